"""One answer's text as its tokens arrive: detokenized, split by who wrote it, cut at stops.

The engine hands over token ids in steps (`relax.relay.engine.Update`); a client wants
text. `AnswerText.feed` turns each step's tokens into the pieces of text that are now
final, each with its writer: "llm" for text the teacher wrote, "slm" for the rest (the
student's text and its `<call>n</call>` commands). Text is held back while it could still
change: a trailing incomplete UTF-8 character (decoded as U+FFFD) and a tail that could be
the start of a stop string. A stop string ends the answer: the text is cut where the stop
starts (the stop itself is not returned), and `stopped` tells the caller to cancel the
engine's row.

Decoding in context, incrementally: a token's text depends on its neighbours
(SentencePiece spaces, byte-level characters split over tokens), so new tokens are decoded
together with the tokens of the last settled stretch before them, and their text is what
that window decodes to past the stretch's own text. Text settles once it ends in a whole
character; the window then moves up. A step costs its own tokens plus one stretch, not
the whole answer, and the text is `tokenizer.decode` of all the tokens (a decoder that
rewrites earlier text falls back to decoding everything). Each character's writer is the
writer of the tokens whose decoding produced it.

Not done here: log-probs.
"""

from __future__ import annotations

from relax.relay.state import LLM

REPLACEMENT = "\ufffd"


class AnswerText:
    """The text of one answer (one choice) so far.

    `tokens`, `sources`: every token fed (sources as the engine reports them);
    `text`: the text emitted; `kept_tokens`: the tokens the emitted answer consists of
    (all of them, or those up to the one that completed a stop string).
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.sources: list[int] = []
        self._full = ""  # the whole decoded answer so far
        # The decoding window: tokens[_prefix:_read] is the last settled stretch, whose text
        # ends _full[:_settled]; tokens from _read on are decoded with it as context.
        self._prefix = self._read = self._settled = 0
        self._writer = []  # per character of _full: "slm" or "llm"
        self.text = ""
        self.spans: list[list[int]] = []  # [start, end) character spans of `text` the LLM wrote
        self.stopped = False
        self.kept_tokens: int | None = None
        self.calls = 0
        """Calls honoured so far (the engine's count; the caller keeps it)."""
        self.finish: str | None = None
        """The API's finish reason once the answer has ended (the caller sets it)."""
        self.row = None
        """The engine's whole finished row (tokens, sources, log-probs), when it ran to its end."""

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self):
        """The whole answer's text (`decode(tokens)`), decoding only the tokens after the
        settled stretch with that stretch as context."""
        p, r = self._prefix, self._read
        stretch = self._decode(self.tokens[p:r])
        window = self._decode(self.tokens[p:])
        if window.startswith(stretch):
            full = self._full[: self._settled] + window[len(stretch) :]
        else:  # the decoder rewrote the stretch's text: decode everything, settle afresh
            full = self._decode(self.tokens)
            self._prefix = self._read = self._settled = 0
            r = 0
        if not full.endswith(REPLACEMENT):  # whole characters: the window moves up
            self._prefix, self._read, self._settled = r, len(self.tokens), len(full)
        return full

    def _extend(self, tokens, sources):
        """Decode after each run of tokens of one writer; the new characters are its."""
        runs = []
        for t, s in zip(tokens, sources):
            who = "llm" if s == LLM else "slm"
            if runs and runs[-1][0] == who:
                runs[-1][1].append(t)
            else:
                runs.append((who, [t]))
        self.sources.extend(sources)
        for who, ids in runs:
            self.tokens.extend(ids)
            full = self._decode_new()
            common = (
                len(self._full) if full.startswith(self._full) else _common_prefix(full, self._full)
            )
            self._writer = self._writer[:common] + [who] * (len(full) - common)
            self._full = full

    def feed(self, tokens, sources, final=False) -> list[tuple[str, str]]:
        """The pieces of text `tokens` made final, as (text, writer) with writer "slm" or
        "llm", in order. `final`: the answer ends here (nothing is held back)."""
        if self.stopped:
            return []
        before = len(self.tokens)
        self._extend(list(tokens), list(sources))
        full, sent = self._full, len(self.text)
        end = len(full)
        for s in self.stop:
            i = full.find(s, max(0, sent - len(s) + 1))
            if i >= 0 and i < end:
                end = i
                self.stopped = True
        if self.stopped:
            self.kept_tokens = self._tokens_to(before)
        elif not final:
            end -= _held_back(full, self.stop)
        end = max(end, sent)
        return self._emit(end)

    def _tokens_to(self, before):
        """The fewest tokens whose text holds a stop: the answer's tokens up to the one that
        completed it (found among the tokens fed last, from `before` on)."""
        stops = [s for s in self.stop if s in self._full]
        for k in range(before + 1, len(self.tokens) + 1):
            text = self._decode(self.tokens[:k])
            if any(s in text for s in stops):
                return k
        return len(self.tokens)

    def _emit(self, end):
        pieces = []
        start = len(self.text)
        i = start
        while i < end:
            who = self._writer[i]
            j = i
            while j < end and self._writer[j] == who:
                j += 1
            pieces.append((self._full[i:j], who))
            if who == "llm":
                if self.spans and self.spans[-1][1] == i:
                    self.spans[-1][1] = j
                else:
                    self.spans.append([i, j])
            i = j
        self.text = self._full[:end] if end > start else self.text
        return pieces

    @property
    def completion_tokens(self) -> int:
        return self.kept_tokens if self.kept_tokens is not None else len(self.tokens)

    @property
    def llm_tokens(self) -> int:
        return sum(1 for s in self.sources[: self.completion_tokens] if s == LLM)


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _held_back(text, stops):
    """Characters at the end of `text` that may still change or start a stop string: an
    incomplete UTF-8 character (U+FFFD), or the longest tail that is a proper prefix of a
    stop."""
    held = len(text) - len(text.rstrip(REPLACEMENT))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
