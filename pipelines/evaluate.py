"""Evaluate stage: rater-set recall@K of an embedder, with baselines, by exact retrieval.

The model under test is any `embed_fn(paths, boxes) -> (n, d) float32 unit vectors` (paths
relative to the world root, boxes normalised (x0, y0, x1, y1) or None for whole images), so
the metric code runs without torch and every baseline is just another labelled embed_fn.
Retrieval is brute force (FAISS IndexFlatIP, i.e. cosine on unit vectors) over the whole
catalog: the numbers measure the embedding space, not an ANN index's recall.

Metrics, for one query q with relevant set R(q) (rater grade >= 1) and ranked catalog list:

    recall@K(q) = |R(q) ∩ top_K(q)| / min(K, |R(q)|)      hit@K(q) = 1 if R(q) ∩ top_K(q)

both averaged over queries (overall and per query category). Dividing by min(K, |R|) instead
of |R| makes a perfect ranking score 1 at every K, so recall@1 reads as "is the first result
relevant" even when a query has twelve relevant items. A query without relevant items has no
defined recall and is an error, as is a relevant item missing from the catalog.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from data_contracts.constants import UNIT_NORM_TOL
from data_contracts.durable import write_json_atomic, write_text_atomic
from pipelines.embed import embed_fn_from_export

KS: tuple[int, ...] = (1, 5, 10, 50)
REPORT_TOP = 10  # results shown per query in the HTML report
N_CHANGED = 8  # improved / regressed queries shown with both models' grids
RATER_SET = "rater"
ENGAGEMENT_SET = "engagement"
CANDIDATE = "model"
FROZEN_BASELINE = "frozen_pretrained"
NAIVE = "naive_click"
CHAMPION_LABEL = "champion"  # the registry's champion, scored beside the candidate

EmbedFn = Callable[[Sequence[str], np.ndarray | None], np.ndarray]


# --------------------------------------------------------------------------- metrics
def _check_ranked(ranked: Sequence[Sequence], relevant: Sequence[Collection], ks: Sequence[int]
                  ) -> None:
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} ranked lists but {len(relevant)} relevant sets")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"K values must be positive integers, got {list(ks)}")
    for i, rel in enumerate(relevant):
        if len(rel) == 0:
            raise ValueError(f"query {i} has no relevant items: recall is undefined")


def recall_at_k(ranked: Sequence[Sequence], relevant: Sequence[Collection],
                ks: Sequence[int] = KS) -> dict[int, np.ndarray]:
    """Per-query recall@K = |relevant ∩ top-K| / min(K, |relevant|) (see module docstring).

    A ranked list shorter than K (a catalog smaller than K) counts as its whole top-K.
    """
    _check_ranked(ranked, relevant, ks)
    out: dict[int, np.ndarray] = {}
    for k in ks:
        out[int(k)] = np.array([len(set(r[:k]) & set(rel)) / min(k, len(set(rel)))
                                for r, rel in zip(ranked, relevant, strict=True)])
    return out


def hit_at_k(ranked: Sequence[Sequence], relevant: Sequence[Collection],
             ks: Sequence[int] = KS) -> dict[int, np.ndarray]:
    """Per-query hit@K: 1 when at least one relevant item is in the top K, else 0."""
    _check_ranked(ranked, relevant, ks)
    return {int(k): np.array([float(bool(set(r[:k]) & set(rel)))
                              for r, rel in zip(ranked, relevant, strict=True)]) for k in ks}


def per_category_mean(values: dict[int, np.ndarray], categories: Sequence[str]
                      ) -> dict[str, dict[int, float]]:
    """Mean of per-query metric values within each query category."""
    cats = np.asarray(categories)
    return {c: {k: float(v[cats == c].mean()) for k, v in values.items()}
            for c in sorted(set(cats.tolist()))}


# --------------------------------------------------------------------------- retrieval
def _check_unit_vectors(vectors: np.ndarray, n: int, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"{what}: expected ({n}, d) embeddings, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what}: embeddings contain NaN or inf")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOL)
    if len(bad):
        raise ValueError(f"{what}: {len(bad)} embeddings are not unit length (e.g. row "
                         f"{bad[0]} has norm {norms[bad[0]]:.4f}); the embedder must L2-normalise")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def exact_search(catalog: np.ndarray, queries: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product (= cosine on unit vectors): (scores, catalog rows)."""
    import faiss

    catalog = _check_unit_vectors(catalog, len(catalog), "catalog")
    queries = _check_unit_vectors(queries, len(queries), "queries")
    if catalog.shape[1] != queries.shape[1]:
        raise ValueError(f"catalog vectors are {catalog.shape[1]}-d but queries "
                         f"{queries.shape[1]}-d")
    if len(catalog) == 0:
        raise ValueError("cannot search an empty catalog")
    index = faiss.IndexFlatIP(catalog.shape[1])
    index.add(catalog)
    return index.search(queries, min(int(k), len(catalog)))


# --------------------------------------------------------------------------- eval sets
@dataclass(frozen=True)
class EvalSet:
    """Queries (image + box) with graded relevant catalog items (grade >= 1 only)."""

    name: str
    query_ids: list[str]
    query_paths: list[str]
    query_boxes: np.ndarray  # (n, 4) normalised x0, y0, x1, y1
    categories: list[str]
    relevant: list[dict[str, int]]  # item_id -> grade

    def __post_init__(self) -> None:
        n = len(self.query_ids)
        if n == 0:
            raise ValueError(f"eval set {self.name!r} has no queries")
        lengths = {len(self.query_paths), len(self.categories), len(self.relevant),
                   len(self.query_boxes)}
        if lengths != {n}:
            raise ValueError(f"eval set {self.name!r}: columns have different lengths")
        empty = [q for q, rel in zip(self.query_ids, self.relevant, strict=True) if not rel]
        if empty:
            raise ValueError(f"eval set {self.name!r}: {len(empty)} queries have no relevant "
                             f"items (e.g. {empty[0]}); recall is undefined for them")


