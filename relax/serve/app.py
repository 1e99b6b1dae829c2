"""`relax serve`'s HTTP API: OpenAI-compatible completions and chat on the engine loop.

`Service` holds what a server serves (the tokenizer, one engine per strategy, the engine
loop, the metrics); `create_app(service)` is the FastAPI application:

  POST /v1/completions        text or token-id prompts, streamed (SSE) or whole
  POST /v1/chat/completions   messages through the tokenizer's chat template
  GET  /v1/models             relay, slm, llm (those served): the `model` field picks one
  GET  /health                200 while serving, 503 while draining or failed
  GET  /metrics               Prometheus text (`relax.serve.metrics`)

A request becomes rows (prompts x n) submitted to the engine loop (`relax.serve.worker`);
each row's updates come back on the event loop through an asyncio queue, become text
(`relax.serve.text.AnswerText`) and leave as SSE chunks or one JSON body. A client that
disconnects cancels its rows at once; a stop string cancels its row. Every error is one
JSON body `{"error": {"message": ...}}`: 400 for a bad request (one sentence saying what
to fix), 404 for an unknown model, 429 when the queue is full and 503 while draining
(both with `Retry-After`). One access-log line per request (`relax.serve.access`).

Requests name one of a fixed set of models and carry text or token ids: nothing a client
sends is a path, so no request makes the server read or write a file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import secrets
import time

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from relax.relay.command import CallCommand
from relax.relay.state import COMMAND, LLM, SLM
from relax.serve import protocol
from relax.serve.access import AccessLog
from relax.serve.config import DESCRIPTIONS, ServeConfig
from relax.serve.metrics import Metrics
from relax.serve.protocol import ChatRequest, CompletionRequest
from relax.serve.text import AnswerText
from relax.serve.worker import Draining, Overloaded, Row, Strategy, Worker, build_engine

SEED_RANGE = (-(2**63), 2**63)
OUTCOMES = {400: "bad_request", 404: "bad_request", 429: "overloaded", 503: "draining"}
"""The `outcome` label of a refused request, by status (any other: failed)."""
COMPLETION_DEFAULT_TOKENS = 16
"""`max_tokens` of a completion that sets none (the OpenAI API's default); chat defaults to
the whole budget."""


class APIError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", headers=None, param=None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers, self.param = headers, param


class Service:
    """What one server serves: the tokenizer, an engine per strategy, the engine loop.

    `slm`, `llm`: models (relax's or any with the model contract) and their params;
    `command`: the relay's `CallCommand` (built from the tokenizer when None). The relay
    and the teacher alone need the LLM.
    """

    def __init__(self, tokenizer, config: ServeConfig, slm, slm_params, llm=None,
                 llm_params=None, command=None):  # fmt: skip
        self.tokenizer = tokenizer
        self.config = config
        names = [m for m in config.models if llm is not None or m == "slm"]
        if not names:
            raise ValueError("no model to serve: the relay and the teacher alone need the LLM")
        if "relay" in names and command is None:
            command = CallCommand.from_tokenizer(tokenizer)
        strategies = {}
        for name in names:
            engine = build_engine(
                name, slm, llm, config.relay, command, config.engine_slots(name),
                config.call_rows,
            )  # fmt: skip
            params = (llm_params, None) if name == "llm" else (slm_params, llm_params)
            strategies[name] = Strategy(name, engine, *params)
        self.worker = Worker(strategies, config.prompt_width, config.steps_per_call,
                             config.max_queue, flush=self._flush)  # fmt: skip
        self.loop: asyncio.AbstractEventLoop | None = None
        """The event loop the HTTP side runs on (`start` is given it)."""
        self._outbox = collections.deque()  # (asyncio queue, item) the engine thread emitted
        self.metrics = Metrics(self.worker)
        self.created = protocol.now()

    @property
    def models(self):
        return list(self.worker.strategies)

    def start(self, loop: asyncio.AbstractEventLoop):
        """Starts the engine loop; its updates reach the requests on `loop`."""
        self.loop = loop
        self.worker.start(warmup=self.config.warmup)

    def emit(self, queue: asyncio.Queue, item):
        """On the engine thread: `item` for `queue`, handed over at the turn's `_flush`."""
        self._outbox.append((queue, item))

    def _flush(self):
        """On the engine thread, once a turn: the turn's updates to the event loop, at once."""
        if self._outbox and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed
                self.loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self):
        """On the event loop: every update emitted so far into its request's queue."""
        while self._outbox:
            queue, item = self._outbox.popleft()
            queue.put_nowait(item)

    def stop(self):
        self.metrics.draining.set(1)
        self.worker.stop()

    # -- request checks --------------------------------------------------------

    def strategy(self, model: str) -> str:
        if model not in self.worker.strategies:
            raise APIError(
                404, f"model {model!r} is not served here; choose from {', '.join(self.models)}",
                "not_found_error", param="model",
            )  # fmt: skip
        return model

    def encode(self, text: str, special=True) -> list:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def completion_prompts(self, prompt) -> list:
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        if not prompts:
            raise APIError(400, "`prompt` is an empty list", param="prompt")
        return [self.check_prompt(p, "prompt") for p in prompts]

    def chat_prompt(self, req: ChatRequest) -> list:
        messages = [
            {
                "role": m.role,
                "content": m.content
                if isinstance(m.content, str)
                else "".join(p.text for p in m.content),
            }
            for m in req.messages
        ]
        thinking = self.config.enable_thinking
        if req.chat_template_kwargs is not None:
            thinking = req.chat_template_kwargs.enable_thinking
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this server's tokenizer has no chat template: use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
            )
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # the template's own checks
            raise APIError(400, f"the chat template rejects these messages: {e}") from None
        return self.check_prompt(self.encode(text, special=False), "messages")

    def check_prompt(self, ids, field) -> list:
        width, vocab = self.config.prompt_width, len(self.tokenizer)
        if not ids:
            raise APIError(400, f"the prompt (`{field}`) is empty", param=field)
        if len(ids) > width:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens; this server takes at most {width} "
                "(prompt_width)", param=field,
            )  # fmt: skip
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary of {vocab}", param=field
            )
        return ids

    def sampling(self, req, max_tokens, n_prompts) -> dict:
        """The rows' settings, each checked, or an APIError naming the first bad one."""
        message = protocol.unsupported(req)
        if message:
            raise APIError(400, message)
        budget = self.config.relay.max_new_tokens
        if max_tokens is None:
            max_tokens = (
                min(COMPLETION_DEFAULT_TOKENS, budget)
                if isinstance(req, CompletionRequest)
                else budget
            )
        if not 1 <= max_tokens <= budget:
            raise APIError(
                400, f"`max_tokens` is {max_tokens}: it must be in [1, {budget}] (this server's "
                "budget of tokens per answer, relay.max_new_tokens)", param="max_tokens",
            )  # fmt: skip
        t, p = req.temperature, req.top_p
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise APIError(
                400, f"`temperature` is {t}: it must be >= 0 (0 is greedy)", param="temperature"
            )
        if p is not None and not 0 < p <= 1:
            raise APIError(400, f"`top_p` is {p}: it must be in (0, 1]", param="top_p")
        rows = n_prompts * req.n
        if req.n < 1 or rows > self.config.max_rows:
            raise APIError(
                400, f"`n` is {req.n} for {n_prompts} prompt(s): a request may ask for 1 to "
                f"{self.config.max_rows} answers in all (max_rows)", param="n",
            )  # fmt: skip
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 8 or not all(stop):
            raise APIError(400, "`stop` takes at most 8 non-empty strings", param="stop")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise APIError(400, f"`seed` must be a 64-bit signed integer, got {seed}", param="seed")
        return {"max_new_tokens": max_tokens, "temperature": t, "top_p": p, "stop": stop,
                "seed": seed}  # fmt: skip


