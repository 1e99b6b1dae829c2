"""`relax serve`: an OpenAI-compatible HTTP server on the relay engine.

  config.py    ServeConfig: engines, queues and defaults (a preset, flags, key=value)
  worker.py    the engine loop: one thread drives a `Session` per strategy
  text.py      one answer's text as tokens arrive: detokenized, by writer, cut at stops
  protocol.py  the OpenAI requests (pydantic, strict) and response shapes
  metrics.py   Prometheus metrics and the access log
  app.py       the FastAPI application: routes, streaming, errors
  cli.py       the `relax serve` command and `Background` (a server on a thread)

Imports FastAPI and uvicorn only when these modules are imported, not with `relax`.
"""