def load_rater_set(world: Path) -> EvalSet:
    """The rater set: world tables rater_queries + rater_judgments (grade >= 1 is relevant).

    Several judgments of one (query, item) pair keep the highest grade.
    """
    tables = Path(world) / "tables"
    queries = _read(tables / "rater_queries.parquet").sort_values("rater_query_id")
    judgments = _read(tables / "rater_judgments.parquet")
    graded = (judgments[judgments["grade"] >= 1]
              .groupby(["rater_query_id", "item_id"])["grade"].max().reset_index())
    by_query = {q: dict(zip(g["item_id"], g["grade"].astype(int), strict=True))
                for q, g in graded.groupby("rater_query_id")}
    return EvalSet(
        name=RATER_SET,
        query_ids=queries["rater_query_id"].tolist(),
        query_paths=queries["image_path"].tolist(),
        query_boxes=queries[["query_x0", "query_y0", "query_x1", "query_y1"]].to_numpy(float),
        categories=queries["category"].tolist(),
        relevant=[by_query.get(q, {}) for q in queries["rater_query_id"]],
    )


def load_engagement_set(path: Path) -> EvalSet:
    """The engagement-derived set written by harvest (`eval_engagement.parquet`), grade 1."""
    df = _read(Path(path))
    missing = {"query_image_path", "query_x0", "query_y0", "query_x1", "query_y1", "item_ids",
               "category"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return EvalSet(
        name=ENGAGEMENT_SET,
        query_ids=[f"eq{i:05d}" for i in range(len(df))],
        query_paths=df["query_image_path"].tolist(),
        query_boxes=df[["query_x0", "query_y0", "query_x1", "query_y1"]].to_numpy(float),
        categories=df["category"].tolist(),
        relevant=[{str(i): 1 for i in ids} for ids in df["item_ids"]],
    )


def load_catalog(world: Path) -> pd.DataFrame:
    """Catalog rows searched by every query: item_id, category, image_path (sorted by id)."""
    cat = _read(Path(world) / "tables" / "catalog.parquet")
    return cat[["item_id", "product_id", "category", "image_path"]].sort_values(
        "item_id").reset_index(drop=True)


WHOLE_PHOTOS = "whole photo"  # the catalog treatment when no detector is given


def eval_fingerprint(catalog: pd.DataFrame, rater: EvalSet, treatment: str = WHOLE_PHOTOS
                     ) -> str:
    """Hash of the searched catalog, the rater judgments and (when not whole photos) the
    catalog treatment: recall is comparable across models only when this matches."""
    h = hashlib.sha256()
    if treatment != WHOLE_PHOTOS:
        h.update(f"treatment:{treatment}|".encode())
    h.update("\n".join(catalog["item_id"]).encode())
    for q, rel in zip(rater.query_ids, rater.relevant, strict=True):
        h.update(f"|{q}:".encode() + ",".join(f"{i}={g}" for i, g in sorted(rel.items()))
                 .encode())
    return h.hexdigest()[:16]


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"table not found: {path}")
    return pd.read_parquet(path)


# --------------------------------------------------------------------------- evaluation
@dataclass
class SetResult:
    """One model on one eval set: mean metrics and what the report needs per query."""

    recall: dict[int, float]
    hit: dict[int, float]
    per_category: dict[str, dict[int, float]]  # category -> K -> recall@K
    n_queries: int
    query_recall: dict[int, list[float]]  # per query, in eval-set order
    top_items: list[list[str]]  # top REPORT_TOP item ids per query


@dataclass
class ModelResult:
    label: str
    sets: dict[str, SetResult]
    seconds: float


@dataclass
class EvalReport:
    """Every labelled model on every eval set, scored against the same catalog."""

    candidate: str
    ks: tuple[int, ...]
    n_catalog: int
    fingerprint: str
    models: dict[str, ModelResult] = field(default_factory=dict)
    treatment: str = WHOLE_PHOTOS  # how catalog photos became vectors (detector, policy)
    champion_version: str | None = None  # the registered champion scored as CHAMPION_LABEL

    @property
    def headline(self) -> float:
        """Rater recall@10 of the candidate: the number the promotion gate compares."""
        return self.models[self.candidate].sets[RATER_SET].recall[10]

    def flat_metrics(self) -> dict[str, float]:
        """MLflow metric names: `{label}/{set}/recall_at_K`, `.../hit_at_K`,
        `{label}/{set}/{category}/recall_at_K`, plus the headline `rater_recall_at_10`."""
        out: dict[str, float] = {}
        for label, m in self.models.items():
            for name, s in m.sets.items():
                for k in self.ks:
                    out[f"{label}/{name}/recall_at_{k}"] = s.recall[k]
                    out[f"{label}/{name}/hit_at_{k}"] = s.hit[k]
                for cat, per_k in s.per_category.items():
                    for k, v in per_k.items():
                        out[f"{label}/{name}/{cat}/recall_at_{k}"] = v
            out[f"{label}/embed_seconds"] = m.seconds
        out["rater_recall_at_10"] = self.headline
        return out

    def summary(self) -> dict:
        """JSON-friendly numbers (no per-query detail)."""
        return {
            "candidate": self.candidate, "ks": list(self.ks), "n_catalog": self.n_catalog,
            "fingerprint": self.fingerprint, "catalog_treatment": self.treatment,
            "models": {label: {"seconds": m.seconds, "sets": {
                name: {"n_queries": s.n_queries, "recall_at_k": s.recall, "hit_at_k": s.hit,
                       "per_category_recall_at_k": s.per_category}
                for name, s in m.sets.items()}} for label, m in self.models.items()},
        }


def _embed(embed_fn: EmbedFn, paths: list[str], boxes: np.ndarray | None, what: str
           ) -> np.ndarray:
    return _check_unit_vectors(embed_fn(paths, boxes), len(paths), what)


