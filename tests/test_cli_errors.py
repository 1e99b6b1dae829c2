"""A user's mistakes end in one line, `relax <cmd>: <what> (<fix>)`, exit code 2, no traceback.

Each case runs the real `relax` command in a subprocess (as a user would) and
asserts the message, the exit code and that stderr holds no traceback. The
checkpoint is a tiny random model in Hugging Face format with the synthetic
task's tokenizer, written once for the module.
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import relax
from relax.data import synthetic
from relax.data.loaders import BenchmarkUnavailable, load_benchmark
from relax.errors import InputError
from relax.train.metrics import read_metrics, read_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relax_cli(*args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "relax.cli", *args],
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line(rc, err, cmd, *needles):
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"relax {cmd}: ")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint folder (weights, config, tokenizer) and a valid benchmark file."""
    base = tmp_path_factory.mktemp("cli")
    tok_dir = synthetic.save_tokenizer(str(base / "tok"))
    tok = relax.load_tokenizer(tok_dir)
    cfg = relax.ModelConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    model = relax.Model(cfg)
    path = str(base / "model")
    relax.save_hf(model, model.init_params(jax.random.key(0)), path)
    tok.save_pretrained(path)
    bench = base / "bench.jsonl"
    bench.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return {"base": base, "model": path, "bench": str(bench), "tok": tok, "net": model}


def copy_model(ckpt, name):
    import shutil

    dst = str(ckpt["base"] / name)
    shutil.copytree(ckpt["model"], dst)
    return dst


def eval_args(slm, bench, out):
    return ["eval", "--slm", slm, "--strategies", "slm", "--benchmarks", f"b={bench}",
            "--out", out, "--max-new-tokens", "4", "--no-progress"]  # fmt: skip


def test_eval_missing_slm_folder_names_the_flag(tmp_path):
    rc, _, err = relax_cli("eval", "--slm", str(tmp_path / "nope"), "--strategies", "slm")
    assert_one_line(rc, err, "eval", "--slm", "no such folder")
    assert "tokenizer folder" not in err


def test_eval_truncated_safetensors_names_the_file(ckpt, tmp_path):
    path = copy_model(ckpt, "truncated")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    rc, _, err = relax_cli(*eval_args(path, ckpt["bench"], str(tmp_path / "out")))
    assert_one_line(rc, err, "eval", weights, "truncated or corrupt")


def test_eval_unsupported_model_type_is_one_line(ckpt, tmp_path):
    path = copy_model(ckpt, "gpt2")
    config = os.path.join(path, "config.json")
    doc = json.load(open(config))
    json.dump(dict(doc, model_type="gpt2"), open(config, "w"))
    rc, _, err = relax_cli(*eval_args(path, ckpt["bench"], str(tmp_path / "out")))
    assert_one_line(rc, err, "eval", "config.json", "unsupported model_type 'gpt2'")
    assert "During handling" not in err and "direct cause" not in err


def test_eval_empty_benchmark_fails_before_any_model_runs(ckpt, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    rc, stdout, err = relax_cli(*eval_args(ckpt["model"], str(empty), str(out)))
    assert_one_line(rc, err, "eval", str(empty), "no rows")
    assert not out.exists()  # nothing was written: no half report


def test_eval_malformed_jsonl_names_file_and_line(ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n')
    rc, _, err = relax_cli(*eval_args(ckpt["model"], str(bad), str(tmp_path / "out")))
    assert_one_line(rc, err, "eval", f"{bad}: line 3 is not valid JSON")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["steps=abc"], ["steps: expected int, got 'abc'"]),
        (["foo=1"], ["unknown keys ['foo']", "known keys:"]),
        (["--config", "nope"], ["--config nope", "no preset 'nope'", "train-tiny"]),
        (["--no-progress"], ["no --config given", "--config train-tiny"]),
        # values a run would take silently (train nothing, export random weights) or crash on
        (["steps=-1"], ["steps must be >= 0 (0 = no cap), got -1"]),
        (["epochs=0"], ["epochs must be >= 1, got 0", "exports untrained weights"]),
        (["optim.learning_rate=-1e-3"], ["optim.learning_rate must be > 0, got -0.001"]),
        (["batch_size=0"], ["batch_size must be >= 1, got 0"]),
        (["run.dtype=float8"], ["run.dtype must be float32 or bfloat16, got 'float8'"]),
        # an override after an option is an override, not an unknown argument
        (["--no-progress", "steps=2", "--print-config", "foo=1"], ["unknown keys ['foo']"]),
    ],
)
def test_sft_config_mistakes(args, needles):
    if "--config" not in args and "no --config given" not in needles:
        args = ["--config", "train-tiny", *args]
    rc, _, err = relax_cli("sft", *args)
    assert_one_line(rc, err, "sft", *needles)


