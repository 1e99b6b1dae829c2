"""Relay and sampling configuration: frozen dataclasses, static under jit.

Both are hashable, so the decoder passes them as static arguments and a new
value (not a new batch of prompts) is what triggers a recompile. Ranges are
checked on construction, so a bad value fails where it is written rather
than deep inside a trace.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How one model picks its next token.

    The defaults (temperature 0.7, top-p 1.0, no top-k) are the official
    code's vLLM server defaults.
    """

    temperature: float = 0.7
    """Logits are divided by this before top-k / top-p. Must be > 0 unless greedy."""
    top_p: float = 1.0
    """Nucleus mass kept, in (0, 1]; 1.0 keeps everything."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 turns it off."""
    greedy: bool = False
    """Argmax; temperature, top-p and top-k are then ignored."""

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


GREEDY = SamplingConfig(greedy=True)


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    """Budgets, call limits, scheduling and sampling of a relay run (docs/protocol.md, "The relay protocol")."""

    max_new_tokens: int = 512
    """Budget of generated tokens per row (SLM, command and LLM tokens together)."""
    max_call_tokens: int = 8192
    """An honoured call writes min(n, max_call_tokens, remaining budget) LLM tokens."""
    fixed_call_tokens: int | None = None
    """When set, every honoured call writes min(fixed_call_tokens, remaining budget) LLM
    tokens whatever n the SLM asked for (the fixed-length ablation); n = 0 is still no call."""
    max_calls: int = 4
    """Calls honoured per row (the official eval honours 4, its RL rollout 2)."""
    on_call_limit: str = "continue"
    """A command with n >= 1 past max_calls: 'continue' (plain SLM text, hidden from the
    LLM), 'stop' (the row ends, finish_reason 2) or 'block' (no command past the limit:
    the SLM never samples a token that would complete a command's opening `<call>`, as
    if calling were not in its vocabulary; its log-probs are those of that masked
    distribution)."""
    llm_trigger_fraction: float = 1.0
    """An LLM phase starts when rows waiting for the LLM reach this fraction of the
    active rows: 1.0 waits for all (the official scheduler), 0.0 serves a call at once."""
    max_wait_steps: int = 64
    """...or when a row has waited this many loop iterations."""
    prefill_chunk: int = 64
    """Tokens a model ingests per row per step when catching up (prompt, the other
    model's tokens); a catch-up's last step is half or a quarter as wide when that holds
    what is left."""
    slm: SamplingConfig = SamplingConfig()
    """Sampling of the small model."""
    llm: SamplingConfig = SamplingConfig()
    """Sampling of the large model."""
    eos_ids: tuple = (151645, 151643)
    """Token ids that end a row, from either model (Qwen3: <|im_end|>, <|endoftext|>)."""
    pad_id: int = 151643
    """Written after a row's end."""

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f"RelayConfig: {msg}")

        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(
            self.max_call_tokens >= 1, f"max_call_tokens must be >= 1, got {self.max_call_tokens}"
        )
        check(
            self.fixed_call_tokens is None
            or (isinstance(self.fixed_call_tokens, int) and self.fixed_call_tokens >= 1),
            f"fixed_call_tokens must be None or >= 1, got {self.fixed_call_tokens!r}",
        )
        check(self.max_calls >= 0, f"max_calls must be >= 0, got {self.max_calls}")
        check(
            self.on_call_limit in ("continue", "stop", "block"),
            f"on_call_limit must be 'continue', 'stop' or 'block', got {self.on_call_limit!r}",
        )
        check(
            0.0 <= self.llm_trigger_fraction <= 1.0,
            f"llm_trigger_fraction must be in [0, 1], got {self.llm_trigger_fraction}",
        )
        check(self.max_wait_steps >= 1, f"max_wait_steps must be >= 1, got {self.max_wait_steps}")
        check(self.prefill_chunk >= 1, f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        check(isinstance(self.slm, SamplingConfig), "slm must be a SamplingConfig")
        check(isinstance(self.llm, SamplingConfig), "llm must be a SamplingConfig")
        if isinstance(self.eos_ids, list):
            object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        check(
            isinstance(self.eos_ids, tuple)
            and all(isinstance(i, int) and i >= 0 for i in self.eos_ids),
            f"eos_ids must be a tuple of non-negative ints, got {self.eos_ids!r}",
        )
        check(
            isinstance(self.pad_id, int) and self.pad_id >= 0,
            f"pad_id must be an int >= 0, got {self.pad_id}",
        )