def evaluate_models(models: Mapping[str, EmbedFn], world: Path, eval_sets: Sequence[EvalSet],
                    candidate: str = CANDIDATE, ks: Sequence[int] = KS,
                    treatment: str = WHOLE_PHOTOS) -> EvalReport:
    """Embed catalog and queries with each labelled embed_fn, retrieve exactly, score.
    `treatment` names what the embed_fns do to catalog photos (recorded and fingerprinted)."""
    if candidate not in models:
        raise ValueError(f"candidate {candidate!r} is not among the models {sorted(models)}")
    names = [s.name for s in eval_sets]
    if RATER_SET not in names or len(set(names)) != len(names):
        raise ValueError(f"need exactly one '{RATER_SET}' set and unique names, got {names}")
    ks = tuple(sorted({int(k) for k in ks}))
    if 10 not in ks:
        raise ValueError(f"K values must include 10 (the headline rater recall@10), got {ks}")
    catalog = load_catalog(world)
    item_ids = catalog["item_id"].to_numpy()
    known = set(item_ids.tolist())
    for s in eval_sets:
        unknown = {i for rel in s.relevant for i in rel} - known
        if unknown:
            raise ValueError(f"eval set {s.name!r} judges {len(unknown)} items missing from "
                             f"the catalog (e.g. {sorted(unknown)[0]})")
    rater = eval_sets[names.index(RATER_SET)]
    report = EvalReport(candidate, ks, len(catalog), eval_fingerprint(catalog, rater, treatment),
                        treatment=treatment)
    depth = max(max(ks), REPORT_TOP)
    for label, embed_fn in models.items():
        t0 = time.perf_counter()
        cat_vecs = _embed(embed_fn, catalog["image_path"].tolist(), None, f"{label} catalog")
        sets: dict[str, SetResult] = {}
        for s in eval_sets:
            q_vecs = _embed(embed_fn, s.query_paths, s.query_boxes, f"{label} {s.name} queries")
            _, rows = exact_search(cat_vecs, q_vecs, depth)
            ranked = [item_ids[r[r >= 0]].tolist() for r in rows]
            recall = recall_at_k(ranked, s.relevant, ks)
            hit = hit_at_k(ranked, s.relevant, ks)
            sets[s.name] = SetResult(
                recall={k: float(v.mean()) for k, v in recall.items()},
                hit={k: float(v.mean()) for k, v in hit.items()},
                per_category=per_category_mean(recall, s.categories),
                n_queries=len(s.query_ids),
                query_recall={k: v.tolist() for k, v in recall.items()},
                top_items=[r[:REPORT_TOP] for r in ranked],
            )
        report.models[label] = ModelResult(label, sets, round(time.perf_counter() - t0, 2))
    return report


# --------------------------------------------------------------------------- reports
def write_recall_series(report: EvalReport, out_csv: Path, set_name: str = RATER_SET) -> Path:
    """Rater recall@K as a data series (a row per K, a column per model): `dvc plots diff`
    compares it across experiments and commits, which a PNG cannot do."""
    rows = ["k," + ",".join(report.models)]
    rows += [f"{k}," + ",".join(f"{m.sets[set_name].recall[k]:.6f}"
                                for m in report.models.values()) for k in report.ks]
    return write_text_atomic(Path(out_csv), "\n".join(rows) + "\n")


def plot_recall(report: EvalReport, out_png: Path) -> Path:
    """recall@K curves, one line per model, one panel per eval set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_names = list(next(iter(report.models.values())).sets)
    fig, axes = plt.subplots(1, len(set_names), figsize=(5 * len(set_names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], set_names, strict=True):
        for label, m in report.models.items():
            r = m.sets[name].recall
            ax.plot(list(report.ks), [r[k] for k in report.ks], "o-",
                    lw=2.5 if label == report.candidate else 1.2, label=label)
        ax.set_xscale("log")
        ax.set_xticks(list(report.ks), [str(k) for k in report.ks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        n_q = report.models[report.candidate].sets[name].n_queries
        ax.set_title(f"{name} set ({n_q} queries, exact search)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _thumbnailer(world: Path) -> Callable[[str, int, Sequence[float] | None], str]:
    """Base64 JPEG thumbnails of world photos, each made once per report (a catalog photo
    turns up in many grids)."""
    made: dict[tuple, str] = {}

    def thumb(rel: str, px: int, box: Sequence[float] | None = None) -> str:
        key = (rel, px, None if box is None else tuple(float(b) for b in box))
        if key not in made:
            made[key] = _thumb_b64(Path(world) / rel, px, box)
        return made[key]
    return thumb


def _thumb_b64(path: Path, px: int, box: Sequence[float] | None = None) -> str:
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        img = im.convert("RGB")
    if box is not None and tuple(float(b) for b in box) != (0.0, 0.0, 1.0, 1.0):
        w, h = img.size
        ImageDraw.Draw(img).rectangle([box[0] * w, box[1] * h, box[2] * w, box[3] * h],
                                      outline=(255, 200, 0), width=3)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- review tables
def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap CI of a mean over queries (scipy); None below two queries, where
    resampling says nothing."""
    from scipy import stats

    values = np.asarray(values, float)
    if len(values) < 2:
        return None
    ci = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=level,
                         method="percentile", rng=np.random.default_rng(seed)
                         ).confidence_interval
    return float(ci.low), float(ci.high)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """CI of mean(a - b) over the same queries, resampled together (scipy's paired
    bootstrap): is a gap between two models bigger than what the choice of rater queries
    alone would produce?"""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long per-query lists of at least two queries, got "
                         f"{len(a)} and {len(b)}")
    ci = stats.bootstrap((np.asarray(a, float), np.asarray(b, float)),
                         lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                         vectorized=True, n_resamples=n_resamples, confidence_level=level,
                         method="percentile", rng=np.random.default_rng(seed)
                         ).confidence_interval
    return float(ci.low), float(ci.high)


