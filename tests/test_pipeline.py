"""The five stages in the README's order on the train-tiny preset, each reading the files the
one before wrote: sample -> sft -> filter -> grpo -> eval, through `relax.cli.main` in this
process at the smallest sizes (about a minute on 2 CPU cores).

The tiny random models solve nothing, so the train CLI's `grade` is replaced by a grader that accepts
every response: sample keeps every sample and filter every problem, which is what lets the
next stage run (grading has its own tests, tests/test_grading.py). `relax sample`'s rerun
skips what is done.
"""

import json

import pytest

import relax.train.cli as train_cli
from relax.cli import main
from relax.train.metrics import read_metrics
from tests.test_train_resume import MODEL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sample_sft_filter_grpo_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "grade", lambda response, answer, **kw: True)
    d = str(tmp_path)
    common = ["--config", "train-tiny", "--no-progress"]
    sample = [
        "sample", *common, f"output={d}/solutions.jsonl", "data=synthetic:4:2", "k=2",
        "batch_size=4", "relay.max_new_tokens=8", MODEL,
    ]  # fmt: skip
    assert main(sample) == 0
    solutions = rows(f"{d}/solutions.jsonl")
    assert len(solutions) == 8  # 4 problems x k = 2, all graded correct
    assert all(r["enable_thinking"] is False and r["response"] is not None for r in solutions)
    assert [r["correct"] for r in rows(f"{d}/solutions.jsonl.all.jsonl")] == [2, 2, 2, 2]
    capsys.readouterr()
    assert main(sample) == 0  # the rerun: everything is done
    assert "sampled 0 problems x 2 (4 done before, skipped)" in capsys.readouterr().out
    assert len(rows(f"{d}/solutions.jsonl")) == 8

    tok = f"{d}/tokenizer"  # the synthetic tokenizer sample wrote beside its output
    assert main([
        "sft", *common, f"data={d}/solutions.jsonl", f"tokenizer={tok}", f"run.output_dir={d}/sft",
        "batch_size=4", "epochs=1", "run.micro_batch_size=1", MODEL,
    ]) == 0  # fmt: skip
    assert [r["step"] for r in read_metrics(f"{d}/sft")] == [1, 2]  # 8 rows / 4, one epoch
    with open(f"{d}/sft/run_config.json") as f:
        assert json.load(f)["enable_thinking"] is False

    sft = f"{d}/sft/final"  # the tiny teacher too: any checkpoint of the contract serves
    assert main([
        "filter", *common, f"llm={sft}", f"tokenizer={sft}", "data=synthetic:4:1",
        f"output={d}/filtered.jsonl", "k=2", "batch_size=4", "relay.max_new_tokens=8", "dtype=float32",
    ]) == 0  # fmt: skip
    filtered = rows(f"{d}/filtered.jsonl")
    assert len(filtered) == 4 and all(r["pass_rate"] == 1.0 for r in filtered)
    assert all(r["enable_thinking"] is False for r in filtered)

    assert main([
        "grpo", *common, f"slm={sft}", f"llm={sft}", f"tokenizer={sft}",
        f"data={d}/filtered.jsonl", f"run.output_dir={d}/grpo", "group_size=2",
        "prompts_per_step=4", "mini_batch_prompts=2", "max_prompt_len=256", "steps=1",
        "rollout_batch_size=0", "relay.max_new_tokens=8", "relay.max_call_tokens=4",
        "run.micro_batch_size=1",
    ]) == 0  # fmt: skip
    assert [r["step"] for r in read_metrics(f"{d}/grpo")] == [1]

    assert main([
        "eval", "--slm", f"{d}/grpo/final", "--llm", sft, "--strategies", "slm,relay",
        "--benchmarks", f"tiny={d}/filtered.jsonl", "--limit", "2", "--max-new-tokens", "8",
        "--dtype", "float32", "--batch-size", "4", "--out", f"{d}/eval", "--no-progress",
    ]) == 0  # fmt: skip
    with open(f"{d}/eval/results.json") as f:
        results = json.load(f)
    assert results["config"]["enable_thinking"] is False
    assert {"slm", "relay"} <= set(json.dumps(results["summary"]).replace('"', " ").split())


def test_thinking_mode_mismatches_and_foreign_outputs_are_one_line(tmp_path, capsys):
    """Refused before any model loads, exit 2: relax sample in thinking mode (its prompts
    are the non-thinking ones), sft on rows sampled in the other mode, and a sample output
    that holds rows relax sample did not record (it would be rewritten)."""
    data = tmp_path / "thinking.jsonl"
    data.write_text(json.dumps({"question": "q", "response": "r", "enable_thinking": True}) + "\n")
    assert main(["sample", "--config", "train-tiny", "enable_thinking=true"]) == 2
    assert "sample.enable_thinking=true is not supported" in capsys.readouterr().err
    assert main(["sft", "--config", "train-tiny", f"data={data}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relax sft: data ") and "enable_thinking=True" in err, err
    from relax.errors import DataError
    from relax.train.sample import _resume

    with pytest.raises(DataError, match="no relax sample run recorded"):
        _resume(str(data), [{"question": "q", "answer": "1"}])
    assert data.read_text().count("\n") == 1  # untouched
