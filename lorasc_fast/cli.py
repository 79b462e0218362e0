"""The ``lorasc`` command: ``lorasc demo | bench | merge``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("lorasc_fast.demo", "fine-tune MiniLM on Rotten Tomatoes with LoRA vs LoRASC (CPU by default)"),
    "bench": ("lorasc_fast.bench", "benchmark the fused ops against peers; writes bench/results/"),
    "merge": ("lorasc_fast.checkpoint_merge", "merge a PEFT LoRA adapter into a safetensors checkpoint out of core"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorasc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
