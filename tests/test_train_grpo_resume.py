"""`relax grpo` end to end: two jax.distributed processes match one process; SIGTERM
saves the step, prints one line and exits 143, and the rerun resumes bit-identically.

Four runs of one 2-step command (random tiny SLM and LLM), each a subprocess: 2
processes x 2 CPU devices, beside them one process of 4 devices stopped by SIGTERM
during step 1; then the uninterrupted run (the oracle of both checks) and the stopped
run's rerun, which load the stopped run's compiled programs from a JAX compilation
cache instead of compiling them again (the 2-process programs differ).

The random models solve nothing and never call the LLM: every reward would be 0, every
advantage 0, and an update nothing but weight decay, which any two runs agree on. So the
runs grade with ``half_right`` instead of ``relax.grade`` (set on ``relax.train.cli``, which calls it) (as tests/test_pipeline.py
replaces it): about half the responses count as correct, by a hash of their text, so the
groups' rewards differ and the updates follow real policy gradients. ``LAUNCH`` installs
it and runs ``relax``.
"""

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from relax.data.synthetic import make_dataset
from relax.train.grpo_train import step_problems
from relax.train.metrics import read_metrics, read_runtime
from tests.test_train_interrupt import assert_stopped, leaves, no_tmp
from tests.test_train_resume import MODEL, ROOT, saved_params

STEPS = 2
LAUNCH = (
    "import sys, relax; from tests.test_train_grpo_resume import half_right; "
    "import relax.train.cli; relax.train.cli.grade = half_right; from relax.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def half_right(response_text, answer, **kw):
    """``relax.grade``'s signature; True for about half the texts (CRC-32 parity)."""
    return zlib.crc32(response_text.encode()) % 2 == 0


def argv(out, data, *extra):
    return [
        "--config",
        "train-tiny",
        "--no-progress",
        f"run.output_dir={out}",
        "slm=",  # random models of model_config / llm_config
        "llm=",
        "tokenizer=synthetic",
        f"data={data}",
        MODEL,
        MODEL.replace("model_config", "llm_config", 1),
        "group_size=2",
        "prompts_per_step=4",  # 8 rows a step: 2 a device, on 1 x 4 or 2 x 2 devices
        "mini_batch_prompts=2",  # 2 updates a step
        f"steps={STEPS}",
        "rollout_batch_size=0",
        "relay.max_new_tokens=8",
        "relay.max_call_tokens=4",
        "run.micro_batch_size=1",
        "run.checkpoint_every=1000",  # only the stop's checkpoint and the final one
        "run.export=false",
        *extra,
    ]


def launch(out, data, env, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "grpo", *argv(out, data)],
        cwd=ROOT,
        env=env,
        text=True,
        **kw,
    )


def distributed_env(i, port=12397):
    return dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )


def write_problems(path):
    """synthetic:64:1's problems as JSONL, but process 0's two problems of step 1 ask
    "Sum?": their prompts pad to 16 positions, process 1's to 64, and the two processes
    must roll out at one width (a 1-process run's). Their order is the run's (train-tiny's
    run.seed 0)."""
    rows = make_dataset(64, 1)
    cfg = SimpleNamespace(prompts_per_step=4, run=SimpleNamespace(seed=0))
    short = set(step_problems(0, len(rows), cfg)[:2].tolist())
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"question": "Sum?" if i in short else r["question"],
                                "answer": r["answer"]}) + "\n")  # fmt: skip
    return str(path)


def wait_for_start(proc, out, timeout=300):
    """Poll metrics.jsonl until the run has logged where it runs (the models are loaded
    and the first step is next)."""
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and read_runtime(path):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run did not start in {timeout} s")


