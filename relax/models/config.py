"""The model configuration: a frozen dataclass built from a Hugging Face `config.json`.

One dataclass covers the three supported families; the few places they differ
are flags derived from the family and the HF fields:

  qwen3  per-head RMSNorm on q and k (`qk_norm`), optional `attention_bias`
  qwen2  bias on q, k and v (never on o)
  llama  optional `attention_bias` (q, k, v and o) and `mlp_bias`; RoPE scaling
         of type `llama3` or `linear` as its released checkpoints use

It is frozen and hashable so a `Model` built from it can be a static argument
under `jax.jit`. `head_dim` is read from the config, never derived from
hidden_size / num_heads when the config states it (Qwen3-0.6B: hidden 1024,
16 heads, head_dim 128).
"""

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("qwen3", "qwen2", "llama")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF `rope_parameters` / `rope_scaling`.

    rope_type: "default" (none), "linear" (positions divided by `factor`) or
      "llama3" (low frequencies divided by `factor`, high kept, smooth between).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (qwen3 / qwen2 / llama).

    Attributes use the axis letters of `relax.models.transformer`:
      vocab_size V, hidden_size D, intermediate_size F, num_layers L,
      num_heads N, num_kv_heads K (GQA when K < N, MQA when K == 1), head_dim H.
    """

    family: str = "qwen3"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(
                f"unsupported model family {self.family!r}; relax supports {', '.join(FAMILIES)}"
            )
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_scaling.rope_type!r}; "
                f"relax supports {', '.join(ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    # Family-dependent structure, derived once here so the model has no string dispatch.
    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.family != "qwen2" and self.attention_bias

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds the config from a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; relax supports "
                f"{', '.join(FAMILIES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; relax supports 'silu'")
        if hf.get("use_sliding_window", False):
            raise ValueError("sliding-window attention (use_sliding_window: true) is not supported")
        # transformers v5 writes `rope_parameters` (theta inside); v4 wrote
        # `rope_theta` plus an optional `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", 8192)
            ),
        )
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        """Reads `config.json` (or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing config: {path} does not exist")
        with open(path) as f:
            return cls.from_hf_config(json.load(f))

    def to_hf_config(self, dtype_name: str = "float32") -> dict[str, Any]:
        """The `config.json` dictionary `transformers` loads back to this architecture."""
        arch = {
            "qwen3": "Qwen3ForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "llama": "LlamaForCausalLM",
        }[self.family]
        rope = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type == "linear":
            rope["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rope.update(dataclasses.asdict(self.rope_scaling))
        hf = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
        }
        if self.family != "qwen2":
            hf["attention_bias"] = self.attention_bias
        if self.family == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            hf["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return hf
