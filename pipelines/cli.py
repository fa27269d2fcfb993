"""`loupe` command line: one subcommand per pipeline stage.

Each stage module owns its arguments through `add_cli(subparsers)` and sets `func`, so the
command line only composes configuration and calls plain functions.
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = ("world", "validate", "harvest", "demo", "registry", "embed", "index", "ingest",
          "train_detector", "orchestration", "train", "evaluate", "online_eval",
          "simulate_traffic", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        importlib.import_module(f"pipelines.{stage}").add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear line, no traceback
        print(f"loupe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
