"""The OpenAI API's requests and responses as relax serves them (pydantic models, JSON shapes).

Requests are strict: a field of the wrong type, or a field the API does not have, is an
error (`describe` turns pydantic's list into one sentence for the HTTP 400). Fields of
the OpenAI API that relax does not implement are accepted only at their neutral value
(`unsupported` names the first one set otherwise), so a client never silently gets less
than it asked for.

Responses follow the OpenAI shapes, with relax's additions:
- `usage` adds `llm_tokens` (tokens the teacher wrote), `calls` (calls honoured) and
  `llm_token_share` (llm_tokens / completion_tokens).
- each choice of a whole response has `llm_spans`: [start, end) character offsets of the
  text the teacher wrote;
- each streamed chunk's choice has `source`: "llm" when the teacher wrote its text,
  "slm" otherwise (the student's text and its commands).

Not here: routing and generation (`relax.serve.app`), text assembly (`relax.serve.text`).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FINISH_REASONS = {0: "stop", 1: "length", 2: "stop"}
"""The engine's finish reasons as the API's: EOS and the call limit stop, the budget is
`length`. A stop string is `stop` too."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    """A last chunk with `usage` (and no choices) before `data: [DONE]`."""


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    """0 is greedy; None: the server's default (its config's)."""
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    """The rows' PRNG key: the same seed, prompt and settings give the same answer."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Accepted and ignored."""


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, several texts, token ids, or several lists of token ids."""
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ThinkingSwitch(_Strict):
    enable_thinking: bool = False


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: ThinkingSwitch | None = None
    """Only `enable_thinking` (Qwen3's thinking mode; default: the server's, off)."""


# Fields a neutral value of which is all relax serves.
_NEUTRAL = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (False,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
}

_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
    "messages": "a list of messages with a role and content",
}


def unsupported(req: _Sampling) -> str | None:
    """A message naming the first field set to something relax does not serve, else None."""
    for field, neutral in _NEUTRAL.items():
        if field in type(req).model_fields and getattr(req, field) not in neutral:
            return f"`{field}` is not supported by this server (leave it unset)"
    return None


def describe(errors: list) -> str:
    """One sentence for pydantic's (or FastAPI's) validation errors: the first one, with
    its field's dotted path."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})"
    if not loc:
        return f"the request body must be a JSON object ({e['msg']})"
    # drop the union-branch tags pydantic appends (`prompt.list[int].0`)
    path = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float")]
    field = ".".join(path)
    if e.get("type") == "extra_forbidden":
        return f"unknown field `{field}`"
    if e.get("type") == "missing":
        return f"`{field}` is required"
    name = next((p for p in reversed(path) if p in _TYPES), None)
    if name is not None and any(p.endswith("]") or p in ("str",) for p in loc):
        return f"`{field}` must be {_TYPES[name]}"
    return f"`{field}`: {e['msg']}"


def error_body(message: str, kind="invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens, answers) -> dict:
    """The API's usage plus relax's relay figures, over every answer of a request."""
    completion = sum(a.completion_tokens for a in answers)
    llm = sum(a.llm_tokens for a in answers)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "llm_tokens": llm,
        "calls": sum(a.calls for a in answers),
        "llm_token_share": llm / completion if completion else 0.0,
    }
