"""Benchmark loaders: every benchmark becomes a list of `Problem(id, question, answer, kind)`.

Three sources, one result:
  * the paper's Hugging Face dataset ids and splits (`BENCHMARKS`, from the
    official `eval/datasets_loader.py`; MATH-500 uses the hub copy of the CSV
    the official code downloads),
  * a tensorflow-datasets name (`tfds:NAME[/CONFIG]`; tensorflow-datasets is an
    optional import),
  * a local JSONL / JSON / Parquet file with a field mapping.

`kind` is "math" (graded by boxed answer + math-verify) or "choice" (graded by
letter). Multiple-choice questions carry their lettered options in the
question text ("A. ...") and the answer is the letter.

Randomness is seeded: the official code draws its 1,000-question subsets of
MMLU-Pro / SuperGPQA / BBEH with an unseeded shuffle and shuffles GPQA options
unseeded; here both depend only on `seed`, so a result can be reproduced.
AIME is scored avg@k: the loader returns 30 problems and `Benchmark.repeats`
(default 32) says how many samples each gets.

Offline, a hub id fails with one `BenchmarkUnavailable` error that says how to
pass a local file instead. Nothing here downloads anything by itself besides
`datasets.load_dataset` for a hub id.
"""

import dataclasses
import hashlib
import json
import os
import random
from typing import NamedTuple

