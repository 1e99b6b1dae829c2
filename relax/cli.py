"""The `relax` command: one subcommand per pipeline stage.

Each subcommand lives in the module that owns its logic; this file only
dispatches, importing the target lazily so `relax --help` is instant.

A user's mistake (a `relax.errors.RelaxError`, a missing file, malformed YAML)
is printed as one line, `relax <command>: <what is wrong> (<how to fix>)`, with
exit code 2. `--debug` anywhere on the command line, or `RELAX_DEBUG=1`, shows
the full traceback instead. Any other exception is a bug and keeps its
traceback.

`relax sft` and `relax grpo` stopped by SIGTERM or SIGINT save a checkpoint,
print one line and exit with 143 (SIGTERM) or 130 (SIGINT)
(`relax.train.interrupt`); Ctrl-C in the other commands is one line, exit 130.
"""

import argparse
import importlib
import os
import sys

import yaml

from relax.errors import RelaxError, debug_enabled, one_line

# subcommand -> ("module:function", one-line help). Each function takes argv.
COMMANDS = {
    "demo": ("relax.demo.cli:main", "train and evaluate a miniature RelayLLM on CPU, end to end"),
    "sample": (
        "relax.train.cli:sample",
        "the SLM's own correct solutions (k samples per problem, graded): relax sft's data",
    ),
    "sft": ("relax.train.cli:sft", "supervised warm-up (commands inserted into SLM solutions)"),
    "grpo": ("relax.train.cli:grpo", "GRPO with relay rollouts and a difficulty-aware reward"),
    "filter": (
        "relax.train.cli:filter",
        "keep problems the LLM solves in more than min_pass_rate of k samples (default: at least once in 16)",
    ),
    "eval": ("relax.eval.cli:main", "evaluate strategies (slm, llm, relay, routers) on benchmarks"),
    "plan": ("relax.plan.cli:main", "per-device memory, FLOPs, roofline of a preset's programs"),
    "serve": (
        "relax.serve.cli:main",
        "an OpenAI-compatible HTTP server (streaming) for the relay, the SLM and the LLM",
    ),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_enabled()
    argv = [a for a in argv if a != "--debug"]
    # transformers warns on import when torch is absent; relax never needs torch at run time.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = argparse.ArgumentParser(
        prog="relax",
        description="RelayLLM in JAX: an SLM that calls an LLM for a few tokens.",
        epilog="--debug (or RELAX_DEBUG=1) shows the traceback of an error instead of one line.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    target, _ = COMMANDS[argv[0]]
    # The only function-local imports here: jax-backed modules (and the command's module,
    # by importlib) load once a command runs, so `relax --help` stays instant.
    from relax import runtime
    from relax.train.interrupt import Stopped

    runtime.command = argv[0]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)

    try:
        return func(argv[1:]) or 0
    except _user_errors() as e:
        if debug:
            raise
        print(f"relax {argv[0]}: {one_line(e)}", file=sys.stderr)
        return 2
    except Stopped as e:  # sft, grpo: a signal, a checkpoint saved (relax.train.interrupt)
        print(f"relax {argv[0]}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C in a command that does not train
        if debug:
            raise
        print(f"relax {argv[0]}: interrupted (SIGINT)", file=sys.stderr)
        return 130


def _user_errors():
    """Exception types that are the user's to fix (shown as one line)."""
    return (RelaxError, OSError, yaml.YAMLError)


if __name__ == "__main__":
    sys.exit(main())
