"""Accelerators by their datasheet numbers, and the roofline time of a program on one.

`DEVICES` is the one table of peak dense bf16 FLOP/s, HBM bandwidth and HBM size per chip
that `relax plan` and `scripts/bench_accel.py` share. Figures are per chip (one GPU, one
TPU chip), dense (no 2:4 sparsity), in SI units as the vendors print them (GB = 1e9
bytes). `lookup` maps a name ("h200") or a `jax.Device.device_kind` ("NVIDIA H200",
"TPU v5 lite") to a row; an unknown device gives None, never a guess.

What this does not do: measure anything. A roofline time is a lower bound,
max(flops / peak, bytes / bandwidth), not a prediction.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator chip."""

    name: str
    """Short name, as `--device` takes it."""
    bf16_flops: float
    """Peak dense bf16 FLOP/s."""
    hbm_bandwidth: float
    """HBM bandwidth, bytes/s."""
    hbm_bytes: float
    """HBM capacity, bytes."""
    kinds: tuple
    """Lower-case substrings of `jax.Device.device_kind` that name this chip."""

    def roofline_s(self, flops: float, bytes_accessed: float) -> float:
        return max(flops / self.bf16_flops, bytes_accessed / self.hbm_bandwidth)


T, G = 1e12, 1e9
DEVICES = {
    d.name: d
    for d in (
        # NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS "with sparsity"
        # (989 dense), GPU memory 80 GB, bandwidth 3.35 TB/s.
        Device("h100", 989 * T, 3350 * G, 80 * G, ("h100 80gb hbm3", "h100 sxm")),
        # NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS with sparsity
        # (989 dense), GPU memory 141 GB, bandwidth 4.8 TB/s.
        Device("h200", 989 * T, 4800 * G, 141 * G, ("h200",)),
        # Google Cloud TPU documentation, "TPU v5p": 459 TFLOPS bf16, 95 GB HBM2e,
        # 2,765 GB/s per chip.
        Device("tpu-v5p", 459 * T, 2765 * G, 95 * G, ("tpu v5p", "tpu v5")),
        # Google Cloud TPU documentation, "TPU v6e" (Trillium): 918 TFLOPS bf16, 32 GB HBM,
        # 1,640 GB/s per chip.
        Device("tpu-v6e", 918 * T, 1640 * G, 32 * G, ("tpu v6e", "tpu v6 lite")),
        # Google Cloud TPU documentation, "TPU v5e": 197 TFLOPS bf16, 16 GB HBM2, 819 GB/s.
        Device("tpu-v5e", 197 * T, 819 * G, 16 * G, ("tpu v5e", "tpu v5 lite")),
        # Google Cloud TPU documentation, "TPU v4": 275 TFLOPS bf16, 32 GiB HBM2, 1,200 GB/s.
        Device("tpu-v4", 275 * T, 1200 * G, 32 * 2**30, ("tpu v4",)),
    )
}


def lookup(name_or_kind: str | None) -> Device | None:
    """The row of a `--device` name or a `device_kind`; None when unknown.

    A device kind matches the row with the longest matching substring, so
    "TPU v5 lite" is a v5e and plain "TPU v5" a v5p.
    """
    if not name_or_kind:
        return None
    key = name_or_kind.strip().lower()
    if key in DEVICES:
        return DEVICES[key]
    best, best_len = None, 0
    for d in DEVICES.values():
        for k in d.kinds:
            if k in key and len(k) > best_len:
                best, best_len = d, len(k)
    return best


_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS.update({f"{u}b": v for u, v in list(_UNITS.items()) if u not in ("", "b")})
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '141GB' -> 141e9, '512' -> 512."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 80GiB, 141GB, 16e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """Binary units, 3 significant digits: 1.23 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
