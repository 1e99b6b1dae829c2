"""Benchmark loaders: every benchmark becomes a list of `Problem(id, question, answer, kind)`.

Three sources, one result:
  * the paper's Hugging Face dataset ids and splits (`BENCHMARKS` of
    relax.data.benchmarks),
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

Columns. A benchmark of `BENCHMARKS` reads its own columns. A local file
either names its columns (`fields`, on the CLI `NAME=FILE?question=COL&answer=COL`)
or uses one of the documented names of `ALIASES`, tried in order; nothing else
is guessed (a `solution` column is a worked solution, not an answer, and is
never taken for one). The columns used are kept in `Benchmark.columns` and
printed by `relax eval`. An empty file, a malformed or non-UTF-8 JSON line (named
by file and line number), a `.parquet` file that is not Parquet or a missing column
is a `BenchmarkUnavailable` error.

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

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from relax.data.benchmarks import ALIASES, BENCHMARKS, BenchmarkSpec
from relax.errors import DataError

__all__ = [
    "Benchmark",
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
    source: str = ""  # the file, hub id or tfds name the rows came from
    columns: tuple = ()  # ((problem_field, column), ...) used to read the rows

    def __len__(self):
        return len(self.problems)

    def columns_text(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.columns) or "(not recorded)"


class BenchmarkUnavailable(DataError, RuntimeError):
    """A benchmark source could not be read (offline hub, missing file or package, no rows)."""


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
        try:
            return pq.read_table(path).to_pylist()
        except pa.ArrowException as e:  # e.g. a text file named .parquet
            raise BenchmarkUnavailable(
                f"{path}: not a readable Parquet file ({' '.join(str(e).split())})",
                "write it with pyarrow or pandas, or name a JSONL file .jsonl",
            ) from None
    if ext == "jsonl":
        return read_jsonl(path, BenchmarkUnavailable)
    if ext == "json":
        with open(path, "rb") as f:
            text = _utf8(f.read(), path, BenchmarkUnavailable)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkUnavailable(
                f"{path}: invalid JSON at line {e.lineno} ({e.msg})"
            ) from None
        return data if isinstance(data, list) else data.get("data", data.get("rows"))
    raise BenchmarkUnavailable(f"{path}: unsupported format (use .jsonl, .json or .parquet)")


def _utf8(raw, path, error, line=None):
    """``raw`` bytes as text; bytes that are not UTF-8 raise ``error`` naming file (and line)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"line {line}" if line is not None else f"byte {e.start}"
        raise error(
            f"{path}: {where} is not UTF-8 text (byte {raw[e.start]:#04x})",
            "save the file as UTF-8",
        ) from None


def read_jsonl(path, error=DataError):
    """The JSON objects of a JSONL file; a bad line (not JSON, not an object, not UTF-8)
    raises ``error`` naming file and line."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = _utf8(raw, path, error, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(
                    f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno})",
                    "fix or remove that line",
                ) from None
            if not isinstance(row, dict):
                raise error(f"{path}: line {number} is not a JSON object", "one object per line")
            rows.append(row)
    return rows


def _local_hint(name):
    return (
        "Download it on a machine with network access, save the rows as JSONL or Parquet, "
        f"and pass the file: `relax eval --benchmarks {name}=/path/to/{name}.jsonl` (Python: "
        f"load_benchmark({name!r}, path='/path/to/{name}.jsonl', "
        "fields={'question': ..., 'answer': ...}))."
    )


def _read_hub(spec):
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
    try:  # an optional dependency (not in requirements.txt), so imported only when asked for
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
      defaults to the benchmark's own columns, else the documented `ALIASES`.
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
        rows, source = _read_local(path), path
    elif name.startswith("tfds:"):
        rows, source = _read_tfds(name[5:], spec.split), name
    else:
        rows, source = _read_hub(spec), f"hf:{spec.hf_id}"
    if not rows:
        raise BenchmarkUnavailable(
            f"{spec.name}: {source} has no rows", "a benchmark needs at least one problem"
        )
    mapping = _resolve_columns(spec, fields or {}, rows[0], source)

    if spec.sample is not None and len(rows) > spec.sample:
        idx = sorted(random.Random(seed).sample(range(len(rows)), spec.sample))
        rows = [rows[i] for i in idx]
    problems = _rows_to_problems(rows, spec, mapping, seed)
    if limit is not None:
        problems = problems[:limit]
    return Benchmark(
        spec.name,
        tuple(problems),
        spec.repeats if repeats is None else repeats,
        source=source,
        columns=tuple((k, v) for k, v in mapping.items() if k != "choices"),
    )


def _resolve_columns(spec, fields, row, source):
    """Problem field -> column: the user's mapping, else the spec's, else a documented alias."""
    for key, col in fields.items():
        if key not in ALIASES and key != "choices":
            raise BenchmarkUnavailable(
                f"{spec.name}: unknown field {key!r} in the column mapping",
                f"fields are {', '.join(ALIASES)}",
            )
        if any(c not in row for c in ((col,) if isinstance(col, str) else col)):
            raise BenchmarkUnavailable(
                f"{spec.name}: {source} has no column {col!r} (given for {key})",
                f"its columns: {', '.join(sorted(row))}",
            )
    mapping = dict(spec.field_map)
    mapping.update(fields)
    if "choices" in mapping and not all(c in row for c in mapping["choices"]):
        mapping.pop("choices")
    for key, names in ALIASES.items():
        if key in fields or (key in mapping and mapping[key] in row):
            continue
        if key == "answer" and "choices" in mapping:
            continue
        found = next((n for n in names if n in row), None)
        if found is not None:
            mapping[key] = found
        elif key in ("question", "answer"):
            raise BenchmarkUnavailable(
                f"{spec.name}: no column for the {key} in {source} (columns: {', '.join(sorted(row))})",
                f"name it: NAME=FILE?{key}=COL on the CLI, fields={{{key!r}: COL}} in Python; "
                f"recognised names: {', '.join(names)}",
            )
        else:
            mapping.pop(key, None)
    return mapping
