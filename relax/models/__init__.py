"""Flax transformer models (qwen3 / qwen2 / llama), their weights table, KV cache, and HF
checkpoint I/O."""

from relax.models.config import ModelConfig, RopeScaling
from relax.models.model import Model, put_served
from relax.models.weights import WEIGHTS, Weight, put_params

__all__ = ["WEIGHTS", "Model", "ModelConfig", "RopeScaling", "Weight", "put_params", "put_served"]
