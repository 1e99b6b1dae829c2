"""scripts/bench_accel.py --tiny: the accelerator benchmark's code path at toy shapes on CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_accel_tiny_prints_one_json_line():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_accel.py"), "--tiny"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tiny"] is True and res["device"] is None  # a CPU is not in the device table
    for case in res["decode"].values():
        assert case["tokens_per_s"] > 0 and case["hbm_utilisation"] is None
    assert set(res["decode"]) == {"batch=1", "batch=4"}
    relay = res["relay"]
    assert relay["tokens_per_s"] > 0 and relay["calls"] > 0
    assert abs(relay["llm_token_share"] - 4 / 32) < 0.02  # 4 LLM tokens per 32 slots
    assert res["grpo_step"]["seconds"] > 0
    assert "[bench_accel]" in proc.stderr  # progress goes to stderr
