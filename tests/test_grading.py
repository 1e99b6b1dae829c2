"""relax.grade: last boxed answer (balanced braces) + math-verify, letter matching.

The cases are the ones that trip simple graders: nested braces, \\frac vs
\\dfrac, percentages, thousands separators, units, intervals, text answers,
several boxes, and garbage that must not raise.
"""

import pytest

from relax.data.grading import extract_choice, grade, grade_choice, last_boxed


def _r(ans):
    return f"Let me think. So the final answer is $\\boxed{{{ans}}}$."


# (response, reference, expected)
MATH_CASES = [
    # nested braces and fractions
    (_r("\\frac{1}{2}"), "\\frac12", True),
    (_r("\\dfrac{1}{2}"), "\\frac{1}{2}", True),
    (_r("\\tfrac{3}{4}"), "0.75", True),
    (_r("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", True),
    (_r("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt{2}}{2}", False),
    (_r("{{5}}"), "5", True),
    (_r("2^{10}"), "1024", True),
    # percentages and thousands separators
    (_r("50\\%"), "50", True),
    (_r("50\\%"), "0.5", True),  # math-verify accepts a percentage as its fraction too
    (_r("1,000"), "1000", True),
    (_r("1{,}000"), "1000", True),
    (_r("12,345,678"), "12345678", True),
    (_r("1,000"), "1001", False),
    # units and text wrappers
    (_r("5 \\text{ cm}"), "5", True),
    (_r("18 \\text{ dollars}"), "18", True),
    (_r("\\$18.00"), "18", True),
    (_r("90^\\circ"), "90", True),
    # intervals, sets, tuples
    (_r("[1, 2)"), "[1,2)", True),
    (_r("(1, 2]"), "[1,2)", False),
    (_r("(-\\infty, 3)"), "(-\\infty,3)", True),
    (_r("(3, 4)"), "(3,4)", True),
    (_r("\\{1, 2, 3\\}"), "\\{3,2,1\\}", True),
    # equations and expressions
    (_r("x = 3"), "3", True),
    (_r("2\\sqrt{2}"), "\\sqrt{8}", True),
    (_r("\\pi/2"), "\\frac{\\pi}{2}", True),
    (_r("x^2+2x+1"), "(x+1)^2", True),
    (_r("-7"), "7", False),
    # text answers (math-verify alone treats words as symbol products)
    (_r("\\text{Evelyn}"), "Evelyn", True),
    (_r("\\text{Nevely}"), "Evelyn", False),
    (_r("\\text{(C)}"), "\\text{(C)}", True),
    (_r("\\text{Yes}"), "yes", True),
    # which box counts
    ("\\boxed{3} no wait, \\boxed{4}", "4", True),
    ("\\boxed{3} no wait, \\boxed{4}", "3", False),
    ("first \\fbox{7}", "7", True),
    ("\\boxed 7", "7", True),
    ("\\boxed{\\frac{1}{2}} and then \\boxed{\\frac{1}{3}}", "\\frac13", True),
    ("The answer is 5.", "5", False),  # no box: not graded correct
    ("\\boxed{}", "5", False),
    ("\\boxed{\\frac{1}{2}", "\\frac12", False),  # unclosed
    (_r("5"), "\\boxed{5}", True),  # boxed reference
    (_r("3.14159"), "\\pi", False),
]


@pytest.mark.parametrize("response,answer,expected", MATH_CASES)
def test_math_cases(response, answer, expected):
    assert grade(response, answer) is expected


def test_at_least_thirty_tricky_cases():
    assert len(MATH_CASES) + len(CHOICE_CASES) >= 30


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("x \\boxed{ {1}{2} } y", "{1}{2}"),
        ("\\boxed{\\{1\\}}", "\\{1\\}"),
        ("none", None),
        ("\\boxed{a} \\boxed{b{c}}", "b{c}"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


CHOICE_CASES = [
    ("... so \\boxed{C}", "C", True),
    ("... so \\boxed{(C)}", "C", True),
    ("... so \\boxed{\\text{C}}", "C", True),
    ("... so \\boxed{C. 42 apples}", "C", True),
    ("The answer is (B).", "B", True),
    ("Final Answer: D", "D", True),
    ("The answer is (B). Final Answer: D", "B", False),
    ("the answer is a number, \\boxed{A}", "A", True),
    ("the answer is a number", "A", False),
    ("\\boxed{C}", 2, True),
    ("\\boxed{c}", "(C)", True),
    ("\\boxed{E}", "C", False),
]


@pytest.mark.parametrize("response,answer,expected", CHOICE_CASES)
def test_choice_cases(response, answer, expected):
    assert grade(response, answer, kind="choice") is expected
    assert grade_choice(response, answer) is expected


def test_extract_choice_none():
    assert extract_choice("no letter here") is None
    assert extract_choice(None) is None


GARBAGE = [
    None,
    5,
    3.5,
    b"\\boxed{1}",
    "",
    "\\boxed{",
    "}}}}{{{",
    "\\boxed{\\frac{}{}}",
    "\\boxed{" + "(" * 40 + "}",
    "\\boxed{\\sqrt[}",
    "\x00\xff",
    ["\\boxed{1}"],
]


@pytest.mark.parametrize("junk", GARBAGE)
def test_garbage_never_raises(junk):
    assert grade(junk, "1") in (True, False)
    assert grade("\\boxed{1}", junk) in (True, False)
    assert grade(junk, junk, kind="choice") in (True, False)
    assert grade(junk, "1", kind="nonsense") in (True, False)
