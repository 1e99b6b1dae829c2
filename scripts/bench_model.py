"""Model benchmarks, measured side by side in one run.

(a) Greedy decode tokens/s of `relax.generate` against `transformers`
    `generate` (PyTorch, same weights through save_hf), batch 8, 128 new tokens,
    on a random Qwen3 of about 20M parameters.
(b) Forward+backward throughput of a ~50M-parameter Qwen3 at sequence 512 (the
    training forward relax's trainers run: layers rematerialised, chunked log-prob
    loss; also without remat), as model FLOPs over this machine's measured float32
    matmul peak.
(c) Long-context greedy decode: batch 8, a 4,096-token prompt, 256 new tokens, a
    random 4-layer Qwen3, relax against `transformers` `generate` with its static
    cache (`cache_implementation="static"`), same weights.
(d) Decode cost against cache capacity: one decode step of a tiny 4-layer model,
    batch 8, with the same 200 filled slots in a 256-slot and a 32,768-slot cache.

The last line printed is one JSON object with `decode_vs_transformers`,
`train_flop_utilisation` and `long_decode_vs_transformers` (plus the raw figures).

    python scripts/bench_model.py                 # CPU, float32, the issue's sizes
    python scripts/bench_model.py --preset qwen3-0.6b --dtype bfloat16 --skip-train  # accelerator
"""

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_times

import relax
from relax.models import Model, ModelConfig
from relax.train.logprobs import sequence_stats, training_model

PRESETS = {
    # ~20M parameters: a small vocabulary keeps the embedding from dominating.
    "decode-20m": ModelConfig(
        family="qwen3",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        tie_embeddings=True,
    ),
    # ~50M parameters for the training throughput.
    "train-50m": ModelConfig(
        family="qwen3",
        vocab_size=8192,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=8,
        num_heads=10,
        num_kv_heads=5,
        head_dim=64,
        tie_embeddings=True,
    ),
    # ~10M parameters (mostly embedding) for the long-context decode, so the 4,096-token
    # prompt is a few seconds of CPU per run.
    "long-4l": ModelConfig(
        family="qwen3",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        tie_embeddings=True,
    ),
    # The real Qwen3-0.6B shape (random weights), for an accelerator run.
    "qwen3-0.6b": ModelConfig(
        family="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_embeddings=True,
    ),
}


def timed(fn, repeats):
    """Best wall time of `repeats` calls after one warm-up call (compilation)."""
    return best_times([fn], repeats)[1][0]


def bench_decode(
    cfg, dtype, batch, prompt_len, new_tokens, repeats, with_torch=True, static=False, chunk=64
):
    """Greedy decode tokens/s of relax and (with_torch) of transformers on the same weights.

    static: transformers uses its static (preallocated) KV cache. chunk: relax's
    prefill_chunk (prompt tokens ingested per loop step)."""
    model = Model(cfg, dtype=dtype)
    params = model.init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, size=(batch, prompt_len)).astype(np.int32)
    lens = np.full((batch,), prompt_len, np.int32)
    greedy = relax.SamplingConfig(greedy=True)
    config = relax.RelayConfig(
        max_new_tokens=new_tokens, slm=greedy, llm=greedy, eos_ids=(), pad_id=0, prefill_chunk=chunk
    )
    key = jax.random.key(1)

    def run_relax():
        out = relax.generate(model, params, prompts, lens, key, config)
        return jax.block_until_ready(out.tokens)

    result = {"params": model.num_params(), "batch": batch, "new_tokens": new_tokens}
    if not with_torch:
        t_relax = timed(run_relax, repeats)
        return {"relax_tokens_per_s": batch * new_tokens / t_relax, **result}

    import torch
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as path:
        relax.save_hf(model, params, path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = torch.as_tensor(prompts, dtype=torch.long)

    extra = {"cache_implementation": "static"} if static else {}

    def run_torch():
        with torch.no_grad():
            return hf.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )

    _, (t_relax, t_torch) = best_times([run_relax, run_torch], repeats)
    ours = np.asarray(run_relax())[:, prompt_len : prompt_len + new_tokens]
    theirs = run_torch()[:, prompt_len:].numpy()
    result.update(
        relax_tokens_per_s=batch * new_tokens / t_relax,
        transformers_tokens_per_s=batch * new_tokens / t_torch,
        decode_vs_transformers=t_torch / t_relax,
        greedy_token_agreement=float(np.mean(ours == theirs)),
    )
    return result


def bench_cache_capacity(batch=8, filled=200, capacities=(256, 32768), repeats=10):
    """ms per decode step (`jit(model.apply)`, cache donated) at each cache capacity,
    the same `filled` slots in use: the step should cost the same whatever the capacity."""
    cfg = PRESETS["long-4l"]
    model = Model(cfg)
    params = model.init_params(jax.random.key(0))
    step = jax.jit(model.apply, donate_argnums=3)
    tok = jnp.zeros((batch, 1), jnp.int32)
    steps = []
    for slots in capacities:
        holder = {"cache": model.init_cache(batch, slots), "i": 0}

        def one(holder=holder):
            pos = jnp.full((batch, 1), filled + holder["i"] % 8, jnp.int32)
            logits, holder["cache"] = step(params, tok, pos, holder["cache"])
            holder["i"] += 1
            return jax.block_until_ready(logits)

        steps.append(one)
    _, times = best_times(steps, repeats)
    return {slots: 1000 * t for slots, t in zip(capacities, times)}


