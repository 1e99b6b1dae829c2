"""Checks that vLLM reads relax's exports: greedy tokens from vLLM equal relax's.

Writes a tiny random Qwen3 with `relax.save_hf` (or takes `--model DIR`, a real
export), runs scripts/vllm_generate.py on it in a vLLM environment's python
(`--vllm PYTHON`), decodes the same prompts greedily with `relax.generate`
(no EOS, as vLLM's `ignore_eos=True`) and compares the tokens row by row. Not a
test of the suite: it needs a vLLM install, which relax does not depend on.

    python scripts/check_vllm_export.py --vllm /work/vllm-venv/bin/python
    python scripts/check_vllm_export.py --vllm /work/vllm-venv/bin/python \\
        --model /models/exported --prompts 8 --max-tokens 64

It prints vllm_generate.py's timing line, one line per row that differs (the
first differing step, both tokens, and relax's logit margin there between its
own token and vLLM's: a margin near zero is a tie that float rounding may break
either way, a large one a real disagreement; a negative one means relax's full
forward itself prefers vLLM's token, its decode having rounded the other way),
and a last line

    check_vllm_export: OK, 4/4 rows equal (95 tokens), vllm 0.32.0

or `MISMATCH, ...`, with exit code 1 (about 80 s on 2 cores, most of it vLLM's
start-up and torch.compile; `--eager` saves ~30 s). Files go to a temporary
folder, or to `--keep DIR`, which keeps them (model/, requests.json,
result.json, vllm.log). If vLLM fails, the end of its log is printed.

Compare in float32 (the default). In bfloat16 the engines round differently and
greedy paths part within a few steps: on the tiny model 7 of 8 rows differed, all
at margins of 0.005-0.05 (bfloat16's spacing near the top logits).

The tiny model has head_dim 32: vLLM's CPU attention supports head sizes 32, 64,
80, 96, 112, 128, 160, 192, 224, 256 and 512 only. Its random weights are
scaled up from relax's normal(0.02) init, whose greedy output repeats one token.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import relax

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = relax.ModelConfig(
    family="qwen3",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", required=True, help="python of an environment with vllm")
    p.add_argument("--model", help="a Hugging Face folder (default: a tiny random Qwen3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=4, help="number of prompts")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens of the longest row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--keep", help="folder for the model, requests, result and vllm.log")
    return p.parse_args()


def tiny_model(path, seed):
    """Saves a tiny random Qwen3 whose greedy output varies; returns (model, params)."""
    model = relax.Model(TINY)
    params = model.init_params(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Weights of std ~0.2 give logits of std ~2 over 512 tokens: varied argmaxes with
    # wide margins, so float rounding between the two engines rarely flips a token.
    leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
    relax.save_hf(model, params, path)
    return model, params


def requests(vocab_size, count, max_tokens, seed):
    """`count` random prompts of 4-24 ids and max_tokens from max_tokens/2 to max_tokens."""
    rng = np.random.default_rng(seed)
    # Below 32,000, clear of a real tokenizer's special ids at the top of its vocabulary.
    high = min(vocab_size, 32_000)
    prompts = [rng.integers(0, high, int(rng.integers(4, 25))).tolist() for _ in range(count)]
    news = np.linspace(max(1, max_tokens // 2), max_tokens, count).astype(int).tolist()
    return prompts, news


def relax_greedy(model, params, prompts, news):
    """relax.generate's greedy tokens of each row, `news[b]` of them, no EOS."""
    width = max(len(p) for p in prompts)
    padded = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    greedy = relax.SamplingConfig(greedy=True)
    config = relax.RelayConfig(
        max_new_tokens=max(news), slm=greedy, llm=greedy, eos_ids=(), pad_id=0
    )
    out = relax.generate(model, params, padded, lens, jax.random.key(0), config)
    tokens = np.asarray(out.tokens)
    return [tokens[b, n0 : n0 + n].tolist() for b, (n0, n) in enumerate(zip(lens, news))]


def margin(model, params, prefix, ours, theirs):
    """relax's logit of its token minus that of vLLM's, after `prefix`."""
    tokens = jnp.asarray([prefix], jnp.int32)
    positions = jnp.arange(len(prefix), dtype=jnp.int32)[None]
    logits, _ = model.apply(params, tokens, positions, None)
    last = np.asarray(logits[0, -1])
    return float(last[ours] - last[theirs])


def run_vllm(python, model_dir, prompts, news, dtype, eager, folder):
    """vllm_generate.py's result dict; its log goes to folder/vllm.log."""
    req_path = os.path.join(folder, "requests.json")
    res_path = os.path.join(folder, "result.json")
    with open(req_path, "w") as f:
        json.dump({"model": model_dir, "prompts": prompts, "max_tokens": news, "repeats": 1}, f)
    cmd = [python, os.path.join(HERE, "vllm_generate.py"), req_path, res_path, "--dtype", dtype]
    cmd += ["--eager"] if eager else []
    log_path = os.path.join(folder, "vllm.log")
    with open(log_path, "w") as log:  # vLLM logs on stdout and stderr alike
        done = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path) as f:
        text = f.read()
    if done.returncode != 0:
        sys.exit(
            f"{text[-3000:]}\ncheck_vllm_export: vllm_generate.py failed (exit {done.returncode})"
        )
    print("".join(line for line in text.splitlines(True) if line.startswith("vllm: ")), end="")
    with open(res_path) as f:
        return json.load(f)


def compare(model, params, prompts, ours, theirs):
    """Rows equal; prints where each other row first differs."""
    equal = 0
    for b, (a, v) in enumerate(zip(ours, theirs)):
        if a == v:
            equal += 1
            continue
        step = next((t for t, (x, y) in enumerate(zip(a, v)) if x != y), min(len(a), len(v)))
        if step < min(len(a), len(v)):
            gap = margin(model, params, prompts[b] + a[:step], a[step], v[step])
            print(
                f"row {b}: differs at step {step} of {len(a)}: relax {a[step]}, "
                f"vllm {v[step]}, relax's margin {gap:.2e}"
            )
        else:
            print(f"row {b}: relax wrote {len(a)} tokens, vllm {len(v)}")
    return equal


def main():
    args = parse_args()
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        if args.model:
            model_dir = os.path.abspath(args.model)
            model, params = relax.load_hf(model_dir, dtype=dtype)
        else:
            model_dir = os.path.join(folder, "model")
            model, params = tiny_model(model_dir, args.seed)
            model = relax.Model(model.config, dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        prompts, news = requests(model.config.vocab_size, args.prompts, args.max_tokens, args.seed)
        theirs = run_vllm(args.vllm, model_dir, prompts, news, args.dtype, args.eager, folder)
        ours = relax_greedy(model, params, prompts, news)

    equal = compare(model, params, prompts, ours, theirs["outputs"])
    verdict = "OK" if equal == len(ours) else "MISMATCH"
    print(
        f"check_vllm_export: {verdict}, {equal}/{len(ours)} rows equal "
        f"({sum(news)} tokens), vllm {theirs['vllm_version']}"
    )
    sys.exit(0 if equal == len(ours) else 1)


if __name__ == "__main__":
    main()
