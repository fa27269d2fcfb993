"""The seed study through DVC's experiment queue: is the debiased − naive gap the position
correction or the luck of one training seed?

    make seed-study SEEDS="0 1 2 3 4"      # queue, run, then this script

`make seed-study` queues one experiment per training seed (`dvc exp run --queue evaluate
-S train.seed=N -n seed-N`) and runs the queue; DVC re-runs only what the seed changes (both
trainings, the baseline and the evaluation; the world and the harvest stay cached). This
script reads `dvc exp show --json` into reports/seed_study.json: per seed the rater
recall@10 of the debiased candidate, the naive variant and the frozen baseline (each
experiment's reports/eval.json), the per-seed paired-bootstrap CI of the gap, and the mean
gap over seeds with its 95 % Student-t CI. `bench/debias_seeds.py` goes further on the same
question (best-epoch and same-colour breakdowns from the world's truth).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_contracts.durable import write_text_atomic  # noqa: E402

EVAL_FILE = "reports/eval.json"


def _entries(node) -> Iterator[dict]:
    """Every revision entry (`rev`, `name`, `data`) anywhere in `dvc exp show --json`."""
    if isinstance(node, list):
        for item in node:
            yield from _entries(item)
    elif isinstance(node, dict):
        if "rev" in node and isinstance(node.get("data"), dict):
            yield node
        for key in ("experiments", "revs"):
            if node.get(key):
                yield from _entries(node[key])


def read_metrics(rev: str) -> dict:
    """The experiment's committed eval.json (`dvc exp show` drops list values such as CIs)."""
    shown = subprocess.run(["git", "show", f"{rev}:{EVAL_FILE}"], capture_output=True,
                           text=True)
    if shown.returncode != 0:
        raise ValueError(f"experiment {rev[:7]} has no {EVAL_FILE}: it never reached the "
                         f"evaluate stage ({shown.stderr.strip()})")
    return json.loads(shown.stdout)


def seed_rows(shown: list, prefix: str = "seed-") -> list[dict]:
    """One row per experiment named `<prefix>N`: its train.seed and eval.json numbers."""
    rows = {}
    for entry in _entries(shown):
        name = entry.get("name") or ""
        if not name.startswith(prefix):
            continue
        if entry.get("error"):  # `dvc exp run --run-all` exits 0 when a queued run fails
            raise ValueError(f"experiment {name} failed ({entry['error'].get('msg')}): see "
                             f"`dvc queue logs {name}`, fix it, then `dvc exp remove {name}` "
                             "and queue it again")
        params = entry["data"].get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = read_metrics(entry["rev"])
        seed = int(params["train"]["seed"])
        gap = metrics.get("recall_at_10_vs_naive") or {}
        rows[seed] = {"experiment": name, "rev": entry["rev"], "seed": seed,
                      "debiased_recall_at_10": metrics["recall_at_10"],
                      "naive_recall_at_10": metrics["naive_recall_at_10"],
                      "frozen_recall_at_10": metrics["baseline_recall_at_10"],
                      "gap": metrics["recall_at_10"] - metrics["naive_recall_at_10"],
                      "gap_ci95_over_queries": gap.get("ci95")}
    return [rows[s] for s in sorted(rows)]


def summarise(rows: list[dict]) -> dict:
    """Mean debiased − naive gap over seeds with its 95 % Student-t CI (scipy)."""
    from scipy import stats

    if len(rows) < 2:
        raise ValueError(f"a seed study needs at least two seeds' experiments, got "
                         f"{len(rows)}: queue more (make seed-study SEEDS=\"0 1 2\")")
    gaps = np.array([r["gap"] for r in rows])
    summary = {"seeds": [r["seed"] for r in rows], "per_seed": rows,
               "gap_mean": round(float(gaps.mean()), 4),
               "debiased_ahead": f"{int((gaps > 0).sum())}/{len(gaps)}"}
    if np.ptp(gaps) < 1e-9:  # Student-t has no spread to scale: scipy answers NaN
        summary["gap_ci95_over_seeds"] = [summary["gap_mean"], summary["gap_mean"]]
        summary["warning"] = (f"all {len(gaps)} seeds gave the same gap {gaps[0]:+.4f}: the "
                              "interval over seeds is degenerate; the eval set is too coarse "
                              "to see seed noise or train.seed does not reach training")
        print(f"WARNING: {summary['warning']}", file=sys.stderr)
        return summary
    lo, hi = stats.t.interval(0.95, len(gaps) - 1, loc=gaps.mean(), scale=stats.sem(gaps))
    summary["gap_ci95_over_seeds"] = [round(float(lo), 4), round(float(hi), 4)]
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "reports" / "seed_study.json")
    p.add_argument("--prefix", default="seed-", help="experiment name prefix")
    args = p.parse_args(argv)
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"],
                           capture_output=True, text=True, check=True).stdout
    summary = summarise(seed_rows(json.loads(shown), args.prefix))
    write_text_atomic(args.out, json.dumps(summary, indent=1) + "\n")
    print(f"{'seed':>4} {'debiased':>9} {'naive':>7} {'frozen':>7} {'gap':>7}")
    for r in summary["per_seed"]:
        print(f"{r['seed']:>4} {r['debiased_recall_at_10']:>9.4f} {r['naive_recall_at_10']:>7.4f}"
              f" {r['frozen_recall_at_10']:>7.4f} {r['gap']:>+7.4f}")
    lo, hi = summary["gap_ci95_over_seeds"]
    print(f"gap {summary['gap_mean']:+.4f}, 95 % CI over seeds [{lo:+.4f}, {hi:+.4f}], "
          f"debiased ahead {summary['debiased_ahead']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