def reference_label(report: EvalReport) -> str | None:
    """What the candidate is compared with query by query: the serving champion when it
    was scored, else the frozen pretrained baseline."""
    return next((label for label in (CHAMPION_LABEL, FROZEN_BASELINE)
                 if label in report.models and label != report.candidate), None)


def per_query_table(report: EvalReport, eval_set: EvalSet, k: int = 10) -> pd.DataFrame:
    """One row per query: id, category, photo, relevant count, every model's recall@k and the
    candidate's change against the reference (the table logged with `mlflow.log_table`)."""
    df = pd.DataFrame({"query_id": eval_set.query_ids, "category": eval_set.categories,
                       "image_path": eval_set.query_paths,
                       "n_relevant": [len(r) for r in eval_set.relevant]})
    for label, m in report.models.items():
        df[f"{label}_recall_at_{k}"] = m.sets[eval_set.name].query_recall[k]
    ref = reference_label(report)
    if ref is not None:
        df[f"delta_vs_{ref}"] = (df[f"{report.candidate}_recall_at_{k}"]
                                 - df[f"{ref}_recall_at_{k}"])
    return df


def category_recall(report: EvalReport, eval_set: EvalSet, k: int = 10) -> list[dict]:
    """Recall@k per query category (and `all`) for every model with its 95 % bootstrap CI
    over that category's queries, and the candidate's paired gap to the reference."""
    cats = np.asarray(eval_set.categories)
    ref = reference_label(report)
    per_query = {label: np.asarray(m.sets[eval_set.name].query_recall[k])
                 for label, m in report.models.items()}
    rows = []
    for cat in [*sorted(set(cats.tolist())), "all"]:
        mask = np.ones(len(cats), bool) if cat == "all" else cats == cat
        row: dict = {"category": cat, "n_queries": int(mask.sum()), "models": {
            label: {"recall": float(v[mask].mean()), "ci95": bootstrap_ci(v[mask])}
            for label, v in per_query.items()}}
        if ref is not None:
            ours, theirs = per_query[report.candidate][mask], per_query[ref][mask]
            row["gap"] = {"vs": ref, "diff": float((ours - theirs).mean()),
                          "ci95": paired_bootstrap_ci(ours, theirs) if mask.sum() >= 2
                          else None}
        rows.append(row)
    return rows


@dataclass(frozen=True)
class GateVerdict:
    """The promotion gate's verdict on this evaluation, shown at the top of the report."""

    promote: bool
    reason: str
    champion: str | None  # the registered champion it was compared with
    applied: bool  # the retrain gate acts on it in this run; else advisory


def gate_verdict(report: EvalReport, margin: float, applied: bool) -> GateVerdict:
    """The gate's rule (pipelines.registry.decide_promotion) on this run's numbers: the
    candidate against the champion scored beside it on the same set."""
    from pipelines.registry import decide_promotion

    champ = report.models.get(CHAMPION_LABEL)
    promote, reason = decide_promotion(
        report.headline, None if champ is None else champ.sets[RATER_SET].recall[10], margin)
    return GateVerdict(promote, reason, report.champion_version, applied)


