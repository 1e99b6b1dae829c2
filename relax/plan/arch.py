"""Model architectures without weights: a `config.json`, a known name, or a preset's config.

`relax plan` and the accelerator benchmark need shapes, not weights, and the presets
point at HF checkpoint folders that may not exist on the machine doing the planning.
`resolve` reads `config.json` when the folder has one, else matches the path's last
component against `KNOWN` (the released Hugging Face configs of the Qwen3 models the
presets use), else takes an explicit `model_config`, else fails with one line.
"""

from __future__ import annotations

import os

from relax.models.config import ModelConfig


class PlanError(ValueError):
    """A preset the planner cannot read; the message is one line for the user."""


def _qwen3(hidden, ffw, layers, heads, tied):
    return ModelConfig(
        family="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=ffw,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_embeddings=tied,
        max_position_embeddings=40960,
        bos_token_id=151643,
        eos_token_id=151645,
    )


# The config.json values of the Hugging Face checkpoints Qwen/Qwen3-{0.6B,1.7B,4B,8B}.
KNOWN = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tied=False),
}


def known(name: str) -> ModelConfig:
    """A `KNOWN` architecture by name ("Qwen3-8B", "qwen3-0.6b"); PlanError otherwise."""
    key = name.strip().lower()
    if key not in KNOWN:
        raise PlanError(f"unknown architecture {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[key]


def resolve(path: str, model_config: dict | None, where: str) -> tuple[ModelConfig, str]:
    """(architecture, where it came from) of a model given as a path and/or a config dict.

    Order: `config.json` under `path`; the path's last component as a `KNOWN` name
    ("checkpoints/Qwen3-1.7B"); `model_config` (the fields of `relax.ModelConfig`).
    """
    if path and os.path.exists(os.path.join(path, "config.json")):
        return ModelConfig.from_json(path), f"{path}/config.json"
    name = os.path.basename(os.path.normpath(path)) if path else ""
    if name.lower() in KNOWN:
        return KNOWN[name.lower()], f"known {name}"
    if model_config:
        try:
            return ModelConfig(**model_config), "model_config"
        except TypeError as e:
            raise PlanError(f"{where}: bad model_config: {e}") from None
    raise PlanError(
        f"{where}: no architecture for {path or '(no path)'!r}: no config.json there, "
        f"{name or 'the name'!r} is not one of {', '.join(KNOWN)}, and no model_config is given"
    )
