"""Compiled memory of the model programs at real Qwen3 shapes, on abstract inputs.

Nothing is allocated: each program is lowered on `jax.ShapeDtypeStruct`s and
compiled, and XLA's `memory_analysis()` reports its buffers. This runs on a
CPU laptop (a few minutes of compilation for the relay loop).

  decode   one decode step `jit(model.apply, donate_argnums=3)`, Qwen3-1.7B bf16,
           batch 16, 9,216 cache slots.
  relay    the relay loop (`relax.relay.decoder._run`, caches donated), SLM
           Qwen3-1.7B bf16 + LLM Qwen3-8B bf16, batch 16, prompt 1,024, budget 8,192.
  train    `jax.grad` of the summed final-norm activations (`Model.hidden`, no LM
           head) of one 12,287-token sequence, Qwen3-1.7B float32, remat on.

    python scripts/memory_model.py [decode relay train] [--float32]

--float32 compiles decode and relay with float32 models instead. On CPU that is
the figure to read for the cache: XLA's CPU backend has no bfloat16 matmul, so
a bfloat16 program there also holds a float32 copy of the weights (hoisted out
of the layer loop), which GPU and TPU programs do not.

Prints one line per program and ends with one JSON object of GiB figures.
"""

import json
import sys

import jax
import jax.numpy as jnp

from relax.models import Model, ModelConfig
from relax.relay.command import CallCommand
from relax.relay.config import RelayConfig
from relax.relay.decoder import _run
from relax.relay.loop import Loop

GIB = 2**30
QWEN3_1_7B = ModelConfig(
    family="qwen3",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    tie_embeddings=True,
)
QWEN3_8B = ModelConfig(
    family="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    tie_embeddings=False,
)


def nbytes(tree):
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_cache(model, batch, slots):
    return jax.eval_shape(lambda: model.init_cache(batch, slots))


def memory(lowered):
    m = lowered.compile().memory_analysis()
    return {
        "temp": m.temp_size_in_bytes / GIB,
        "argument": m.argument_size_in_bytes / GIB,
        "output": m.output_size_in_bytes / GIB,
        "alias": m.alias_size_in_bytes / GIB,
    }


DTYPE = jnp.bfloat16


def decode(batch=16, slots=9216):
    model = Model(QWEN3_1_7B, dtype=DTYPE)
    cache = abstract_cache(model, batch, slots)
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    lowered = jax.jit(model.apply, donate_argnums=3).lower(model.param_shapes(), tok, tok, cache)
    return {"cache": nbytes(cache) / GIB, **memory(lowered)}


def relay(batch=16, prompt=1024, budget=8192):
    slm = Model(QWEN3_1_7B, dtype=DTYPE)
    llm = Model(QWEN3_8B, dtype=DTYPE)
    config = RelayConfig(max_new_tokens=budget)
    texts = ["<call>", "</call>"] + [str(d) for d in range(10)] + [f" w{i}" for i in range(500)]
    command = CallCommand.from_token_texts(texts)
    loop = Loop(slm=slm, llm=llm, config=config, max_n=command.max_n)
    tables = command.device_tables(QWEN3_1_7B.vocab_size)
    slots = prompt + budget
    caches = abstract_cache(slm, batch, slots), abstract_cache(llm, batch, slots)
    lowered = _run.lower(
        loop,
        slm.param_shapes(),
        llm.param_shapes(),
        tables,
        jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.random.key(0),
        *caches,
    )
    chunk_logits = batch * config.prefill_chunk * QWEN3_1_7B.vocab_size * 4
    params = nbytes(slm.param_shapes()) + nbytes(llm.param_shapes())
    return {
        "caches": nbytes(caches) / GIB,
        "params": params / GIB,
        "logits_chunk": chunk_logits / GIB,
        **memory(lowered),
    }


def train(seq=12287):
    model = Model(QWEN3_1_7B, dtype=jnp.float32, remat=True)
    tok = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(p, tokens, positions):
        return model.hidden(p, tokens, positions, None)[0].astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss)).lower(model.param_shapes(), tok, tok)
    return memory(lowered)


CASES = {"decode": decode, "relay": relay, "train": train}


def main(argv):
    global DTYPE
    if "--float32" in argv:
        DTYPE = jnp.float32
        argv = [a for a in argv if a != "--float32"]
    names = argv or list(CASES)
    result = {}
    for name in names:
        result[name] = CASES[name]()
        print(name, ", ".join(f"{k} {v:.2f} GiB" for k, v in result[name].items()), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
