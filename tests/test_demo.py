"""`relax demo --quick`: every stage runs and writes its files (a smoke test, not the targets).

The quick preset trains untrained-scale models, so its accuracies mean
nothing; what is checked is the pipeline: checkpoints in Hugging Face format
that `relax.load_hf` reads back, the filtered problems, results.json with
every strategy and the demo's summary fields, the table and the plot, and
stage caching.
"""

import json
import os

import pytest

from relax.data.placement import call_placement
from relax.demo.cache import Stages
from relax.demo.cli import main, parse_args
from relax.demo.config import PretrainConfig, load_demo_config
from relax.demo.stages import reference_examples
from relax.errors import ConfigError
from relax.eval.report import seed_spread, summary_table

STRATEGIES = (
    "slm",
    "grpo_slm",
    "llm",
    "relay",
    "teacher_free",
    "random_router",
    "entropy_router",
    "relay_simple",
    "relay_unmasked",
    "fixed_n",
)


def test_stage_cache_reuses_and_fresh_retrains(tmp_path):
    st = Stages(str(tmp_path), fresh=False)
    settings = {"a": 1, "model": PretrainConfig()}
    assert not st.done("x", settings)
    st.start("x")
    st.finish("x", settings, {"k": 2})
    assert st.done("x", settings)
    assert not st.done("x", {"a": 2, "model": PretrainConfig()})
    assert st.info("x")["info"] == {"k": 2}
    assert not Stages(str(tmp_path), fresh=True).done("x", settings)


def test_config_presets_load_and_overrides_apply():
    args = parse_args(["--quick", "grpo.steps=3", "task.num_items=9"])
    cfg = load_demo_config(args)
    assert cfg.grpo.steps == 3 and cfg.task.num_items == 9
    full = load_demo_config(parse_args([]))
    assert full.out == "runs/demo"
    with pytest.raises(ConfigError, match=r"unknown keys \['nope'\]"):
        load_demo_config(parse_args(["nope=1"]))


