"""Benchmark loaders on fixture files written here, in every supported format;
the hub path fails with one clear error offline."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relax.data.benchmarks import BENCHMARKS
from relax.data.loaders import BenchmarkUnavailable, load_benchmark

# One fixture row per benchmark, in the columns of the paper's hub datasets.
ROWS = {
    "math500": [
        {"problem": "What is $1+1$?", "answer": "2", "unique_id": "test/a/1.json"},
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "unique_id": "test/a/2.json"},
    ],
    "gsm8k": [{"question": "Tom has 1,200 apples.", "answer": "He has 1,200.\n#### 1,200"}],
    "minerva": [{"problem": "Speed of light?", "answer": "3e8"}],
    "olympiadbench": [{"id": 7, "question": "Find x.", "final_answer": ["$5$"]}],
    "aime2024": [{"id": 60, "problem": "AIME q", "answer": "204"}],
    "aime2025": [{"id": "I-1", "problem": "AIME q2", "answer": "70"}],
    "mmlu_pro": [
        {
            "question_id": 70,
            "question": "Pick",
            "options": ["x", "y", "z"],
            "answer": "B",
            "answer_index": 1,
        }
    ],
    "supergpqa": [
        {"uuid": "u1", "question": "Pick one", "options": ["p", "q"], "answer_letter": "A"}
    ],
    "gpqa_diamond": [
        {
            "Record ID": "r1",
            "Question": "Which?",
            "Correct Answer": "right",
            "Incorrect Answer 1": "w1",
            "Incorrect Answer 2": "w2",
            "Incorrect Answer 3": "w3",
        }
    ],
    "bbeh": [{"question": "Is it true?", "answer": "yes"}],
}
EXPECTED = {  # (id, answer, kind) of the first row
    "math500": ("test/a/1.json", "2", "math"),
    "gsm8k": ("gsm8k/0", "1200", "math"),
    "minerva": ("minerva/0", "3e8", "math"),
    "olympiadbench": ("7", "$5$", "math"),
    "aime2024": ("60", "204", "math"),
    "aime2025": ("I-1", "70", "math"),
    "mmlu_pro": ("70", "B", "choice"),
    "supergpqa": ("u1", "A", "choice"),
    "bbeh": ("bbeh/0", "yes", "math"),
}


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_benchmark_from_local_file(tmp_path, name, fmt):
    path = _write(tmp_path / f"{name}.{fmt}", ROWS[name], fmt)
    bench = load_benchmark(name, path=path)
    assert bench.name == name
    assert len(bench) == len(ROWS[name])
    p = bench.problems[0]
    assert p.question.startswith(
        str(
            ROWS[name][0].get("problem")
            or ROWS[name][0].get("question")
            or ROWS[name][0].get("Question")
        )
    )
    if name == "gpqa_diamond":
        assert p.kind == "choice" and p.id == "r1"
        letter_line = next(line for line in p.question.splitlines() if line.endswith("right"))
        assert letter_line.startswith(p.answer + ". ")
    else:
        assert (p.id, p.answer, p.kind) == EXPECTED[name]
    if p.kind == "choice":
        assert "\nA. " in p.question and "\nB. " in p.question
    assert bench.repeats == (32 if name.startswith("aime") else 1)


def test_gpqa_option_order_is_seeded(tmp_path):
    rows = [dict(ROWS["gpqa_diamond"][0], **{"Record ID": f"r{i}"}) for i in range(20)]
    path = _write(tmp_path / "g.jsonl", rows, "jsonl")
    a = load_benchmark("gpqa_diamond", path=path, seed=0)
    b = load_benchmark("gpqa_diamond", path=path, seed=0)
    c = load_benchmark("gpqa_diamond", path=path, seed=1)
    assert a == b
    assert len({p.answer for p in a.problems}) > 1  # the correct answer is not always A
    assert [p.answer for p in a.problems] != [p.answer for p in c.problems]


def test_subset_is_seeded_and_sized(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(1500)]
    path = _write(tmp_path / "bbeh.jsonl", rows, "jsonl")
    a = load_benchmark("bbeh", path=path, seed=3)
    assert len(a) == 1000
    assert a == load_benchmark("bbeh", path=path, seed=3)
    assert a != load_benchmark("bbeh", path=path, seed=4)


def test_custom_file_with_field_mapping(tmp_path):
    rows = [{"q": "2+2?", "gold": "4", "key": "k0"}, {"q": "3+3?", "gold": "6", "key": "k1"}]
    path = _write(tmp_path / "mine.parquet", rows, "parquet")
    bench = load_benchmark(
        "mine",
        path=path,
        fields={"question": "q", "answer": "gold", "id": "key"},
        limit=1,
        repeats=4,
    )
    assert bench.problems == (("k0", "2+2?", "4", "math"),)
    assert bench.repeats == 4


def test_missing_column_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"text": "x"}], "jsonl")
    with pytest.raises(BenchmarkUnavailable, match="no column"):
        load_benchmark("bad", path=path)


def test_hub_offline_fails_clearly():
    with pytest.raises(BenchmarkUnavailable) as info:
        load_benchmark("math500")
    msg = str(info.value)
    assert BENCHMARKS["math500"].hf_id in msg and "local" in msg and "jsonl" in msg


def test_tfds_and_unknown_fail_clearly(tmp_path):
    with pytest.raises(BenchmarkUnavailable, match="tensorflow-datasets|tfds"):
        load_benchmark("tfds:gsm8k")
    with pytest.raises(BenchmarkUnavailable, match="unknown benchmark"):
        load_benchmark("nope")
    with pytest.raises(BenchmarkUnavailable, match="not found"):
        load_benchmark("math500", path=str(tmp_path / "absent.jsonl"))
