"""`relax plan` on the tiny preset (four fake CPU devices), its cost counter and device table."""

import json

import jax
import jax.numpy as jnp
import pytest

from relax.plan import cli
from relax.plan.cost import program_cost
from relax.plan.devices import DEVICES, lookup, parse_bytes

PROGRAMS = [
    "sft step",
    "grpo update",
    "old/ref logprobs",
    "rollout relay",
    "eval relay",
    "filter generate",
]


def test_plan_cli_tiny_table_and_json(capsys):
    # As written: the teacher folder does not exist yet, the preset's llm_config gives its shape.
    assert cli.main(["train-tiny", "--devices", "4", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert [p["name"] for p in report["programs"]] == PROGRAMS
    for p in report["programs"]:
        assert "error" not in p, p
        assert p["fits"] is True
        assert (
            p["argument_bytes"] > 0 and p["total_bytes"] >= p["argument_bytes"] - p["alias_bytes"]
        )
        assert p["flops"] > 0 and p["bytes_accessed"] > 0 and p["roofline_s"] > 0
    assert report["all_fit"] is True and report["devices"] == 4
    relay = {p["name"]: p["per_iteration"] for p in report["programs"]}
    assert relay["rollout relay"] and not relay["sft step"]
    table = "\n".join(out[:-1])
    assert table.startswith("program") and "roofline h100" in table
    assert all(name in table for name in PROGRAMS)


def test_oversized_program_does_not_fit():
    # The tiny SFT step's params and AdamW state alone are over 1 MiB per device.
    report = cli.plan_preset(
        "configs/train-tiny.yaml", [], devices=4, device_memory="1MiB", only={"sft step"}
    )
    (row,) = report["programs"]
    assert row["argument_bytes"] > 2**20
    assert row["fits"] is False and report["all_fit"] is False


def test_unknown_architecture_is_one_clear_line():
    with pytest.raises(SystemExit, match="grpo.llm: no architecture for 'runs/tiny-llm/final'"):
        cli.plan_preset(
            "configs/train-tiny.yaml", ["grpo.llm_config={}"], devices=4, only={"sft step"}
        )


def test_too_many_devices_is_reported():
    with pytest.raises(SystemExit, match="already initialised with 4 CPU devices"):
        cli.plan_preset("configs/train-tiny.yaml", [], devices=64)


def test_cost_counts_every_scan_iteration():
    # XLA's cost analysis counts a loop body once; the jaxpr count must not.
    def f(x, w):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((10, 16, 16), jnp.float32)
    cost = program_cost(jax.jit(f), x, w)
    assert cost.flops == 10 * 2 * 8 * 16 * 16
    assert cost.bytes == 10 * 4 * (8 * 16 + 16 * 16 + 8 * 16)
    assert not cost.per_iteration
    loop = lambda x: jax.lax.while_loop(lambda c: c.sum() < 1, lambda c: c @ c, x)
    assert program_cost(loop, jax.ShapeDtypeStruct((4, 4), jnp.float32)).per_iteration


def test_device_table():
    assert lookup("NVIDIA H200") is DEVICES["h200"]
    assert lookup("NVIDIA H100 80GB HBM3") is DEVICES["h100"]
    assert lookup("TPU v5 lite") is DEVICES["tpu-v5e"] and lookup("TPU v5") is DEVICES["tpu-v5p"]
    assert lookup("TPU v6 lite") is DEVICES["tpu-v6e"] and lookup("cpu") is None
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("141GB") == 141 * 10**9
    with pytest.raises(ValueError):
        parse_bytes("eighty")
    h = DEVICES["h100"]
    assert h.roofline_s(h.bf16_flops, 0) == 1.0 and h.roofline_s(0, 2 * h.hbm_bandwidth) == 2.0


def test_architecture_resolution(tmp_path):
    from relax.models import ModelConfig
    from relax.plan.arch import KNOWN, PlanError, resolve

    a, src = resolve("checkpoints/Qwen3-8B", None, "grpo.llm")
    assert a is KNOWN["qwen3-8b"] and not a.tie_embeddings and a.num_layers == 36
    assert src == "known Qwen3-8B"
    own = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, head_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(own.to_hf_config()))
    assert resolve(str(tmp_path), None, "sft.model")[0].hidden_size == 32  # config.json first
    assert resolve("", {"num_layers": 3}, "sft.model")[0].num_layers == 3
    with pytest.raises(PlanError, match="sft.model: no architecture"):
        resolve("runs/nothing/final", None, "sft.model")


def test_mesh_splits_the_relay_per_device():
    """`--mesh model=2` on 4 devices: the rollout relay's weights split over two devices
    (tensor parallel) and its caches by rows and kv head, on a mesh the report names.
    Per device: below the one-device plan in all, below the data-parallel plan in
    arguments (the weights; the caches are split four ways in both)."""
    plan = lambda n, mesh=None: cli.plan_preset(
        "configs/train-tiny.yaml", [], devices=n, only={"rollout relay"}, mesh=mesh
    )["programs"][0]
    dp, tp, single = plan(4), plan(4, "model=2"), plan(1)  # 4 first: it sets the count
    assert "error" not in tp, tp
    assert dp["mesh"] == "data=4 fsdp=1 model=1" and tp["mesh"] == "data=2 fsdp=1 model=2"
    # a step's 32 rollouts on 32 slots (rollout_batch_size 64, capped at the step's rows)
    assert "32 requests on 32 slots (8 / row shard)" in dp["shapes"]
    assert "(16 / row shard)" in tp["shapes"]
    assert tp["total_bytes"] < single["total_bytes"] / 2
    assert tp["argument_bytes"] < 0.6 * dp["argument_bytes"]
    with pytest.raises(SystemExit, match="expected data=N"):
        cli.plan_preset("configs/train-tiny.yaml", [], devices=4, mesh="tp=2")
