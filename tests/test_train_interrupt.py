"""`relax sft` stopped by a signal: a checkpoint of the step, one line, exit 143 / 130,
no traceback, no orbax temporary folder; the rerun resumes bit-identically. One run per
``run.output_dir``: a second is one line with exit 2, a dead run's lock does not block.

The run is a subprocess signalled as a scheduler or a Ctrl-C would signal it; the
reference and the resumed runs run in this process (the same 4 CPU devices).
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from relax.train import cli
from relax.train.metrics import read_metrics
from tests.test_train_resume import MODEL, ROOT, saved_params

STEPS = 300  # ~5 s of tiny steps: the signal always lands mid-run


def argv(out, *extra):
    return [
        "--config",
        "train-tiny",
        "--no-progress",
        f"run.output_dir={out}",
        f"steps={STEPS}",
        "epochs=200",
        "run.checkpoint_every=1000",  # only the stop's checkpoint and the final one
        "run.micro_batch_size=2",
        "run.export=false",
        "data=synthetic:64:0",
        "batch_size=8",
        MODEL,
        *extra,
    ]


def start(out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "relax.cli", "sft", *argv(out, *extra)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc, out, step, timeout=240):
    """Poll metrics.jsonl until the run has logged ``step``."""
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(path)):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} logged in {timeout} s")


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_stopped(rc, err, signal_name, code, command="sft"):
    """rc, one final line, no traceback; returns the step the line names (None: before step 1)
    and the checkpoint folder."""
    assert rc == code, (rc, err[-3000:])
    assert "Traceback" not in err and "Segmentation" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"relax {command}: ")]
    assert len(lines) == 1, err[-3000:]
    m = re.fullmatch(
        rf"relax {command}: stopped by {signal_name} (at step (\d+); checkpoint saved in (\S+)|"
        r"before step 1; nothing to save), rerun the same command to resume",
        lines[0],
    )
    assert m, lines[0]
    return (int(m.group(2)), m.group(3)) if m.group(2) else (None, None)


def no_tmp(out):
    ckpt = os.path.join(out, "ckpt")
    return [f for f in os.listdir(ckpt) if "tmp" in f] if os.path.isdir(ckpt) else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupt")
    ref, out = str(base / "ref"), str(base / "out")
    assert cli.sft(argv(ref)) == 0  # uninterrupted
    proc = start(out)
    wait_for_step(proc, out, 2)
    # A second run on the same folder while the first trains: refused before it loads.
    second = subprocess.run(
        [sys.executable, "-m", "relax.cli", "sft", *argv(out)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    running = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    first = (proc.returncode, err, proc.pid)
    listing = sorted(os.listdir(os.path.join(out, "ckpt")))
    tmp = no_tmp(out)
    stopped_rows = read_metrics(out)
    assert cli.sft(argv(out)) == 0  # the rerun: its lock file still names the dead process
    return {
        "ref": ref,
        "out": out,
        "first": first,
        "second": second,
        "running": running,
        "listing": listing,
        "tmp": tmp,
        "stopped_rows": stopped_rows,
    }


def test_sigterm_saves_the_step_and_exits_143(runs):
    rc, err, _ = runs["first"]
    step, where = assert_stopped(rc, err, "SIGTERM", 143)
    assert step is not None and 2 <= step < STEPS, step
    assert where == os.path.join(runs["out"], "ckpt")
    assert runs["listing"] == [str(step)] and runs["tmp"] == []
    assert [r["step"] for r in runs["stopped_rows"]] == list(range(1, step + 1))
    _, saved_step, position = saved_params(runs["out"], step)
    assert (saved_step, position) == (step, step * 8)


def test_resume_after_sigterm_is_bit_identical(runs):
    """The rerun restores the stopped step s and replays s+1 .. STEPS: every loss equals
    the uninterrupted run's (step s+1 included) and the final params are bit-identical."""
    step, _ = assert_stopped(*runs["first"][:2], "SIGTERM", 143)
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(runs["ref"])}
    rows = read_metrics(runs["out"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[step]["step"] == step + 1 and rows[step]["loss"] == ref_loss[step + 1]
    assert all(r["loss"] == ref_loss[r["step"]] for r in rows)
    p_ref, _, _ = saved_params(runs["ref"], STEPS)
    p_out, _, _ = saved_params(runs["out"], STEPS)
    for a, b in zip(leaves(p_ref), leaves(p_out), strict=True):
        assert np.array_equal(a, b)
    assert no_tmp(runs["out"]) == []


def test_a_second_run_on_the_same_folder_is_refused(runs):
    """One line, exit 2, naming the folder and the running process; the first run was
    still training when it came back, and a dead run's lock did not block the rerun
    (the fixture's resume returned 0)."""
    second, pid = runs["second"], runs["first"][2]
    assert runs["running"]
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"relax sft: run.output_dir {runs['out']} is in use by another run"), (
        line
    )
    assert f"(pid {pid})" in line, line
    with open(os.path.join(runs["out"], ".lock")) as f:  # the rerun's own pid, lock released
        assert int(f.read()) == os.getpid()


def test_sigint_during_start_up_exits_130(tmp_path):
    """Ctrl-C while the run loads and compiles: no traceback, no crash; the run stops
    before step 1 (the signal came before TrainRun was ready) or at step 1, saved."""
    out = str(tmp_path / "int")
    proc = start(out)
    assert proc.stdout.readline().startswith("[sft]")  # printed just before TrainRun starts
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    step, _ = assert_stopped(proc.returncode, err, "SIGINT", 130)
    assert step in (None, 1), step
    listing = sorted(os.listdir(os.path.join(out, "ckpt")))
    assert listing == ([] if step is None else ["1"])


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """jax.distributed, 2 processes x 2 CPU devices: SIGTERM to process 1 only. JAX's
    preemption service passes the notice on; both processes save the same step, print
    the same line and exit 143."""
    out = str(tmp_path / "multi")
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS="localhost:12395",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "relax.cli", "sft", *argv(out)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    wait_for_step(procs[0], out, 2)
    procs[1].send_signal(signal.SIGTERM)
    ends = [(p.communicate(timeout=300)[1], p.returncode)[::-1] for p in procs]
    steps = [assert_stopped(rc, err, "SIGTERM", 143)[0] for rc, err in ends]
    assert steps[0] == steps[1] and steps[0] is not None and steps[0] < STEPS, steps
    assert sorted(os.listdir(os.path.join(out, "ckpt"))) == [str(steps[0])]
    _, saved_step, position = saved_params(out, steps[0])
    assert (saved_step, position) == (steps[0], steps[0] * 8)