def test_overrides_may_follow_options():
    rc, out, err = relax_cli(
        "sft", "--config", "train-tiny", "steps=3", "--no-progress", "batch_size=4",
        "--print-config", "run.dtype=bfloat16",
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    cfg = json.loads(out)
    assert (cfg["steps"], cfg["batch_size"], cfg["run"]["dtype"]) == (3, 4, "bfloat16")


def test_grpo_on_an_empty_problem_file_fails_before_loading(tmp_path):
    empty = tmp_path / "problems.jsonl"
    empty.write_text("\n")
    rc, _, err = relax_cli("grpo", "--config", "train-tiny", f"data={empty}", "--no-progress")
    assert_one_line(rc, err, "grpo", f"data {empty}: no rows")


def test_demo_takes_no_progress_and_trailing_overrides(tmp_path):
    # --no-progress is accepted, and seeds=0 after it is read as an override
    rc, _, err = relax_cli(
        "demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo"), "seeds=0"
    )
    assert_one_line(rc, err, "demo", "seeds must be >= 1, got 0")


def test_debug_shows_the_traceback(tmp_path):
    rc, _, err = relax_cli("sft", "--config", "train-tiny", "steps=abc", env={"RELAX_DEBUG": "1"})
    assert rc != 0 and "Traceback" in err and "ConfigError" in err


