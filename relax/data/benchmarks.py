"""The benchmarks relax knows by name, and the column names a local file may use.

`BENCHMARKS`: where each benchmark of the paper lives (the Hugging Face dataset ids and
splits of the official `eval/datasets_loader.py`; MATH-500 uses the hub copy of the CSV
the official code downloads) and how its rows map to a `Problem` (`BenchmarkSpec`).
`ALIASES`: the documented column names tried, in order, for a file that names none.
relax.data.loaders reads them.
"""

import dataclasses

__all__ = [
    "ALIASES",
    "BENCHMARKS",
    "MATH_BENCHMARKS",
    "TRANSFER_BENCHMARKS",
    "BenchmarkSpec",
]


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

# The documented column names, tried in order when the benchmark's own column is
# absent and no mapping is given. Only names that mean the same thing in every
# data set: "solution" (a worked solution) is deliberately not an answer alias.
ALIASES = {
    "question": ("question", "problem", "prompt", "Question"),
    "answer": ("answer", "final_answer", "expected_answer", "answer_letter"),
    "options": ("options", "choices"),
    "id": ("id", "unique_id", "question_id", "uid"),
}
