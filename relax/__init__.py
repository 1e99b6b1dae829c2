"""relax: RelayLLM in JAX/Flax.

A small model (SLM) writes the answer; when it writes the plain-text command
`<call>n</call>` a large model (LLM) writes the next n tokens, and the SLM
carries on. The whole relay runs on device in one compiled loop.

The public names below are imported lazily, so `import relax` stays cheap and
a command-line tool only pays for the parts it uses.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Model": "relax.models",
    "ModelConfig": "relax.models",
    "load_hf": "relax.models.hf",
    "save_hf": "relax.models.hf",
    "load_tokenizer": "relax.tokenizer",
    "build_prompt": "relax.tokenizer",
    "CallCommand": "relax.relay.command",
    "RelayConfig": "relax.relay.config",
    "SamplingConfig": "relax.relay.config",
    "RelayOutput": "relax.relay.decoder",
    "RelayDecoder": "relax.relay.decoder",
    "relay_generate": "relax.relay.decoder",
    "generate": "relax.relay.decoder",
    "Engine": "relax.relay.engine",
    "Requests": "relax.relay.inputs",
    "RowSettings": "relax.relay.inputs",
    "grade": "relax.data.grading",
    "load_benchmark": "relax.data.loaders",
    "EvalConfig": "relax.eval.strategies",
    "evaluate": "relax.eval.strategies",
    "write_report": "relax.eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("models", "relay", "train", "data", "eval", "errors"):
        return importlib.import_module(f"relax.{name}")
    raise AttributeError(f"module 'relax' has no attribute {name!r}")


def __dir__():
    """The public names (imported on first use), for tab completion and `dir(relax)`."""
    return [*__all__, "__version__"]
