"""Flax transformer models (qwen3 / qwen2 / llama), their KV cache, and HF checkpoint I/O."""

from relax.models.config import ModelConfig, RopeScaling
from relax.models.model import Model

__all__ = ["Model", "ModelConfig", "RopeScaling"]