class Generation:
    """One request's rows on the engine loop and their answers, assembled as updates arrive."""

    def __init__(self, service: Service, strategy, prompts, n, settings, arrived):
        self.service = service
        self.strategy = strategy
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = arrived
        self.first_token_at = None
        self.prompt_tokens = sum(len(p) for p in prompts) * n
        self.prompt_lens = [len(p) for p in prompts for _ in range(n)]
        stop = settings.pop("stop")
        seed = settings.pop("seed")
        self.answers, self.rows = [], []
        for i, ids in enumerate(p for p in prompts for _ in range(n)):
            self.answers.append(AnswerText(service.tokenizer, stop))
            self.rows.append(Row(strategy, ids, seed, i, emit=self._emitter(i), **settings))

    def _emitter(self, i):
        return lambda item: self.service.emit(self.queue, (i, item))

    def submit(self):
        try:
            self.service.worker.submit(self.rows)
        except Overloaded:
            raise APIError(
                429, "the server is at capacity (every slot busy, the queue full): retry later",
                "rate_limit_error", {"Retry-After": str(self.service.config.retry_after)},
            ) from None  # fmt: skip
        except Draining:
            raise APIError(
                503, "the server is shutting down", "service_unavailable",
                {"Retry-After": str(self.service.config.retry_after)},
            ) from None  # fmt: skip

    def cancel(self):
        self.service.worker.cancel(self.rows)

    async def events(self):
        """Yields (choice index, [(text, writer)], finish reason or None) as rows write."""
        left = len(self.rows)
        while left:
            i, item = await self.queue.get()
            if isinstance(item, BaseException):
                self.cancel()
                raise APIError(500, f"generation failed: {item}", "server_error")
            answer = self.answers[i]
            if answer.finish is not None:
                continue
            pieces = answer.feed(item.tokens, item.source, final=item.finished)
            answer.calls = item.calls
            if answer.stopped:
                self.service.worker.cancel([self.rows[i]])
                answer.finish = "stop"
            elif item.finished:
                answer.finish = protocol.FINISH_REASONS.get(item.finish_reason, "stop")
                answer.row = item.row
            if pieces and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if answer.finish is not None:
                left -= 1
            yield i, pieces, answer.finish

    def finished(self, outcome="ok"):
        """Metrics of the request; returns its access-log fields."""
        m, name = self.service.metrics, self.strategy
        end = time.perf_counter()
        m.requests.labels(name, outcome).inc()
        m.prompt_tokens.labels(name).inc(self.prompt_tokens)
        completion = 0
        for a, plen in zip(self.answers, self.prompt_lens):
            sources = a.row[1][plen:] if a.row is not None else a.sources[: a.completion_tokens]
            for code, label in ((SLM, "slm"), (COMMAND, "command"), (LLM, "llm")):
                count = sum(1 for s in sources if s == code)
                if count:
                    m.tokens.labels(name, label).inc(count)
            m.calls.labels(name).inc(a.calls)
            completion += a.completion_tokens
        if self.first_token_at is not None:
            m.ttft.labels(name).observe(self.first_token_at - self.arrived)
            if completion > len(self.answers):
                per = (end - self.first_token_at) / (completion - len(self.answers))
                m.tpot.labels(name).observe(per)
        m.latency.labels(name).observe(end - self.arrived)
        use = protocol.usage(self.prompt_tokens, self.answers)
        ttft = f"{self.first_token_at - self.arrived:.3f}s" if self.first_token_at else "-"
        return {
            "model": name, "n": len(self.rows), "prompt": use["prompt_tokens"],
            "completion": use["completion_tokens"], "llm": use["llm_tokens"],
            "calls": use["calls"], "ttft": ttft, "outcome": outcome,
        }  # fmt: skip


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(service: Service) -> FastAPI:
    """The FastAPI application of `service`; its lifespan starts and drains the engine loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.start, asyncio.get_running_loop())
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="relax serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(AccessLog)

    def refused(request, status, message, kind="invalid_request_error", param=None, headers=None):
        outcome = OUTCOMES.get(status, "failed")
        model = request.scope.get("state", {}).get("relax", {}).get("model", "-")
        service.metrics.requests.labels(model, outcome).inc()
        _note(request, outcome=outcome, error=json.dumps(message))
        return JSONResponse(protocol.error_body(message, kind, param), status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return refused(request, e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        return refused(request, 400, protocol.describe(e.errors()))

    @app.get("/health")
    async def health():
        w = service.worker
        status = "failed" if w.failure else "draining" if w.draining else "ok"
        slots = {
            n: {"in_use": u, "waiting": q, "slots": w.slots(n)} for n, (u, q) in w.stats().items()
        }
        return JSONResponse({"status": status, "models": slots}, 200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        data = [
            {"id": n, "object": "model", "created": service.created, "owned_by": "relax",
             "description": DESCRIPTIONS[n]}
            for n in service.models
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        name = service.strategy(req.model)
        _note(request, model=name)
        prompts = service.completion_prompts(req.prompt)
        settings = service.sampling(req, req.max_tokens, len(prompts))
        return await _serve(service, request, req, name, prompts, settings, arrived, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        arrived = time.perf_counter()
        name = service.strategy(req.model)
        _note(request, model=name)
        prompt = service.chat_prompt(req)
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        settings = service.sampling(req, max_tokens, 1)
        return await _serve(service, request, req, name, [prompt], settings, arrived, chat=True)

    return app


async def _serve(service, request, req, name, prompts, settings, arrived, chat):
    gen = Generation(service, name, prompts, req.n, settings, arrived)
    gen.submit()
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    head = {"id": rid, "created": protocol.now(), "model": name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(gen, request, head, chat, include_usage)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    task = asyncio.ensure_future(_collect(gen))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                gen.cancel()
                task.cancel()
                _note(request, **gen.finished("cancelled"))
                return Response(status_code=499)
    except BaseException:
        gen.cancel()
        task.cancel()
        raise
    task.result()
    _note(request, **gen.finished())
    choices = []
    for i, a in enumerate(gen.answers):
        choice = {"index": i, "finish_reason": a.finish, "llm_spans": a.spans}
        if chat:
            choice["message"] = {"role": "assistant", "content": a.text}
            choice["logprobs"] = None
        else:
            choice["text"] = a.text
            choice["logprobs"] = None
        choices.append(choice)
    kind = "chat.completion" if chat else "text_completion"
    usage = protocol.usage(gen.prompt_tokens, gen.answers)
    return {**head, "object": kind, "choices": choices, "usage": usage}


async def _collect(gen):
    async for _ in gen.events():
        pass


async def _stream(gen, request, head, chat, include_usage):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i, text=None, finish=None, source=None, role=False):
        c = {"index": i, "finish_reason": finish, "logprobs": None}
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            c["delta"] = delta
        else:
            c["text"] = text or ""
        if source is not None:
            c["source"] = source
        return _sse({**head, "object": kind, "choices": [c]})

    outcome = "cancelled"
    try:
        if chat:
            for i in range(len(gen.rows)):
                yield chunk(i, role=True)
        async for i, pieces, finish in gen.events():
            for text, who in pieces:
                yield chunk(i, text, source=who)
            if finish is not None:
                yield chunk(i, finish=finish)
        if include_usage:
            yield _sse({**head, "object": kind, "choices": [],
                        "usage": protocol.usage(gen.prompt_tokens, gen.answers)})  # fmt: skip
        yield "data: [DONE]\n\n"
        outcome = "ok"
    except APIError as e:
        outcome = "failed"
        yield _sse(protocol.error_body(e.message, e.kind))
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # a client that left (or an error): its rows leave their slots now
        _note(request, **gen.finished(outcome))


def _note(request, **fields):
    """Fields for this request's access-log line."""
    request.scope.setdefault("state", {}).setdefault("relax", {}).update(fields)
