"""`relax plan CONFIG`: per-device memory, FLOPs, bytes and roofline time of a preset's programs.

    relax plan configs/train-qwen3-1.7b+8b.yaml --devices 8 --device-memory 80GiB --device h200

Every program the preset's stages run (SFT step, GRPO update, old/ref log-probs, rollout
relay call, eval relay call, filter generate) is lowered and compiled for N fake CPU
devices on `jax.ShapeDtypeStruct` inputs at the preset's shapes: nothing is allocated
and no weights are read, so it runs on a laptop for 8B-sized models. Per program it
prints XLA's `memory_analysis()` per device (arguments, temporaries, outputs; total =
their sum minus donated aliases), whether that fits in `--device-memory`, the FLOPs and
bytes of one call per device (`relax.plan.cost`: every loop iteration counted) and the
roofline time max(flops / peak, bytes / bandwidth) on `--device`.

Architectures come from each model's `config.json`, else a known name (Qwen3-0.6B /
1.7B / 4B / 8B), else the section's `model_config` / `llm_config`; a GRPO student under
the SFT stage's output folder has the SFT model's architecture and a filter teacher at
the GRPO teacher's path the GRPO teacher's. The eval program uses the GRPO models with
the settings of `--eval` (default configs/eval-paper.yaml). Shapes are worst cases: a
rollout row is the padded `max_prompt_len` plus `max_response`; eval and filter prompts
are `--prompt-len` wide (default: the GRPO `max_prompt_len`).

With `--json` the last line is one JSON object: `programs` (name, shapes, per-device
bytes, fits, flops, bytes_accessed, roofline_s, compile_s) and `all_fit`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


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
        default=os.path.join(CONFIG_DIR, "eval-paper.yaml"),
        help="eval settings YAML for the eval relay program ('' = no eval program)",
    )
    p.add_argument("--prompt-len", type=int, help="eval / filter prompt width")
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


def _set_device_count(n):
    """Ask for n fake CPU devices; only possible before jax initialises its backends."""
    if not _backends_initialised():
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
        )
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


def _load(preset, overrides):
    import yaml

    if not os.path.exists(preset):
        named = os.path.join(CONFIG_DIR, preset + ".yaml")
        if not os.path.exists(named):
            raise SystemExit(f"relax plan: no preset {preset!r}")
        preset = named
    with open(preset) as f:
        doc = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"relax plan: override {item!r} is not section.key=value")
        key, raw = item.split("=", 1)
        *path, last = key.strip().split(".")
        node = doc
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(raw)
    return preset, doc


def _eval_settings(path, vocab_size):
    """(RelayConfig, batch_size, prompt_bucket) of an eval YAML (`relax eval --config`)."""
    import yaml

    from relax.plan.programs import eos_pad
    from relax.relay.config import RelayConfig, SamplingConfig

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    relay = dict(doc.get("relay") or {})
    for m in ("slm", "llm"):
        if m in relay:
            relay[m] = SamplingConfig(**relay[m])
    eos, pad = eos_pad(vocab_size)
    relay.setdefault("eos_ids", eos)
    relay.setdefault("pad_id", pad)
    return RelayConfig(**relay), int(doc.get("batch_size", 16)), int(doc.get("prompt_bucket", 64))


def build_programs(doc, devices, eval_path=None, prompt_len=None):
    """[(name, Program or None, error or None, models note)] for every stage of the preset."""
    import jax.numpy as jnp

    from relax.models import Model
    from relax.plan import programs as pg
    from relax.plan.arch import resolve
    from relax.relay.config import RelayConfig, SamplingConfig
    from relax.train import config as config_lib

    n = len(devices)
    out = []
    archs = {}  # path -> (arch, source): a later stage reading an earlier stage's model

    def arch(path, model_config, where):
        if path and os.path.exists(os.path.join(path, "config.json")):
            return resolve(path, model_config, where)
        for done, (a, src) in archs.items():
            if path and done and (path == done or path.startswith(done.rstrip("/") + "/")):
                return a, f"{src}, via {done}"
        a, src = resolve(path, model_config, where)
        if path:
            archs[path] = (a, src)
        return a, src

    def add(name, build, note):
        try:
            out.append((name, build(), None, note))
        except Exception as e:  # noqa: BLE001  (one failing program must not hide the others)
            out.append((name, None, f"{type(e).__name__}: {e}", note))

    def dtype(name):
        return jnp.dtype(name)

    if doc.get("sft") is not None:
        cfg = config_lib.from_dict(config_lib.SFTConfig, doc["sft"], "sft.")
        a, src = arch(cfg.model, cfg.model_config, "sft.model")
        archs[cfg.run.output_dir] = (a, src)  # the SFT output has the SFT model's architecture
        model = Model(a, dtype=dtype(cfg.run.dtype))
        add("sft step", lambda: pg.sft_step(model, cfg, n), f"slm {src}")
    grpo = None
    if doc.get("grpo") is not None:
        grpo = cfg = config_lib.from_dict(config_lib.GRPOConfig, doc["grpo"], "grpo.")
        sa, ssrc = arch(cfg.slm, cfg.model_config, "grpo.slm")
        la, lsrc = arch(cfg.llm, cfg.llm_config, "grpo.llm")
        slm = Model(sa, dtype=dtype(cfg.run.dtype))
        add("grpo update", lambda: pg.grpo_update(slm, cfg, n), f"slm {ssrc}")
        add("old/ref logprobs", lambda: pg.grpo_logprobs(slm, cfg, n), f"slm {ssrc}")
        # The rollout's SLM dtype: `rollout_dtype` where the config has one, else the
        # trained params' dtype (today's rollout samples from the f32 master weights).
        r_slm = Model(sa, dtype=dtype(getattr(cfg, "rollout_dtype", "") or cfg.run.dtype))
        llm = Model(la, dtype=dtype(cfg.llm_dtype))
        eos, pad = pg.eos_pad(sa.vocab_size)
        relay_cfg = RelayConfig(  # as `relax grpo` builds it
            max_new_tokens=cfg.max_response,
            max_calls=cfg.max_calls,
            max_call_tokens=cfg.max_call_tokens,
            slm=SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p),
            llm=SamplingConfig(temperature=cfg.llm_temperature, top_p=cfg.llm_top_p),
            eos_ids=eos,
            pad_id=pad,
            **cfg.relay,
        )
        rows = getattr(cfg, "rollout_batch_size", 0) or cfg.prompts_per_step * cfg.group_size
        width = pg._grpo_width(cfg)[0]
        command = pg.stand_in_command(sa.vocab_size)
        add(
            "rollout relay",
            lambda: pg.relay_program(
                "rollout relay",
                r_slm,
                r_slm.param_shapes(),
                llm,
                llm.param_shapes(),
                relay_cfg,
                command,
                rows,
                width,
                devices,
            ),
            f"slm {ssrc}; llm {lsrc}",
        )
        if eval_path:
            e_slm, e_llm = Model(sa, dtype=jnp.bfloat16), Model(la, dtype=jnp.bfloat16)

            def eval_program():
                ecfg, bs, bucket = _eval_settings(eval_path, sa.vocab_size)
                p = prompt_len or cfg.max_prompt_len
                d = math.gcd(n, bs)  # as eval: the most devices that divide the batch
                return pg.relay_program(
                    "eval relay",
                    e_slm,
                    e_slm.param_shapes(),
                    e_llm,
                    e_llm.param_shapes(),
                    ecfg,
                    command,
                    bs,
                    -(-p // bucket) * bucket,
                    devices[:d],
                )

            add("eval relay", eval_program, f"bf16 slm {ssrc}; llm {lsrc}")
    if doc.get("filter") is not None:
        cfg_f = config_lib.from_dict(config_lib.FilterConfig, doc["filter"], "filter.")
        fa, fsrc = arch(cfg_f.llm, {}, "filter.llm")
        teacher = Model(fa, dtype=dtype(cfg_f.dtype))

        def filter_program():
            from relax.train.rollout import pad_prompts

            eos, pad = pg.eos_pad(fa.vocab_size)
            gen = RelayConfig(
                max_new_tokens=cfg_f.max_new_tokens,
                slm=SamplingConfig(temperature=cfg_f.temperature, top_p=cfg_f.top_p),
                eos_ids=eos,
                pad_id=pad,
            )
            p = prompt_len or (grpo.max_prompt_len if grpo else 1024)
            width = pad_prompts([[0] * p])[0].shape[1]
            # `pass_rates` hands host arrays to relax.generate: one device runs all rows.
            return pg.relay_program(
                "filter generate",
                teacher,
                teacher.param_shapes(),
                None,
                None,
                gen,
                None,
                cfg_f.batch_size * cfg_f.k,
                width,
                devices[:1],
            )

        add("filter generate", filter_program, f"llm {fsrc}")
    return out


def measure(prog, device, memory):
    """Compile `prog` and return its row of the report."""
    from relax.plan.cost import program_cost

    t = time.perf_counter()
    lowered = prog.fn.lower(*prog.args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    ma = compiled.memory_analysis()
    ma = ma[0] if isinstance(ma, (list, tuple)) else ma
    row = {
        "name": prog.name,
        "shapes": prog.shapes,
        "argument_bytes": int(ma.argument_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
    }
    row["total_bytes"] = (
        row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"] - row["alias_bytes"]
    )
    row["fits"] = row["total_bytes"] <= memory
    cost = program_cost(prog.fn, *prog.args).scaled(1.0 / prog.devices)
    row["flops"] = cost.flops
    row["bytes_accessed"] = cost.bytes
    row["per_iteration"] = cost.per_iteration
    row["roofline_s"] = device.roofline_s(cost.flops, cost.bytes) if device else None
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) else xla) or {}
    row["xla_flops_loop_bodies_once"] = float(xla.get("flops", 0.0))
    row["compile_s"] = round(compile_s, 1)
    return row


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
):
    """The report of a preset: {"preset", "devices", "device", "device_memory", "programs",
    "all_fit"}. Each program row is `measure`'s, or {"name", "error", "fits": False}."""
    from relax.plan.devices import lookup, parse_bytes

    devs = _set_device_count(devices)
    dev = lookup(device)
    if dev is None:
        raise SystemExit(f"relax plan: unknown --device {device!r}")
    memory = parse_bytes(device_memory) if device_memory else int(dev.hbm_bytes)
    path, doc = _load(preset, overrides)
    from relax.plan.arch import PlanError

    if "task" in doc:
        raise SystemExit(f"relax plan: {path} is a `relax demo` preset, not a training preset")
    if not any(doc.get(k) is not None for k in ("sft", "grpo", "filter")):
        raise SystemExit(
            f"relax plan: {path} has no sft:, grpo: or filter: section (a training preset is "
            "needed; eval settings are given with --eval)"
        )
    try:
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


