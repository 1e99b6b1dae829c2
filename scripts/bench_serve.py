"""Load benchmark of `relax serve`: C concurrent clients on loopback against the relay server.

    python scripts/bench_serve.py [--clients 1,8,32] [--requests 128] [--slots 16]
                                  [--budget 512] [--steps-per-call 16] [--rounds 2]

The models, prompts and long-tailed answer lengths are `bench_engine.py`'s (random tiny
models, greedy; the SLM ends where a hash of its token and position falls under a
lognormal hazard, median budget / 8, and writes `<call>4</call>` every `--period` slots),
served by `relax.serve` in this process (uvicorn on a thread, `--steps-per-call` engine
iterations per host call). The clients run in another process (asyncio + httpx): C of
them share R requests, each streamed (`/v1/completions`, token-id prompt, temperature 0,
max_tokens = the budget, usage in the last chunk). Every request must complete with the
offline engine's greedy answer: the same text (the vocabulary's token texts decoded), the
same number of tokens and of LLM tokens.

Prints one line per client count and ends with one JSON object, per C:
  tokens_per_s            generated tokens / wall time of all R requests
  ttft_p50 / ttft_p99     time to first token (s), as the client sees it
  e2e_p50 / e2e_p99       request latency (s)
  served_vs_offline       tokens_per_s over the engine's offline throughput on the same R
                          requests and slots (one compiled program for the whole queue,
                          offline_tokens_per_s beside it), each side the best of --rounds
                          alternating rounds (offline, then served); goal >= 0.8 (the
                          HTTP layer and host stepping cost little)
  round_ratios            each round's served / offline, for the spread
  cpu_s                   CPU seconds of the last round: the offline run, the served run
                          (the server process: engine, HTTP, XLA's threads) and the
                          clients' process; on 2 cores what the server and the clients
                          spend beyond the offline run is what the served run loses
The latencies are the best served round's. offline_tokens_per_s at the top level: the
best of --rounds offline runs at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import time

import jax
import numpy as np

SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def tokenizer_of(texts):
    """A `transformers` tokenizer whose ids are `texts` (decoded by concatenation)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(texts)}, unk_token=texts[0]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=texts[1], pad_token=texts[0])


def clients(url, jobs, c, out):
    """The load: `c` streaming clients take `jobs` (index, prompt ids, max_tokens) in turn;
    `out` gets ([(index, ttft, e2e, text, usage)], wall seconds)."""
    import httpx

    async def run():
        todo = list(jobs)[::-1]
        results = []
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(timeout=None, limits=limits) as http:

            async def client():
                while todo:
                    i, ids, max_tokens = todo.pop()
                    body = {"model": "relay", "prompt": ids, "max_tokens": max_tokens,
                            "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
                    t0 = time.perf_counter()
                    first, text, usage = None, [], None
                    async with http.stream("POST", url + "/v1/completions", json=body) as r:
                        assert r.status_code == 200, (r.status_code, await r.aread())
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            d = json.loads(line[6:])
                            usage = d.get("usage") or usage
                            for ch in d["choices"]:
                                if ch["text"] and first is None:
                                    first = time.perf_counter() - t0
                                text.append(ch["text"])
                    results.append((i, first, time.perf_counter() - t0, "".join(text), usage))

            t0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(client() for _ in range(c)))
            return results, time.perf_counter() - t0, time.process_time() - cpu0

    out.put(asyncio.run(run()))


