"""The `relax` command: one subcommand per pipeline stage.

Each subcommand lives in the module that owns its logic; this file only
dispatches, importing the target lazily so `relax --help` is instant.
"""

import argparse
import importlib
import sys

# subcommand -> ("module:function", one-line help). Each function takes argv.
COMMANDS = {
    "demo": ("relax.demo:main", "train and evaluate a miniature RelayLLM on CPU, end to end"),
    "sft": ("relax.train.cli:sft", "supervised warm-up (commands inserted into SLM solutions)"),
    "grpo": ("relax.train.cli:grpo", "GRPO with relay rollouts and a difficulty-aware reward"),
    "filter": ("relax.train.cli:filter", "keep problems the LLM solves at least once in k samples"),
    "eval": ("relax.eval.cli:main", "evaluate strategies (slm, llm, relay, routers) on benchmarks"),
    "plan": ("relax.plan.cli:main", "per-device memory, FLOPs, roofline of a preset's programs"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="relax",
        description="RelayLLM in JAX: an SLM that calls an LLM for a few tokens.",
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
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return func(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
