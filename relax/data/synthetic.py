"""A synthetic reasoning task small enough to train on a CPU, with a tokenizer.

The task is the miniature behind `relax demo`. Each problem is a short word
problem whose step-by-step solution ends in `\\boxed{}`:

    Question: Ann has 5 coins. She sells a bivo, then finds 4 more. How
              many coins does she have now?
    Solution: 37. 37+5: 7+5=12 carry 1. 3+1=4. So 42. 42+4: 2+4=6 carry 0.
              4=4. So 46. \\boxed{46}

Most steps are easy: column additions written digit by digit, each reading
the number just written and one number from the prompt. One step per sold
item is hard: its price ("37") is world knowledge, a fixed seeded catalog
of `num_items` made-up item names (3 to 7 letters) that no prompt contains.
A larger model memorises the catalog; a small one does not, so its errors
concentrate on two tokens of a ~65-token solution. That is the situation
RelayLLM is built for: the SLM should open its answer with `<call>2</call>`
when it does not know the price, and let the LLM write it.

Why this layout (measured with the demo preset's models): the prices open
the answer, so the hard step sits at one fixed, salient place, the
answer's first token, where GRPO finds it. When the price followed "A bivo
sells for", GRPO learned to call right after "A", with a call long enough
to cover any name: several times the LLM tokens the price needs. Nothing
but arithmetic follows the price: with the item's name after it ("37 for
a bivo"), a student handed an unknown price by the LLM wrote the name of a
known item with that price instead of copying the name from the prompt.
Every later step copies either the number written just before it or a
number from the prompt, so a command before a price splits no copy.

The inline layout (`TaskConfig(layout="inline")`, the hard preset) puts the
prices mid-solution, each after a varying number of easy steps, so a student
must call where the content needs a price it does not know:

    Question: Ann has 5 coins. First: 4 more. Second: bivo sold. Third:
              zop sold. How many coins does she have now?
    Solution: First: 4 more. 5+4: 5+4=9 carry 0. 0=0. So 9. Second: bivo
              for 37. 9+37: ... So 46. Third: zop for 52. ... \boxed{98}

Each step opens with its event copied from the question. The question numbers
its events with one-token markers ("Second: "), and what the marker is followed
by there, the gain or the item's first letter, is what the step copies right
after writing it: finding the next event is one step past the last marker
written. Measured on a validation split with the hard preset's models: when
each step instead copied its clause from an unnumbered question ("She finds 4
more, then sells a bivo, ..."), the teacher solved 59% of the problems and the
student 39% of those whose prices it knows, most errors a wrong clause or name;
with the markers the teacher solves 83%, and the student, trained for 1,200
steps, solves 99.7% of the problems whose prices it knows. Item names stay
characters: made one token each, the 48 names were too rare for either model to
learn to copy (0% solved).

`make_dataset(..., num_known=k)` draws problems that only sell the first k
items: the demo trains the small model on such a corpus, so it masters the
easy steps but knows only k prices, while the teacher's corpus covers the
whole catalog (a smaller model trained on less of the world's knowledge).

`hard_spans` gives the character spans of the hard tokens in each solution,
so an evaluation can check where the calls land.

The tokenizer is character-level (every printable ASCII character and the
newline, so any text, the digits of any `<call>n</call>` included, can be
written), plus whole-word tokens for the template's fixed words and for
`<call>`/`</call>` (and the inline layout's markers), and Qwen-style chat
special tokens. It is saved as an ordinary Hugging Face tokenizer
(tokenizer.json, tokenizer_config.json with a chat template) so
`relax.load_tokenizer`, prompts, the command automaton and grading all run
unchanged. What it does not do: it is no general-purpose tokenizer (no byte
fallback, ASCII only).
"""

import dataclasses
import json
import os
import random
import string

from tokenizers import AddedToken, Tokenizer, decoders, models

from relax.tokenizer import INSTRUCTION

# The instruction `relax.build_prompt` appends (the paper's evaluation prompt); one token.

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Qwen's chat layout; `enable_thinking` is accepted and ignored (no thinking).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAMES = (
    ("Ann", "she"),
    ("Bob", "he"),
    ("Cal", "he"),
    ("Dee", "she"),
    ("Eve", "she"),
    ("Max", "he"),
)
GAINS = ("finds", "gets", "wins")