__all__ = [
    "BENCHMARKS",
    "MATH_BENCHMARKS",
    "TRANSFER_BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "BenchmarkUnavailable",
    "Problem",
    "format_choices",
    "load_benchmark",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Problem(NamedTuple):
    id: str
    question: str  # for multiple choice: includes the lettered options
    answer: str  # for multiple choice: the letter
    kind: str  # "math" | "choice"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    problems: tuple  # of Problem
    repeats: int = 1  # samples per problem (avg@k)

    def __len__(self):
        return len(self.problems)


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how its rows map to a Problem.

    fields: Problem field -> row column. "question" and "answer" are needed;
    "options" (a list column) makes it multiple choice; "choices" (a tuple of
    columns, the first one correct, GPQA style) also does, with seeded shuffle;
    "id" is optional (the row index otherwise).
    answer_format: "plain", "gsm8k" (text after ####, commas removed),
    "first" (first element of a list column), "letter" (index or letter).
    """

    name: str
    hf_id: str
    hf_config: str | None
    split: str
    fields: tuple  # ((problem_field, column), ...); tuple so the spec is hashable
    kind: str = "math"
    answer_format: str = "plain"
    repeats: int = 1
    sample: int | None = None  # seeded subset size (the paper's 1,000)

    @property
    def field_map(self):
        return dict(self.fields)


def _spec(
    name, hf_id, config, split, kind="math", answer_format="plain", repeats=1, sample=None, **fields
):
    return BenchmarkSpec(
        name, hf_id, config, split, tuple(fields.items()), kind, answer_format, repeats, sample
    )


BENCHMARKS = {
    s.name: s
    for s in [
        _spec(
            "math500",
            "HuggingFaceH4/MATH-500",
            None,
            "test",
            question="problem",
            answer="answer",
            id="unique_id",
        ),
        _spec(
            "gsm8k",
            "openai/gsm8k",
            "main",
            "test",
            answer_format="gsm8k",
            question="question",
            answer="answer",
        ),
        _spec(
            "minerva",
            "zwhe99/simplerl-minerva-math",
            None,
            "test",
            question="problem",
            answer="answer",
        ),
        _spec(
            "olympiadbench",
            "zwhe99/simplerl-OlympiadBench",
            None,
            "test",
            answer_format="first",
            question="question",
            answer="final_answer",
            id="id",
        ),
        _spec(
            "aime2024",
            "HuggingFaceH4/aime_2024",
            None,
            "train",
            repeats=32,
            question="problem",
            answer="answer",
            id="id",
        ),
        _spec(
            "aime2025",
            "yentinglin/aime_2025",
            "default",
            "train",
            repeats=32,
            question="problem",
            answer="answer",
            id="id",
        ),
        _spec(
            "mmlu_pro",
            "TIGER-Lab/MMLU-Pro",
            None,
            "test",
            kind="choice",
            answer_format="letter",
            sample=1000,
            question="question",
            options="options",
            answer="answer",
            id="question_id",
        ),
        _spec(
            "supergpqa",
            "m-a-p/SuperGPQA",
            None,
            "train",
            kind="choice",
            answer_format="letter",
            sample=1000,
            question="question",
            options="options",
            answer="answer_letter",
            id="uuid",
        ),
        _spec(
            "gpqa_diamond",
            "Idavidrein/gpqa",
            "gpqa_diamond",
            "train",
            kind="choice",
            question="Question",
            id="Record ID",
            choices=(
                "Correct Answer",
                "Incorrect Answer 1",
                "Incorrect Answer 2",
                "Incorrect Answer 3",
            ),
        ),
        _spec(
            "bbeh",
            "MrLight/bbeh-eval",
            None,
            "train",
            sample=1000,
            question="question",
            answer="answer",
        ),
    ]
}
MATH_BENCHMARKS = ("math500", "gsm8k", "minerva", "olympiadbench", "aime2024", "aime2025")
TRANSFER_BENCHMARKS = ("mmlu_pro", "supergpqa", "gpqa_diamond", "bbeh")

# Columns tried, in order, when a local file has no mapping and no spec.
_GUESS = {
    "question": ("question", "problem", "input", "prompt", "Question"),
    "answer": ("answer", "final_answer", "target", "solution", "answer_letter", "expected_answer"),
    "options": ("options", "choices"),
    "id": ("id", "unique_id", "uid", "question_id", "idx"),
}


class BenchmarkUnavailable(RuntimeError):
    """A benchmark source could not be read (offline hub, missing file or package)."""


def format_choices(question, options):
    """Question followed by lettered options, as the official loaders write them."""
    lines = [str(question).rstrip(), "", "Options:"]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def _format_answer(value, fmt):
    if fmt == "gsm8k":
        return str(value).split("####")[-1].strip().replace(",", "")
    if fmt == "first":
        if isinstance(value, (list, tuple)) or (
            hasattr(value, "tolist") and not isinstance(value, str)
        ):
            value = list(value)
            value = value[0] if value else ""
        return str(value).strip()
    if fmt == "letter":
        if isinstance(value, (int,)) and not isinstance(value, bool):
            return LETTERS[value]
        s = str(value).strip().strip("()").strip()
        return LETTERS[int(s)] if s.isdigit() else s.upper()
    return str(value).strip()


def _stable_seed(seed, key):
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def _rows_to_problems(rows, spec, fields, seed):
    problems = []
    for i, row in enumerate(rows):
        pid = (
            str(row[fields["id"]]) if "id" in fields and fields["id"] in row else f"{spec.name}/{i}"
        )
        question = row[fields["question"]]
        if "choices" in fields:  # GPQA: first column correct, options shuffled with a seeded rng
            opts = [str(row[c]).strip() for c in fields["choices"]]
            order = list(range(len(opts)))
            random.Random(_stable_seed(seed, pid)).shuffle(order)
            question = format_choices(question, [opts[j] for j in order])
            problems.append(Problem(pid, question, LETTERS[order.index(0)], "choice"))
            continue
        answer = _format_answer(row[fields["answer"]], spec.answer_format)
        kind = spec.kind
        if "options" in fields and fields["options"] in row and row[fields["options"]] is not None:
            opts = list(row[fields["options"]])
            question = format_choices(question, [str(o) for o in opts])
            kind = "choice"
            answer = _format_answer(answer, "letter")
        problems.append(Problem(pid, str(question), answer, kind))
    return problems


def _read_local(path):
    if not os.path.exists(path):
        raise BenchmarkUnavailable(f"benchmark file not found: {path}")
    ext = path.lower().rsplit(".", 1)[-1]
    if ext == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if ext == "jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if ext == "json":
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, list) else data.get("data", data.get("rows"))
    raise BenchmarkUnavailable(f"{path}: unsupported format (use .jsonl, .json or .parquet)")


def _local_hint(name):
    return (
        "Download it on a machine with network access, save the rows as JSONL or Parquet, "
        f"and pass the file: `relax eval --benchmarks {name}=/path/to/{name}.jsonl` (Python: "
        f"load_benchmark({name!r}, path='/path/to/{name}.jsonl', "
        "fields={'question': ..., 'answer': ...}))."
    )


def _read_hub(spec):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a requirement
        raise BenchmarkUnavailable(
            f"the `datasets` package is needed for {spec.hf_id}. {_local_hint(spec.name)}"
        ) from e
    try:
        ds = datasets.load_dataset(spec.hf_id, spec.hf_config, split=spec.split)
    except Exception as e:
        raise BenchmarkUnavailable(
            f"could not load {spec.hf_id} (config {spec.hf_config}, split {spec.split}) from the "
            f"Hugging Face hub or its local cache ({type(e).__name__}; offline?). "
            f"{_local_hint(spec.name)}"
        ) from None
    return list(ds)


def _read_tfds(name, split):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise BenchmarkUnavailable(
            f"tfds:{name} needs tensorflow-datasets, which is not installed "
            "(pip install tensorflow-datasets), or pass a local JSONL/Parquet file instead."
        ) from None
    try:
        ds = tfds.load(name, split=split)
    except Exception as e:
        raise BenchmarkUnavailable(
            f"could not load tfds:{name} split {split} ({type(e).__name__}: {e})"
        ) from None

    def _py(v):
        v = v.numpy() if hasattr(v, "numpy") else v
        if isinstance(v, bytes):
            return v.decode()
        return v.tolist() if hasattr(v, "tolist") else v

    return [{k: _py(v) for k, v in ex.items()} for ex in ds]


def load_benchmark(
    name, path=None, fields=None, split=None, limit=None, repeats=None, seed=0, kind=None
):
    """Load one benchmark as a `Benchmark` (name, problems, repeats).

    name: a key of BENCHMARKS ("math500", "aime2024", "mmlu_pro", ...), or
      "hf:ORG/NAME[:CONFIG]" / "tfds:NAME[/CONFIG]" for another source, or any
      label when `path` is given.
    path: a local .jsonl / .json / .parquet file; overrides the hub.
    fields: {"question": col, "answer": col, "options": col, "id": col};
      defaults to the benchmark's own columns, else common column names.
    split: overrides the spec's split (hub / tfds). limit: keep the first
      `limit` problems (after the seeded subset). repeats: samples per
      problem (AIME default 32). seed: subset selection and GPQA option order.
    kind: "math" or "choice" for a custom benchmark.
    """
    spec = BENCHMARKS.get(name)
    if spec is None:
        label = name.split(":", 1)[-1] if ":" in name else name
        spec = BenchmarkSpec(label, "", None, split or "test", (), kind or "math")
        if name.startswith("hf:"):
            hf = name[3:].split(":")
            spec = dataclasses.replace(
                spec,
                name=hf[0].split("/")[-1],
                hf_id=hf[0],
                hf_config=hf[1] if len(hf) > 1 else None,
                split=split or "test",
            )
        elif not name.startswith("tfds:") and path is None:
            raise BenchmarkUnavailable(
                f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}, "
                "hf:ORG/NAME, tfds:NAME, "
                f"or pass a local file with path=..."
            )
    if split is not None:
        spec = dataclasses.replace(spec, split=split)
    if kind is not None:
        spec = dataclasses.replace(spec, kind=kind)

    if path is not None:
        rows = _read_local(path)
    elif name.startswith("tfds:"):
        rows = _read_tfds(name[5:], spec.split)
    else:
        rows = _read_hub(spec)

    mapping = dict(spec.field_map)
    if fields:
        mapping.update(fields)
    if rows:
        for key, guesses in _GUESS.items():
            if key not in mapping or (mapping[key] not in rows[0] and key not in ("choices",)):
                found = next((g for g in guesses if g in rows[0]), None)
                if found is not None:
                    mapping[key] = found
                elif key in ("options", "id"):
                    mapping.pop(key, None)
        if "choices" in mapping and not all(c in rows[0] for c in mapping["choices"]):
            mapping.pop("choices")
        missing = [
            k for k in ("question", "answer") if k not in mapping or mapping[k] not in rows[0]
        ]
        if "choices" in mapping:
            missing = [k for k in missing if k != "answer"]
        if missing:
            raise BenchmarkUnavailable(
                f"{spec.name}: no column for {missing} in {sorted(rows[0])}; "
                "pass fields={'question': ..., "
                f"'answer': ...}} (CLI: NAME=FILE?question=COL&answer=COL)"
            )

    if spec.sample is not None and len(rows) > spec.sample:
        idx = sorted(random.Random(seed).sample(range(len(rows)), spec.sample))
        rows = [rows[i] for i in idx]
    problems = _rows_to_problems(rows, spec, mapping, seed)
    if limit is not None:
        problems = problems[:limit]
    return Benchmark(spec.name, tuple(problems), spec.repeats if repeats is None else repeats)
