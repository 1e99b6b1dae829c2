"""The call-command automaton: `<call>\\s*(\\d+)\\s*</call>` over token ids.

The SLM asks for help by writing the plain-text command `<call>n</call>`. In
a byte-level BPE vocabulary that text is several tokens, tokenised
differently in different contexts (`<`,`call`,`>` at the start of a line,
` <`,`call`,`>` after a space, `</`,`call`,`>` or the merged `></` when the
tags touch, `.<` after a full stop, `>.` when a full stop follows). The
decoder therefore cannot look for fixed token ids; it runs a character
automaton for the pattern, compiled once on the host into per-(state, token)
tables by walking every vocabulary entry's characters.

What the tables say, for a row in automaton state `s` that emits token `t`
(tables are indexed by a token *class*: tokens with identical columns share
one, which shrinks Qwen's 151k columns to a few dozen):

- `next_state[s, c]`: the state after all of `t`'s characters. After a
  complete command the automaton starts afresh on the token's remaining
  characters (regex `finditer` semantics: non-overlapping, leftmost first).
- digit update `(mul, add)`: the number being read becomes `n * mul + add`
  (`mul == 0` means "a new number starts in this token"). A token may carry
  several digits (tokenizers that group digits), and `n` saturates at
  `max_n` instead of overflowing int32.
- `complete[s, c]` and the completed command's number `(cmul, cadd)`.
- where the command (or the partial command left at the end of the token)
  started: in this token, or where the row's partial command started, or at
  the row's last `<` (needed for `<call>3<call>...`, where the `<` that ends
  one attempt starts the next). The decoder keeps those two token indices per
  row and marks the whole token range of a completed command as `command`,
  retroactively: a partial `<ca` is only known to be a command when it
  completes. A token overlapping the command by a single character (` <`,
  `>.`) is a command token.

Tokenizer families. The tables need each token's text as it reads in
context. `from_tokenizer` decodes every id after a plain anchor token, which
is exact for byte-level BPE (Qwen, Llama 3) and for SentencePiece (Llama 2,
Mistral, Gemma), whose `▁` pieces lose their space when decoded alone;
`from_token_bytes` takes a tiktoken-style byte vocabulary (Tekken);
`from_token_texts` takes one string per id.

Semantics chosen (the eager reference implements the same ones with `re`):
- Character classes are ASCII (`re.ASCII`): `\\s` is [ \\t\\n\\r\\f\\v] and `\\d`
  is [0-9]. With ASCII classes, decoding each token alone and decoding the
  whole text agree on every character the pattern can use, even when a token
  holds half of a multi-byte character (it decodes to U+FFFD, a plain-text
  character either way).
- A token whose characters hold two complete commands (no real vocabulary
  has one) counts only the first; `CallCommand.multi_complete` reports how
  many (state, token) pairs are affected.

What this module does not do: decide what a command means (n = 0, call
limits); that is the decoder's job.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence

import flax.struct
import jax
import numpy as np

from relax.errors import InputError

PATTERN = re.compile(r"<call>\s*(\d+)\s*</call>", re.ASCII)

_WS = frozenset(" \t\n\r\f\v")
_DIGITS = frozenset("0123456789")

# States. 0: nothing; 1-5: "<", "<c", "<ca", "<cal", "<call"; 6: "<call>" and
# optional whitespace; 7: in the digits; 8: digits then whitespace; 9: "<"
# after the digits; 10-13: "</", "</c", "</ca", "</cal"; 14: "</call".
NUM_STATES = 15
_OPEN = "<call>"
_CLOSE = "</call>"

# Where a partial or complete command started.
START_KEEP = 0  # where the row's partial command started (before this token)
START_HERE = 1  # in this token
START_LT = 2  # at the row's last "<" (before this token)


def _char_step(state: int, ch: str):
    """One character. Returns (new state, digit action, complete).

    digit action: None (no change), ("reset", d) or ("append", d).
    A failed partial match restarts at this character if it is "<".
    """
    restart = 1 if ch == "<" else 0
    if state == 0:
        return restart, None, False
    if 1 <= state <= 4:  # "<", "<c", "<ca", "<cal"
        return (state + 1 if ch == _OPEN[state] else restart), None, False
    if state == 5:  # "<call"
        return (6 if ch == ">" else restart), None, False
    if state == 6:  # "<call>" \s*
        if ch in _WS:
            return 6, None, False
        if ch in _DIGITS:
            return 7, ("reset", int(ch)), False
        return restart, None, False
    if state == 7:  # digits
        if ch in _DIGITS:
            return 7, ("append", int(ch)), False
        if ch in _WS:
            return 8, None, False
        return (9 if ch == "<" else 0), None, False
    if state == 8:  # digits \s*
        if ch in _WS:
            return 8, None, False
        return (9 if ch == "<" else 0), None, False
    if state == 9:  # digits \s* "<": "/" continues; "c" makes this "<" a new "<c"
        if ch == "/":
            return 10, None, False
        if ch == "c":
            return 2, None, False
        return restart, None, False
    if 10 <= state <= 13:  # "</", "</c", "</ca", "</cal"
        return (state + 1 if ch == _CLOSE[state - 8] else restart), None, False
    if state == 14:  # "</call"
        if ch == ">":
            return 0, None, True
        return restart, None, False
    raise ValueError(state)


def _walk(state: int, text: str, max_n: int):
    """Walks one token's characters from `state` (see the module docstring).

    Returns a tuple: next_state, mul, add, start_src, lt_src, complete, cmul,
    cadd, cstart_src, completions, opens. `opens`: a command's opening `<call>`
    completes inside the token (the automaton enters state 6). `lt_src` says where the row's last "<" is
    after the token (START_HERE or START_KEEP). Numbers are saturated at
    max_n; `mul` is clipped to max_n + 1 (any n >= 1 then saturates).
    """
    start = START_KEEP  # start of the current partial command
    lt = START_LT  # the last "<" (START_LT: before this token)
    mul, add = 1, 0  # n_now = n_before * mul + add (mul == 0: fresh number)
    complete, cmul, cadd, cstart, completions = False, 1, 0, START_KEEP, 0
    opens = False
    for ch in text:
        old = state
        state, digit, done = _char_step(state, ch)
        opens |= state == 6 and old != 6
        if done:
            completions += 1
            if completions == 1:
                complete, cmul, cadd, cstart = True, mul, add, start
        if digit is not None:
            kind, d = digit
            if kind == "reset":
                mul, add = 0, d
            else:
                mul, add = min(mul * 10, max_n + 1), min(add * 10 + d, max_n)
        if state == 1 and ch == "<":  # a new attempt starts at this "<"
            start = START_HERE
        elif state == 2 and old == 9:  # the "<" that ended the digits starts it
            start = lt
        if ch == "<":
            lt = START_HERE
    return state, mul, add, start, lt, complete, cmul, cadd, cstart, completions, opens


def _anchor(tokenizer):
    """(id, text) of a plain token to decode others after: "a" as the tokenizer writes it."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(
            "the tokenizer encodes 'a' as no tokens; cannot anchor in-context decoding"
        )
    anchor = int(ids[-1])
    text = tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not text or set(text) & (set("<>/call") | _WS | _DIGITS) - set("a"):
        raise ValueError(f"anchor token {anchor} decodes to {text!r}, not a plain letter")
    return anchor, text