# Fixed words of the templates, tokenised whole (with the space before them)
# so prompts and solutions stay short; digits and item names stay one
# character per token, so arithmetic and recall work on single characters.
WORD_TOKENS = (
    "<call>",
    "</call>",
    INSTRUCTION,
    "\\boxed{",
    "user",
    "assistant",
    "How many coins does she have now?",
    "How many coins does he have now?",
    " sells for ",
    " sells a",
    "How",
    "She",
    "He",
    " has",
    " coins",
    " she",
    " he",
    " finds",
    " gets",
    " wins",
    " more",
    " then",
    " sells",
    " for",
    " and",
    " many",
    " does",
    " have",
    " now",
    " carry",
    " So",
) + tuple(" " + name for name, _ in NAMES)


LAYOUTS = ("prices_first", "inline")

# The inline layout's event markers: the question numbers its events with them, and
# each step of the solution opens with its event's marker and copies the sentence that
# follows it there. One token each, distinct, so the copy starts from one unambiguous
# token (see the module docstring).
ORDINALS = tuple(
    w + ": " for w in ("First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth")
)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The synthetic task's knobs.

    num_items: size of the price catalog (the hard "knowledge").
    catalog_seed: seed of the catalog; models only agree on prices under the
      same catalog, so it is part of the task, not of a data split.
    min_steps / max_steps: number of "finds k more" gains per problem (each
      one more column addition after the sale).
    min_sold / max_sold: items sold per problem (hard steps), min_sold..max_sold.
    layout: "prices_first" (the prices open the solution: one fixed, salient place)
      or "inline" (numbered events in the question's order, sales among the gains,
      after the first gain, so each price is needed mid-solution after a varying
      number of easy steps: a student must place its calls by content, not by
      position; see the module docstring). Inline needs max_steps + max_sold <= 8.
    """

    num_items: int = 64
    catalog_seed: int = 1234
    min_steps: int = 2
    max_steps: int = 4
    max_sold: int = 1
    min_sold: int = 1
    layout: str = "prices_first"

    def __post_init__(self):
        if not 1 <= self.num_items <= 2000:
            raise ValueError(f"num_items must be in 1..2000, got {self.num_items}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        if not 1 <= self.min_sold <= self.max_sold <= 3:
            raise ValueError(
                f"need 1 <= min_sold <= max_sold <= 3, got {self.min_sold}, {self.max_sold}"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "inline" and self.max_steps + self.max_sold > len(ORDINALS):
            raise ValueError(
                f"the inline layout numbers at most {len(ORDINALS)} events, got up to "
                f"{self.max_steps} gains + {self.max_sold} sales"
            )


def catalog(task):
    """The world's price list: {item name: price in 10..99}, fixed by the seed.

    Names are made-up words of alternating consonants and vowels, 3 to 7
    letters long, distinct, and never one of the template's words (their
    varying length is part of the layout's design: see the module docstring).
    """
    rng = random.Random(task.catalog_seed)
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    names = set()
    while len(names) < task.num_items:
        length = rng.randint(3, 7)
        names.add("".join(rng.choice(vowels if i % 2 else consonants) for i in range(length)))
    names = sorted(names)
    rng.shuffle(names)
    return {name: rng.randint(10, 99) for name in names}


def _column_sum(a, b):
    """Digit-by-digit text of a + b (a < 1000, b < 100), and the sum."""
    total = a + b
    units = a % 10 + b % 10
    carry = units // 10
    tens_a, tens_b = a // 10, b // 10
    tens_sum = tens_a + tens_b + carry
    tens_terms = "+".join(str(t) for t in (tens_a, tens_b, carry) if t) or "0"
    text = f"{a}+{b}: {a % 10}+{b % 10}={units} carry {carry}. {tens_terms}={tens_sum}. So {total}."
    return text, total


def make_problem(rng, task, prices=None, items=None):
    """One problem: {"question", "solution", "answer", "hard_spans", "hard_items"}.

    rng: a `random.Random`. items: the item names problems may sell (default
    the whole catalog). hard_spans: [(start, end)] character spans of the
    prices (the hard tokens) inside `solution`; hard_items: the item of each.
    """
    prices = prices or catalog(task)
    items = list(items or prices)
    name, pronoun = rng.choice(NAMES)
    value = rng.randint(0, 9)
    sold = rng.sample(items, rng.randint(task.min_sold, task.max_sold))
    gains = [rng.randint(1, 9) for _ in range(rng.randint(task.min_steps, task.max_steps))]
    if task.layout == "prices_first":
        events = [("sale", sold)] + [("gain", k) for k in gains]
    else:  # inline: every sale its own event, at a random place after the first gain
        events = [("gain", k) for k in gains]
        for item in sold:
            events.insert(rng.randint(1, len(events)), ("sale", [item]))
    clauses = []
    for kind, arg in events:
        if kind == "sale":
            clauses.append("sells " + " and ".join(f"a {item}" for item in arg))
        else:
            clauses.append(f"{rng.choice(GAINS)} {arg} more")
    if task.layout == "prices_first":
        story = f"{pronoun.capitalize()} " + ", then ".join(clauses) + "."
    else:  # inline: "First: 4 more. Second: bivo sold. ..." (the gain verbs drawn
        # above go unused, so both layouts draw the same random stream)
        clauses = [
            ORDINALS[i] + (f"{arg} more" if kind == "gain" else arg[0])
            for i, (kind, arg) in enumerate(events)
        ]
        ends = ["." if kind == "gain" else " sold." for kind, _ in events]
        story = " ".join(c + end for c, end in zip(clauses, ends))
    question = f"{name} has {value} coins. {story} How many coins does {pronoun} have now?"
    text, hard_spans, hard_items = "", [], []

    def price(item, clause=None):
        nonlocal text
        if clause:  # inline: "Second: bivo for 37. ", the price recalled from the name
            text += f"{clause} for "
        hard_spans.append((len(text), len(text) + len(str(prices[item]))))
        hard_items.append(item)
        text += f"{prices[item]}. "
        return prices[item]

    if task.layout == "prices_first":
        # The prices come first, and every later step reads the number just
        # written or one from the prompt: see the module docstring.
        for item in sold:
            price(item)
        total = prices[sold[0]]
        addends = [prices[item] for item in sold[1:]] + [value] + gains
    else:
        # The running total starts at the coins she has; a sale writes its price
        # (the hard step) right before the sum that adds it. Each step opens with its
        # event copied from the question, marker first ("Second: bivo for 37. "): the
        # marker, one past the last one written, is one token, and what follows it in
        # the question is one token too (the gain or the item).
        total, addends = value, []
        for (kind, arg), clause in zip(events, clauses):
            if kind == "sale":
                addend = price(arg[0], clause)
            else:
                text += clause + ". "
                addend = arg
            step, total = _column_sum(total, addend)
            text += step + " "
    for addend in addends:
        step, total = _column_sum(total, addend)
        text += step + " "
    text += f"\\boxed{{{total}}}"
    return {
        "question": question,
        "solution": text,
        "answer": str(total),
        "hard_spans": hard_spans,
        "hard_items": hard_items,
    }


def make_dataset(n, seed, task=None, num_known=None):
    """n problems from a seeded generator (different seeds, different splits).

    num_known: only the first `num_known` items of the catalog are sold (a
    corpus that covers part of the world's knowledge, e.g. the small model's).
    """
    task = task or TaskConfig()
    prices = catalog(task)
    items = list(prices)[:num_known] if num_known else None
    rng = random.Random(seed)
    return [make_problem(rng, task, prices, items) for _ in range(n)]


def task_words(task):
    """The whole-word tokens a task adds to the template's: for the inline layout the
    event markers and " sold", so that finding an event is one token and its content
    starts right after it (item names stay characters: a name made one token of its
    own is too rare for a miniature model to learn to copy)."""
    if task is None or task.layout != "inline":
        return ()
    return ORDINALS + (" sold",)


def build_tokenizer(task=None):
    """The task's `tokenizers.Tokenizer`: characters + whole words + chat specials
    (+ `task_words(task)`)."""
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    # No merges: every character is its own token unless an added token covers it.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    words = WORD_TOKENS + task_words(task)
    tokenizer.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    return tokenizer


def save_tokenizer(path, task=None):
    """Write the tokenizer as a Hugging Face tokenizer folder; returns `path`.

    Loadable by `transformers.AutoTokenizer.from_pretrained(path)` and
    `relax.load_tokenizer(path)`: eos is `<|im_end|>` (ends every answer),
    pad is `<|endoftext|>`, and the chat template is Qwen's layout.
    """
    os.makedirs(path, exist_ok=True)
    build_tokenizer(task).save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": IM_END, "pad_token": PAD_TOKEN}, f, indent=2)
    return path
