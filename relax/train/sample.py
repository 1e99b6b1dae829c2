"""`relax sample`: the SLM's own correct solutions, the data `relax sft` reads.

For each problem ``{"question", "answer"}``, ``k`` samples from the SLM (the paper's
prompt, ``relax.train.warmup.self_solutions``), graded with ``relax.grade``; the correct
ones are appended to ``cfg.output`` as ``{"question", "answer", "response", "index",
"enable_thinking"}`` rows (``index``: the problem's row in the data). Every problem
sampled is recorded in ``<output>.all.jsonl`` with how many of its k samples were
correct.

Problems go in fixed chunks of ``batch_size`` (chunk c samples with the seed's key
folded with its first row), and each chunk is written when it ends: a rerun with the
same data and output skips the chunks ``.all.jsonl`` records, drops rows a cut-short
run wrote after its last record, and ends with the file an uninterrupted run writes.
Another data file for the same output is refused.

What it does not do: insert commands (``relax sft`` does, ``build_warmup_examples``)
or run over several processes (one process, its default device).
"""

import collections
import functools
import json
import os

import jax
from tqdm.auto import tqdm

from relax.errors import DataError
from relax.tokenizer import build_prompt
from relax.train.warmup import self_solutions


def sample_solutions(model, params, tokenizer, problems, cfg, grade, progress=True):
    """Sample, grade and append the correct solutions of ``problems`` to ``cfg.output``.

    ``cfg`` is a ``SampleConfig``; the SLM decodes with ``cfg.relay``. Returns (problems
    sampled now, correct rows written now, problems skipped as already done)."""
    key = jax.random.key(cfg.seed)
    prompt_fn = functools.partial(build_prompt, enable_thinking=cfg.enable_thinking)
    done = _resume(cfg.output, problems)
    n, sampled, written = len(problems), 0, 0
    bar = tqdm(total=n, initial=len(done), desc="sample", disable=not progress)
    for start in range(0, n, cfg.batch_size):
        index = [i for i in range(start, min(start + cfg.batch_size, n)) if i not in done]
        if not index:  # (a chunk is partly done only when limit or batch_size changed)
            continue
        chunk = [problems[i] for i in index]
        kept = self_solutions(
            model, params, tokenizer, chunk, cfg.relay, grade, jax.random.fold_in(key, start),
            batch_size=len(chunk), samples=cfg.k, prompt_fn=prompt_fn,
        )  # fmt: skip
        first = {}  # question -> its first index in the chunk
        for i in index:
            first.setdefault(problems[i]["question"], i)
        rows = [
            dict(r, index=first[r["question"]], enable_thinking=cfg.enable_thinking) for r in kept
        ]
        correct = collections.Counter(r["index"] for r in rows)
        record = [
            {"index": i, "question": problems[i]["question"], "correct": correct[i], "k": cfg.k}
            for i in index
        ]
        _append(cfg.output, rows)  # the rows first: a record promises its rows are written
        _append(cfg.output + ".all.jsonl", record)
        sampled, written = sampled + len(chunk), written + len(rows)
        bar.update(len(chunk))
    bar.close()
    return sampled, written, len(done)


def _append(path, rows):
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()


def _read(path):
    """The rows of a JSONL file this module wrote; a cut-short last line is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DataError(
                    f"{path}: line {number} is not valid JSON", "delete the file to start over"
                ) from None
    return rows


def _resume(output, problems):
    """The problem indices ``<output>.all.jsonl`` records as done; ``output`` keeps only
    their rows (a run cut short between its two appends wrote rows with no record)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    records = _read(output + ".all.jsonl")
    for r in records:
        i = r.get("index")
        if not isinstance(i, int) or i >= len(problems) or problems[i]["question"] != r["question"]:
            raise DataError(
                f"{output}.all.jsonl records problem {i} as {r.get('question')!r:.60}, "
                "which is not that row of this data",
                "pass the data it was sampled from, or another output (or delete it)",
            )
    done = {r["index"] for r in records}
    rows = _read(output)
    if rows and not records:
        raise DataError(
            f"{output} exists and holds rows no relax sample run recorded ({output}.all.jsonl "
            "is missing or empty)",
            "choose another output; relax sample never overwrites such a file",
        )
    kept = [r for r in rows if r.get("index") in done]
    if len(kept) != len(rows):
        with open(output + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(output + ".tmp", output)
    return done