def test_sft_prints_its_planned_steps(tmp_path):
    """steps is a cap: the run says it trains 8 steps and why, not silently fewer."""
    rc, out, err = relax_cli(
        "sft", "--config", "train-tiny", "--no-progress", "steps=40",
        f"run.output_dir={tmp_path}", "run.export=false", "data=synthetic:64:0", "batch_size=8",
        "max_len=160", "run.micro_batch_size=2", "model_config={vocab_size: 160, hidden_size: 16, intermediate_size: 32, num_layers: 1, "
        "num_heads: 2, num_kv_heads: 1, head_dim: 8}",
    )  # fmt: skip
    assert rc == 0, err[-3000:]
    assert (
        "[sft] 6 steps = 2 epoch(s) x 3 batches of 8 from 28 examples; steps=40 is only a cap "
        "(raise epochs for more steps) (36 of 64 examples are longer than max_len=160 and dropped)"
    ) in out
    # where it runs: one line on stderr, a warning that 4 devices share the CPU, and a record
    lines = [line for line in err.splitlines() if line.startswith("relax sft runs on ")]
    assert lines == [
        f"relax sft runs on cpu: 4 x cpu of 4 visible, 1 process, mesh data=4 fsdp=1 model=1 "
        f"(jax {jax.__version__})"
    ], err[-3000:]
    assert err.count("4 devices on CPU-only jax") == 1
    (row,) = read_runtime(str(tmp_path))
    assert row["from_step"] == 0 and row["runtime"]["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
    assert len(read_metrics(str(tmp_path))) == 6  # the step rows alone


def test_benchmark_columns_are_explicit(tmp_path):
    """A `solution` column is never graded as the answer; the columns used are recorded."""
    path = tmp_path / "sol.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "solution": "1+1=2, so \\boxed{2}"}) + "\n")
    with pytest.raises(
        BenchmarkUnavailable, match=r"no column for the answer.*'solution'|solution"
    ):
        load_benchmark("mine", path=str(path))
    bench = load_benchmark("mine", path=str(path), fields={"answer": "solution"})
    assert dict(bench.columns) == {"question": "problem", "answer": "solution"}
    assert bench.source == str(path)
    with pytest.raises(BenchmarkUnavailable, match="no column 'gold'"):
        load_benchmark("mine", path=str(path), fields={"answer": "gold"})


def test_prompt_ids_outside_the_vocabulary_are_an_error(ckpt):
    model = ckpt["net"]
    params = model.init_params(jax.random.key(0))
    vocab = model.config.vocab_size
    prompts = np.array([[1, 2, 3], [4, vocab + 7, 0]], np.int32)
    cfg = relax.RelayConfig(max_new_tokens=2, eos_ids=(0,), pad_id=0)
    with pytest.raises(
        InputError, match=rf"id {vocab + 7} at row 1, slot 1 .* vocabulary of {vocab}"
    ):
        relax.generate(model, params, prompts, np.array([3, 2]), jax.random.key(0), cfg)
    # Past a row's length the prompt is padding: any value there is ignored.
    out = relax.generate(model, params, prompts, np.array([3, 1]), jax.random.key(0), cfg)
    assert out.tokens.shape == (2, 5)


def test_a_call_of_zero_rows_is_an_error(ckpt):
    model = ckpt["net"]
    params = model.init_params(jax.random.key(0))
    cfg = relax.RelayConfig(max_new_tokens=2, eos_ids=(0,), pad_id=0)
    for prompts in (np.zeros((0, 3), np.int32), np.zeros((2, 0), np.int32)):
        lens = np.ones(prompts.shape[:1], np.int32)
        with pytest.raises(InputError, match=r"a call needs at least one row of at least one"):
            relax.generate(model, params, prompts, lens, jax.random.key(0), cfg)


def test_budget_past_max_positions_warns_once(ckpt):
    import dataclasses

    model = dataclasses.replace(
        ckpt["net"], config=dataclasses.replace(ckpt["net"].config, max_position_embeddings=4)
    )
    params = model.init_params(jax.random.key(0))
    cfg = relax.RelayConfig(max_new_tokens=3, eos_ids=(0,), pad_id=0)
    prompts, lens = jnp.ones((1, 2), jnp.int32), jnp.array([2])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        relax.generate(model, params, prompts, lens, jax.random.key(0), cfg)
        relax.generate(model, params, prompts, lens, jax.random.key(1), cfg)
    texts = [str(w.message) for w in seen if "max_position_embeddings" in str(w.message)]
    assert len(texts) == 1 and "5 tokens exceeds its max_position_embeddings (4)" in texts[0]


def test_eval_text_named_parquet_is_one_line(ckpt, tmp_path):
    fake = tmp_path / "bench.parquet"
    fake.write_text('{"question": "1+1?", "answer": "2"}\n')
    rc, _, err = relax_cli(*eval_args(ckpt["model"], str(fake), str(tmp_path / "out")))
    assert_one_line(rc, err, "eval", f"{fake}: not a readable Parquet file")


def test_eval_non_utf8_line_names_file_and_line(ckpt, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    rc, _, err = relax_cli(*eval_args(ckpt["model"], str(bad), str(tmp_path / "out")))
    assert_one_line(rc, err, "eval", f"{bad}: line 2 is not UTF-8 text (byte 0xe9)")


def test_eval_limit_zero_is_one_line(ckpt, tmp_path):
    args = [*eval_args(ckpt["model"], ckpt["bench"], str(tmp_path / "out")), "--limit", "0"]
    rc, _, err = relax_cli(*args)
    assert_one_line(rc, err, "eval", "--limit 0: must be >= 1")


def test_eval_out_naming_a_file_fails_before_anything_loads(ckpt, tmp_path):
    out = tmp_path / "results.json"
    out.write_text("{}")
    # batch_size=2 after the options: an override there is read, not rejected
    rc, stdout, err = relax_cli(*eval_args(ckpt["model"], ckpt["bench"], str(out)), "batch_size=2")
    assert_one_line(rc, err, "eval", f"--out {out}: is a file, not a folder")
    assert "[eval]" not in stdout  # no benchmark was read
    assert out.read_text() == "{}"


@pytest.mark.parametrize("damage", ["int32", "nan"])
def test_eval_weights_that_are_not_finite_floats_name_the_tensor(ckpt, tmp_path, damage):
    from safetensors.numpy import load_file, save_file

    path = copy_model(ckpt, f"weights-{damage}")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    if damage == "int32":
        tensors[name] = tensors[name].astype(np.int32)
        needle = f"tensor {name!r} is stored as int32, not as floats"
    else:
        tensors[name] = tensors[name].copy()
        tensors[name][0, :3] = np.nan
        needle = f"tensor {name!r} holds 3 NaN or infinite values of {tensors[name].size}"
    save_file(tensors, weights)
    rc, _, err = relax_cli(*eval_args(path, ckpt["bench"], str(tmp_path / "out")))
    assert_one_line(rc, err, "eval", weights, needle)


def test_more_devices_than_visible_is_one_line_before_loading(ckpt, tmp_path):
    # this process and its children see 4 fake CPU devices (tests/conftest.py)
    rc, stdout, err = relax_cli(
        *eval_args(ckpt["model"], ckpt["bench"], str(tmp_path)), "--devices", "5"
    )
    assert_one_line(rc, err, "eval", "--devices 5: only 4 cpu devices are visible", "relax[cuda12]")
    assert "[eval]" not in stdout
    rc, _, err = relax_cli("sft", "--config", "train-tiny", "mesh.data=3", "model=/nonexistent")
    assert_one_line(
        rc,
        err,
        "sft",
        "mesh.data=3 mesh.fsdp=1 mesh.model=1 needs 3 devices, but 4 cpu devices are visible",
    )
    rc, _, err = relax_cli("sft", "--config", "train-tiny", "run.num_devices=8")
    assert_one_line(rc, err, "sft", "run.num_devices 8: only 4 cpu devices are visible")


def test_eval_pair_with_different_tokenizers_is_one_line(ckpt, tmp_path):
    """Token ids pass between the two models: an LLM folder whose tokenizer is another one
    (here Qwen3's beside the synthetic task's) is refused before any weights load."""
    import shutil

    from tests.scripted import qwen_tokenizer_dir

    llm = copy_model(ckpt, "other-tokenizer")
    for name in os.listdir(llm):
        if name not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(llm, name))
    for name in os.listdir(qwen_tokenizer_dir()):
        shutil.copy(os.path.join(qwen_tokenizer_dir(), name), llm)
    args = eval_args(ckpt["model"], ckpt["bench"], str(tmp_path / "out"))
    args[args.index("slm", 3)] = "relay"  # --strategies relay
    rc, _, err = relax_cli(*args, "--llm", llm)
    assert_one_line(rc, err, "eval", f"the LLM's tokenizer in {llm} differs from the SLM's")
