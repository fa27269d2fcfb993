"""Debiased vs naive training over several training seeds: is the gap the position correction
or the luck of one run?

    .venv/bin/python bench/debias_seeds.py --world data/demo --harvest runs/demo/harvest \
        --seeds 0 1 2 [--work runs/demo/debias_seeds] [--out reports/debias_seeds.json]

Each seed trains both variants from the same harvest (same rows; the naive pairs drop only
the inverse propensity) with `params.yaml`'s recipe and that seed, and scores both exports on
the rater set exactly as `loupe evaluate` does. A seed changes the head's initialisation, the
augmented views, pair order and hard-negative picks, so each seed builds its own frozen-feature
cache (a few minutes on two cores). The JSON holds per-seed recall@10 of both variants, the
per-seed paired-bootstrap CI over rater queries, and the mean gap across seeds with its 95 %
Student-t CI over seeds (the uncertainty the README quotes).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_contracts.durable import write_text_atomic  # noqa: E402
from pipelines import evaluate as ev  # noqa: E402
from pipelines.embed import embed_fn_from_export  # noqa: E402
from pipelines.train import FeatureCache, TrainConfig, train  # noqa: E402
from pipelines.versions import resolved_versions  # noqa: E402

VARIANTS = ("debiased", "naive")


@dataclass(frozen=True)
class StyleTruth:
    """Style cluster and palette of every listing and of every rater query's target, read
    once from the world's truth/ (which only evaluation tooling may read)."""

    items: pd.DataFrame  # item_id -> cluster_id, palette
    queries: pd.DataFrame  # rater_query_id (in the rater set's order) -> cluster_id, palette

    @classmethod
    def load(cls, world: Path, rater: ev.EvalSet) -> StyleTruth:
        products = pd.read_parquet(world / "truth" / "products.parquet").set_index(
            "product_id")[["cluster_id", "palette"]]
        targets = pd.read_parquet(world / "truth" / "rater_queries.parquet").set_index(
            "rater_query_id")["target_product_id"]
        catalog = pd.read_parquet(world / "tables" / "catalog.parquet",
                                  columns=["item_id", "product_id"])
        items = products.loc[catalog["product_id"]].set_axis(catalog["item_id"])
        queries = products.loc[targets[rater.query_ids]].set_axis(rater.query_ids)
        return cls(items, queries)

    def colour_confusion(self, top_items: list[list[str]]) -> float:
        """Share of top-10 results from another style cluster but the query's palette: the
        confusion the legacy ranker's "shop the colour" pins teach a position-blind learner."""
        shares = []
        for (_, target), items in zip(self.queries.iterrows(), top_items, strict=True):
            found = self.items.loc[items[:10]]
            shares.append(float(((found["cluster_id"] != target["cluster_id"])
                                 & (found["palette"] == target["palette"])).mean()))
        return float(np.mean(shares))