def main(argv=None):
    import sys

    sys.path.insert(0, SCRIPTS)
    from bench_engine import Steered, length_hazard, prompts_for
    from bench_relay import EOS, PAD, TEXTS, tiny
    from timing import best_times

    from relax.relay.command import CallCommand
    from relax.relay.config import GREEDY, RelayConfig
    from relax.relay.engine import Engine, Requests, stats
    from relax.serve.app import Service, create_app
    from relax.serve.cli import Background
    from relax.serve.config import ServeConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--period", type=int, default=128)
    ap.add_argument("--trigger", type=float, default=0.25, help="llm_trigger_fraction")
    ap.add_argument("--call-rows", type=int, default=4)
    ap.add_argument("--steps-per-call", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    slm_model, sp = tiny(jax.random.PRNGKey(1), 64, 2, 4)
    llm_model, lp = tiny(jax.random.PRNGKey(2), 256, 4, 8)
    hz = tuple(float(x) for x in length_hazard(args.budget, args.prompt + args.budget))
    slm, llm = Steered(slm_model, hz, args.period), Steered(llm_model)
    command = CallCommand.from_token_texts(TEXTS)
    config = RelayConfig(
        max_new_tokens=args.budget, max_call_tokens=64, max_calls=64, prefill_chunk=64,
        llm_trigger_fraction=args.trigger, slm=GREEDY, llm=GREEDY, eos_ids=(EOS,), pad_id=PAD,
    )  # fmt: skip
    R = args.requests
    prompts, lens = prompts_for(R, args.prompt)
    tokenizer = tokenizer_of(TEXTS)

    # Offline: the whole queue as one program on the same slots.
    engine = Engine(slm, llm, config, command, args.slots, call_rows=args.call_rows)
    requests = Requests.build(config, prompts, lens, jax.random.PRNGKey(0))
    offline_run = lambda: engine.run_state(sp, lp, requests)
    (es,), (t_off,) = best_times([offline_run], args.rounds)
    out = jax.tree.map(np.asarray, es.results.output())
    generated = stats(es)["generated_tokens"]
    offline = generated / t_off
    want = [
        (
            tokenizer.decode(out.tokens[i, lens[i] : out.lengths[i]].tolist(),
                             skip_special_tokens=True),
            int(out.lengths[i] - lens[i]),
            int(out.llm_tokens[i]),
        )
        for i in range(R)
    ]  # fmt: skip
    print(f"offline: {R} requests, {generated} tokens in {t_off:.2f}s: {offline:.0f} tokens/s")

    serve_cfg = ServeConfig(
        relay=config, models=("relay",), slots=args.slots, prompt_width=args.prompt,
        steps_per_call=args.steps_per_call, max_queue=max(64, R), max_rows=1,
        call_rows=args.call_rows,
    )  # fmt: skip
    service = Service(tokenizer, serve_cfg, slm, sp, llm, lp, command=command)
    jobs = [(i, prompts[i, : lens[i]].tolist(), args.budget) for i in range(R)]
    res = {"offline_tokens_per_s": round(offline, 1)}
    ctx = multiprocessing.get_context("spawn")

    def cpu_seconds():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def offline_time():
        start, cpu = time.perf_counter(), cpu_seconds()
        jax.block_until_ready(offline_run())
        cpu_used["offline"] = cpu_seconds() - cpu
        return time.perf_counter() - start

    def served_run(url, c):
        q = ctx.Queue()
        proc = ctx.Process(target=clients, args=(url, jobs, c, q))
        proc.start()
        cpu = cpu_seconds()
        results, wall, client_cpu = q.get()
        cpu_used["served"], cpu_used["clients"] = cpu_seconds() - cpu, client_cpu
        proc.join()
        assert len(results) == R, f"{len(results)} of {R} requests completed"
        for i, _, _, text, usage in results:
            got = (text, usage["completion_tokens"], usage["llm_tokens"])
            assert got == want[i], f"request {i}: served {got[1:]}, offline {want[i][1:]}"
        return results, wall

    cpu_used = {}  # CPU seconds of the last offline run, served run (server) and its clients
    with Background(create_app(service)) as server:
        for c in (int(x) for x in args.clients.split(",")):
            # Alternating rounds: the offline queue, then the served run, --rounds times,
            # so both sides share the machine's phase (a shared CPU's speed drifts by tens
            # of percent within minutes); each side's best round makes the ratio.
            pairs = [(offline_time(), served_run(server.url, c)) for _ in range(args.rounds)]
            t_now = min(t for t, _ in pairs)
            results, wall = min((p[1] for p in pairs), key=lambda rw: rw[1])
            tokens = sum(r[4]["completion_tokens"] for r in results)
            ttft = np.array([r[1] for r in results])
            e2e = np.array([r[2] for r in results])
            row = {
                "tokens_per_s": round(tokens / wall, 1),
                "ttft_p50": round(float(np.percentile(ttft, 50)), 4),
                "ttft_p99": round(float(np.percentile(ttft, 99)), 4),
                "e2e_p50": round(float(np.percentile(e2e, 50)), 3),
                "e2e_p99": round(float(np.percentile(e2e, 99)), 3),
                "served_vs_offline": round(tokens / wall / (generated / t_now), 3),
                "offline_tokens_per_s": round(generated / t_now, 1),
                "round_ratios": [round(t / w, 3) for t, (_, w) in pairs],
                "cpu_s": {k: round(v, 2) for k, v in cpu_used.items()},
            }
            res[f"C={c}"] = row
            print(f"C={c}: {R} requests, {tokens} tokens in {wall:.2f}s, every one the offline "
                  f"answer: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)  # fmt: skip
    res.update(requests=R, slots=args.slots, budget=args.budget,
               steps_per_call=args.steps_per_call)  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()
