"""Answer grading: the last `\\boxed{...}` of a response against a reference.

Math answers: the content of the *last* `\\boxed{...}` (balanced braces, so
`\\boxed{\\frac{1}{2}}` is read whole; the official code's greedy regex is not)
is compared with the reference by math-verify (`parse` + `verify`), after a
cheap normalised string match that catches text answers and saves sympy the
work. math-verify alone would treat a bare word as a product of symbols
("Evelyn" == "Nevely"), so answers that are plain words must match as strings.

Multiple-choice answers: the chosen letter (from `\\boxed{X}`, "answer is (X)"
or "Final Answer: X") must equal the reference letter.

The official pipeline re-checks every wrong item with gpt-4o-mini; relax does
not (no network at evaluation, and a re-check can only raise scores).

`grade` never raises: garbage in, False out.
"""

import re
import threading

from math_verify import parse, verify

__all__ = ["extract_choice", "grade", "grade_choice", "last_boxed", "normalize_answer"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text):
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, or None.

    Braces are matched with a counter, so nested groups stay whole. An
    unbraced `\\boxed 5` yields "5". An unclosed box yields None.
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    while start >= 0:
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        i = start + len(cmd)
        if i < len(text) and (text[i].isalpha()):
            # e.g. "\boxedx" is another macro; look further left.
            start = max(text.rfind(c, 0, start) for c in _BOX_COMMANDS)
            continue
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and (j == 0 or text[j - 1] != "\\"):
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            return None
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0).strip() if m else None
    return None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize_answer(s):
    """A light string normal form: no spaces, no `\\text{}` wrappers, no `$`,
    `\\left`/`\\right`, `\\dfrac`->`\\frac`, thousands separators and trailing
    period removed, lower case. Used only for an exact-match shortcut."""
    s = str(s)
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


_WORDS = re.compile(r"^[A-Za-z][A-Za-z\s\-']*$")


def _is_word_answer(s):
    """True for answers that are words (names, yes/no), not maths."""
    plain = _TEXT_WRAPPERS.sub(r"\1", s).strip()
    return bool(_WORDS.match(plain)) and len(plain.replace(" ", "")) > 1


def _math_verify(answer, predicted):
    # math-verify's timeouts use SIGALRM, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"$\\boxed{{{answer}}}$", parsing_timeout=timeout)
    pred = parse(f"$\\boxed{{{predicted}}}$", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def grade(response_text, answer, kind="math"):
    """True when the response's final answer matches `answer`.

    kind: "math" (last boxed + math-verify) or "choice" (letter match; see
    `grade_choice`). Never raises.
    """
    try:
        if kind == "choice":
            return grade_choice(response_text, answer)
        if answer is None or response_text is None:
            return False
        answer = str(answer).strip()
        boxed_answer = last_boxed(answer)
        if boxed_answer is not None:  # references sometimes come boxed
            answer = boxed_answer
        predicted = last_boxed(response_text)
        if predicted is None or not predicted or not answer:
            return False
        if normalize_answer(predicted) == normalize_answer(answer):
            return True
        if _is_word_answer(answer) or _is_word_answer(predicted):
            return False
        return _math_verify(answer, predicted)
    except Exception:  # grading must never take an evaluation down
        return False


_CHOICE_PATTERNS = (
    # Letters must be upper case ("the answer is a number" names no option).
    re.compile(r"(?i:answer)\s*(?i:is)?\s*:?\s*\**\s*\(?([A-Z])\)?(?![A-Za-z])"),
)


def extract_choice(text):
    """The chosen option letter (upper case) or None: the last `\\boxed{X}`
    (also `\\boxed{(X)}`, `\\boxed{\\text{X}}`, `\\boxed{X. option text}`), else the
    last "answer is (X)" / "Final Answer: X"."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        inner = _TEXT_WRAPPERS.sub(r"\1", boxed).strip()
        m = re.match(r"^\(?([A-Za-z])\)?(?:$|[.:)\s])", inner)
        if m:
            return m.group(1).upper()
    for pattern in _CHOICE_PATTERNS:
        hits = pattern.findall(text)
        if hits:
            return hits[-1].upper()
    return None


def grade_choice(response_text, answer):
    """Multiple choice: the response's letter equals the reference letter
    (`answer` may be "C", "(C)" or an index 2). Never raises."""
    try:
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = chr(ord("A") + answer)
        ref = re.sub(r"[\s()]", "", str(answer)).upper()
        if len(ref) != 1 or not ref.isalpha():
            return False
        return extract_choice(response_text) == ref
    except Exception:
        return False