def format_table(report):
    from relax.plan.devices import format_bytes

    head = (
        "program",
        "shapes",
        "args",
        "temp",
        "out",
        "total",
        "fits",
        "TFLOP",
        "GB moved",
        f"roofline {report['device']}",
        "compile",
    )
    lines = [head]
    for r in report["programs"]:
        if "error" in r:
            lines.append((r["name"], r.get("shapes", ""), "error: " + r["error"][:100]))
            continue
        star = "*" if r["per_iteration"] else ""
        rt = r["roofline_s"]
        lines.append(
            (
                r["name"],
                r["shapes"],
                format_bytes(r["argument_bytes"]),
                format_bytes(r["temp_bytes"]),
                format_bytes(r["output_bytes"]),
                format_bytes(r["total_bytes"]),
                "yes" if r["fits"] else "NO",
                f"{r['flops'] / 1e12:.3g}{star}",
                f"{r['bytes_accessed'] / 1e9:.3g}{star}",
                "-"
                if rt is None
                else (f"{rt * 1e3:.3g} ms{star}" if rt < 1 else f"{rt:.3g} s{star}"),
                f"{r['compile_s']} s",
            )
        )
    widths = [
        max(len(l[i]) for l in lines if i < len(l) and len(l) == len(head))
        for i in range(len(head))
    ]
    text = []
    for l in lines:
        if len(l) == len(head):
            text.append("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())
        else:
            text.append("  ".join(l))
    text.insert(1, "-" * len(text[0]))
    mem = format_bytes(report["device_memory"])
    text.append(
        f"per device, {report['devices']} devices, {mem} each; all fit: "
        f"{'yes' if report['all_fit'] else 'NO'}. * per loop iteration (a while loop of "
        "unknown trip count: its costliest step)."
    )
    return "\n".join(text)


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
    )
    print(format_table(report))
    for r in report["programs"]:
        print(f"  {r['name']}: {r['models']}")
    if args.json:
        print(json.dumps(report))
    return 0
