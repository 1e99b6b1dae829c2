"""One program's row of the `relax plan` report (compile, memory, cost) and the printed table.

`measure` compiles a `relax.plan.programs.Program` and reads XLA's `memory_analysis()`
(per device; total = arguments + temporaries + outputs - donated aliases) and the
loop-aware FLOPs and bytes of `relax.plan.cost`; `format_table` prints the rows.
"""

import time

from relax.plan.cost import program_cost
from relax.plan.devices import format_bytes


def measure(prog, device, memory):
    """Compile `prog` and return its row of the report."""
    t = time.perf_counter()
    lowered = prog.fn.lower(*prog.args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    ma = compiled.memory_analysis()
    ma = ma[0] if isinstance(ma, (list, tuple)) else ma
    row = {
        "name": prog.name,
        "shapes": prog.shapes,
        "mesh": prog.mesh,
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


def format_table(report):
    head = (
        "program",
        "shapes",
        "mesh",
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
                r.get("mesh") or "-",
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
