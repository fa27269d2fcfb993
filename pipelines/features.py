"""Item feature table shared by the re-ranker in serving and by offline analysis.

Engagement is debiased with the harvest stage's propensity estimate: an item's
click-through is clicks over *examinations* (sum of theta at the positions it was shown),
smoothed towards the global rate, so items that were merely shown high get no free credit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.durable import write_atomic

FEATURE_COLUMNS = ["item_id", "available", "region", "price", "examinations", "clicks",
                   "saves", "debiased_ctr"]


@dataclass(frozen=True)
class FeatureConfig:
    prior_examinations: float = 5.0  # Bayesian smoothing strength towards the global CTR


def build_item_features(catalog: pd.DataFrame, impressions: pd.DataFrame,
                        theta: list[float], cfg: FeatureConfig | None = None) -> pd.DataFrame:
    cfg = cfg or FeatureConfig()
    theta_arr = np.asarray(theta, dtype=np.float64)
    imp = impressions[impressions["position"] <= len(theta_arr)]
    exam = pd.Series(theta_arr[imp["position"].to_numpy() - 1], index=imp.index)
    agg = pd.DataFrame({
        "examinations": exam.groupby(imp["item_id"]).sum(),
        "clicks": imp.groupby("item_id")["clicked"].sum(),
        "saves": imp.groupby("item_id")["saved"].sum(),
    })
    global_ctr = agg["clicks"].sum() / max(agg["examinations"].sum(), 1e-9)
    feats = catalog[["item_id", "available", "region", "price"]].merge(
        agg, left_on="item_id", right_index=True, how="left").fillna(
        {"examinations": 0.0, "clicks": 0, "saves": 0})
    feats["debiased_ctr"] = ((feats["clicks"] + cfg.prior_examinations * global_ctr)
                             / (feats["examinations"] + cfg.prior_examinations))
    feats["clicks"] = feats["clicks"].astype("int64")
    feats["saves"] = feats["saves"].astype("int64")
    return feats[FEATURE_COLUMNS].reset_index(drop=True)


def write_item_features(world: Path, harvest_dir: Path | None, out: Path) -> Path:
    """The feature table; with no harvest (a cold-started catalog, no logs yet) every item
    has zero examinations and the re-ranker ranks on similarity, availability and region."""
    theta = [] if harvest_dir is None else json.loads(
        (Path(harvest_dir) / "harvest.json").read_text())["propensity"]["theta"]
    feats = build_item_features(pd.read_parquet(Path(world) / "tables/catalog.parquet"),
                                pd.read_parquet(Path(world) / "tables/impressions.parquet"),
                                theta)
    return write_atomic(Path(out), lambda tmp: feats.to_parquet(tmp, index=False))
