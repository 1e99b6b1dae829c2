"""Accelerator benchmark: decode, relay and GRPO step at real model shapes, random weights.

    python scripts/bench_accel.py            # one GPU or TPU chip, <= 8 minutes
    python scripts/bench_accel.py --tiny     # the same code at toy shapes, CPU, < 1 minute

Prints progress to stderr and ends with one JSON line on stdout:

  decode      tokens/s of `relax.generate` for a Qwen3-0.6B-shaped bf16 model, batch 1
              and 16, 4,096 cache slots (a 512-token prompt, then decoding), and the
              HBM-bandwidth utilisation: (bytes of the weights + of the filled part of
              the KV cache) per decode step / step time / the chip's peak bandwidth.
              Decode time is the difference of two runs of one compiled program that
              stop after n1 and n2 new tokens, so prefill and compilation cancel out.
  relay       tokens/s of `relax.relay_generate` with 0.6B + 8B-shaped bf16 models,
              batch 16, 4,096 slots, the LLM writing ~3% of the tokens (whole call:
              prefill, SLM and LLM decoding, catch-ups).
  grpo_step   seconds of one GRPO micro-step: loss + gradient of the loss `relax grpo`
              trains with (`make_grpo_loss`), float32 0.6B-shaped params (the master
              weights), one row of 4,096 tokens.

How random weights are made to behave. A random model samples junk, so each model is
wrapped (`Steered`): EOS is suppressed until a stop slot carried in the params (so one
compiled program serves both decode lengths), and the relay's SLM is forced, by a large
logit bias, to write `<call>4</call>` (3 tokens) at every slot p with p % 128 in 0..2:
the LLM then writes 4 tokens per 128 slots, 3.1% of the output. The vocabulary is a
stand-in with the 151,936 ids of Qwen3 whose ids 2..13 read as `<call>`, `</call>` and
the digits, so the command automaton runs exactly as with a real tokenizer. The bias is
one elementwise op on the logits; everything else is the code eval and training run.

Devices: `jax.devices()[0].device_kind` is looked up in `relax.plan.devices.DEVICES`; an
unknown chip (or a CPU) reports null utilisation. A case that runs out of memory is
reported as an error and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from relax.models import Model, ModelConfig
from relax.plan.arch import KNOWN
from relax.plan.devices import lookup
from relax.plan.programs import stand_in_command
from relax.relay import decoder
from relax.relay.config import GREEDY, RelayConfig

PAD, EOS, OPEN, CLOSE = 0, 1, 2, 3  # ids of the stand-in vocabulary; 4..13 are the digits
CALL = (OPEN, 4 + 4, CLOSE)  # <call>4</call>
CALL_TOKENS = 4

# slots: KV cache slots per row (prompt + new tokens); decode_steps: the two stop lengths.
FULL = {
    "slm": KNOWN["qwen3-0.6b"],
    "llm": KNOWN["qwen3-8b"],
    "slots": 4096,
    "prompt": 512,
    "decode_batches": (1, 16),
    "decode_steps": (128, 1152),
    "relay_batch": 16,
    "relay_new": 1536,
    "period": 128,
    "grpo_tokens": 4096,
}
_TINY_ARCH = {"family": "qwen3", "vocab_size": 512, "num_kv_heads": 2, "head_dim": 16}
TINY = {
    "slm": ModelConfig(
        **_TINY_ARCH, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4
    ),
    "llm": ModelConfig(
        **_TINY_ARCH, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8
    ),
    "slots": 256,
    "prompt": 32,
    "decode_batches": (1, 4),
    "decode_steps": (16, 80),
    "relay_batch": 4,
    "relay_new": 192,
    "period": 32,
    "grpo_tokens": 128,
}


def log(msg):
    print(f"[bench_accel] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Steered:
    """A model whose EOS logit is off before slot params["stop"] (and forced from it on),
    and which writes CALL at slots p with p % period in 0..2 when period > 0."""

    inner: Model
    period: int = 0

    def init_cache(self, batch, max_len):
        return self.inner.init_cache(batch, max_len)

    def apply(self, params, tokens, positions, cache):
        logits, cache = self.inner.apply(params["inner"], tokens, positions, cache)
        nxt = positions + 1  # the slot being predicted
        V = logits.shape[-1]
        vocab = jnp.arange(V)
        want = jnp.where(nxt >= params["stop"], EOS, -1)
        if self.period:
            phase = nxt % self.period
            want = jnp.where(phase < 3, jnp.asarray(CALL)[jnp.clip(phase, 0, 2)], want)
        bias = jnp.where(vocab == EOS, -1e9, 0.0) + jnp.where(vocab == want[..., None], 2e9, 0.0)
        return logits + bias, cache


def random_params(model, seed):
    return jax.jit(model.init_params)(jax.random.key(seed))


def prompts(batch, width, V, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(14, V, size=(batch, width)).astype(np.int32), np.full(
        batch, width, np.int32
    )


def tree_bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def decode_case(S, batch, device):
    cfg = S["slm"]
    model = Steered(Model(cfg, dtype=jnp.bfloat16))
    inner = random_params(model.inner, 0)
    P, N = S["prompt"], S["slots"] - S["prompt"]
    pr, ln = prompts(batch, P, cfg.vocab_size)
    relay_cfg = RelayConfig(max_new_tokens=N, slm=GREEDY, llm=GREEDY, eos_ids=(EOS,), pad_id=PAD)
    key = jax.random.key(0)

    def run(steps):  # stop after `steps` new tokens: EOS forced at slot P + steps - 1
        params = {"inner": inner, "stop": jnp.int32(P + steps - 1)}
        return decoder.generate(model, params, pr, ln, key, relay_cfg)

    n1, n2 = S["decode_steps"]
    jax.block_until_ready(run(n1))  # compile
    # The step time is a difference of two runs: the best of three of each, alternating,
    # so that one slow run (a busy host) cannot make it small or negative.
    runs = [(timed(lambda: run(n1)), timed(lambda: run(n2))) for _ in range(3)]
    (o1, _), (o2, _) = runs[0]
    t1, t2 = (min(r[i][1] for r in runs) for i in (0, 1))
    got = int(np.asarray(o2.lengths)[0] - P), int(np.asarray(o1.lengths)[0] - P)
    assert got == (n2, n1), f"rows stopped after {got} tokens, not {(n2, n1)}"
    step = (t2 - t1) / (n2 - n1)
    filled = P + (n1 + n2) / 2  # mean filled slots over the measured steps
    kv = 2 * cfg.num_layers * batch * filled * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 k, v
    moved = tree_bytes(inner) + kv
    return {
        "tokens_per_s": round(batch / step, 1),
        "step_ms": round(step * 1e3, 3),
        "bytes_per_step": int(moved),
        "hbm_utilisation": None
        if device is None
        else round(moved / step / device.hbm_bandwidth, 4),
    }


def relay_case(S, device):
    slm = Steered(Model(S["slm"], dtype=jnp.bfloat16), S["period"])
    llm = Steered(Model(S["llm"], dtype=jnp.bfloat16))
    B, P, N = S["relay_batch"], S["prompt"], S["relay_new"]
    never = jnp.int32(2**30)
    sp = {"inner": random_params(slm.inner, 0), "stop": never}
    lp = {"inner": random_params(llm.inner, 1), "stop": never}
    V = S["slm"].vocab_size
    command = stand_in_command(V)
    relay_cfg = RelayConfig(
        max_new_tokens=N,
        max_call_tokens=64,
        max_calls=N,
        slm=GREEDY,
        llm=GREEDY,
        eos_ids=(EOS,),
        pad_id=PAD,
    )
    pr, ln = prompts(B, P, V)
    key = jax.random.key(0)
    run = lambda: decoder.relay_generate(slm, sp, llm, lp, pr, ln, key, relay_cfg, command)
    jax.block_until_ready(run())  # compile
    out, t = timed(run)
    gen = int(np.sum(np.asarray(out.lengths) - P))
    llm_tokens = int(np.sum(np.asarray(out.llm_tokens)))
    return {
        "tokens_per_s": round(gen / t, 1),
        "seconds": round(t, 3),
        "llm_token_share": round(llm_tokens / max(gen, 1), 4),
        "calls": int(np.sum(np.asarray(out.calls))),
    }


def grpo_case(S, device):
    from relax.train.config import GRPOConfig
    from relax.train.grpo_train import make_grpo_loss

    model = Model(S["slm"], dtype=jnp.float32)
    params = random_params(model, 0)
    T = S["grpo_tokens"]
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(14, S["slm"].vocab_size, size=(1, T)), jnp.int32)
    mb = {
        "inputs": toks,
        "positions": jnp.arange(T, dtype=jnp.int32)[None],
        "targets": jnp.roll(toks, -1, axis=1),
        "loss_mask": jnp.ones((1, T), jnp.float32).at[:, : T // 8].set(0.0),  # prompt masked
        "old_logp": jnp.full((1, T), -12.0, jnp.float32),
        "ref_logp": jnp.full((1, T), -12.0, jnp.float32),
        "advantages": jnp.ones((1,), jnp.float32),
    }
    loss_fn = make_grpo_loss(model, GRPOConfig())
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    num_tokens = jnp.float32(T)
    jax.block_until_ready(step(params, mb, num_tokens))  # compile
    times = [timed(lambda: step(params, mb, num_tokens))[1] for _ in range(3)]
    t = min(times)
    flops = 6.0 * model.num_params() * T  # dense matmuls, forward + backward
    return {
        "seconds": round(t, 4),
        "tokens_per_s": round(T / t, 1),
        "model_flops_utilisation_vs_bf16_peak": None
        if device is None
        else round(flops / t / device.bf16_flops, 4),
    }


def guarded(name, fn):
    """Runs one case; an out-of-memory (or any other) failure is reported, not raised."""
    log(f"{name} ...")
    t = time.perf_counter()
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001  (OOM is an XlaRuntimeError; report any failure)
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        res = {"error": ("OOM: " if oom else f"{type(e).__name__}: ") + msg}
    log(f"{name}: {res} ({time.perf_counter() - t:.1f} s)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke run)")
    ap.add_argument("--cases", default="decode,relay,grpo_step", help="comma-separated subset")
    args = ap.parse_args(argv)
    S = TINY if args.tiny else FULL
    cases = set(args.cases.split(","))
    dev0 = jax.devices()[0]
    device = lookup(dev0.device_kind)
    log(f"device {dev0.device_kind!r} -> {device.name if device else 'unknown (null utilisation)'}")
    res = {
        "device_kind": dev0.device_kind,
        "device": device.name if device else None,
        "tiny": args.tiny,
    }
    if "decode" in cases:
        res["decode"] = {
            f"batch={b}": guarded(f"decode batch {b}", lambda b=b: decode_case(S, b, device))
            for b in S["decode_batches"]
        }
    if "relay" in cases:
        res["relay"] = guarded(f"relay batch {S['relay_batch']}", lambda: relay_case(S, device))
    if "grpo_step" in cases:
        res["grpo_step"] = guarded(
            f"grpo step {S['grpo_tokens']} tokens", lambda: grpo_case(S, device)
        )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