def seed_ci(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean gap over training seeds (each seed one draw of the
    whole recipe: init, views, pair order, negatives); a point interval for one seed."""
    from scipy.stats import t

    mean = float(np.mean(diffs))
    if len(diffs) < 2:
        return mean, mean
    half = float(t.ppf((1 + level) / 2, len(diffs) - 1) * np.std(diffs, ddof=1)
                 / np.sqrt(len(diffs)))
    return mean - half, mean + half


class RaterCurve(pl.Callback):
    """Rater recall@10 of the model after every epoch, from the plain-view trunk features
    (the cache's); reported next to the validation curve, never used to pick a checkpoint."""

    def __init__(self, world: Path, rater: ev.EvalSet, cache_dir: Path, cfg: TrainConfig):
        self.world, self.rater, self.cache_dir, self.cfg = world, rater, cache_dir, cfg
        self.rows: list[dict] = []

    def on_fit_start(self, trainer, module) -> None:
        catalog = ev.load_catalog(self.world)
        self.item_ids = catalog["item_id"].to_numpy()
        boxes = np.vstack([np.tile([0.0, 0.0, 1.0, 1.0], (len(catalog), 1)),
                           self.rater.query_boxes])
        images = pd.DataFrame(boxes, columns=["x0", "y0", "x1", "y1"]).assign(
            path=catalog["image_path"].tolist() + list(self.rater.query_paths))
        feats = FeatureCache(self.cache_dir, module.model, self.cfg.views, self.cfg.seed
                             ).features(self.world, images, self.cfg.threads)[:, 0]
        self.catalog_feats = torch.from_numpy(feats[:len(catalog)].astype(np.float32))
        self.query_feats = torch.from_numpy(feats[len(catalog):].astype(np.float32))

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, module) -> None:
        was = module.model.training
        module.model.eval()
        items = module.model.forward_from_frozen(self.catalog_feats).numpy()
        queries = module.model.forward_from_frozen(self.query_feats).numpy()
        module.model.train(was)
        _, rows = ev.exact_search(items, queries, 10)
        recall = ev.recall_at_k([self.item_ids[r].tolist() for r in rows], self.rater.relevant,
                                (10,))[10]
        self.rows.append({"epoch": int(trainer.current_epoch),
                          "rater_recall_at_10": round(float(recall.mean()), 4)})


def run(world: Path, harvest: Path, seeds: list[int], work: Path, params: Path) -> dict:
    rater = ev.load_rater_set(world)
    style = StyleTruth.load(world, rater)
    per_seed = []
    for seed in seeds:
        cfg = TrainConfig.load(params, seed=seed, progress_bar=False)
        exports, seconds, curves = {}, {}, {}
        for variant in VARIANTS:
            out = work / f"seed{seed}" / variant
            if not (out / "train.json").is_file():  # written last: else a finished earlier run
                raters = RaterCurve(world, rater, work / "feature_cache", cfg)
                train(world, harvest / f"pairs_{variant}.parquet", out, cfg,
                      cache_dir=work / "feature_cache",
                      resume=(out / "checkpoints" / "last.ckpt").exists(),
                      callbacks=(raters,))
                write_text_atomic(out / "rater_curve.json", json.dumps(raters.rows))
            exports[variant] = out / "export"
            trained = json.loads((out / "train.json").read_text())
            seconds[variant] = trained["train_seconds"]
            rater_rows = {r["epoch"]: r for r in json.loads(
                (out / "rater_curve.json").read_text())} if (out / "rater_curve.json"
                                                           ).is_file() else {}
            curves[variant] = [{**row, **rater_rows.get(row["epoch"], {})}
                               for row in trained["curve"]]
        report = ev.evaluate_models(
            {label: embed_fn_from_export(exports[label], world) for label in VARIANTS},
            world, [rater], candidate="debiased")
        q = {v: report.models[v].sets[ev.RATER_SET].query_recall[10] for v in VARIANTS}
        pins = {v: style.colour_confusion(report.models[v].sets[ev.RATER_SET].top_items)
                for v in VARIANTS}
        lo, hi = ev.paired_bootstrap_ci(q["debiased"], q["naive"])
        row = {"seed": seed,
               "debiased_recall_at_10": round(float(np.mean(q["debiased"])), 4),
               "naive_recall_at_10": round(float(np.mean(q["naive"])), 4),
               "diff": round(float(np.mean(q["debiased"]) - np.mean(q["naive"])), 4),
               "ci95": [round(lo, 4), round(hi, 4)], "train_seconds": seconds,
               "curves": curves,
               "top10_same_colour_other_style": {v: round(pins[v], 4) for v in VARIANTS}}
        per_seed.append(row)
        print(f"seed {seed}: debiased {row['debiased_recall_at_10']:.4f}  naive "
              f"{row['naive_recall_at_10']:.4f}  diff {row['diff']:+.4f}  CI95 "
              f"[{lo:+.4f}, {hi:+.4f}]", flush=True)
    diffs = np.array([r["diff"] for r in per_seed])
    lo, hi = seed_ci(diffs)
    return {"world": str(world), "harvest": str(harvest), "n_rater_queries": len(rater.query_ids),
            "versions": resolved_versions(), "seeds": per_seed,
            "mean_debiased_recall_at_10": round(float(np.mean(
                [r["debiased_recall_at_10"] for r in per_seed])), 4),
            "mean_naive_recall_at_10": round(float(np.mean(
                [r["naive_recall_at_10"] for r in per_seed])), 4),
            "mean_diff": round(float(diffs.mean()), 4),
            "mean_diff_ci95_over_seeds": [round(lo, 4), round(hi, 4)],
            "sd_diff_over_seeds": round(float(diffs.std(ddof=1)), 4) if len(diffs) > 1 else None,
            "mean_top10_same_colour_other_style": {v: round(float(np.mean(
                [r["top10_same_colour_other_style"][v] for r in per_seed])), 4) for v in VARIANTS},
            "seeds_debiased_ahead": int((diffs > 0).sum()), "n_seeds": len(per_seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=REPO / "data/demo")
    ap.add_argument("--harvest", type=Path, default=REPO / "runs/demo/harvest")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=REPO / "runs/demo/debias_seeds")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--out", type=Path, default=REPO / "reports/debias_seeds.json")
    args = ap.parse_args()
    for need in (args.world / "tables", args.harvest / "pairs_debiased.parquet"):
        if not need.exists():
            sys.exit(f"missing {need}: generate the world and run `dvc repro harvest` first")
    result = run(args.world, args.harvest, args.seeds, args.work, args.params)
    lo, hi = result["mean_diff_ci95_over_seeds"]
    print(f"\n| seeds | debiased R@10 | naive R@10 | mean gap [95 % CI over seeds] | seeds "
          f"debiased ahead |\n|---|---|---|---|---|\n| {result['n_seeds']} | "
          f"{result['mean_debiased_recall_at_10']:.4f} | {result['mean_naive_recall_at_10']:.4f}"
          f" | {result['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
          f"{result['seeds_debiased_ahead']}/{result['n_seeds']} |")
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
