"""`loupe` command line: one subcommand per pipeline stage.

Each stage module owns its arguments through `add_cli(subparsers)` and sets `func`, so the
command line only composes configuration and calls plain functions. `COMMANDS` names the
module of each command, so a call imports only that module (`loupe world` never pays for
torch); tests/code/test_cli.py holds the table to what the modules register.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module whose add_cli registers it, its one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("pipelines.world.cli", "generate the demo product world (known ground truth)"),
    "import-catalog": ("pipelines.import_catalog", "a folder of photos + a catalog table -> "
                                                   "a world (the real-data entry point)"),
    "bootstrap": ("pipelines.bootstrap", "cold start: frozen champion + pretrained detector "
                                         "-> a live index, no logs or training needed"),
    "validate": ("pipelines.validate", "check a table (or a whole world) against its contract"),
    "harvest": ("pipelines.harvest", "engagement pairs with position-bias correction + splits"),
    "demo": ("pipelines.demo", "demo world -> retrain DAG -> rollout DAG, then where to look"),
    "promote": ("pipelines.registry", "promotion gate: move alias champion if the challenger "
                                      "beats it on rater recall@10"),
    "mlflow-ui": ("pipelines.registry", "open the MLflow UI on 127.0.0.1 (same store)"),
    "embed": ("pipelines.embed", "re-embed the catalog with one model version (resumable)"),
    "build-shard": ("pipelines.index", "build one shard of an index version"),
    "finalize-index": ("pipelines.index", "checksum the built shards, write the manifest"),
    "build-index": ("pipelines.index", "build every shard and the manifest"),
    "canary": ("pipelines.index", "probe an index version; exits 1 when it fails"),
    "cutover": ("pipelines.index", "make a canary-passed index version live"),
    "rollback": ("pipelines.index", "one step back to the previous index version"),
    "compact": ("pipelines.index", "fold the delta into a rebuilt version, canary, cutover"),
    "index-status": ("pipelines.index", "live / previous versions and canary verdicts"),
    "ingest": ("pipelines.ingest", "streaming indexer: change feed -> delta log"),
    "publish-changes": ("pipelines.ingest", "append a catalog diff to the change feed"),
    "train-detector": ("pipelines.train_detector", "train, export and score the scene detector"),
    "airflow-run": ("pipelines.airflow_local", "run a Loupe DAG in-process (dag.test) and "
                                               "report per-task wall times"),
    "train": ("pipelines.train", "contrastive embedder training on harvested pairs"),
    "evaluate": ("pipelines.evaluate", "rater-set recall@K with baselines, MLflow run, "
                                       "registered challenger version"),
    "online-eval": ("pipelines.online_eval", "A/B and interleaving analysis of served logs"),
    "simulate-traffic": ("pipelines.simulate_traffic",
                         "simulated users against a front door, or the session-count study"),
    "serve": ("pipelines.serve", "start Triton + shard replicas + search API"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for one command (its module's real arguments), or, for any other
    `command`, the listing of every command from the table alone."""
    parser = argparse.ArgumentParser(prog="loupe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_cli(sub)
    else:
        for name, (_, help_line) in COMMANDS.items():
            sub.add_parser(name, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear line, no traceback
        print(f"loupe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
