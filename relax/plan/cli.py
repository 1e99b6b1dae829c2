"""`relax plan CONFIG`: per-device memory, FLOPs, bytes and roofline time of a preset's programs.

    relax plan configs/train-qwen3-1.7b+8b.yaml --devices 8 --device-memory 80GiB --device h200

Every program the preset's stages run (SFT step, GRPO update, old/ref log-probs, rollout
relay call, eval relay call, filter generate) is lowered and compiled for N fake CPU
devices on `jax.ShapeDtypeStruct` inputs at the preset's shapes, placed on each stage's
`mesh:` (`--mesh data=1,fsdp=2,model=4` for every stage, `grpo.mesh.model=4` for one;
see relax.plan.programs for the placements): nothing is allocated
and no weights are read, so it runs on a laptop for 8B-sized models. Per program it
prints XLA's `memory_analysis()` per device (arguments, temporaries, outputs; total =
their sum minus donated aliases), whether that fits in `--device-memory`, the FLOPs and
bytes of one call per device (`relax.plan.cost`: every loop iteration counted) and the
roofline time max(flops / peak, bytes / bandwidth) on `--device`. It compiles with
XLA:CPU's loop-invariant code motion off (`PLAN_XLA_FLAGS`): on CPU that pass hoists
float32 copies of bf16 weights out of the layer loop, memory no accelerator program
holds.

Architectures come from each model's `config.json`, else a known name (Qwen3-0.6B /
1.7B / 4B / 8B), else the section's `model_config` / `llm_config`; a GRPO student under
the SFT stage's output folder has the SFT model's architecture and a filter teacher at
the GRPO teacher's path the GRPO teacher's. The eval program uses the GRPO models with
the settings of `--eval` (default configs/eval-paper.yaml). Shapes are worst cases: a
rollout row is the padded `max_prompt_len` plus `relay.max_new_tokens`; eval and filter prompts
are `--prompt-len` wide (default: the GRPO `max_prompt_len`).

With `--json` the last line is one JSON object: `programs` (name, shapes, per-device
bytes, fits, flops, bytes_accessed, roofline_s, compile_s) and `all_fit`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from relax.config import apply_overrides, read_yaml, resolve_preset
from relax.plan.devices import lookup, parse_bytes

# jax and every module that imports it (relax.runtime, relax.plan.arch, .programs, .report)
# are imported inside functions, after `_set_device_count` has set XLA_FLAGS and
# JAX_PLATFORMS for the fake CPU devices: jax reads them when it first loads.


def _parser():
    p = argparse.ArgumentParser(prog="relax plan", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML preset (path, or a name in configs/ without .yaml)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
    p.add_argument("--device", default="h100", help="roofline device: h100, h200, tpu-v5p, ...")
    p.add_argument(
        "--device-memory", help="per-device memory, e.g. 80GiB (default: --device's HBM)"
    )
    p.add_argument(
        "--eval",
        default="eval-paper",
        help="eval settings for the eval relay program: a YAML path or a preset name "
        "(default eval-paper; '' = no eval program)",
    )
    p.add_argument("--prompt-len", type=int, help="eval / filter prompt width")
    p.add_argument(
        "--mesh",
        help="mesh of every stage, e.g. data=1,fsdp=2,model=4 (default: each section's "
        "mesh:, itself all devices on data); one stage: grpo.mesh.model=4",
    )
    p.add_argument("--only", help="comma-separated program names (default: all)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("overrides", nargs="*", help="section.key=value edits of the preset")
    return p


def _backends_initialised():
    if "jax" not in sys.modules:
        return False
    try:  # jax imported but no device asked for yet: XLA_FLAGS is still read
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return True


# XLA:CPU has no bfloat16 matmul: it converts bf16 weights to float32, and its
# loop-invariant code motion then hoists those converts for the whole layer stack out of
# the layer loop, a float32 copy of every bf16 weight that a GPU or TPU program never
# holds. The plan measures accelerator programs, so it compiles with that pass off.
PLAN_XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _set_device_count(n):
    """Ask for n fake CPU devices (and PLAN_XLA_FLAGS); only possible before jax initialises
    its backends."""
    if not _backends_initialised():
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
        )
        if PLAN_XLA_FLAGS not in flags:
            flags = f"{flags} {PLAN_XLA_FLAGS}"
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    have = len(jax.devices("cpu"))
    if have < n:
        raise SystemExit(
            f"relax plan: jax is already initialised with {have} CPU devices, fewer than "
            f"--devices {n}; run relax plan in a fresh process (or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n} before jax is imported)"
        )
    return jax.devices("cpu")[:n]


STAGES = ("sft", "grpo", "filter")


def mesh_overrides(doc, mesh):
    """`--mesh data=1,fsdp=2,model=4` as `section.mesh.axis=size` overrides of every stage
    the preset has."""
    items = [i.strip() for i in mesh.split(",") if i.strip()]
    for item in items:
        axis, _, size = item.partition("=")
        if axis not in ("data", "fsdp", "model") or not size.lstrip("-").isdigit():
            raise SystemExit(f"relax plan: --mesh {mesh!r}: expected data=N,fsdp=N,model=N")
    return [f"{sec}.mesh.{item}" for sec in STAGES if doc.get(sec) is not None for item in items]


def _load(preset, overrides, mesh=None):
    preset = resolve_preset(preset)
    doc = read_yaml(preset)
    if mesh:  # before the explicit overrides, which may refine one stage
        doc = apply_overrides(doc, mesh_overrides(doc, mesh))
    return preset, apply_overrides(doc, overrides)


def plan_preset(
    preset,
    overrides=(),
    devices=8,
    device="h100",
    device_memory=None,
    eval_path=None,
    prompt_len=None,
    only=None,
    log=None,
    mesh=None,
):
    """The report of a preset: {"preset", "devices", "device", "device_memory", "programs",
    "all_fit"}. Each program row is `measure`'s, or {"name", "error", "fits": False}."""
    from relax.plan.report import measure

    devs = _set_device_count(devices)
    if log:
        from relax import runtime

        log(runtime.line(runtime.where(devices=devs)) + " (fake devices: nothing runs)")
    dev = lookup(device)
    if dev is None:
        raise SystemExit(f"relax plan: unknown --device {device!r}")
    memory = parse_bytes(device_memory) if device_memory else int(dev.hbm_bytes)
    path, doc = _load(preset, overrides, mesh)
    eval_path = resolve_preset(eval_path, flag="--eval") if eval_path else None
    from relax.plan.arch import PlanError

    if "task" in doc:
        raise SystemExit(f"relax plan: {path} is a `relax demo` preset, not a training preset")
    if not any(doc.get(k) is not None for k in ("sft", "grpo", "filter")):
        raise SystemExit(
            f"relax plan: {path} has no sft:, grpo: or filter: section (a training preset is "
            "needed; eval settings are given with --eval)"
        )
    try:
        from relax.plan.programs import build_programs

        built = build_programs(doc, devs, eval_path, prompt_len)
    except (PlanError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise SystemExit(f"relax plan: {path}: {msg}") from None
    rows = []
    for name, prog, err, note in built:
        if only and name not in only:
            continue
        if err is None:
            if log:
                log(f"[plan] compiling {prog.name} ({prog.shapes}) ...")
            try:
                row = measure(prog, dev, memory)
            except Exception as e:  # noqa: BLE001  (reported in its row, as a build error is)
                row = {
                    "name": prog.name,
                    "shapes": prog.shapes,
                    "error": f"{type(e).__name__}: {e}",
                }
        else:
            row = {"name": name, "error": err}
        row.setdefault("fits", False)
        row["models"] = note
        rows.append(row)
        if log and "compile_s" in row:
            log(f"[plan]   {row['compile_s']} s")
    return {
        "preset": path,
        "devices": devices,
        "device": dev.name,
        "device_memory": memory,
        "programs": rows,
        "all_fit": bool(rows) and all(r["fits"] for r in rows),
    }


def main(argv=None):
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    report = plan_preset(
        args.config,
        args.overrides,
        args.devices,
        args.device,
        args.device_memory,
        args.eval or None,
        args.prompt_len,
        only,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        mesh=args.mesh,
    )
    from relax.plan.report import format_table

    print(format_table(report))
    for r in report["programs"]:
        print(f"  {r['name']}: {r['models']}")
    if args.json:
        print(json.dumps(report))
    return 0
