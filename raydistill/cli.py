"""`raydistill <command>`: one config tree, YAML + `key.sub=value` overrides, lazily imported commands.

Each command module exposes `main(cfg: RootConfig, args) -> int` and optionally `add_arguments(parser)`.
Commands are imported only when chosen, so `raydistill data list` never imports Ray or vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from raydistill.config import ConfigError, load_config, split_overrides
from raydistill.data.records import DataError

COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("raydistill.stages.distill", "the whole workflow: index, generate, filter, sft, train, evaluate"),
    "index": ("raydistill.stages.index", "build the retrieval index (Ray Data)"),
    "generate": ("raydistill.stages.generate", "teacher trajectories, grading, filtering, SFT data (Ray Data)"),
    "train": ("raydistill.stages.train", "LoRA student training (Ray Train)"),
    "evaluate": ("raydistill.stages.evaluate", "evaluate students on the benchmarks and write the report"),
    "serve": ("raydistill.stages.serve", "serve the student agent over HTTP (Ray Serve)"),
    "solve": ("raydistill.agent.solve", "run one agent episode on a question and print the trajectory"),
    "data": ("raydistill.data.cli", "list and show the bundled data sets"),
}


def _load_command(name: str):
    module_name, _ = COMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
        p.add_argument("--log-level", default="INFO")
        if name == command:
            module = _load_command(name)
            if module is not None and hasattr(module, "add_arguments"):
                module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    overrides, rest = split_overrides(argv)
    parser = build_parser(command)
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = _load_command(args.command)
    if module is None or not hasattr(module, "main"):
        print(f"raydistill {args.command}: not yet implemented", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)
        return int(module.main(cfg, args) or 0)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
