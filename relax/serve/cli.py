"""`relax serve`: an OpenAI-compatible relay server on the engine.

    relax serve --slm runs/relay_slm --llm Qwen3-8B [--config serve] [--host 127.0.0.1]
                [--port 8000] [--slots 16] [--max-new-tokens 2048] [key=value ...]

Models are Hugging Face checkpoint folders (`relax.load_hf`); the tokenizer is read from
--tokenizer (default: the --slm folder). Settings, later ones winning: the defaults of
`relax.serve.config.ServeConfig`, a YAML preset (--config: a file or a preset name), the
flags, then key=value overrides with dotted keys (relay.max_calls=2 slots=32). Without
--llm only the student alone (`slm`) is served.

It binds 127.0.0.1 unless --host says otherwise. Every engine is compiled before the port
opens. SIGTERM or Ctrl-C: the server stops taking connections, finishes the requests in
flight, then exits (uvicorn's graceful shutdown, then the engine loop drains); after
SIGTERM with one line and exit code 143, after Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import jax.numpy as jnp
import uvicorn

from relax import runtime
from relax.config import resolve_preset
from relax.errors import ConfigError
from relax.models.hf import load_hf
from relax.serve import config as serve_config
from relax.serve.app import Service, create_app
from relax.tokenizer import load_tokenizer


def _parser():
    p = argparse.ArgumentParser(
        prog="relax serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--slm", required=True, help="SLM (student) checkpoint folder")
    p.add_argument("--llm", help="LLM (teacher) checkpoint folder (needed by relay and llm)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --slm)")
    p.add_argument("--config", help="YAML file of ServeConfig settings, or a preset name (serve)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--slots", type=int, help="rows the relay engine decodes at once")
    p.add_argument("--max-new-tokens", type=int, help="the budget: the largest max_tokens")
    p.add_argument("--prompt-width", type=int, help="the longest prompt in tokens")
    p.add_argument("--models", help="strategies served, comma-separated (relay,slm,llm)")
    p.add_argument("--log-level", default="info", help="logging level (default: info)")
    p.add_argument("overrides", nargs="*", help="key=value settings (dotted: relay.max_calls=2)")
    return p


def build_config(args, tokenizer):
    flags = {
        "slots": args.slots,
        "relay.max_new_tokens": args.max_new_tokens,
        "prompt_width": args.prompt_width,
        "models": args.models,
    }
    preset = resolve_preset(args.config) if args.config else None
    return serve_config.load(preset, args.overrides, flags, tokenizer)


def main(argv=None):
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    for flag in ("slm", "llm", "tokenizer"):
        folder = getattr(args, flag)
        if folder is not None and not os.path.isdir(folder):
            raise ConfigError(
                f"--{flag} {folder}: no such folder",
                "pass a Hugging Face checkpoint folder: config.json, model.safetensors, "
                "tokenizer files",
            )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tokenizer = load_tokenizer(args.tokenizer or args.slm)
    config = build_config(args, tokenizer)
    runtime.announce()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    slm, slm_params = load_hf(args.slm, dtype=dtype)
    llm, llm_params = load_hf(args.llm, dtype=dtype) if args.llm else (None, None)
    service = Service(tokenizer, config, slm, slm_params, llm, llm_params)
    serve(create_app(service), args.host, args.port, args.log_level)
    return 0


def serve(app, host="127.0.0.1", port=8000, log_level="info"):
    """Runs `app` with uvicorn until SIGTERM / SIGINT, which drain it (see the docstring).
    After a SIGTERM's drain, one line and exit code 143, as the other relax commands."""

    def drained(signum, frame):  # uvicorn re-raises the signal once it has shut down
        print("relax serve: drained and stopped (SIGTERM)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, drained)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class Background:
    """`app` served by uvicorn on a thread (tests, benchmarks): `with Background(app) as s:`
    then `s.url`; leaving the block drains it as SIGTERM would. `port=0`: a free port."""

    def __init__(self, app, host="127.0.0.1", port=0, log_level="warning"):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="relax-http", daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()