def _decode_padded(decode, ids, n):
    """decode(ids), where ids >= n (a model's padded vocabulary rows) read as U+FFFD."""
    out, run = [], []
    for i in (int(i) for i in ids):
        if i < n:
            run.append(i)
            continue
        if run:
            out.append(decode(run))
            run = []
        out.append("\ufffd")
    if run:
        out.append(decode(run))
    return "".join(out)


@dataclasses.dataclass(frozen=True, eq=False)
class CallCommand:
    """The command automaton compiled for one vocabulary.

    Build with `CallCommand.from_tokenizer(tokenizer)` or, for a vocabulary
    given as the text of each token id, `CallCommand.from_token_texts(texts)`.
    Tables are numpy arrays; the decoder moves them to the device.
    """

    token_class: np.ndarray
    """[V] int32: the class of each token id (tokens with equal table columns)."""
    next_state: np.ndarray
    """[S, C] int32: automaton state after the token."""
    mul: np.ndarray
    """[S, C] int32: digit update n' = n * mul + add (mul == 0: n' = add), saturating."""
    add: np.ndarray
    """[S, C] int32: see `mul`."""
    start_src: np.ndarray
    """[S, C] int32: where the partial command left after the token started (START_*)."""
    lt_here: np.ndarray
    """[S, C] bool: the token holds a "<" (the row's last "<" moves to this token)."""
    complete: np.ndarray
    """[S, C] bool: a command completes inside the token."""
    cmul: np.ndarray
    """[S, C] int32: the completed command's n = n_before * cmul + cadd (cmul == 0: cadd)."""
    cadd: np.ndarray
    """[S, C] int32: see `cmul`."""
    cstart_src: np.ndarray
    """[S, C] int32: where the completed command started (START_*)."""
    opens: np.ndarray
    """[S, C] bool: a command's opening `<call>` completes inside the token (what a
    decoder masks to block calls)."""
    max_n: int
    """n saturates here."""
    texts: tuple
    """The text of each token id, as walked."""
    decode: Callable[[Sequence[int]], str]
    """ids -> text; the eager reference runs the regex on this."""
    multi_complete: int = 0
    """(state, token) pairs whose token completes more than one command (only the first counts)."""

    @property
    def vocab_size(self) -> int:
        return int(self.token_class.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.next_state.shape[1])

    @classmethod
    def from_tokenizer(cls, tokenizer, max_n: int = 1_000_000) -> CallCommand:
        """Compiles the automaton for a `transformers` tokenizer of any family.

        Each token's text is read *in context*: decoded after a plain anchor
        token, minus the anchor's own text. Byte-level BPE (Qwen, Llama 3, GPT-2,
        Tekken-style vocabularies) gives each id's text either way, but
        SentencePiece (Llama 2, Mistral, Gemma) drops a piece's `▁` space when the
        piece is decoded alone and keeps it after other text, and a space decides
        whether `<call>1` then `▁2` reads as "12" or as "1 2". Byte-fallback
        pieces (`<0x35>`) read as their byte; a lone byte of a multi-byte
        character reads as U+FFFD, harmless for the ASCII pattern (module
        docstring). `decode` reads id lists the same way, so the eager reference
        sees the same text.
        """
        n = len(tokenizer)
        anchor, prefix = _anchor(tokenizer)

        def read(batch):
            return tokenizer.batch_decode(
                [[anchor, *ids] for ids in batch],
                skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            )

        texts = []
        step = 4096
        for lo in range(0, n, step):
            for i, text in zip(
                range(lo, min(lo + step, n)), read([[i] for i in range(lo, min(lo + step, n))])
            ):
                if not text.startswith(prefix):
                    raise ValueError(
                        f"token {i} changes the text of the token before it when decoded after it "
                        f"({prefix!r} + id {i} -> {text!r}); the command automaton needs "
                        "tokens that append text"
                    )
                texts.append(text[len(prefix) :])

        def decode(ids):
            return _decode_padded(lambda run: read([run])[0][len(prefix) :], ids, n)

        return cls._build(texts, max_n, decode)

    @classmethod
    def from_token_bytes(cls, pieces: Sequence[bytes], max_n: int = 1_000_000) -> CallCommand:
        """Compiles the automaton for a byte-level vocabulary given as each id's bytes.

        The tiktoken-style families (Mistral's Tekken, OpenAI's encodings) are
        byte pieces whose text is the UTF-8 decoding of their concatenation; an
        id's text is its bytes decoded alone (a lone byte of a multi-byte
        character reads as U+FFFD, harmless for the ASCII pattern), and `decode`
        decodes the concatenated bytes of a list of ids.
        """
        pieces = [bytes(p) for p in pieces]

        def decode(ids):
            return _decode_padded(
                lambda run: b"".join(pieces[i] for i in run).decode("utf-8", "replace"),
                ids,
                len(pieces),
            )

        return cls._build([p.decode("utf-8", "replace") for p in pieces], max_n, decode)

    @classmethod
    def from_token_texts(cls, texts: Sequence[str], max_n: int = 1_000_000) -> CallCommand:
        """Compiles the automaton for a vocabulary given as one string per token id."""
        texts = list(texts)

        def decode(ids):
            return _decode_padded(lambda run: "".join(texts[i] for i in run), ids, len(texts))

        return cls._build(texts, max_n, decode)

    @classmethod
    def _build(cls, texts, max_n, decode) -> CallCommand:
        if not 1 <= max_n <= 100_000_000:
            raise ValueError(f"max_n must be in [1, 1e8] (int32 arithmetic), got {max_n}")
        if not texts:
            raise InputError("the vocabulary is empty: the command automaton needs its tokens")
        relevant = set("<>/call") | _WS | _DIGITS
        columns = {}  # column signature -> class id
        token_class = np.zeros(len(texts), np.int32)
        cols = []
        walk_cache = {}
        for i, text in enumerate(texts):
            # Characters the pattern never uses are interchangeable: one key for them.
            key = "".join(ch if ch in relevant else "\x00" for ch in text)
            if key not in walk_cache:
                walk_cache[key] = tuple(_walk(s, key, max_n) for s in range(NUM_STATES))
            col = walk_cache[key]
            if col not in columns:
                columns[col] = len(cols)
                cols.append(col)
            token_class[i] = columns[col]
        arr = np.array(cols, dtype=np.int64).transpose(1, 0, 2)  # [S, C, fields]
        f = [arr[:, :, k] for k in range(arr.shape[2])]
        if not _can_complete(f[0], f[5].astype(bool)):
            raise InputError(
                f"no sequence of this vocabulary's {len(texts)} tokens spells a command "
                "<call>n</call>, so the relay could never call (use the tokenizer the SLM "
                "was trained with, one whose tokens can spell <, call, >, / and digits)"
            )
        return cls(
            token_class=token_class,
            next_state=f[0].astype(np.int32),
            mul=f[1].astype(np.int32),
            add=f[2].astype(np.int32),
            start_src=f[3].astype(np.int32),
            lt_here=f[4] == START_HERE,
            complete=f[5].astype(bool),
            cmul=f[6].astype(np.int32),
            cadd=f[7].astype(np.int32),
            cstart_src=f[8].astype(np.int32),
            opens=f[10].astype(bool),
            max_n=int(max_n),
            texts=tuple(texts),
            decode=decode,
            multi_complete=int((f[9] > 1).sum()),
        )

    def padded_class(self, vocab_size: int) -> np.ndarray:
        """token_class for a model vocabulary of `vocab_size` ids.

        Models often pad the embedding past the tokenizer (Qwen3: 151936 rows,
        151669 tokens); the extra ids are plain text (read as U+FFFD, like
        `decode` does), never sampled by a trained model. A model vocabulary
        smaller than the tokenizer is an error.
        """
        return self._padded(vocab_size)[0]

    def _padded(self, vocab_size: int):
        """(token_class [vocab_size], {name: [S, C'] table}), C' = C or C + 1.

        The extra ids take the class of a token without pattern characters; a
        vocabulary without one gets such a column appended (to copies: the
        command itself never changes).
        """
        if vocab_size < self.vocab_size:
            raise ValueError(
                f"model vocabulary ({vocab_size}) is smaller than the command's tokenizer "
                f"({self.vocab_size} tokens): the model and tokenizer do not belong together"
            )
        tables = {name: getattr(self, name) for name in TABLE_FIELDS}
        col = np.arange(self.num_classes)
        ok = (self.next_state == 0).all(0) & (self.mul == 1).all(0) & (self.add == 0).all(0)
        ok &= ~self.complete.any(0) & ~self.lt_here.any(0) & (self.start_src[0] == START_KEEP)
        ok &= ~self.opens.any(0)
        if col[ok].size:
            plain = int(col[ok][0])
        else:
            plain = self.num_classes
            for name, table in tables.items():
                fill = 1 if name in ("mul", "cmul") else 0
                tables[name] = np.concatenate(
                    [table, np.full((NUM_STATES, 1), fill, table.dtype)], axis=1
                )
        pad = np.full(vocab_size - self.vocab_size, plain, np.int32)
        return np.concatenate([self.token_class, pad]), tables

    def device_tables(self, vocab_size: int) -> CommandTables:
        """The tables as a `CommandTables` pytree for a model vocabulary of `vocab_size` ids
        (made once per command and size). Its leaves are numpy arrays: they become device
        arrays as arguments of the decoder's jit, or constants of a caller's trace, so a
        cached table never holds a tracer."""
        return _device_tables(self, vocab_size)


