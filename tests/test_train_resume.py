"""`relax sft` end to end: SIGKILL + resume is bit-identical; two jax.distributed
processes match one process (data-parallel, and on an fsdp mesh spanning both); the
exported model loads in transformers.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from relax.train import cli
from relax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = (
    "model_config={family: qwen3, vocab_size: 160, hidden_size: 32, intermediate_size: 64, "
    "num_layers: 1, num_heads: 4, num_kv_heads: 2, head_dim: 8, tie_embeddings: true}"
)


def argv(out, *extra):
    return [
        "--config",
        "train-tiny",
        "--no-progress",
        f"run.output_dir={out}",
        "steps=6",
        "run.checkpoint_every=2",
        "run.keep_checkpoints=3",
        "run.micro_batch_size=2",
        "data=synthetic:64:0",
        "batch_size=8",
        MODEL,
        *extra,
    ]


def run_cli(out, *extra):
    cmd = [sys.executable, "-m", "relax.cli", "sft", *argv(out, *extra)]
    return subprocess.run(
        cmd,
        check=False,
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_distributed(out, port=12391, *extra):
    """Two processes x 2 CPU devices (4 in all, like this process), stopped after step 2."""
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
        )
        cmd = [
            sys.executable,
            "-m",
            "relax.cli",
            "sft",
            *argv(out, "run.kill_at_step=2", "run.export=false", *extra),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def saved_params(out, step):
    """A checkpoint's params as host arrays, whatever mesh (and processes) saved them."""
    import jax

    mgr = ocp.CheckpointManager(
        os.path.join(out, "ckpt"), item_handlers=ocp.StandardCheckpointHandler()
    )
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), mgr.item_metadata(step))
    state = mgr.restore(step, args=ocp.args.StandardRestore(target))
    mgr.close()
    return state["params"], int(state["step"]), int(state["data_position"])


def leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    ref, killed, multi = str(base / "ref"), str(base / "killed"), str(base / "multi")
    procs = start_distributed(multi)
    assert cli.sft(argv(ref)) == 0  # uninterrupted, in this process (same 4 CPU devices)
    first = run_cli(killed, "run.kill_at_step=3", "run.export=false")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert cli.sft(argv(killed, "run.export=false")) == 0  # the resumed run, in this process
    logs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    return ref, killed, multi, logs


def test_sigkill_then_resume_is_bit_identical(runs):
    """A subprocess is SIGKILLed after step 3 (checkpoints at 2, 4, 6); the second
    run (in this process) restores step 2,
    replays 3..6 from the saved rng and data position; params at step 6 are
    bit-identical (np.array_equal) and every replayed loss equals the reference's."""
    ref, killed = runs[:2]
    p_ref, step_ref, pos_ref = saved_params(ref, 6)
    p_res, step_res, pos_res = saved_params(killed, 6)
    assert (step_ref, pos_ref) == (step_res, pos_res) == (6, 48)
    for a, b in zip(leaves(p_ref), leaves(p_res), strict=True):
        assert np.array_equal(a, b)
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(ref)}
    rows = read_metrics(killed)
    # Step 3 ran twice; the resumed run dropped the first run's row for it.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["loss"] == ref_loss[r["step"]]


def test_export_loads_in_transformers(runs):
    ref = runs[0]
    final = os.path.join(ref, "final")
    import jax.numpy as jnp
    import torch
    import transformers

    import relax

    model, params = relax.load_hf(final, dtype=jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = tok("Start 6. 6+3=9.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
    pos = jnp.arange(len(ids))[None]
    got, _ = model.apply(params, jnp.asarray([ids], jnp.int32), pos, None)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    ck, _, _ = saved_params(ref, 6)
    for a, b in zip(leaves(ck), leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_processes_match_one(runs):
    """jax.distributed on localhost (gloo CPU collectives): 2 processes x 2 devices,
    each feeding its half of every global batch, give the params of 1 process x
    4 devices after 2 AdamW steps to 1e-6 (float32; measured ~1e-8)."""
    ref, multi, logs = runs[0], runs[2], runs[3]
    _assert_multi_matches(ref, multi, logs)


def _assert_multi_matches(one, multi, logs):
    """The two processes stopped after step 2, and their step-2 params equal ``one``'s
    to 1e-6."""
    # Each process SIGKILLs itself after step 2's checkpoint. Whichever dies
    # second may instead be aborted by JAX's coordination service, which ends
    # every task once a peer is gone; that race is fine, any other end is not.
    peer_gone = "JAX distributed service detected fatal errors"
    for rc, log in logs:
        assert rc == -signal.SIGKILL or (rc == -signal.SIGABRT and peer_gone in log), log[-3000:]
    assert any(rc == -signal.SIGKILL for rc, _ in logs), [rc for rc, _ in logs]
    p_one, _, _ = saved_params(one, 2)
    p_multi, step, pos = saved_params(multi, 2)
    assert (step, pos) == (2, 16)
    for a, b in zip(leaves(p_one), leaves(p_multi), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_two_processes_match_one_on_an_fsdp_mesh(tmp_path):
    """mesh.fsdp=2 (x data=2) over 2 processes x 2 devices: params, gradients and AdamW
    state sharded across both processes, each process feeding its rows and saving its
    shards; after 2 steps the params equal one process's fsdp=2 run to 1e-6 (measured
    ~2e-8)."""
    multi, one = str(tmp_path / "multi"), str(tmp_path / "one")
    procs = start_distributed(multi, 12393, "mesh.fsdp=2")
    single = run_cli(one, "run.kill_at_step=2", "run.export=false", "mesh.fsdp=2")
    logs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    assert single.returncode == -signal.SIGKILL, single.stderr[-2000:]
    _assert_multi_matches(one, multi, logs)


def test_damaged_newest_checkpoint_resumes_from_an_older_one(runs, tmp_path, capsys):
    """A file deleted inside the newest checkpoint (step 6): the run warns once naming
    step 6, moves it aside (never deletes it), resumes from step 4, replays 5 and 6
    bit-identically, and metrics.jsonl holds each step once."""
    import shutil

    ref = runs[0]
    out = str(tmp_path / "damaged")
    shutil.copytree(ref, out)
    step6 = os.path.join(out, "ckpt", "6")
    # orbax's OCDBT layout keeps the array data in the files of `.../d/` folders.
    victims = [
        os.path.join(d, f)
        for d, _, files in os.walk(step6)
        for f in files
        if os.path.basename(d) == "d"
    ]
    assert victims, sorted(os.listdir(step6))
    for v in victims:
        os.remove(v)
    capsys.readouterr()
    assert cli.sft(argv(out, "run.export=false")) == 0
    err = capsys.readouterr().err
    assert err.count("cannot be restored") == 1 and "checkpoint step 6" in err, err
    assert os.path.isdir(os.path.join(out, "ckpt-broken", "6"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    p_ref, _, _ = saved_params(ref, 6)
    p_new, step, _ = saved_params(out, 6)
    assert step == 6
    for a, b in zip(leaves(p_ref), leaves(p_new), strict=True):
        assert np.array_equal(a, b)
