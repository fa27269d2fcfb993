"""Engagement-pair harvesting with position-bias correction, and leak-free splits.

Clicks are free labels, but higher results get clicked for being higher. Under the
position-based click model, P(click | q, d, k) = theta_k * gamma(q, d). We estimate the
examination propensity theta_k by **result randomisation** ("RandTop-n": Wang, Bendersky,
Metzler, Najork, *Learning to Rank with Selection Bias in Personal Search*, SIGIR 2016;
Joachims, Swaminathan, Schnabel, *Unbiased Learning-to-Rank with Biased Feedback*, WSDM 2017):
a small share of sessions is logged with the top-20 shuffled uniformly, so relevance is
independent of position there and CTR_k / CTR_1 = theta_k / theta_1. Propensities are only
identified up to scale, so position 1 is the reference (theta_1 = 1). A decreasing isotonic fit
(scipy's pool-adjacent-violators) removes noise that contradicts "lower is examined less".

Click and save pairs are then weighted by the clipped inverse propensity of the position they
were clicked at (IPS), self-normalised to mean 1 over the engagement pairs (SNIPS: Swaminathan
& Joachims, *The Self-Normalized Estimator for Counterfactual Learning*, NeurIPS 2015): the
correction moves weight between positions, not between engagement and co-engagement pairs.
The naive variant keeps the same rows, the save boost and the normalisation and drops only the
inverse propensity, so training compares the two on identical data and the same source mix, and
the difference is the position correction alone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import isotonic_regression

from data_contracts import schemas
from data_contracts.constants import GRID_SIZE, RANDOMISED_POLICY
from data_contracts.durable import atomic_dir, write_text_atomic

log = logging.getLogger("loupe.harvest")

PAIR_COLUMNS = [
    "query_image_path", "query_x0", "query_y0", "query_x1", "query_y1",
    "item_id", "positive_image_path", "position", "propensity", "weight", "source", "split",
]
SOURCES = ("click", "save", "cosave", "same_product")


@dataclass(frozen=True)
class HarvestConfig:
    """Knobs of the harvest stage (params.yaml `harvest:`)."""

    max_position: int = GRID_SIZE  # deepest position weighted; shorter logged grids: theirs
    min_randomised_sessions: int = 100  # tiny world: 114 give MAE 0.1 over 20 positions
    min_position_sessions: int = 50  # a position is estimated only if this many showed it
    weight_clip: float = 10.0  # cap on 1/theta so a few deep clicks cannot dominate
    save_boost: float = 2.0  # a save is a stronger signal than a click
    cosave_weight: float = 1.0
    same_product_weight: float = 1.0
    max_cosave_pairs_per_board: int = 12
    self_normalise: bool = True  # engagement weights averaged to 1 (see module docstring)
    val_share: float = 0.1  # share of non-held-out products used for early stopping
    # fewer validation pairs rank epochs on little evidence (a loud warning); raising
    # max_val_share above val_share lets more products validate (lowest draws first) until
    # there are this many val pairs or max_val_share of the trainable products validate
    min_val_pairs: int = 200
    max_val_share: float = 0.1
    eval_days: float = 14.0  # sessions in the last N days of logs are evaluation only
    heldout_shown_share: float = 0.2  # grid share of held-out products that marks a session
    bootstrap: int = 200
    seed: int = 0


@dataclass
class PropensityEstimate:
    position: list[int]
    theta: list[float]  # the estimate used for weighting (isotonic, theta_1 = 1)
    theta_raw: list[float]
    ci_low: list[float]
    ci_high: list[float]
    n_sessions: int
    method: str = "result randomisation (RandTop-n) + decreasing isotonic fit"

    @property
    def depth(self) -> int:
        """Deepest position the estimate covers (the logged grid length, capped)."""
        return len(self.theta)

    def lookup(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        if len(positions) and (positions.min() < 1 or positions.max() > self.depth):
            raise ValueError(f"positions {positions.min()}..{positions.max()} outside the "
                             f"estimated 1..{self.depth}")
        return np.asarray(self.theta)[positions - 1]


@dataclass
class HarvestResult:
    out_dir: Path
    propensity: PropensityEstimate
    counts: dict[str, dict[str, int]]
    cutoff: str
    seconds: float
    config: HarvestConfig = field(default_factory=HarvestConfig)


# --------------------------------------------------------------------------- propensity
def _ctr_ratio(clicks: np.ndarray) -> np.ndarray:
    """clicks: sessions x positions (0/1, NaN where a session's grid was shorter); returns
    CTR_k / CTR_1, each CTR over the sessions that showed position k."""
    with np.errstate(invalid="ignore"):
        ctr = np.nanmean(clicks, axis=0)
    if not ctr[0] > 0:
        raise ValueError("no clicks at position 1 in randomised sessions: cannot anchor theta")
    return ctr / ctr[0]


def _resampled_ratio(clicks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CTR_k / CTR_1 of one bootstrap resample of sessions (NaN where it is undefined)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = np.nanmean(clicks[rng.integers(0, len(clicks), len(clicks))], axis=0)
        return ctr / ctr[0] if ctr[0] > 0 else np.full_like(ctr, np.nan)


def estimate_propensity(impressions: pd.DataFrame, cfg: HarvestConfig) -> PropensityEstimate:
    """Examination propensity per position from the randomised sessions alone.

    Each position's click rate is taken over the randomised sessions whose grid reached it,
    so grids of any length count; the estimate covers positions 1..n where n is the deepest
    position at least `min_position_sessions` sessions showed (capped by `max_position`).
    Too little randomised traffic is an error that says how much is needed, never NaN."""
    rand = impressions[(impressions["logging_policy"] == RANDOMISED_POLICY)
                       & (impressions["position"] <= cfg.max_position)]
    n_sessions = rand["session_id"].nunique()
    if n_sessions < cfg.min_randomised_sessions:
        raise ValueError(
            f"{n_sessions} randomised sessions (logging_policy '{RANDOMISED_POLICY}') in the "
            f"impressions; the propensity estimate needs at least "
            f"{cfg.min_randomised_sessions} (harvest.min_randomised_sessions): log a share of "
            "traffic with the results shuffled for longer (docs/bring_your_own_data.md)")
    grid = rand.pivot_table(index="session_id", columns="position", values="clicked",
                            aggfunc="max")
    shown = grid.notna().sum(axis=0)
    deep = shown.index[shown >= cfg.min_position_sessions]
    depth = int(min(deep.max(), cfg.max_position)) if len(deep) else 0
    if depth < 2:
        raise ValueError(
            f"randomised grids are too short or too few to estimate a position effect: no "
            f"position beyond 1 was shown in {cfg.min_position_sessions} randomised sessions "
            "(harvest.min_position_sessions)")
    clicks = grid.reindex(columns=range(1, depth + 1)).to_numpy(dtype=np.float64)
    raw = _ctr_ratio(clicks)
    n_at = shown.reindex(range(1, depth + 1)).fillna(0).to_numpy(dtype=np.float64)
    if (n_at == 0).any():
        gaps = [k + 1 for k in np.flatnonzero(n_at == 0)]
        raise ValueError(f"randomised grids skip positions {gaps}: positions must run 1..n")
    theta = np.clip(isotonic_regression(raw, weights=n_at * np.maximum(raw, 1e-3),
                                        increasing=False).x, 1e-3, 1.0)
    theta[0] = 1.0
    rng = np.random.default_rng(cfg.seed)
    boots = np.stack([_resampled_ratio(clicks, rng) for _ in range(cfg.bootstrap)])
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanpercentile(boots, [2.5, 97.5], axis=0)
    return PropensityEstimate(
        position=list(range(1, depth + 1)),
        theta=theta.round(6).tolist(), theta_raw=raw.round(6).tolist(),
        ci_low=lo.round(6).tolist(), ci_high=hi.round(6).tolist(), n_sessions=len(clicks),
    )


# --------------------------------------------------------------------------- splits
def _stable_unit(keys: pd.Series, seed: int) -> np.ndarray:
    """Deterministic pseudo-random number in [0, 1) per key (process-independent)."""
    h = pd.util.hash_pandas_object(keys.astype(str) + f"#{seed}", index=False).to_numpy()
    return (h % np.uint64(1_000_003)).astype(np.float64) / 1_000_003


def assign_product_splits(catalog: pd.DataFrame, judgments: pd.DataFrame,
                          cfg: HarvestConfig) -> pd.Series:
    """product_id -> train / val / test. Every product a rater judged similar is test."""
    products = pd.Series(catalog["product_id"].unique())
    rated_items = judgments.loc[judgments["grade"] >= 1, "item_id"]
    rated = set(catalog.loc[catalog["item_id"].isin(rated_items), "product_id"])
    u = _stable_unit(products, cfg.seed)
    split = np.where(products.isin(rated), "test", np.where(u < cfg.val_share, "val", "train"))
    trainable = np.flatnonzero(split != "test")
    if cfg.val_share > 0 and len(trainable) > 1 and not (split == "val").any():
        # a small catalog can draw no validation product at all: take the lowest draws
        n_val = max(1, round(cfg.val_share * len(trainable)))
        split[trainable[np.argsort(u[trainable], kind="stable")[:n_val]]] = "val"
    return pd.Series(split, index=products.to_numpy(), name="split")


SESSION_FATES = {  # why a session ended on its side (harvest.json `sessions_by_fate`)
    "eval": "logged after the cutoff: engagement evaluation only",
    "engaged_heldout": "dropped: engaged a held-out (rater-judged) product",
    "shown_heldout": "dropped: its grid was mostly held-out products (leak guard)",
    "train": "trains",
    "val": "validates (engaged validation products only)",
    "no_engagement": "dropped: engaged nothing it could learn from",
}


def _session_sides(impressions: pd.DataFrame, item_split: pd.Series, cutoff: pd.Timestamp,
                   heldout_shown_share: float) -> tuple[pd.Series, pd.Series]:
    """Side of each logged session (train, val, eval after the cutoff, or drop) and its
    fate, the reason (SESSION_FATES).

    A query photo shows some product we cannot see; the results it was shown are our best
    proxy. A session that engaged a held-out (test) product, or was shown a grid where
    held-out products make up `heldout_shown_share` or more, never trains: it was most likely
    looking for one. Otherwise it trains if it engaged any training product (only those pairs
    are kept), and validates if it engaged validation products only; so every query photo
    sits on exactly one side.
    """
    imp = impressions.assign(item_split=impressions["item_id"].map(item_split))
    engaged = imp["clicked"] | imp["saved"]
    per = imp.groupby("session_id").agg(ts=("ts", "first"))
    is_test = imp["item_split"].eq("test")
    per["engaged_heldout"] = (engaged & is_test).groupby(imp["session_id"]).any()
    per["shown_heldout"] = is_test.groupby(imp["session_id"]).mean() >= heldout_shown_share
    per["train"] = (engaged & imp["item_split"].eq("train")).groupby(imp["session_id"]).any()
    per["val"] = (engaged & imp["item_split"].eq("val")).groupby(imp["session_id"]).any()
    fate = pd.Series(np.select(
        [per["ts"] > cutoff, per["engaged_heldout"], per["shown_heldout"], per["train"],
         per["val"]],
        ["eval", "engaged_heldout", "shown_heldout", "train", "val"], default="no_engagement"),
        index=per.index)
    side = fate.where(fate.isin(["eval", "train", "val"]), "drop")
    return side, fate


# --------------------------------------------------------------------------- pairs
def _engagement_pairs(impressions: pd.DataFrame, side: pd.Series, item_split: pd.Series,
                      prop: PropensityEstimate, cfg: HarvestConfig,
                      correct_position: bool = True) -> pd.DataFrame:
    imp = impressions[impressions["clicked"] | impressions["saved"]].copy()
    imp["split"] = imp["session_id"].map(side)
    # a training session keeps only its training-product pairs (and likewise for val)
    imp = imp[imp["split"].isin(["train", "val"]) & imp["item_id"].map(item_split).eq(imp["split"])
              & (imp["position"] <= prop.depth)]
    imp["propensity"] = prop.lookup(imp["position"].to_numpy())
    ipw = (np.minimum(1.0 / imp["propensity"].to_numpy(), cfg.weight_clip)
           if correct_position else np.ones(len(imp)))
    imp["source"] = np.where(imp["saved"], "save", "click")
    imp["weight"] = np.minimum(ipw * np.where(imp["saved"], cfg.save_boost, 1.0),
                               cfg.weight_clip)
    return imp


def _catalog_pairs(catalog: pd.DataFrame, product_split: pd.Series, boards: pd.DataFrame,
                   cutoff: pd.Timestamp, cfg: HarvestConfig) -> pd.DataFrame:
    """Co-engagement pairs: the same product from two sellers; two items co-saved on a board."""
    cat = catalog[["item_id", "product_id", "image_path"]].assign(
        split=catalog["product_id"].map(product_split))
    same = cat.merge(cat, on="product_id", suffixes=("_a", "_b"))
    same = same[same["item_id_a"] < same["item_id_b"]].assign(
        source="same_product", weight=cfg.same_product_weight)
    b = boards[boards["saved_at"] <= cutoff].merge(cat, on="item_id")
    co = b.merge(b, on="board_id", suffixes=("_a", "_b"))
    co = co[(co["item_id_a"] < co["item_id_b"]) & (co["product_id_a"] != co["product_id_b"])]
    co = co.drop_duplicates(["item_id_a", "item_id_b"])
    co = (co.sort_values(["board_id", "item_id_a", "item_id_b"])
          .groupby("board_id").head(cfg.max_cosave_pairs_per_board)
          .assign(source="cosave", weight=cfg.cosave_weight))
    both = pd.concat([same, co], ignore_index=True)
    both = both[both["split_a"] == both["split_b"]]
    both = both[both["split_a"].isin(["train", "val"])]
    return pd.DataFrame({
        "query_image_path": both["image_path_a"], "query_x0": 0.0, "query_y0": 0.0,
        "query_x1": 1.0, "query_y1": 1.0, "item_id": both["item_id_b"],
        "positive_image_path": both["image_path_b"], "position": 0, "propensity": 1.0,
        "weight": both["weight"].astype(float), "source": both["source"],
        "split": both["split_a"],
    })


def build_pairs(impressions: pd.DataFrame, catalog: pd.DataFrame, boards: pd.DataFrame,
                side: pd.Series, product_split: pd.Series, prop: PropensityEstimate,
                cutoff: pd.Timestamp, cfg: HarvestConfig, naive: bool = False) -> pd.DataFrame:
    """Deduplicated training pairs; `naive=True` drops the inverse propensity and nothing else."""
    item_split = catalog.set_index("item_id")["product_id"].map(product_split)
    eng = _engagement_pairs(impressions, side, item_split, prop, cfg, correct_position=not naive)
    eng = eng.merge(catalog[["item_id", "image_path"]], on="item_id").rename(
        columns={"image_path": "positive_image_path"})
    pairs = pd.concat([eng[PAIR_COLUMNS],
                       _catalog_pairs(catalog, product_split, boards, cutoff, cfg)[PAIR_COLUMNS]],
                      ignore_index=True)
    # one row per (query photo, positive): keep the strongest evidence
    pairs = (pairs.sort_values(["query_image_path", "item_id", "weight"],
                               ascending=[True, True, False], kind="mergesort")
             .drop_duplicates(["query_image_path", "item_id"]).reset_index(drop=True))
    engaged = pairs["source"].isin(["click", "save"])
    if cfg.self_normalise and engaged.any():
        pairs.loc[engaged, "weight"] /= pairs.loc[engaged, "weight"].mean()
    weights = pairs["weight"].to_numpy(dtype=np.float64)
    if not (np.isfinite(weights) & (weights > 0)).all():
        raise ValueError(f"{int((~(np.isfinite(weights) & (weights > 0))).sum())} pair weights "
                         "are NaN, infinite or not positive: the propensity estimate is broken")
    return pairs


def engagement_eval_set(impressions: pd.DataFrame, catalog: pd.DataFrame, side: pd.Series,
                        product_split: pd.Series) -> pd.DataFrame:
    """Post-cutoff sessions whose engaged items are all held-out products: queries + items."""
    imp = impressions[impressions["session_id"].map(side).eq("eval")
                      & (impressions["clicked"] | impressions["saved"])]
    imp = imp.merge(catalog[["item_id", "product_id", "category"]], on="item_id")
    imp = imp[imp["product_id"].map(product_split).eq("test")]
    grouped = imp.groupby(["query_image_path", "query_x0", "query_y0", "query_x1", "query_y1"],
                          sort=True).agg(item_ids=("item_id", lambda s: sorted(set(s))),
                                         category=("category", "first")).reset_index()
    return grouped


# --------------------------------------------------------------------------- stage
def _validated(world: Path, quarantine_dir: Path | None, docs_dir: Path | None) -> None:
    from data_contracts.validation import validate_table

    tables = world / "tables"
    for name in ("catalog", "impressions", "boards", "rater_judgments"):
        if name == "boards" and not (tables / "boards.parquet").exists():
            continue  # optional: a shop without boards has no co-save pairs
        validate_table(name, tables / f"{name}.parquet", quarantine_dir=quarantine_dir,
                       docs_dir=docs_dir)


def harvest(world: Path, out_dir: Path, cfg: HarvestConfig | None = None,
            quarantine_dir: Path | None = None, docs_dir: Path | None = None) -> HarvestResult:
    """Validate the logs, estimate propensities, write pairs, splits and the eval set.

    Output lands in a temporary sibling and is renamed into place, so a failed run (bad
    contract, bad input) leaves the previous harvest untouched.
    """
    cfg = cfg or HarvestConfig()
    t0 = time.perf_counter()
    world, out_dir = Path(world), Path(out_dir)
    _validated(world, quarantine_dir, docs_dir)
    tables = world / "tables"
    impressions = pd.read_parquet(tables / "impressions.parquet")
    catalog = pd.read_parquet(tables / "catalog.parquet")
    boards = (pd.read_parquet(tables / "boards.parquet") if (tables / "boards.parquet").exists()
              else schemas.BOARDS.empty_table().to_pandas())
    judgments = pd.read_parquet(tables / "rater_judgments.parquet")

    prop = estimate_propensity(impressions, cfg)
    cutoff = impressions["ts"].max() - pd.Timedelta(days=cfg.eval_days)
    product_split = assign_product_splits(catalog, judgments, cfg)
    while True:  # grow the validation products until the val pairs can rank epochs
        item_split = catalog.set_index("item_id")["product_id"].map(product_split)
        side, fate = _session_sides(impressions, item_split, cutoff, cfg.heldout_shown_share)
        debiased = build_pairs(impressions, catalog, boards, side, product_split, prop, cutoff,
                               cfg)
        grown = _grow_validation(product_split, debiased, cfg)
        if grown is None:
            break
        product_split = grown
    fates = {k: int(fate.eq(k).sum()) for k in SESSION_FATES}
    _warn_about_guards(fates)

    _require_trainable(debiased, product_split, fates)
    naive = build_pairs(impressions, catalog, boards, side, product_split, prop, cutoff, cfg,
                        naive=True)
    eval_set = engagement_eval_set(impressions, catalog, side, product_split)

    summary = {
        "propensity": asdict(prop),
        "clip": cfg.weight_clip,
        "cutoff": cutoff.isoformat(),
        "pairs_by_split_and_source": _counts(debiased),
        "declared_sources": {"augmentation": "views made at train time (pipelines.train)"},
        "sessions_by_side": {k: int(v) for k, v in side.value_counts().sort_index().items()},
        "sessions_by_fate": fates,
        "products_by_split": {k: int(v) for k, v in
                              product_split.value_counts().sort_index().items()},
        "eval_engagement_queries": len(eval_set),
        "config": asdict(cfg),
    }
    with atomic_dir(out_dir) as tmp:
        debiased.to_parquet(tmp / "pairs_debiased.parquet", index=False)
        naive.to_parquet(tmp / "pairs_naive.parquet", index=False)
        eval_set.to_parquet(tmp / "eval_engagement.parquet", index=False)
        product_split.rename_axis("product_id").reset_index().to_parquet(
            tmp / "splits.parquet", index=False)
        (tmp / "harvest.json").write_text(json.dumps(summary, indent=1))
    return HarvestResult(out_dir, prop, summary["pairs_by_split_and_source"], cutoff.isoformat(),
                         round(time.perf_counter() - t0, 2), cfg)


def _grow_validation(product_split: pd.Series, pairs: pd.DataFrame, cfg: HarvestConfig
                     ) -> pd.Series | None:
    """Twice the validation products (adding the train products with the lowest draws)
    while the val pairs are fewer than `min_val_pairs` and the cap allows; None when done."""
    n_val_pairs = int((pairs["split"] == "val").sum())
    trainable = product_split[product_split != "test"]
    n_val = int((trainable == "val").sum())
    if (n_val_pairs >= cfg.min_val_pairs or cfg.max_val_share <= cfg.val_share
            or n_val + 1 > cfg.max_val_share * len(trainable)):
        if n_val_pairs < cfg.min_val_pairs:
            log.warning("only %d validation pairs (harvest.min_val_pairs %d) with %d of %d "
                        "trainable products validating (harvest.max_val_share): epochs are "
                        "ranked on little evidence", n_val_pairs, cfg.min_val_pairs, n_val,
                        len(trainable))
        return None
    train = trainable[trainable == "train"]
    if train.empty:
        return None
    u = pd.Series(_stable_unit(pd.Series(train.index), cfg.seed), index=train.index)
    add = min(max(1, n_val), int(cfg.max_val_share * len(trainable)) - n_val)
    grown = product_split.copy()
    grown[u.sort_values(kind="stable").index[:add]] = "val"
    return grown


def _warn_about_guards(fates: dict[str, int]) -> None:
    """Say loudly when the leak guard costs much of the trainable traffic."""
    guarded = fates["shown_heldout"]
    could_train = guarded + fates["train"] + fates["val"]
    if could_train and guarded / could_train > 0.1:
        log.warning("the leak guard (harvest.heldout_shown_share) dropped %d of %d sessions "
                    "that could train (%.0f %%): their grids were mostly held-out products",
                    guarded, could_train, 100 * guarded / could_train)


def _require_trainable(pairs: pd.DataFrame, product_split: pd.Series,
                       fates: dict[str, int]) -> None:
    """No training pairs is an error that says why, not an empty harvest."""
    if (pairs["split"] == "train").any():
        return
    products = product_split.value_counts().to_dict()
    raise ValueError(
        f"the harvest left nothing to train on: products by split {products}, sessions by "
        f"fate {fates}. Every product a rater judged similar is held out for testing, with "
        "the sessions that engaged it; judgments that cover the whole catalog hold out "
        "everything (judge a sample of queries, see docs/bring_your_own_data.md)")


def _counts(pairs: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {split: {src: int(n) for src, n in g["source"].value_counts().sort_index().items()}
            for split, g in pairs.groupby("split")}


# --------------------------------------------------------------------------- report
def propensity_mae(prop: PropensityEstimate, truth_path: Path) -> float:
    """Mean absolute error of the estimate against the world's true curve (reports only)."""
    truth = json.loads(Path(truth_path).read_text())
    true = np.asarray(truth["examination"], dtype=np.float64)[: len(prop.theta)]
    return float(np.mean(np.abs(np.asarray(prop.theta) - true)))


def plot_propensity(prop: PropensityEstimate, truth_path: Path | None, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(prop.position, prop.ci_low, prop.ci_high, alpha=0.2, label="95% bootstrap CI")
    ax.plot(prop.position, prop.theta_raw, "o", ms=3, label="CTR_k / CTR_1 (randomised)")
    ax.plot(prop.position, prop.theta, "-", lw=2, label="estimate (isotonic)")
    if truth_path is not None and Path(truth_path).exists():
        truth = json.loads(Path(truth_path).read_text())
        ax.plot(truth["position"], truth["examination"], "k--", lw=1.5, label="truth")
        ax.set_title(f"Examination propensity (MAE {propensity_mae(prop, truth_path):.3f})")
    ax.set_xlabel("position")
    ax.set_ylabel("P(examined)")
    ax.set_xticks(prop.position)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def write_report(result: HarvestResult, world: Path, reports_dir: Path) -> dict:
    """reports/harvest.json (DVC metrics) and reports/propensity.png, scored against truth."""
    truth = Path(world) / "truth" / "propensity.json"  # generated worlds only
    has_truth = truth.is_file()
    pairs_by_source: dict[str, int] = {}
    for per_source in result.counts.values():
        for src, n in per_source.items():
            pairs_by_source[src] = pairs_by_source.get(src, 0) + n
    metrics = {
        "propensity_mae": (round(propensity_mae(result.propensity, truth), 4) if has_truth
                           else None),
        "pairs_by_source": dict(sorted(pairs_by_source.items())),
        "pairs_by_split": {s: sum(v.values()) for s, v in result.counts.items()},
        "randomised_sessions": result.propensity.n_sessions,
        "weight_clip": result.config.weight_clip,
        "seconds": result.seconds,
    }
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(reports_dir / "harvest.json", json.dumps(metrics, indent=1) + "\n")
    plot_propensity(result.propensity, truth if has_truth else None,
                    reports_dir / "propensity.png")
    return metrics


def add_cli(sub) -> None:
    p = sub.add_parser("harvest", help="engagement pairs with position-bias correction + splits")
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reports", type=Path, default=None, help="write harvest.json + plot here")
    p.add_argument("--quarantine", type=Path, default=Path("quarantine"))
    p.add_argument("--docs", type=Path, default=None, help="GE Data Docs site for the checks")
    p.add_argument("--params", type=Path, default=None, help="params.yaml with a harvest: block")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from pipelines.config import load

    cfg = load(HarvestConfig, args.params, "harvest")
    result = harvest(args.world, args.out, cfg, quarantine_dir=args.quarantine,
                     docs_dir=args.docs)
    summary = {"out": str(result.out_dir), "pairs": result.counts, "seconds": result.seconds}
    if args.reports is not None:
        summary["report"] = write_report(result, args.world, args.reports)
    print(json.dumps(summary, indent=1))
    return 0
