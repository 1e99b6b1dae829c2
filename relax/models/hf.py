"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`.

Both directions come from ONE table, `relax.models.weights.WEIGHTS`, where each
weight is declared once: its record names the HF tensor (with `{i}` for the layer
index) and how many of the relax kernel's leading axes are the linear layer's input
axes, beside the weight's logical axes and initialiser. A linear layer's HF weight is
[out, in]; relax keeps it as a kernel [in..., out...] (e.g. q: HF [N*H, D] <-> relax
[D, N, H]; o: HF [D, N*H] <-> relax [N, H, D]), so "transpose then reshape" and its
inverse are the only transforms. Norms, biases and the embedding are reshaped only.
Per-layer tensors are stacked on a leading L axis because the model scans over its
layers.

Safetensors are read with numpy (bfloat16 through ml_dtypes); torch is never
needed at run time. Every failure names the file and the tensor: unsupported
model type, missing config, missing tensor, unexpected tensor, wrong shape, a
tensor not stored as floats, NaN or infinite values.
Tied embeddings are explicit: a tied model has no `lm_head`, and a checkpoint
that stores `lm_head.weight` for a tied model must store the embedding there.
"""

import json
import math
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from relax.errors import RelaxError
from relax.models.config import ModelConfig
from relax.models.model import Model
from relax.models.weights import WEIGHTS

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(RelaxError, ValueError):
    """A checkpoint that cannot be read or does not match the model it claims to be."""


def _corrupt(file, error):
    return CheckpointError(
        f"{file}: cannot read the safetensors file ({' '.join(str(error).split())})",
        "the file is truncated or corrupt: download or export it again",
    )


def _open(file):
    """An open safetensors handle; a truncated or corrupt file is a CheckpointError naming it."""
    try:
        return safe_open(file, framework="numpy").__enter__()
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _corrupt(file, e) from None


def _read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} ({e.msg})") from None


def _check_values(w: np.ndarray, name: str, file: str) -> None:
    """A weight must be stored as floats and be finite: an integer tensor would be cast
    to floats silently, and one NaN poisons every answer (empty ones, not an error)."""
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise CheckpointError(
            f"{file}: tensor {name!r} is stored as {w.dtype}, not as floats",
            "export the weights as float32, bfloat16 or float16",
        )
    bad = np.size(w) - int(np.count_nonzero(np.isfinite(w)))
    if bad:
        raise CheckpointError(
            f"{file}: tensor {name!r} holds {bad} NaN or infinite values of {np.size(w)}",
            "the checkpoint is damaged, or its training diverged: export a finite one",
        )


def _to_relax(w: np.ndarray, shape: tuple, layout: int | None) -> np.ndarray:
    """HF tensor -> relax array of `shape` (one layer's shape for stacked params)."""
    return w.T.reshape(shape) if layout else w.reshape(shape)


def _to_hf(x: np.ndarray, layout: int | None) -> np.ndarray:
    """relax array (one layer) -> HF tensor."""
    if layout is None:
        return x.reshape(-1)
    if layout == 0:
        return x
    return x.reshape(math.prod(x.shape[:layout]), -1).T


def _hf_shape(shape: tuple, layout: int | None) -> tuple:
    if layout is None:
        return (math.prod(shape),)
    if layout == 0:
        return tuple(shape)
    return (math.prod(shape[layout:]), math.prod(shape[:layout]))


def _tensors(model: Model):
    """(hf name, relax path, layout, layer or None, shape) for every tensor this model has,
    in the order of `WEIGHTS` (a stacked weight's layers in turn)."""
    shapes = model.param_shapes()
    for name, weight in WEIGHTS.items():
        hf_name, path, layout = weight.hf, tuple(name.split("/")), weight.layout
        node = shapes
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            continue
        if "{i}" in hf_name:
            for i in range(model.config.num_layers):
                yield hf_name.format(i=i), path, layout, i, node.shape[1:]
        else:
            yield hf_name, path, layout, None, node.shape


def _read_tensors(path: str) -> dict[str, tuple[str, object]]:
    """Maps each tensor name to the safetensors file holding it (single or sharded)."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' mapping tensor names to files")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    if os.path.exists(single):
        handle = _open(single)
        names = {name: single for name in handle.keys()}
        handle.__exit__(None, None, None)
        return names
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")


def load_hf(path: str, dtype=jnp.bfloat16) -> tuple[Model, dict]:
    """Reads a Hugging Face checkpoint directory into (model, params).

    path: a folder with config.json and model.safetensors or a sharded
      model.safetensors.index.json. dtype: float32 or bfloat16, for both
      parameters and compute.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"missing config: {config_path} does not exist")
    hf_config = _read_json(config_path)
    try:
        config = ModelConfig.from_hf_config(hf_config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    model = Model(config, dtype=dtype)
    location = _read_tensors(path)
    np_dtype = jnp.dtype(dtype)

    handles = {}

    def read(name):
        file = location[name]
        if file not in handles:
            if not os.path.exists(file):
                raise CheckpointError(
                    f"{file}: missing shard (named for {name!r} by {INDEX_FILE})",
                    "copy every shard of the checkpoint",
                )
            handles[file] = _open(file)
        try:
            return handles[file].get_tensor(name)
        except SafetensorError as e:
            raise _corrupt(file, e) from None

    expected = {}
    params: dict = {}
    for hf_name, rpath, layout, layer, shape in _tensors(model):
        expected[hf_name] = rpath
        if hf_name not in location:
            raise CheckpointError(
                f"{path}: missing tensor {hf_name!r} (model_type "
                f"{config.family}, needed for {'/'.join(rpath)})"
            )
        w = read(hf_name)
        want = _hf_shape(shape, layout)
        if tuple(w.shape) != tuple(want):
            raise CheckpointError(
                f"{location[hf_name]}: tensor {hf_name!r} has shape "
                f"{tuple(w.shape)}, expected {tuple(want)} from config.json"
            )
        _check_values(w, hf_name, location[hf_name])
        x = _to_relax(w, shape, layout).astype(np_dtype)
        node = params
        for key in rpath[:-1]:
            node = node.setdefault(key, {})
        if layer is None:
            node[rpath[-1]] = x
        else:
            node.setdefault(rpath[-1], [None] * config.num_layers)[layer] = x

    for name in location:
        if name in expected:
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            # Some exporters store the tied head anyway; accept it only if it is the embedding.
            if not np.array_equal(read(name), read("model.embed_tokens.weight")):
                raise CheckpointError(
                    f"{location[name]}: tensor 'lm_head.weight' differs from "
                    "'model.embed_tokens.weight' but config.json ties them"
                )
            continue
        if re.search(r"rotary_emb\.inv_freq$", name):
            continue  # a cached constant some old exporters saved; recomputed from the config
        raise CheckpointError(
            f"{location[name]}: unexpected tensor {name!r} for model_type "
            f"{config.family} with this config.json"
        )
    for h in handles.values():
        h.__exit__(None, None, None)

    def finish(node):
        if isinstance(node, list):
            return jnp.asarray(np.stack(node))
        if isinstance(node, dict):
            return {k: finish(v) for k, v in node.items()}
        return jnp.asarray(node)

    return model, finish(params)


def save_hf(model: Model, params: dict, path: str, max_shard_bytes: int | None = None) -> None:
    """Writes `params` as a Hugging Face checkpoint `transformers` loads to the same logits.

    Writes config.json and model.safetensors, or shards of at most
    `max_shard_bytes` with a model.safetensors.index.json.
    """
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for hf_name, rpath, layout, layer, shape in _tensors(model):
        node = params
        for key in rpath:
            if key not in node:
                raise CheckpointError(f"params lack {'/'.join(rpath)} needed for {hf_name!r}")
            node = node[key]
        x = np.asarray(jax.device_get(node if layer is None else node[layer]))
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(
                f"param {'/'.join(rpath)} has shape {x.shape}, expected {tuple(shape)}"
            )
        tensors[hf_name] = np.ascontiguousarray(_to_hf(x, layout))
    dtype_name = "bfloat16" if model.dtype == jnp.bfloat16 else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_config(dtype_name), f, indent=2)
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        _save_weights(tensors, os.path.join(path, SINGLE_FILE), metadata)
        return
    shards, current, size = [], {}, 0
    for name, x in tensors.items():
        if current and size + x.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = x
        size += x.nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_weights(shard, os.path.join(path, file), metadata)
        weight_map.update({name: file for name in shard})
    total = sum(x.nbytes for x in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _save_weights(tensors, file, metadata):
    """safetensors' file, with the permissions of any file written here (safetensors
    creates it owner-only, 0600): the process's umask applied to 0666, like config.json."""
    save_file(tensors, file, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)