def matmul_peak_flops(dtype, n=2048, repeats=20):
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = timed(lambda: jax.block_until_ready(f(a, a)), repeats)
    return 2 * n**3 / t


def bench_train(cfg, dtype, batch, seq, repeats, remat=True):
    """Seconds and FLOP/s of one loss + gradient of the training forward as relax's
    trainers build it: `training_model` (each layer rematerialised when `remat`, the
    `run.remat` default) and the chunked token log-probs of `sequence_stats` (SFT's
    cross-entropy), no [B, T, V] logits."""
    model = training_model(Model(cfg, dtype=dtype), remat)
    params = model.init_params(jax.random.key(0))
    tokens = jnp.asarray(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32
    )
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def loss_fn(p):
        stats = sequence_stats(model, p, tokens[:, :-1], positions[:, :-1], tokens[:, 1:])
        return -stats["logp"].mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    t = timed(lambda: jax.block_until_ready(step(params)), repeats)
    n = model.num_params()
    c = cfg
    t_len = seq - 1
    # Model FLOPs (recomputation not counted): 6 N per token for the dense parts
    # (forward 2N, backward 4N), plus the attention matmuls (QK^T and PV: 4 T^2 N H
    # forward per layer, x3 with backward).
    flops = 6 * n * batch * t_len + 12 * c.num_layers * batch * t_len**2 * c.num_heads * c.head_dim
    return {"train_params": n, "train_step_s": t, "train_flops_per_s": flops / t}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="decode-20m", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--long-prompt-len", type=int, default=4096)
    parser.add_argument("--long-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    print(f"devices: {jax.devices()}")

    decode = bench_decode(
        PRESETS[args.preset],
        dtype,
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.repeats,
        with_torch=not args.skip_torch,
    )
    print(
        f"(a) decode, {decode['params'] / 1e6:.1f}M params, batch {args.batch}, "
        f"{args.new_tokens} new tokens: relax {decode['relax_tokens_per_s']:.0f} tok/s"
    )
    if "transformers_tokens_per_s" in decode:
        print(
            f"    transformers {decode['transformers_tokens_per_s']:.0f} tok/s -> ratio "
            f"{decode['decode_vs_transformers']:.2f}x (greedy agreement "
            f"{decode['greedy_token_agreement']:.3f})"
        )
    result = dict(decode)
    if not args.skip_train:
        peak = matmul_peak_flops(dtype)
        train = bench_train(PRESETS["train-50m"], dtype, args.train_batch, 512, args.repeats)
        plain = bench_train(
            PRESETS["train-50m"], dtype, args.train_batch, 512, args.repeats, remat=False
        )
        util = train["train_flops_per_s"] / peak
        util_plain = plain["train_flops_per_s"] / peak
        print(
            f"(b) train fwd+bwd, {train['train_params'] / 1e6:.1f}M params, batch "
            f"{args.train_batch} x 512: {train['train_flops_per_s'] / 1e9:.1f} GFLOP/s of "
            f"{peak / 1e9:.1f} GFLOP/s matmul peak -> {util:.1%} (without remat {util_plain:.1%})"
        )
        result.update(
            train,
            matmul_peak_flops_per_s=peak,
            train_flop_utilisation=util,
            train_flop_utilisation_no_remat=util_plain,
        )
    if not args.skip_long:
        long = bench_decode(
            PRESETS["long-4l"],
            dtype,
            args.batch,
            args.long_prompt_len,
            args.long_new_tokens,
            2,
            with_torch=not args.skip_torch,
            static=True,
            chunk=512,
        )
        print(
            f"(c) long decode, {long['params'] / 1e6:.1f}M params, batch {args.batch}, prompt "
            f"{args.long_prompt_len}, {args.long_new_tokens} new tokens: relax "
            f"{long['relax_tokens_per_s']:.0f} tok/s"
        )
        result["long_relax_tokens_per_s"] = long["relax_tokens_per_s"]
        if "transformers_tokens_per_s" in long:
            print(
                f"    transformers (static cache) {long['transformers_tokens_per_s']:.0f} tok/s -> "
                f"ratio {long['decode_vs_transformers']:.2f}x (greedy agreement "
                f"{long['greedy_token_agreement']:.3f})"
            )
            result.update(
                long_transformers_tokens_per_s=long["transformers_tokens_per_s"],
                long_decode_vs_transformers=long["decode_vs_transformers"],
                long_greedy_token_agreement=long["greedy_token_agreement"],
            )
        cap = bench_cache_capacity(batch=args.batch)
        print(
            "(d) decode step, 200 slots filled: "
            + ", ".join(f"{ms:.1f} ms with {slots} slots" for slots, ms in cap.items())
        )
        result["decode_step_ms_by_cache_slots"] = cap
    result.setdefault("decode_vs_transformers", None)
    result.setdefault("train_flop_utilisation", None)
    result.setdefault("long_decode_vs_transformers", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