def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    assert main(["--quick", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert set(STRATEGIES) <= set(res["strategies"])
    for name in STRATEGIES:
        m = res["strategies"][name]
        assert 0.0 <= m["accuracy"] <= 100.0
        assert 0.0 <= m["llm_token_share"] <= 100.0
        assert m["llm_prefill_tokens"] >= 0.0
    assert res["strategies"]["slm"]["llm_token_share"] == 0.0
    assert res["strategies"]["llm"]["llm_token_share"] == 100.0
    assert res["strategies"]["teacher_free"]["llm_token_share"] == 0.0
    assert "gap_closed" in res and res["wall_time_s"] > 0
    for f in ("results.md", "results.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    import relax

    assert res["config"]["fixed_n_used"].keys() == {"fixed_n"}  # the relay's mean call length
    for stage in ("llm", "slm", "warmup", "relay", "grpo_slm", "relay_simple", "relay_unmasked"):
        path = os.path.join(out, stage, "model")
        assert os.path.exists(os.path.join(path, "config.json"))
        assert os.path.exists(os.path.join(path, "tokenizer.json"))
    model, params = relax.load_hf(os.path.join(out, "relay", "model"), dtype="float32")
    assert model.config.vocab_size == len(relax.load_tokenizer(os.path.join(out, "relay", "model")))
    assert os.path.exists(os.path.join(out, "filter", "problems.jsonl"))


def test_reference_examples_mask_the_commands_they_insert(tmp_path):
    import re

    import relax
    from relax.data import synthetic

    tok = relax.load_tokenizer(synthetic.save_tokenizer(str(tmp_path / "tok")))
    problems = synthetic.make_dataset(40, 3, synthetic.TaskConfig(num_items=8))
    plain = reference_examples(tok, problems)
    noisy = reference_examples(tok, problems, read_commands=3, seed=1)
    inserted = 0
    for p, a, b in zip(problems, plain, noisy):
        assert a["prompt_ids"] == b["prompt_ids"] and set(a["response_mask"]) == {1.0}
        kept = [t for t, m in zip(b["response_ids"], b["response_mask"]) if m]
        assert kept == a["response_ids"]  # unmasked tokens: exactly the solution + EOS
        masked = tok.decode([t for t, m in zip(b["response_ids"], b["response_mask"]) if not m])
        commands = re.findall(r"<call>[1-9]</call>", masked)
        assert "".join(commands) == masked and len(commands) <= 3
        inserted += len(commands)
        assert (
            re.sub(r"<call>[1-9]</call>", "", tok.decode(b["response_ids"][:-1])) == p["solution"]
        )
    assert 40 <= inserted <= 80  # 0..3 per solution, 1.5 on average


def test_reference_examples_mask_unknown_prices(tmp_path):
    """`unknown` items: their prices, and nothing else, are masked out of the loss, also
    when inserted commands move them (or sit right before or after them); the text the
    model reads is the whole solution."""
    import re

    import relax
    from relax.data import synthetic

    task = synthetic.TaskConfig(num_items=8, min_sold=2, max_sold=2, layout="inline")
    tok = relax.load_tokenizer(synthetic.save_tokenizer(str(tmp_path / "tok"), task))
    problems = synthetic.make_dataset(60, 3, task)
    unknown = set(list(synthetic.catalog(task))[4:])
    shifted = 0
    for read in (0, 3):
        examples = reference_examples(tok, problems, read, seed=2, unknown=unknown)
        for p, e in zip(problems, examples):
            ids, mask = e["response_ids"], e["response_mask"]
            hidden = tok.decode([t for t, m in zip(ids, mask) if not m])
            want = [
                p["solution"][a:b]
                for (a, b), i in zip(p["hard_spans"], p["hard_items"])
                if i in unknown
            ]
            assert re.sub(r"<call>[1-9]</call>", "", hidden) == "".join(want)
            assert re.sub(r"<call>[1-9]</call>", "", tok.decode(ids[:-1])) == p["solution"]
            shifted += bool(read and want and e["commands"])
    assert shifted > 10
    with pytest.raises(ValueError, match="unknown_items"):
        PretrainConfig(unknown_items="forgotten")


def test_seed_spread_means_and_std():
    """Several seeds: per-seed values, field-wise means of the summaries, and the table
    with mean ± std (sample std: values 40 and 60 give 50 ± 14.1)."""

    def one(acc, share, gap, placed):
        avg = {"accuracy": acc, "call_ratio": share, "llm_prefill_tokens": 2.0, "calls": 1.0}
        return {
            "summary": {"relay": {"benchmarks": {"b": dict(avg)}, "average": avg}},
            "gap_closed": gap,
            "call_placement": {"share": placed},
        }

    spread, summary = seed_spread([one(40.0, 1.0, 0.5, 0.8), one(60.0, 3.0, 0.7, 0.6)])
    assert spread["relay"] == {"accuracy": [40.0, 60.0], "call_ratio": [1.0, 3.0]}
    assert spread["gap_closed"] == [0.5, 0.7] and spread["call_placement"] == [0.8, 0.6]
    from relax.eval.report import markdown_spread

    text = markdown_spread(spread)
    assert (
        "Relay calls starting within 2 tokens before a hard step: 70.0 ± 14.1 % (2 seeds)" in text
    )
    assert "call_placement" not in text
    assert summary["relay"]["average"]["accuracy"] == 50.0
    assert summary["relay"]["benchmarks"]["b"]["call_ratio"] == 2.0
    table = summary_table(
        {"summary": summary, "gap_closed": 0.6, "seeds": [0, 1]}, wall=1.0, spread=spread
    )
    assert "| relay | 50.0 ± 14.1 | 2.00 ± 1.41 |" in table
    assert "gap closed by relay: 60.0% ± 14.1 (mean ± std of 2 seeds)" in table


def test_call_placement_counts_honoured_calls_near_a_price(tmp_path):
    """A call is at a hard step when the next price (commands removed) starts at most two
    tokens after it; only a record's first `calls` commands count (honoured ones)."""
    import relax
    from relax.data import synthetic

    tok = relax.load_tokenizer(synthetic.save_tokenizer(str(tmp_path / "tok")))
    records = [
        # right before the first price: at a hard step
        {
            "response": "<call>2</call>37. 37+5: 7+5=12 carry 1. 3+1=4. So 42. \\boxed{42}",
            "calls": 1,
        },
        # inside a price, the next price far away: not
        {"response": "37. 3<call>2</call>7+5: 7+5=12 carry 1. So 42. 50. \\boxed{92}", "calls": 1},
        # one token (the space) before a mid-solution price: at a hard step
        {
            "response": "5+4: 5+4=9 carry 0. So 9.<call>2</call> 37. 9+37: So 46. \\boxed{46}",
            "calls": 1,
        },
        # the second command was not honoured (calls = 1): not counted
        {"response": "<call>2</call>37. <call>1</call>37+5: So 42. \\boxed{42}", "calls": 1},
        # a call before a sum, no price after it: not
        {"response": "5+4: <call>3</call>5+4=9 carry 0. So 9. \\boxed{9}", "calls": 1},
        # inline layout: right after "for", before the price: at a hard step
        {
            "response": "First: 4 more. 5+4: So 9. Second: bivo for <call>2</call>37. So 46.",
            "calls": 1,
        },
        # inline layout: before the event's marker, far ahead of the price: not
        {"response": "So 9. <call>2</call>Second: bivo for 37. So 46.", "calls": 1},
    ]
    placement = call_placement(records, tok)
    assert placement == {"commands": 7, "at_hard_step": 4, "within_tokens": 2, "share": 4 / 7}
    assert call_placement([], tok)["share"] is None