def finish(proc, timeout=600):
    """(exit code, what it printed on the pipes) of a run, killed after ``timeout`` s."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, (out or "") + (err or "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("grpo")
    data = write_problems(base / "problems.jsonl")
    ref, out, multi = str(base / "ref"), str(base / "out"), str(base / "multi")
    cached = dict(  # 1 process x 4 devices, compiled programs kept in base/jax-cache
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_COMPILATION_CACHE_DIR=str(base / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    logged = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    procs = [launch(multi, data, distributed_env(i), **logged) for i in range(2)]
    try:
        first = launch(out, data, cached, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(first)
        wait_for_start(first, out)
        # The runtime row is written just before TrainRun's last look at the signal flag;
        # a second later the run is well into step 1 (compiling it takes far longer).
        time.sleep(1.0)
        first.send_signal(signal.SIGTERM)
        rc, err = finish(first)
        stopped = {
            "rc": rc,
            "err": err,
            "listing": sorted(os.listdir(os.path.join(out, "ckpt"))),
            "tmp": no_tmp(out),
            "rows": read_metrics(out),
        }
        # Its programs are those of every later step: these two load them from the cache.
        procs += [launch(ref, data, cached, **logged), launch(out, data, cached, **logged)]
        ends = {"ref": finish(procs[3]), "rerun": finish(procs[4])}
        logs = [finish(p) for p in procs[:2]]
    finally:
        for p in procs:  # a failed set-up leaves no run behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"ref": ref, "out": out, "multi": multi, "stopped": stopped, "ends": ends, "logs": logs}


def without_time(row):
    return {k: v for k, v in row.items() if k != "time"}


def test_grpo_updates_are_real(runs):
    """The premise: the uninterrupted run ends with 0, each step's groups have unequal
    rewards, so the updates follow policy gradients (not weight decay alone) and step 2
    moves the params far more than the 1e-6 the two-process check allows."""
    rc, log = runs["ends"]["ref"]
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    rows = read_metrics(runs["ref"])
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["accuracy"] < 1 and r["grad_norm"] > 1e-3, r
    p1, p2 = saved_params(runs["out"], 1)[0], saved_params(runs["ref"], 2)[0]
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(leaves(p1), leaves(p2), strict=True)]
    assert max(moved) > 1e-5, moved


def test_two_processes_match_one(runs):
    """jax.distributed on localhost (CPU collectives): 2 processes x 2 devices, each
    rolling out and training on its half of every step's rows, end with 0 and give the
    1-process run's metrics (rollout statistics equal, losses to 1e-5) and step-2 params
    to 1e-6."""
    for rc, log in runs["logs"]:
        assert rc == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    assert [r["runtime"]["processes"] for r in read_runtime(runs["multi"])] == [2]
    one, two = read_metrics(runs["ref"]), read_metrics(runs["multi"])
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        a, b = without_time(a), without_time(b)
        assert a.keys() == b.keys()
        for k in ("reward", "accuracy", "call_rate", "response_tokens", "train_width"):
            assert a[k] == b[k], (k, a[k], b[k])
        np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=1e-5, atol=1e-6)
    p_one, step_one, pos_one = saved_params(runs["ref"], STEPS)
    p_two, step_two, pos_two = saved_params(runs["multi"], STEPS)
    assert (step_one, pos_one) == (step_two, pos_two) == (STEPS, STEPS * 4)
    for a, b in zip(leaves(p_one), leaves(p_two), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_sigterm_saves_the_step_and_exits_143(runs):
    """SIGTERM during step 1 (its compilation and rollouts): the step ends, is saved, one
    line names it, exit 143, no traceback, no orbax temporary folder."""
    s = runs["stopped"]
    step, where = assert_stopped(s["rc"], s["err"], "SIGTERM", 143, command="grpo")
    assert (step, where) == (1, os.path.join(runs["out"], "ckpt"))
    assert s["listing"] == ["1"] and s["tmp"] == []
    assert [r["step"] for r in s["rows"]] == [1]
    _, saved_step, position = saved_params(runs["out"], 1)
    assert (saved_step, position) == (1, 4)


def test_resume_after_sigterm_is_bit_identical(runs):
    """The rerun restores step 1 and runs step 2: its rollouts, rewards and losses equal the
    uninterrupted run's exactly, and so do the step-2 params (np.array_equal)."""
    rc, log = runs["ends"]["rerun"]
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    ref_rows, rows = read_metrics(runs["ref"]), read_metrics(runs["out"])
    assert [r["step"] for r in rows] == [1, 2]
    assert [without_time(r) for r in rows] == [without_time(r) for r in ref_rows]
    assert without_time(runs["stopped"]["rows"][0]) == without_time(ref_rows[0])
    assert [r["from_step"] for r in read_runtime(runs["out"])] == [0, 1]
    p_ref, _, _ = saved_params(runs["ref"], STEPS)
    p_out, step, _ = saved_params(runs["out"], STEPS)
    assert step == STEPS
    for a, b in zip(leaves(p_ref), leaves(p_out), strict=True):
        assert np.array_equal(a, b)
    assert no_tmp(runs["out"]) == []
