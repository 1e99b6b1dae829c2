"""Compiled memory of the model programs at real Qwen3 shapes, on abstract inputs.

Nothing is allocated: each program is lowered on `jax.ShapeDtypeStruct`s and
compiled, and XLA's `memory_analysis()` reports its buffers. This runs on a
CPU laptop (a few minutes of compilation for the relay loop).

  decode   one decode step `jit(model.apply, donate_argnums=3)`, Qwen3-1.7B bf16,
           batch 16, 9,216 cache slots.
  relay    the relay loop (`RelayDecoder.lower`, caches donated), SLM
           Qwen3-1.7B bf16 + LLM Qwen3-8B bf16, batch 16, prompt 1,024, budget 8,192.
  train    `jax.grad` of the summed final-norm activations (`Model.hidden`, no LM
           head) of one 12,287-token sequence, Qwen3-1.7B float32, remat on.
  grpo     the GRPO loss + grad as the training loop builds it, same sequence.

    python scripts/memory_model.py [decode relay train grpo] [--float32] [--accelerator-like]

decode and relay also compile the same program at a tiny capacity (16 cache
slots; a 16-token prompt and budget) and report the difference, the temporaries
that grow with the cache (`temp_from_cache(s)`): what an in-place cache keeps
near zero, whatever else the backend holds.

--accelerator-like compiles with XLA:CPU's loop-invariant code motion off (as
`relax plan` does): on CPU that pass hoists float32 copies of the bf16 weights
out of the layer loop, memory a GPU or TPU program never holds.

--float32 compiles decode and relay with float32 models instead. On CPU that is
the figure to read for the cache: XLA's CPU backend has no bfloat16 matmul, so
a bfloat16 program there also holds a float32 copy of the weights (hoisted out
of the layer loop), which GPU and TPU programs do not.

Prints one line per program and ends with one JSON object of GiB figures.
"""

import json
import os
import sys

if "--accelerator-like" in sys.argv:  # before jax reads XLA_FLAGS
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    )

import jax
import jax.numpy as jnp

from relax.models import Model, ModelConfig
from relax.relay.command import CallCommand
from relax.relay.config import RelayConfig
from relax.relay.decoder import RelayDecoder
from relax.relay.inputs import Requests

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
    """Also `temp_at_16_slots`: the same step with a 16-slot cache. What the cache costs
    in temporaries is the difference (`temp_from_cache`); the rest is capacity-free (on
    CPU, mostly XLA's float32 copy of bfloat16 weights)."""
    model = Model(QWEN3_1_7B, dtype=DTYPE)
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)

    def compiled(s):
        cache = abstract_cache(model, batch, s)
        step = jax.jit(model.apply, donate_argnums=3)
        return cache, memory(step.lower(model.param_shapes(), tok, tok, cache))

    cache, full = compiled(slots)
    _, small = compiled(16)
    return {
        "cache": nbytes(cache) / GIB,
        **full,
        "temp_at_16_slots": small["temp"],
        "temp_from_cache": full["temp"] - small["temp"],
    }


def relay(batch=16, prompt=1024, budget=8192, small=False):
    """Also `temp_at_32_slots` / `temp_from_caches`, as for decode: the same loop with a
    16-token prompt and a 16-token budget, and the difference."""
    slm = Model(QWEN3_1_7B, dtype=DTYPE)
    llm = Model(QWEN3_8B, dtype=DTYPE)
    config = RelayConfig(max_new_tokens=budget)
    texts = ["<call>", "</call>"] + [str(d) for d in range(10)] + [f" w{i}" for i in range(500)]
    command = CallCommand.from_token_texts(texts)
    slots = prompt + budget
    caches = abstract_cache(slm, batch, slots), abstract_cache(llm, batch, slots)
    requests = jax.eval_shape(
        lambda: Requests.build(
            config, jnp.zeros((batch, prompt), jnp.int32), jnp.ones((batch,), jnp.int32),
            jax.random.key(0),
        )
    )  # fmt: skip
    decoder = RelayDecoder(slm, llm, config, command)  # one device: no layout
    lowered = decoder.lower(slm.param_shapes(), llm.param_shapes(), requests)
    if small:
        return memory(lowered)
    chunk_logits = batch * config.prefill_chunk * QWEN3_1_7B.vocab_size * 4
    params = nbytes(slm.param_shapes()) + nbytes(llm.param_shapes())
    full = memory(lowered)
    tiny = relay(batch, 16, 16, small=True)
    return {
        "caches": nbytes(caches) / GIB,
        "params": params / GIB,
        "logits_chunk": chunk_logits / GIB,
        **full,
        "temp_at_32_slots": tiny["temp"],
        "temp_from_caches": full["temp"] - tiny["temp"],
    }


def train(seq=12287):
    model = Model(QWEN3_1_7B, dtype=jnp.float32, remat=True)
    tok = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def loss(p, tokens, positions):
        return model.hidden(p, tokens, positions, None)[0].astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss)).lower(model.param_shapes(), tok, tok)
    return memory(lowered)


def grpo(seq=12287):
    """Loss + grad of the GRPO loss the training loop builds (`make_grpo_loss` on the
    `training_model`: remat, chunked log-probs at the rollout temperature), one sequence."""
    from relax.train.config import GRPOConfig
    from relax.train.grpo_train import make_grpo_loss
    from relax.train.logprobs import training_model

    cfg = GRPOConfig()
    model = training_model(Model(QWEN3_1_7B, dtype=jnp.float32), cfg.run.remat)
    loss_fn = make_grpo_loss(model, cfg)
    ints = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    floats = jax.ShapeDtypeStruct((1, seq), jnp.float32)
    batch = {"inputs": ints, "positions": ints, "targets": ints, "loss_mask": floats,
             "old_logp": floats, "ref_logp": floats,
             "advantages": jax.ShapeDtypeStruct((1,), jnp.float32)}  # fmt: skip
    grad = jax.grad(lambda p, mb: loss_fn(p, mb, jnp.float32(seq))[0])
    return memory(jax.jit(grad).lower(model.param_shapes(), batch))


CASES = {"decode": decode, "relay": relay, "train": train, "grpo": grpo}


def main(argv):
    global DTYPE
    if "--float32" in argv:
        DTYPE = jnp.float32
    argv = [a for a in argv if a not in ("--float32", "--accelerator-like")]
    names = argv or list(CASES)
    result = {}
    for name in names:
        result[name] = CASES[name]()
        print(name, ", ".join(f"{k} {v:.2f} GiB" for k, v in result[name].items()), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