# The [S, C] tables of a CallCommand (opens last).
TABLE_FIELDS = (
    "next_state", "mul", "add", "start_src", "lt_here", "complete", "cmul", "cadd", "cstart_src",
    "opens",
)  # fmt: skip


# The tables read per (state, class) each step, in the order of CommandTables.cells.
CELL_FIELDS = TABLE_FIELDS[:-1]
_BOOL_CELLS = ("lt_here", "complete")


@flax.struct.dataclass
class CommandTables:
    """The automaton as the decoder reads it on device: a pytree of arrays.

    token_class is [V] (the model's vocabulary, padded ids plain). cells is [S, C, F]
    int32: the [S, C] tables named in `CELL_FIELDS`, stacked, so one gather reads all
    of a row's entries (`cell`) where one gather per table would be nine small device
    ops every loop iteration. opens is [S, V]: the [S, C] table indexed by token id
    (read through token_class once, on the host), so a blocked-call step reads one row
    per row instead of gathering the whole table every iteration of the loop. The
    entries mean what the same-named `CallCommand` fields mean.
    """

    token_class: jax.Array
    cells: jax.Array
    opens: jax.Array

    def cell(self, state, cls):
        """{name: [B] entry} of every table in `CELL_FIELDS` at ([B] state, [B] class)."""
        row = self.cells[state, cls]  # [B, F]
        return {
            name: row[:, i].astype(bool) if name in _BOOL_CELLS else row[:, i]
            for i, name in enumerate(CELL_FIELDS)
        }


@functools.lru_cache(maxsize=32)
def _device_tables(command: CallCommand, vocab_size: int) -> CommandTables:
    token_class, tables = command._padded(vocab_size)
    cells = np.stack([tables[name].astype(np.int32) for name in CELL_FIELDS], axis=-1)
    return CommandTables(
        token_class=token_class, cells=cells, opens=tables["opens"][:, token_class]
    )


def _can_complete(next_state, complete) -> bool:
    """Whether some token sequence completes a command from the start state: a walk over
    the [states, classes] transition table."""
    seen, todo = {0}, [0]
    while todo:
        s = todo.pop()
        if complete[s].any():
            return True
        for t in set(next_state[s].tolist()) - seen:
            seen.add(t)
            todo.append(t)
    return False
