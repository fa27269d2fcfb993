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
RATER_SET = "rater"
ENGAGEMENT_SET = "engagement"
CANDIDATE = "model"
FROZEN_BASELINE = "frozen_pretrained"
NAIVE = "naive_click"

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


def pick_report_queries(eval_set: EvalSet, n: int) -> list[int]:
    """Up to n query indices, round-robin over categories so every category is shown."""
    by_cat: dict[str, list[int]] = {}
    for i in np.argsort(eval_set.query_ids, kind="stable"):
        by_cat.setdefault(eval_set.categories[i], []).append(int(i))
    picked: list[int] = []
    queues = [by_cat[c] for c in sorted(by_cat)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


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


_CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#222}
table.m{border-collapse:collapse;margin-bottom:18px}
table.m td,table.m th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.grid{display:flex;align-items:flex-start;gap:6px;margin:10px 0;padding:8px;
      border-bottom:1px solid #eee}
.grid figure{margin:0;text-align:center;font-size:10px}
.grid img{display:block;width:96px;height:96px;object-fit:cover}
.query img{border:4px solid #555}
.hit img{border:4px solid #1a9e3a}
.miss img{border:4px solid #d0312d}
.sep{width:14px}
"""


def write_html_report(report: EvalReport, eval_set: EvalSet, world: Path, out_html: Path,
                      n_queries: int = 20, label: str | None = None) -> Path:
    """Self-contained HTML (images inlined as base64): a metrics table, then for each of
    ~n_queries queries the query image and its top-10 results, hits green, misses red."""
    world, label = Path(world), label or report.candidate
    result = report.models[label].sets[eval_set.name]
    catalog = load_catalog(world).set_index("item_id")
    rows = [f"<tr><th>model</th><th>set</th>{''.join(f'<th>R@{k}</th>' for k in report.ks)}"
            "</tr>"]
    for lab, m in report.models.items():
        for name, s in m.sets.items():
            cells = "".join(f"<td>{s.recall[k]:.3f}</td>" for k in report.ks)
            rows.append(f"<tr><td>{html.escape(lab)}</td><td>{name}</td>{cells}</tr>")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Loupe eval: "
             f"{html.escape(label)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Loupe embedder evaluation: {html.escape(label)}</h1>",
             f"<p>Exact search over {report.n_catalog} catalog items (catalog photos: "
             f"<code>{html.escape(report.treatment)}</code>); eval fingerprint "
             f"<code>{report.fingerprint}</code>. recall@K = |relevant ∩ top-K| / "
             "min(K, |relevant|).</p>",
             f"<table class='m'>{''.join(rows)}</table>",
             f"<h2>{eval_set.name} queries: top-{REPORT_TOP} "
             "(green = relevant, red = not; ★ = same product)</h2>"]
    for i in pick_report_queries(eval_set, n_queries):
        rel = eval_set.relevant[i]
        top = result.top_items[i]
        found = len(set(top) & set(rel))
        figs = [f"<figure class='query'><img src='data:image/jpeg;base64,"
                f"{_thumb_b64(world / eval_set.query_paths[i], 160, eval_set.query_boxes[i])}'>"
                f"<figcaption>{html.escape(eval_set.query_ids[i])}<br>"
                f"{html.escape(eval_set.categories[i])}<br>R@10 {result.query_recall[10][i]:.2f}"
                f" · {found}/{len(rel)} rel</figcaption></figure>", "<div class='sep'></div>"]
        for rank, item in enumerate(top, start=1):
            grade = rel.get(item, 0)
            mark = "hit" if grade >= 1 else "miss"
            star = " ★" if grade >= 2 else ""
            figs.append(f"<figure class='{mark}'><img src='data:image/jpeg;base64,"
                        f"{_thumb_b64(world / catalog.loc[item, 'image_path'], 96)}'>"
                        f"<figcaption>#{rank} {html.escape(item)}{star}</figcaption></figure>")
        parts.append(f"<div class='grid' data-query='{html.escape(eval_set.query_ids[i])}'>"
                     + "".join(figs) + "</div>")
    parts.append("</body></html>")
    return write_text_atomic(Path(out_html), "\n".join(parts))


def write_reports(report: EvalReport, sets: Sequence[EvalSet], world: Path, out_dir: Path,
                  n_report_queries: int = 20) -> dict[str, Path]:
    """eval_summary.json, recall_at_k.png + .csv and eval_report.html (rater queries)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rater = next(s for s in sets if s.name == RATER_SET)
    return {
        "summary": write_json_atomic(out_dir / "eval_summary.json", report.summary(),
                                     sort_keys=False),
        "plot": plot_recall(report, out_dir / "recall_at_k.png"),
        "series": write_recall_series(report, out_dir / "recall_at_k.csv"),
        "html": write_html_report(report, rater, world, out_dir / "eval_report.html",
                                  n_report_queries),
    }


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """CI of mean(a - b) over the same queries, resampling queries: is a gap between two
    models bigger than what the choice of rater queries alone would produce?"""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need two equally long, non-empty per-query lists, got {len(a)} "
                         f"and {len(b)}")
    diff = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_resamples, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


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
            extra_metrics: Mapping[str, float] | None = None, batch_size: int = 64,
            detector: tuple[Path, str] | None = None,
            inputs: Mapping[str, tuple[Path, str]] | None = None) -> Published:
    """Write the reports, log one MLflow run (params, every metric, plots, HTML report, the
    export as an MLflow pyfunc model), register it as a new `challenger` version and, if
    asked, run the promotion gate (which re-scores a champion measured on another set on
    this one)."""
    import tempfile

    from pipelines import registry
    from pipelines.mlflow_model import save_embedder_model

    if propensity_png is not None and not Path(propensity_png).exists():
        raise FileNotFoundError(f"propensity plot not found: {propensity_png}")
    paths = write_reports(report, sets, world, out_dir, n_report_queries)
    plots = [paths["plot"], paths["series"]] + ([Path(propensity_png)]
                                                if propensity_png is not None else [])
    run_params = {"candidate": report.candidate, "models": ",".join(report.models),
                  "ks": ",".join(map(str, report.ks)), "n_catalog": report.n_catalog,
                  "retrieval": "exact (faiss IndexFlatIP)", "world": str(world),
                  "catalog_treatment": report.treatment,
                  **{f"n_queries_{s.name}": len(s.query_ids) for s in sets}, **(params or {})}
    with tempfile.TemporaryDirectory() as tmp:
        run = registry.log_run(
            registry_cfg, run_name=run_name or f"evaluate-{report.candidate}",
            params=run_params, metrics={**report.flat_metrics(), **(extra_metrics or {})},
            artifacts={"plots": plots, "report": [paths["html"], paths["summary"]]},
            mlflow_model=save_embedder_model(Path(export_dir), Path(tmp) / "model"),
            inputs=inputs, tags={registry.FINGERPRINT: report.fingerprint})
    ref = registry.register_model_version(registry_cfg, run, report.headline, report.fingerprint)
    decision = registry.promotion_gate(
        registry_cfg, ref, rescore=_rater_rescorer(registry_cfg, sets, world, batch_size,
                                                   detector)
    ) if promote else None
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


def _rater_rescorer(registry_cfg, sets: Sequence[EvalSet], world: Path, batch_size: int,
                    detector: tuple[Path, str] | None = None) -> Callable:
    """rescore(version) -> that registered version's rater recall@10 on this world's set,
    with this evaluation's catalog treatment."""
    import tempfile

    from pipelines import registry

    rater = next(s for s in sets if s.name == RATER_SET)

    def rescore(ref) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            export = registry.download_model(registry_cfg, ref.model_version, Path(tmp))
            fn = evaluation_embed_fn(export, world, batch_size, detector)
            return evaluate_models({CANDIDATE: fn}, world, [rater],
                                   treatment=treatment_label(detector)).headline

    return rescore


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
    train config, the resolved package versions, its per-epoch validation curve); a new
    `challenger` version, and the promotion gate when `promote`. `detector` (export dir,
    `loupe-detector/N`) embeds catalog photos by the serving catalog treatment (detect ->
    salient box -> crop, `pipelines.embed.catalog_treatment`), so the number is what the
    rollout's index will answer; without one, catalog photos are embedded whole."""
    from pipelines.registry import RegistryConfig
    from pipelines.versions import resolved_versions

    world = Path(world)
    if CANDIDATE in baselines:
        raise ValueError(f"'{CANDIDATE}' labels the candidate; pick another baseline label")
    train_info = {} if train_json is None else json.loads(Path(train_json).read_text())
    sets = [load_rater_set(world)]
    if engagement is not None:
        sets.append(load_engagement_set(Path(engagement)))
    exports = {CANDIDATE: Path(model), **{k: Path(v) for k, v in baselines.items()}}
    fns = {label: evaluation_embed_fn(path, world, config.batch_size, detector)
           for label, path in exports.items()}
    report = evaluate_models(fns, world, sets, CANDIDATE, config.ks, treatment_label(detector))
    published = None
    if log_mlflow:
        params = {f"eval.{k}": v for k, v in asdict(config).items()}
        params.update({f"model_file.{label}": str(p) for label, p in exports.items()})
        params.update({f"train.{k}": v for k, v in train_info.get("config", {}).items()})
        params.update({f"versions.{k}": v for k, v in resolved_versions().items()})
        params.update({f"train_versions.{k}": v
                       for k, v in train_info.get("versions", {}).items()})
        reg_cfg = RegistryConfig(tracking_uri, promotion_margin=config.promotion_margin)
        published = publish(
            report, sets, world, out_dir, reg_cfg, Path(model), params,
            propensity_png, promote, config.report_queries,
            extra_metrics={k: float(train_info[k]) for k in
                           ("train_seconds", "best_val_style_recall_at_10")
                           if train_info.get(k) is not None},
            batch_size=config.batch_size, detector=detector,
            inputs=eval_inputs(world, engagement, train_info.get("pairs")))
        _log_curve(reg_cfg, published.run_id, train_info.get("curve", []))
        paths = published.paths
    else:
        paths = write_reports(report, sets, world, out_dir, config.report_queries)
    metrics = eval_metrics_file(report, train_info.get("train_seconds"))
    if metrics_path is not None:
        write_text_atomic(Path(metrics_path), json.dumps(metrics, indent=1) + "\n")
    return Evaluated(report, metrics, paths, published)


def _log_curve(registry_cfg, run_id: str, curve: Sequence[Mapping]) -> None:
    """The candidate's per-epoch training curve as stepped `train/<name>` metrics."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(f"train/{k}", float(v), now, int(row["epoch"]))
            for row in curve for k, v in row.items() if k != "epoch" and v is not None]
    if rows:
        MlflowClient(registry_cfg.uri, registry_cfg.uri).log_batch(run_id, metrics=rows)


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
