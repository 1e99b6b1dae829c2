"""What `relax serve` runs with: one typed config, filled like every other relax config.

`ServeConfig` is the source of truth; a preset (`--config serve`, or any YAML file of its
keys), the command's flags and trailing `key=value` overrides fill it through the one
loader of relax (`relax.config.load_config`); eos and pad ids the relay section
leaves unset are the tokenizer's. The engines' shapes follow from it: every strategy's
slots hold rows `prompt_width + relay.max_new_tokens` long, compiled once at start.

It does not load models or bind sockets (`relax.serve.cli` does).
"""

from __future__ import annotations

import dataclasses

from relax.config import load_config
from relax.errors import ConfigError
from relax.relay.config import RelayConfig
from relax.tokenizer import special_ids

STRATEGIES = ("relay", "slm", "llm")
"""The `model` names a client may ask for: the relay (the student calling the teacher),
the student alone, the teacher alone."""

DESCRIPTIONS = {
    "relay": "the student writes, and the teacher writes n tokens on each <call>n</call>",
    "slm": "the student alone (commands are plain text, no teacher)",
    "llm": "the teacher alone",
}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The server's engines, queues and defaults."""

    relay: RelayConfig = dataclasses.field(default_factory=RelayConfig)
    """Budget (`max_new_tokens`: the most `max_tokens` a request may ask), calls, scheduling
    and the default sampling (`slm:` of the relay and the student, `llm:` of the teacher's
    segments and the teacher alone) when a request sets no temperature / top_p."""
    models: tuple = STRATEGIES
    """The strategies served (`model` names), a subset of relay, slm, llm."""
    slots: int = 16
    """Rows the relay's engine decodes at once; more requests wait in its queue."""
    solo_slots: int = 0
    """Slots of the student-alone and teacher-alone engines (0: `slots`)."""
    prompt_width: int = 1024
    """The longest prompt in tokens (chat template included); longer ones get HTTP 400."""
    steps_per_call: int = 16
    """Engine iterations per host call: tokens reach clients in steps of at most this many
    (smaller: lower latency per token, more host round trips)."""
    max_queue: int = 64
    """Rows waiting for a slot per strategy, past which a request is refused (HTTP 429)."""
    max_rows: int = 16
    """Rows one request may ask for (prompts x n)."""
    call_rows: int = 0
    """The relay engine's calls served at once (`relax.Engine.call_rows`; 0: its default)."""
    enable_thinking: bool = False
    """Qwen3 chat templates' thinking mode, unless a request sets
    `chat_template_kwargs.enable_thinking` (the paper: off)."""
    retry_after: int = 1
    """Seconds a refused client is told to wait (`Retry-After`)."""
    warmup: bool = True
    """Compile every engine before the server takes requests (else on first use)."""

    def __post_init__(self):
        if isinstance(self.models, (list, str)):
            models = self.models.split(",") if isinstance(self.models, str) else self.models
            object.__setattr__(self, "models", tuple(m.strip() for m in models))

        def check(field, ok, rule):
            if not ok:
                raise ConfigError(f"{field} must be {rule}, got {getattr(self, field)!r}")

        check(
            "models",
            self.models and set(self.models) <= set(STRATEGIES) and len(set(self.models)) == len(self.models),
            f"distinct names from {', '.join(STRATEGIES)}",
        )  # fmt: skip
        for field in ("slots", "prompt_width", "steps_per_call", "max_rows", "retry_after"):
            check(field, getattr(self, field) >= 1, ">= 1")
        for field in ("solo_slots", "max_queue", "call_rows"):
            check(field, getattr(self, field) >= 0, ">= 0")
        room = min(self.engine_slots(m) for m in self.models) + self.max_queue
        check("max_rows", self.max_rows <= room, f"<= slots + max_queue ({room}) to ever fit")

    def engine_slots(self, strategy: str) -> int:
        return self.slots if strategy == "relay" else (self.solo_slots or self.slots)


def load(preset=None, overrides=(), settings=None, tokenizer=None) -> ServeConfig:
    """ServeConfig: defaults < the tokenizer's eos / pad ids < preset < `settings` (dotted
    key -> value, None skipped: the flags) < `key=value` overrides."""
    ids = special_ids(tokenizer) if tokenizer is not None else None
    return load_config(ServeConfig, preset, None, overrides, settings=settings, special_ids=ids)