# --------------------------------------------------------------------------- HTML report
_CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#222;max-width:1500px}
table.m{border-collapse:collapse;margin-bottom:18px}
table.m td,table.m th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.m td:first-child,table.m th:first-child{text-align:left}
.ci{color:#777;font-size:11px}
.up{color:#1a7f37}.down{color:#c0362c}
.decision{padding:10px 14px;border-radius:6px;margin:8px 0 18px;font-size:15px}
.decision.promote{background:#e6f4ea;border:1px solid #1a9e3a}
.decision.keep{background:#fdecea;border:1px solid #d0312d}
.caveat{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;max-width:1000px}
.grid{display:flex;align-items:flex-start;gap:6px;margin:6px 0;padding:6px;
      border-bottom:1px solid #eee}
.grid figure{margin:0;text-align:center;font-size:10px}
.grid img{display:block;width:96px;height:96px;object-fit:cover}
.grid .who{width:90px;font-size:12px;font-weight:600}
.pair{margin-bottom:14px;border:1px solid #ddd;border-radius:6px}
.query img{border:4px solid #555}
.hit img{border:4px solid #1a9e3a}
.miss img{border:4px solid #d0312d}
.sep{width:14px}
"""


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "<span class='ci'>(n&lt;2)</span>" if ci is None else \
        f"<span class='ci'>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _decision_html(verdict: GateVerdict | None) -> str:
    if verdict is None:
        return ("<div class='decision keep'><b>No gate verdict:</b> the registry was not "
                "consulted (--no-mlflow), so there is no champion to compare with.</div>")
    action = ("PROMOTE to champion" if verdict.promote else
              f"KEEP the champion{f' {html.escape(verdict.champion)}' if verdict.champion else ''}")
    how = ("this run's promotion gate applies it." if verdict.applied else
           "advisory: this run registers a <code>challenger</code> only; "
           "<code>loupe promote challenger --reason '…'</code> applies the same gate.")
    return (f"<div class='decision {'promote' if verdict.promote else 'keep'}' "
            f"id='decision'><b>Decision: {action}</b> — {html.escape(verdict.reason)}.<br>"
            f"<small>{how}</small></div>")


def _metrics_table(report: EvalReport) -> str:
    rows = [f"<tr><th>model</th><th>set</th>{''.join(f'<th>R@{k}</th>' for k in report.ks)}"
            "</tr>"]
    for lab, m in report.models.items():
        for name, s in m.sets.items():
            cells = "".join(f"<td>{s.recall[k]:.3f}</td>" for k in report.ks)
            rows.append(f"<tr><td>{html.escape(lab)}</td><td>{name}</td>{cells}</tr>")
    return f"<table class='m'>{''.join(rows)}</table>"


def _category_html(report: EvalReport, rows: list[dict]) -> str:
    labels = list(report.models)
    ref = reference_label(report)
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    gap_head = f"<th>{html.escape(report.candidate)} − {html.escape(ref)}</th>" if ref else ""
    out = [f"<table class='m' id='categories'><tr><th>category</th><th>n</th>{head}{gap_head}"
           "</tr>"]
    for row in rows:
        cells = "".join(f"<td>{row['models'][lab]['recall']:.3f} "
                        f"{_fmt_ci(row['models'][lab]['ci95'])}</td>" for lab in labels)
        if ref:
            gap = row["gap"]
            tone = "" if gap["ci95"] is None or gap["ci95"][0] <= 0 <= gap["ci95"][1] else (
                " class='up'" if gap["diff"] > 0 else " class='down'")
            cells += f"<td{tone}>{gap['diff']:+.3f} {_fmt_ci(gap['ci95'])}</td>"
        out.append(f"<tr><td>{html.escape(row['category'])}</td><td>{row['n_queries']}</td>"
                   f"{cells}</tr>")
    return "".join(out) + "</table>"


def _engagement_html(report: EvalReport) -> str:
    """Rater vs engagement recall@10 per model, with why the two disagree."""
    if any(ENGAGEMENT_SET not in m.sets for m in report.models.values()):
        return ""
    rows = ["<tr><th>model</th><th>rater R@10</th><th>engagement R@10</th>"
            "<th>engagement − rater</th></tr>"]
    for lab, m in report.models.items():
        r, e = m.sets[RATER_SET].recall[10], m.sets[ENGAGEMENT_SET].recall[10]
        rows.append(f"<tr><td>{html.escape(lab)}</td><td>{r:.3f}</td><td>{e:.3f}</td>"
                    f"<td>{e - r:+.3f}</td></tr>")
    return ("<h2>Rater set vs engagement set</h2>"
            f"<table class='m' id='engagement'>{''.join(rows)}</table>"
            "<p class='caveat'><b>Why they differ — the logging shadow.</b> Engagement labels "
            "are clicks and saves on the grids the serving model of the time showed; an item it "
            "never showed can never be a positive, so the set rewards ranking like the logging "
            "model and under-counts good results it missed. Position-bias correction re-weights "
            "shown positions but cannot label unshown items. Rater judgments are pooled over "
            "several models and graded independently of what was served: the gate and the "
            "headline use the rater set.</p>")


def _grid(thumb, catalog: pd.DataFrame, eval_set: EvalSet, i: int, top: Sequence[str],
          recall: float, who: str | None = None) -> str:
    """One query's photo (its box drawn) and a model's top-10, hits green, misses red."""
    rel = eval_set.relevant[i]
    found = len(set(top) & set(rel))
    figs = [f"<div class='who'>{html.escape(who)}</div>"] if who else []
    figs += [f"<figure class='query'><img src='data:image/jpeg;base64,"
             f"{thumb(eval_set.query_paths[i], 160, eval_set.query_boxes[i])}'>"
             f"<figcaption>{html.escape(eval_set.query_ids[i])}<br>"
             f"{html.escape(eval_set.categories[i])}<br>R@10 {recall:.2f}"
             f" · {found}/{len(rel)} rel</figcaption></figure>", "<div class='sep'></div>"]
    for rank, item in enumerate(top, start=1):
        grade = rel.get(item, 0)
        star = " ★" if grade >= 2 else ""
        figs.append(f"<figure class='{'hit' if grade >= 1 else 'miss'}'><img "
                    f"src='data:image/jpeg;base64,{thumb(catalog.loc[item, 'image_path'], 96)}'>"
                    f"<figcaption>#{rank} {html.escape(item)}{star}</figcaption></figure>")
    return (f"<div class='grid' data-query='{html.escape(eval_set.query_ids[i])}'>"
            + "".join(figs) + "</div>")


def changed_queries(report: EvalReport, eval_set: EvalSet, ref: str, k: int = 10
                    ) -> tuple[list[int], list[int]]:
    """Query indices whose recall@k the candidate improved (largest gain first) and
    regressed (largest loss first) against `ref`."""
    ours = np.asarray(report.models[report.candidate].sets[eval_set.name].query_recall[k])
    theirs = np.asarray(report.models[ref].sets[eval_set.name].query_recall[k])
    diff = ours - theirs
    ids = np.asarray(eval_set.query_ids)
    improved = sorted(np.flatnonzero(diff > 1e-12), key=lambda i: (-diff[i], ids[i]))
    regressed = sorted(np.flatnonzero(diff < -1e-12), key=lambda i: (diff[i], ids[i]))
    return [int(i) for i in improved], [int(i) for i in regressed]


def worst_queries(report: EvalReport, eval_set: EvalSet, n: int, k: int = 10) -> list[int]:
    """The candidate's n lowest-recall@k queries, worst first (ties by query id)."""
    recall = report.models[report.candidate].sets[eval_set.name].query_recall[k]
    return sorted(range(len(recall)), key=lambda i: (recall[i], eval_set.query_ids[i]))[:n]


def _changed_html(report: EvalReport, eval_set: EvalSet, thumb, catalog: pd.DataFrame,
                  n_show: int) -> str:
    ref = reference_label(report)
    if ref is None:
        return "<h2>Against the champion</h2><p>No champion or baseline to compare with.</p>"
    improved, regressed = changed_queries(report, eval_set, ref)
    cand = report.models[report.candidate].sets[eval_set.name]
    other = report.models[ref].sets[eval_set.name]
    n = len(eval_set.query_ids)
    parts = [f"<h2 id='changed'>{html.escape(report.candidate)} vs {html.escape(ref)}, query by "
             f"query</h2><p><b class='up'>{len(improved)} improved</b> · <b class='down'>"
             f"{len(regressed)} regressed</b> · {n - len(improved) - len(regressed)} unchanged "
             f"of {n} rater queries (recall@10); the {n_show} largest changes each way, both "
             "models' top-10 (the per-query table has them all).</p>"]
    for title, picked, css in (("Improved", improved, "up"), ("Regressed", regressed, "down")):
        parts.append(f"<h3 class='{css}'>{title} ({len(picked)})</h3>")
        for i in picked[:n_show]:
            parts.append(
                f"<div class='pair {title.lower()}' data-query='{eval_set.query_ids[i]}'>"
                + _grid(thumb, catalog, eval_set, i, cand.top_items[i], cand.query_recall[10][i],
                        report.candidate)
                + _grid(thumb, catalog, eval_set, i, other.top_items[i],
                        other.query_recall[10][i], ref) + "</div>")
    return "".join(parts)


def write_html_report(report: EvalReport, eval_set: EvalSet, world: Path, out_html: Path,
                      n_queries: int = 20, verdict: GateVerdict | None = None,
                      n_changed: int = N_CHANGED) -> Path:
    """Self-contained HTML (images inlined) in the order a reviewer decides: the gate's
    verdict and reason, recall@K, recall@10 per category with CIs, rater vs engagement,
    the queries that got better and worse against the champion (both grids), and the
    candidate's worst `n_queries` queries."""
    world, label = Path(world), report.candidate
    result = report.models[label].sets[eval_set.name]
    catalog = load_catalog(world).set_index("item_id")
    thumb = _thumbnailer(world)
    worst = worst_queries(report, eval_set, n_queries)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Loupe eval: "
             f"{html.escape(label)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Loupe embedder evaluation: {html.escape(label)}</h1>",
             _decision_html(verdict),
             f"<p>Exact search over {report.n_catalog} catalog items (catalog photos: "
             f"<code>{html.escape(report.treatment)}</code>); eval fingerprint "
             f"<code>{report.fingerprint}</code>. recall@K = |relevant ∩ top-K| / "
             "min(K, |relevant|).</p>", _metrics_table(report),
             "<h2>Rater recall@10 by category</h2><p>95 % bootstrap intervals over the "
             "category's queries; a coloured gap is one whose paired interval excludes 0.</p>",
             _category_html(report, category_recall(report, eval_set)),
             _engagement_html(report),
             _changed_html(report, eval_set, thumb, catalog, n_changed),
             f"<h2 id='worst'>Worst {len(worst)} {eval_set.name} queries of "
             f"{html.escape(label)} (lowest recall@10 first; green = relevant, red = not; "
             "★ = same product)</h2>",
             *["<div class='worst'>" + _grid(thumb, catalog, eval_set, i, result.top_items[i],
                                             result.query_recall[10][i]) + "</div>"
               for i in worst],
             "</body></html>"]
    return write_text_atomic(Path(out_html), "\n".join(parts))


def write_reports(report: EvalReport, sets: Sequence[EvalSet], world: Path, out_dir: Path,
                  n_report_queries: int = 20, verdict: GateVerdict | None = None
                  ) -> dict[str, Path]:
    """eval_summary.json (with per-category CIs and the verdict), recall_at_k.png + .csv,
    per_query.csv and eval_report.html (rater queries)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rater = next(s for s in sets if s.name == RATER_SET)
    summary = {**report.summary(), "rater_recall_at_10_by_category":
               category_recall(report, rater), "gate": None if verdict is None else
               asdict(verdict)}
    per_query = out_dir / "per_query.csv"
    write_text_atomic(per_query, per_query_table(report, rater).to_csv(index=False))
    return {
        "summary": write_json_atomic(out_dir / "eval_summary.json", summary, sort_keys=False),
        "plot": plot_recall(report, out_dir / "recall_at_k.png"),
        "series": write_recall_series(report, out_dir / "recall_at_k.csv"),
        "per_query": per_query,
        "html": write_html_report(report, rater, world, out_dir / "eval_report.html",
                                  n_report_queries, verdict),
    }


def eval_metrics_file(report: EvalReport, train_seconds: float | None) -> dict:
    """The DVC metrics file `reports/eval.json`: headline numbers per model label, and the
    candidate's gap to each baseline with a 95 % paired-bootstrap CI over rater queries."""
    def r10(label: str) -> float | None:
        m = report.models.get(label)
        return None if m is None else round(m.sets[RATER_SET].recall[10], 4)

    def gap(label: str) -> dict | None:
        m = report.models.get(label)
        if m is None:
            return None
        ours = report.models[report.candidate].sets[RATER_SET].query_recall[10]
        theirs = m.sets[RATER_SET].query_recall[10]
        lo, hi = paired_bootstrap_ci(ours, theirs)
        return {"diff": round(float(np.mean(ours) - np.mean(theirs)), 4),
                "ci95": [round(lo, 4), round(hi, 4)]}

    cand = report.models[report.candidate].sets[RATER_SET]
    out = {"recall_at_10": r10(report.candidate), "baseline_recall_at_10": r10(FROZEN_BASELINE),
           "naive_recall_at_10": r10(NAIVE),
           "recall_at_k": {str(k): round(v, 4) for k, v in cand.recall.items()},
           "hit_at_k": {str(k): round(v, 4) for k, v in cand.hit.items()},
           "recall_at_10_vs_baseline": gap(FROZEN_BASELINE),
           "recall_at_10_vs_naive": gap(NAIVE),
           "champion_recall_at_10": r10(CHAMPION_LABEL),
           "recall_at_10_vs_champion": gap(CHAMPION_LABEL),
           "train_seconds": train_seconds, "n_rater_queries": cand.n_queries,
           "n_catalog": report.n_catalog, "fingerprint": report.fingerprint}
    return {k: v for k, v in out.items() if v is not None}



# --------------------------------------------------------------------------- MLflow
@dataclass(frozen=True)
class Published:
    """What `publish` left behind: local reports, the MLflow run, the registered version."""

    paths: dict[str, Path]
    run_id: str
    model_version: str  # "loupe-embedder/3": carried by re-embedding, shards and serving
    decision: dict | None  # promotion gate outcome when asked to promote


def publish(report: EvalReport, sets: Sequence[EvalSet], world: Path, out_dir: Path,
            registry_cfg, export_dir: Path, params: Mapping[str, object] | None = None,
            propensity_png: Path | None = None, promote: bool = False,
            n_report_queries: int = 20, run_name: str | None = None,
            extra_metrics: Mapping[str, float] | None = None,
            inputs: Mapping[str, tuple[Path, str]] | None = None) -> Published:
    """Write the reports, log one MLflow run (params, every metric, plots, the HTML report,
    the per-query table, the export as an MLflow pyfunc model), register it as a new
    `challenger` version and, if asked, run the promotion gate. The registry's champion
    must have been scored in `report` (as CHAMPION_LABEL): the report's verdict and the
    gate then compare the same two numbers from the same set."""
    import tempfile

    from pipelines import registry
    from pipelines.mlflow_model import save_embedder_model

    if propensity_png is not None and not Path(propensity_png).exists():
        raise FileNotFoundError(f"propensity plot not found: {propensity_png}")
    champ = registry.version_for_alias(registry_cfg, registry.CHAMPION)
    if champ is not None and champ.model_version != report.champion_version:
        raise ValueError(f"the registry's champion is {champ.model_version} but this "
                         f"evaluation scored {report.champion_version or 'no champion'}; "
                         "evaluate with run_evaluate (it scores the champion beside the "
                         "candidate) so the gate compares numbers from the same set")
    verdict = gate_verdict(report, registry_cfg.promotion_margin, applied=promote)
    paths = write_reports(report, sets, world, out_dir, n_report_queries, verdict)
    plots = [paths["plot"], paths["series"]] + ([Path(propensity_png)]
                                                if propensity_png is not None else [])
    run_params = {"candidate": report.candidate, "models": ",".join(report.models),
                  "ks": ",".join(map(str, report.ks)), "n_catalog": report.n_catalog,
                  "retrieval": "exact (faiss IndexFlatIP)", "world": str(world),
                  "catalog_treatment": report.treatment,
                  "champion_version": report.champion_version or "none",
                  **{f"n_queries_{s.name}": len(s.query_ids) for s in sets}, **(params or {})}
    rater = next(s for s in sets if s.name == RATER_SET)
    with tempfile.TemporaryDirectory() as tmp:
        run = registry.log_run(
            registry_cfg, run_name=run_name or f"evaluate-{report.candidate}",
            params=run_params, metrics={**report.flat_metrics(), **(extra_metrics or {})},
            artifacts={"plots": plots, "report": [paths["html"], paths["summary"],
                                                  paths["per_query"]]},
            mlflow_model=save_embedder_model(Path(export_dir), Path(tmp) / "model"),
            inputs=inputs, tables={"per_query_rater.json": per_query_table(report, rater)},
            tags={registry.FINGERPRINT: report.fingerprint,
                  "gate.verdict": "promote" if verdict.promote else "keep",
                  "gate.reason": verdict.reason})
    ref = registry.register_model_version(registry_cfg, run, report.headline, report.fingerprint)
    champion = report.models.get(CHAMPION_LABEL)
    decision = registry.promotion_gate(
        registry_cfg, ref,
        champion_recall=None if champion is None else champion.sets[RATER_SET].recall[10],
        measured_champion=report.champion_version) if promote else None
    return Published(paths, run.run_id, ref.model_version,
                     None if decision is None else asdict(decision))


def eval_inputs(world: Path, engagement: Path | None, training_pairs: str | None
                ) -> dict[str, tuple[Path, str]]:
    """The run's data lineage, logged as MLflow dataset inputs with content digests: the
    catalog and rater set (and engagement set) it was measured on, the harvested pairs the
    candidate was trained on (train.json's `pairs`)."""
    tables = Path(world) / "tables"
    inputs = {"catalog": (tables / "catalog.parquet", "evaluation"),
              "rater_queries": (tables / "rater_queries.parquet", "evaluation"),
              "rater_judgments": (tables / "rater_judgments.parquet", "evaluation")}
    if engagement is not None:
        inputs["engagement_eval"] = (Path(engagement), "evaluation")
    if training_pairs and Path(training_pairs).is_file():
        inputs["training_pairs"] = (Path(training_pairs), "training")
    return inputs


# --------------------------------------------------------------------------- models + CLI
def treatment_label(detector: tuple[Path, str] | None) -> str:
    """'detect(loupe-detector/3)>salient>whole', or whole photos without a detector."""
    if detector is None:
        return WHOLE_PHOTOS
    from models.detector import PickPolicy

    return f"detect({detector[1]})>{PickPolicy()}"


def evaluation_embed_fn(export: Path, world: Path, batch_size: int,
                        detector: tuple[Path, str] | None) -> EmbedFn:
    """An exported embedder as evaluation runs it: the catalog treatment when a detector is
    given (queries keep their rater boxes either way), else whole catalog photos."""
    if detector is None:
        return embed_fn_from_export(export, world, batch_size)
    from pipelines.embed import catalog_treatment

    return catalog_treatment(export, Path(detector[0]), world, detector[1],
                             batch_size=batch_size)


@dataclass(frozen=True)
class EvaluateConfig:
    """Knobs of the evaluate stage (params.yaml `evaluate:`, all optional)."""

    ks: tuple[int, ...] = KS
    report_queries: int = 20
    batch_size: int = 64
    promotion_margin: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))

    @classmethod
    def load(cls, params: Path | None) -> EvaluateConfig:
        from pipelines.config import load

        return load(cls, params, "evaluate")


@dataclass(frozen=True)
class Evaluated:
    """What `run_evaluate` measured and, with MLflow, logged and registered."""

    report: EvalReport
    metrics: dict  # the DVC metrics file's content (reports/eval.json)
    paths: dict[str, Path]
    published: Published | None  # None with log_mlflow=False


def run_evaluate(config: EvaluateConfig, world: Path, model: Path,
                 baselines: Mapping[str, Path], out_dir: Path, *,
                 engagement: Path | None = None, metrics_path: Path | None = None,
                 train_json: Path | None = None, propensity_png: Path | None = None,
                 tracking_uri: str | None = None, promote: bool = False,
                 log_mlflow: bool = True, detector: tuple[Path, str] | None = None
                 ) -> Evaluated:
    """The evaluate stage, for the CLI, DVC and the retrain DAG alike: rater (and engagement)
    recall@K of the candidate export next to labelled baseline exports; one MLflow run with
    the same params and metrics keys whoever calls (eval config, model files, the candidate's
    train config, the resolved package versions), linked to the candidate's training run
    (train.json's `mlflow_run_id`, which holds the curves); a new
    `challenger` version, and the promotion gate when `promote`. `detector` (export dir,
    `loupe-detector/N`) embeds catalog photos by the serving catalog treatment (detect ->
    salient box -> crop, `pipelines.embed.catalog_treatment`), so the number is what the
    rollout's index will answer; without one, catalog photos are embedded whole."""
    import tempfile

    from pipelines import registry
    from pipelines.versions import resolved_versions

    world = Path(world)
    if {CANDIDATE, CHAMPION_LABEL} & set(baselines):
        raise ValueError(f"'{CANDIDATE}' labels the candidate and '{CHAMPION_LABEL}' the "
                         "registry's champion; pick other baseline labels")
    train_info = {} if train_json is None else json.loads(Path(train_json).read_text())
    sets = [load_rater_set(world)]
    if engagement is not None:
        sets.append(load_engagement_set(Path(engagement)))
    exports = {CANDIDATE: Path(model), **{k: Path(v) for k, v in baselines.items()}}
    fns = {label: evaluation_embed_fn(path, world, config.batch_size, detector)
           for label, path in exports.items()}
    reg_cfg = registry.RegistryConfig(tracking_uri, promotion_margin=config.promotion_margin)
    champion = registry.version_for_alias(reg_cfg, registry.CHAMPION) if log_mlflow else None
    with tempfile.TemporaryDirectory() as tmp:
        if champion is not None:  # scored here, on this set, for the report and the gate
            fns[CHAMPION_LABEL] = evaluation_embed_fn(
                registry.download_model(reg_cfg, champion.model_version, Path(tmp)), world,
                config.batch_size, detector)
        report = evaluate_models(fns, world, sets, CANDIDATE, config.ks,
                                 treatment_label(detector))
    report.champion_version = None if champion is None else champion.model_version
    published = None
    if log_mlflow:
        params = {f"eval.{k}": v for k, v in asdict(config).items()}
        params.update({f"model_file.{label}": str(p) for label, p in exports.items()})
        params.update({f"train.{k}": v for k, v in train_info.get("config", {}).items()})
        params.update({f"versions.{k}": v for k, v in resolved_versions().items()})
        params.update({f"train_versions.{k}": v
                       for k, v in train_info.get("versions", {}).items()})
        published = publish(
            report, sets, world, out_dir, reg_cfg, Path(model), params,
            propensity_png, promote, config.report_queries,
            extra_metrics={k: float(train_info[k]) for k in
                           ("train_seconds", "best_val_style_recall_at_10")
                           if train_info.get(k) is not None},
            inputs=eval_inputs(world, engagement, train_info.get("pairs")))
        if train_info.get("mlflow_run_id"):
            registry.link_runs(reg_cfg, published.run_id, train_info["mlflow_run_id"],
                               published.model_version)
        paths = published.paths
    else:
        paths = write_reports(report, sets, world, out_dir, config.report_queries)
    metrics = eval_metrics_file(report, train_info.get("train_seconds"))
    if metrics_path is not None:
        write_text_atomic(Path(metrics_path), json.dumps(metrics, indent=1) + "\n")
    return Evaluated(report, metrics, paths, published)


def _labelled(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"--baseline must be LABEL=PATH (e.g. {NAIVE}=naive.ts), got {spec!r}")
    return label, Path(path)


def add_cli(sub) -> None:
    p = sub.add_parser("evaluate", help="rater-set recall@K with baselines, MLflow run, "
                                        "registered challenger version")
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True,
                   help="candidate: export directory (loupe train OUT/export)")
    p.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH",
                   help=f"labelled baseline export dir, e.g. {FROZEN_BASELINE}=runs/demo/frozen/"
                        f"export, {NAIVE}=runs/demo/train_naive/export (repeatable)")
    p.add_argument("--engagement", type=Path, default=None,
                   help="eval_engagement.parquet from harvest (secondary set)")
    p.add_argument("--propensity-png", type=Path, default=None, help="harvest's plot to log")
    p.add_argument("--out", type=Path, default=Path("reports/eval"), help="report directory")
    p.add_argument("--metrics", type=Path, default=None, help="DVC metrics file (eval.json)")
    p.add_argument("--train-json", type=Path, default=None,
                   help="the candidate's train.json (loupe train): time + config logged")
    p.add_argument("--params", type=Path, default=None, help="params.yaml (evaluate: block)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-mlflow", action="store_true", help="local reports only")
    p.add_argument("--detector", type=Path, default=None,
                   help="detector export dir: embed catalog photos by the serving treatment "
                        "(detect -> salient box -> crop) instead of whole")
    p.add_argument("--detector-version", default=None,
                   help="the detector's registered version (loupe-detector/N), recorded")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if (args.detector is None) != (args.detector_version is None):
        raise ValueError("--detector and --detector-version go together")
    done = run_evaluate(
        EvaluateConfig.load(args.params), args.world, args.model,
        dict(_labelled(s) for s in args.baseline), args.out, engagement=args.engagement,
        metrics_path=args.metrics, train_json=args.train_json,
        propensity_png=args.propensity_png, tracking_uri=args.tracking_uri,
        log_mlflow=not args.no_mlflow,
        detector=None if args.detector is None else (args.detector, args.detector_version))
    out: dict = {"summary": done.report.summary(), "metrics": done.metrics,
                 "paths": {k: str(v) for k, v in done.paths.items()}}
    if done.published is not None:
        out.update(run_id=done.published.run_id, model_version=done.published.model_version,
                   decision=done.published.decision)
    print(json.dumps(out, indent=1, default=str))
    return 0
