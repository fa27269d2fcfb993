"""Index stage: build a version from an embedding run, canary it, cut over, compact.

Lifecycle of an index version (layout: serving/shards/layout.py):

1. `build_shard` per shard, independently (the DAG runs them in parallel), with the index
   kinds of serving/shards/kinds.py (HNSW over fp16 vectors, or IVF-PQ with exact rescoring).
   A version holds vectors of exactly one model version.
2. `write_manifest`, last and atomically: model version, shard files with sha256, counts,
   parameters, build time. From then on the version directory is immutable.
3. `canary`: probe queries with known neighbours (the other listings of the same product;
   rater-set queries when a query embedder is given), the overlap of the index's answers with
   exact search, and embedding-norm statistics; a failing version gets a verdict with reasons.
4. `cutover` / `rollback` move the pointers (serving/shards/pointer.py) to a version with a
   passing verdict; shard stores watch the pointer and hot-swap.
5. `compact` folds the streaming delta into a fresh build (tombstones dropped, upserts added,
   the graph rebuilt), which then goes through the same canary and cutover.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_contracts.durable import write_json_atomic
from pipelines.config import from_mapping, load_section
from pipelines.embed import EmbedFn, load_embeddings, read_catalog, require_unit_vectors
from serving.shards import layout, pointer
from serving.shards.delta import DELETE, UPSERT, DeltaLog
from serving.shards.kinds import ShardParams, build_shard_from_arrays, load_version, search_shards

log = logging.getLogger("loupe.index")


# --------------------------------------------------------------------------- params
@dataclass(frozen=True)
class CanaryParams:
    k: int = 10
    max_probes: int = 300
    # same-product listings found in the top k, an integrity check: at least this, and at
    # least min_probe_lift x what a random top k would catch (k / items)
    min_probe_recall: float = 0.05
    min_probe_lift: float = 5.0
    min_exact_overlap: float = 0.9  # |index top-k ∩ exact top-k| / k
    min_rater_recall: float = 0.3  # rater-set recall@k (with a query embedder)
    norm_tolerance: float = 0.01  # every stored vector's |‖v‖ - 1|
    max_mean_vector_norm: float = 0.9  # ‖mean vector‖ near 1 = collapsed embeddings
    # catalogs with one listing per product have no sibling to find; their probes are each
    # listing's own vector, jittered (cosine ~0.95 to it), which must find the listing
    self_probe_noise: float = 0.3  # std of the jitter, relative to a unit vector's length
    min_self_recall: float = 0.9
    # ... and, with a query embedder, a re-shot photo: an off-centre crop of the listing's photo
    reshot_box: tuple[float, float, float, float] = (0.04, 0.08, 0.88, 0.96)
    min_reshot_recall: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class StoreParams:
    keep_previous_s: float = 300.0
    poll_s: float = 0.1


@dataclass(frozen=True)
class IndexParams(ShardParams):
    """params.yaml `index:`: the shard shape plus the canary's and the stores' settings."""

    canary: CanaryParams = field(default_factory=CanaryParams)
    store: StoreParams = field(default_factory=StoreParams)

    @classmethod
    def load(cls, params_path: Path | None = None) -> IndexParams:
        section = dict(load_section(params_path, "index"))
        canary = from_mapping(CanaryParams, section.pop("canary", {}) or {}, "index.canary")
        store = StoreParams(**section.pop("store", {}) or {})
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown index params {sorted(unknown)}")
        return cls(**section, canary=canary, store=store)


def new_version_id(model_version: str) -> str:
    """Sortable, unique, and naming its model: 20261101T120000123456Z-loupe-embedder-3."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_version).strip("-")
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{slug}"


# --------------------------------------------------------------------------- builds
def build_shard(embeddings_dir: Path, shard_id: int, n_shards: int, params: IndexParams,
                out_dir: Path) -> dict:
    """Build one shard of the index version `out_dir` from a finished embedding run."""
    emb = load_embeddings(embeddings_dir)
    return build_shard_from_arrays(emb.item_ids, emb.vectors, emb.model_version, shard_id,
                                   replace(params, n_shards=n_shards), out_dir)


def write_manifest(version_dir: Path, n_shards: int, source: dict, delta_seq: int = 0,
                   treatment: dict | None = None) -> dict:
    """Check the shards agree, checksum every file and write manifest.json last."""
    version_dir = Path(version_dir)
    if (version_dir / layout.MANIFEST).exists():
        raise ValueError(f"{version_dir} already has a manifest")
    shards, metas = [], []
    for s in range(n_shards):
        sdir = layout.shard_dir(version_dir, s)
        if not (sdir / layout.SHARD_META).is_file():
            raise FileNotFoundError(f"{version_dir}: shard {s} of {n_shards} is not built")
        meta = json.loads((sdir / layout.SHARD_META).read_text())
        metas.append(meta)
        shards.append({"shard_id": s, "count": meta["count"],
                       "build_seconds": meta["build_seconds"],
                       "files": {name: {"sha256": layout.sha256_file(sdir / name),
                                        "bytes": (sdir / name).stat().st_size}
                                 for name in layout.SHARD_FILES}})
    for key in ("model_version", "kind", "params", "n_shards", "dim"):
        values = {json.dumps(m[key], sort_keys=True) for m in metas}
        if len(values) > 1:
            raise ValueError(f"{version_dir}: shards disagree on {key}: {sorted(values)}")
    if metas[0]["n_shards"] != n_shards:
        raise ValueError(f"{version_dir}: shards were built for {metas[0]['n_shards']} shards")
    manifest = {
        "format": 1, "index_version": version_dir.name,
        "model_version": metas[0]["model_version"], "kind": metas[0]["kind"],
        "params": metas[0]["params"], "n_shards": n_shards, "dim": metas[0]["dim"],
        "count": sum(m["count"] for m in metas), "delta_seq": int(delta_seq),
        "treatment": treatment,
        "build_seconds": round(sum(m["build_seconds"] for m in metas), 3),
        "built_at": datetime.now(UTC).isoformat(), "source": source, "shards": shards,
    }
    write_json_atomic(version_dir / layout.MANIFEST, manifest)
    for sdir in version_dir.glob("shard-*"):  # immutable from here on
        for f in sdir.iterdir():
            f.chmod(0o444)
    return manifest


def build_index(embeddings_dir: Path, index_root: Path, params: IndexParams,
                version: str | None = None) -> Path:
    """Every shard (in sequence; the DAG maps them instead) plus the manifest."""
    emb = load_embeddings(embeddings_dir)
    vdir = layout.version_dir(index_root, version or new_version_id(emb.model_version))
    for s in range(params.n_shards):
        build_shard_from_arrays(emb.item_ids, emb.vectors, emb.model_version, s, params, vdir)
    write_manifest(vdir, params.n_shards, {"embeddings_dir": str(Path(embeddings_dir))},
                   treatment=emb.treatment)
    return vdir


# --------------------------------------------------------------------------- canary
def _exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, min(k, len(vectors)))[1]


def canary(index_root: Path, version: str, world_root: Path, params: CanaryParams,
           query_embed_fn: EmbedFn | None = None, expected_model_version: str | None = None
           ) -> pointer.CanaryVerdict:
    """Probe a built version; the verdict (also saved under verdicts/) gates cutover."""
    manifest, shards = load_version(index_root, version)
    k = params.k
    reasons: list[str] = []
    ids = np.concatenate([s.ids for s in shards])
    vectors = np.ascontiguousarray(np.concatenate([np.asarray(s.vectors) for s in shards]),
                                   dtype=np.float32)
    if expected_model_version and manifest["model_version"] != expected_model_version:
        reasons.append(f"model version {manifest['model_version']!r} is not the expected "
                       f"{expected_model_version!r}")
    if len(ids) == 0:
        raise ValueError(f"index version {version} is empty")

    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    mean_vector_norm = float(np.linalg.norm(vectors.mean(axis=0)))
    metrics: dict = {"items": int(len(ids)), "norm_min": float(norms.min()),
                     "norm_max": float(norms.max()), "norm_mean": float(norms.mean()),
                     "mean_vector_norm": mean_vector_norm}
    if np.abs(norms - 1).max() > params.norm_tolerance:
        reasons.append(f"vector norms span [{norms.min():.4f}, {norms.max():.4f}], outside "
                       f"1 ± {params.norm_tolerance}")
    if mean_vector_norm > params.max_mean_vector_norm:
        reasons.append(f"embeddings collapsed: ‖mean vector‖ = {mean_vector_norm:.3f} > "
                       f"{params.max_mean_vector_norm}")

    # same-product probes: a listing's nearest neighbours should include its siblings
    catalog = read_catalog(world_root)
    product = catalog.set_index("item_id")["product_id"]
    indexed = pd.Series(ids).map(product)
    row_of = {item: r for r, item in enumerate(ids)}
    siblings = {p: set(g) for p, g in pd.Series(ids).groupby(indexed.to_numpy())}
    probes = [r for r, p in enumerate(indexed) if isinstance(p, str) and len(siblings[p]) > 1]
    rng = np.random.default_rng(params.seed)
    if len(probes) > params.max_probes:
        probes = sorted(rng.choice(probes, params.max_probes, replace=False).tolist())
    metrics["n_probes"] = len(probes)
    if not probes:  # one listing per product: each listing must find itself
        _self_probes(ids, vectors, shards, params, rng, metrics, reasons)
        if query_embed_fn is not None:
            _reshot_probes(ids, catalog, shards, query_embed_fn, params, rng, metrics, reasons)
    else:
        queries = vectors[probes]
        found = search_shards(shards, queries, k + 1)
        exact = _exact_top(vectors, queries, k + 1)
        recalls, overlaps = [], []
        for q, r in enumerate(probes):
            got = [item for item, _ in found[q] if item != ids[r]][:k]
            want = [ids[e] for e in exact[q] if e != r][:k]
            sib = siblings[indexed.iloc[r]] - {ids[r]}
            recalls.append(len(set(got) & sib) / min(k, len(sib)))
            overlaps.append(len(set(got) & set(want)) / max(1, len(want)))
        metrics["probe_recall"] = float(np.mean(recalls))
        metrics["probe_recall_floor"] = max(params.min_probe_recall, params.min_probe_lift * k
                                            / max(1, len(ids) - 1))
        metrics["exact_overlap"] = float(np.mean(overlaps))
        if metrics["probe_recall"] < metrics["probe_recall_floor"]:
            reasons.append(f"same-product probe recall@{k} {metrics['probe_recall']:.3f} < "
                           f"{metrics['probe_recall_floor']:.3f}")
        if metrics["exact_overlap"] < params.min_exact_overlap:
            reasons.append(f"overlap with exact search {metrics['exact_overlap']:.3f} < "
                           f"{params.min_exact_overlap}")

    raters = Path(world_root) / "tables" / "rater_queries.parquet"
    if query_embed_fn is not None and pq.read_metadata(raters).num_rows == 0:
        metrics["rater_probes"] = "skipped: the world has no rater set"
    elif query_embed_fn is not None:
        from pipelines.evaluate import load_rater_set, recall_at_k

        rater = load_rater_set(world_root)
        keep = [q for q, rel in enumerate(rater.relevant) if set(rel) & set(row_of)]
        if not keep:
            reasons.append("rater probes: no rater query has a relevant item in this index")
        else:
            qv = require_unit_vectors(
                query_embed_fn([rater.query_paths[q] for q in keep], rater.query_boxes[keep]),
                len(keep), "rater query embeddings")
            found = search_shards(shards, qv, k)
            rel = [set(rater.relevant[q]) & set(row_of) for q in keep]
            recall = float(recall_at_k([[i for i, _ in f] for f in found], rel, [k])[k].mean())
            metrics["rater_recall"] = recall
            metrics["n_rater_probes"] = len(keep)
            if recall < params.min_rater_recall:
                reasons.append(f"rater-set recall@{k} {recall:.3f} < {params.min_rater_recall}")

    vdir = layout.version_dir(index_root, version)
    verdict = pointer.CanaryVerdict(
        index_version=version, model_version=manifest["model_version"], passed=not reasons,
        reasons=reasons, metrics=metrics,
        manifest_sha256=layout.sha256_file(vdir / layout.MANIFEST),
        checked_at=datetime.now(UTC).isoformat(), params=asdict(params))
    pointer.write_verdict(index_root, verdict)
    log.info("canary %s: %s %s", version, "PASS" if verdict.passed else "FAIL", reasons)
    return verdict


def _self_probes(ids: np.ndarray, vectors: np.ndarray, shards, params: CanaryParams,
                 rng: np.random.Generator, metrics: dict, reasons: list[str]) -> None:
    """Each probed listing's vector, jittered and renormalised, must find the listing in
    the top k: the index's integrity on a catalog with no sibling listings."""
    k = params.k
    rows = np.sort(rng.choice(len(ids), min(params.max_probes, len(ids)), replace=False))
    noise = rng.normal(0.0, params.self_probe_noise / np.sqrt(vectors.shape[1]),
                       (len(rows), vectors.shape[1]))
    queries = vectors[rows] + noise.astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = search_shards(shards, queries, k)
    exact = _exact_top(vectors, queries, k)
    hits = [ids[r] in {item for item, _ in f} for r, f in zip(rows, found, strict=True)]
    overlap = [len({item for item, _ in f} & {ids[e] for e in ex}) / max(1, len(ex))
               for f, ex in zip(found, exact, strict=True)]
    metrics.update(probe_kind="self", n_probes=int(len(rows)),
                   self_recall=float(np.mean(hits)), exact_overlap=float(np.mean(overlap)))
    if metrics["self_recall"] < params.min_self_recall:
        reasons.append(f"self probe recall@{k} {metrics['self_recall']:.3f} < "
                       f"{params.min_self_recall}: jittered listings do not find themselves")
    if metrics["exact_overlap"] < params.min_exact_overlap:
        reasons.append(f"overlap with exact search {metrics['exact_overlap']:.3f} < "
                       f"{params.min_exact_overlap}")


def _reshot_probes(ids: np.ndarray, catalog: pd.DataFrame, shards, embed: EmbedFn,
                   params: CanaryParams, rng: np.random.Generator, metrics: dict,
                   reasons: list[str]) -> None:
    """An off-centre crop of a listing's photo, embedded as a user's query would be, must
    find the listing: the model and the index agree on real photos."""
    k = params.k
    photo = catalog.set_index("item_id")["image_path"]
    rows = np.sort(rng.choice(len(ids), min(params.max_probes, len(ids)), replace=False))
    paths = [photo[ids[r]] for r in rows]
    queries = require_unit_vectors(
        embed(paths, np.tile(np.asarray(params.reshot_box, np.float64), (len(rows), 1))),
        len(rows), "re-shot probe embeddings")
    found = search_shards(shards, queries, k)
    hits = [ids[r] in {item for item, _ in f} for r, f in zip(rows, found, strict=True)]
    # in a small catalog a random top k already holds the listing k/n of the time
    floor = max(params.min_reshot_recall, min(0.95, params.min_probe_lift * k / len(ids)))
    metrics.update(n_reshot_probes=int(len(rows)), reshot_recall=float(np.mean(hits)),
                   reshot_recall_floor=floor)
    if metrics["reshot_recall"] < floor:
        reasons.append(f"re-shot probe recall@{k} {metrics['reshot_recall']:.3f} < "
                       f"{floor:.3f}: cropped catalog photos do not find their listing")


class CanaryFailed(ValueError):
    """A built index version failed its canary: it must not go live (no retry helps)."""


def require_canary(index_root: Path, version: str, world_root: Path, params: CanaryParams,
                   query_embed_fn: EmbedFn | None = None,
                   expected_model_version: str | None = None) -> pointer.CanaryVerdict:
    """`canary`, raising CanaryFailed (live traffic untouched) unless the version passed."""
    verdict = canary(index_root, version, world_root, params, query_embed_fn,
                     expected_model_version)
    if not verdict.passed:
        raise CanaryFailed(f"index version {version} failed its canary, live traffic "
                           f"untouched: {'; '.join(verdict.reasons)}")
    return verdict


def publish(embeddings_dir: Path, index_root: Path, world_root: Path, params: IndexParams,
            version: str | None = None, query_embed_fn: EmbedFn | None = None,
            expected_model_version: str | None = None) -> pointer.CanaryVerdict:
    """Build -> canary -> cutover in this process: what `loupe serve` and the benches do to
    an embedding run (the rollout DAG runs the same steps as separate, mapped tasks)."""
    vdir = build_index(embeddings_dir, index_root, params, version)
    verdict = require_canary(index_root, vdir.name, world_root, params.canary, query_embed_fn,
                             expected_model_version)
    pointer.cutover(index_root, vdir.name)
    return verdict


# --------------------------------------------------------------------------- compaction
def compact(index_root: Path, params: IndexParams, version: str | None = None) -> Path:
    """A new version = live version + delta (upserts folded in, tombstones dropped), built
    from scratch with `params`; its manifest records the delta seq it folded in, so stores
    replay only newer delta rows on top of it."""
    live = pointer.read(index_root, layout.CURRENT)
    if live is None:
        raise ValueError(f"{index_root}: nothing is live, nothing to compact")
    manifest, shards = load_version(index_root, live)
    model = manifest["model_version"]
    items = {str(i): v for s in shards for i, v in zip(s.ids.tolist(), np.asarray(s.vectors),
                                                        strict=True)}
    upto = manifest["delta_seq"]
    folded = dropped = other_model = 0
    delta_path = Path(index_root) / layout.DELTA_DB
    if delta_path.exists():
        delta = DeltaLog(delta_path, create=False)
        try:
            upto = max(upto, delta.max_seq())
            for row in delta.rows_after(manifest["delta_seq"], upto=upto):
                if row.op == UPSERT and row.model_version != model:
                    other_model += 1
                elif row.op == UPSERT:
                    items[row.item_id] = row.vector
                    folded += 1
                elif row.op == DELETE and items.pop(row.item_id, None) is not None:
                    dropped += 1
        finally:
            delta.close()
    ids = np.array(sorted(items), dtype=str)
    vectors = np.stack([items[i] for i in ids]) if len(ids) else \
        np.zeros((0, manifest["dim"]), np.float32)
    vdir = layout.version_dir(index_root, version or new_version_id(model))
    for s in range(params.n_shards):
        build_shard_from_arrays(ids, vectors, model, s, params, vdir)
    write_manifest(vdir, params.n_shards, {
        "compacted_from": live, "delta_upserts_folded": folded, "tombstones_dropped": dropped,
        "delta_rows_of_other_models": other_model}, delta_seq=upto,
        treatment=manifest.get("treatment"))
    log.info("compacted %s -> %s: %d upserts folded, %d tombstones dropped", live, vdir.name,
             folded, dropped)
    return vdir


def prune_delta(index_root: Path) -> int:
    """Drop delta rows already folded into both the live and the previous version."""
    delta_path = Path(index_root) / layout.DELTA_DB
    pointed = [v for v in (pointer.read(index_root, layout.CURRENT),
                           pointer.read(index_root, layout.PREVIOUS)) if v]
    if not delta_path.exists() or not pointed:
        return 0
    upto = min(layout.read_manifest(layout.version_dir(index_root, v))["delta_seq"]
               for v in pointed)
    delta = DeltaLog(delta_path, create=False)
    try:
        return delta.prune(upto)
    finally:
        delta.close()


# --------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    def root(p, version: bool = False) -> None:
        p.add_argument("--index-root", type=Path, required=True)
        p.add_argument("--params", type=Path, default=None)
        if version:
            p.add_argument("--version", required=True, help="index version id")

    p = sub.add_parser("build-shard", help="build one shard of an index version")
    root(p, version=True)
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--shard", type=int, required=True)
    p.set_defaults(func=_build_shard_cli)

    p = sub.add_parser("finalize-index", help="checksum the built shards, write the manifest")
    root(p, version=True)
    p.add_argument("--embeddings", type=Path, required=True)
    p.set_defaults(func=_finalize_cli)

    p = sub.add_parser("build-index", help="build every shard and the manifest")
    root(p)
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--version", default=None, help="default: <utc time>-<model>")
    p.set_defaults(func=_build_index_cli)

    p = sub.add_parser("canary", help="probe an index version; exits 1 when it fails")
    root(p, version=True)
    p.add_argument("--world", type=Path, required=True, help="catalog (and rater set) root")
    p.add_argument("--expect-model", default=None, help="the serving embedder's version")
    p.set_defaults(func=_canary_cli)

    p = sub.add_parser("cutover", help="make a canary-passed index version live")
    root(p, version=True)
    p.set_defaults(func=lambda a: _print(pointer.cutover(a.index_root, a.version)))

    p = sub.add_parser("rollback", help="one step back to the previous index version")
    root(p)
    p.set_defaults(func=lambda a: _print(pointer.rollback(a.index_root)))

    p = sub.add_parser("compact", help="fold the delta into a rebuilt version, canary, cutover")
    root(p)
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--no-cutover", action="store_true")
    p.set_defaults(func=_compact_cli)

    p = sub.add_parser("index-status", help="live / previous versions and canary verdicts")
    root(p)
    p.set_defaults(func=lambda a: _print(pointer.index_status(a.index_root)))


def _print(payload: dict) -> int:
    print(json.dumps(payload, indent=1, default=str))
    return 0


def _build_shard_cli(args) -> int:
    params = IndexParams.load(args.params)
    vdir = layout.version_dir(args.index_root, args.version)
    return _print(build_shard(args.embeddings, args.shard, params.n_shards, params, vdir))


def _finalize_cli(args) -> int:
    params = IndexParams.load(args.params)
    vdir = layout.version_dir(args.index_root, args.version)
    manifest = write_manifest(vdir, params.n_shards, {"embeddings_dir": str(args.embeddings)})
    return _print({k: manifest[k] for k in ("index_version", "model_version", "count")})


def _build_index_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    vdir = build_index(args.embeddings, args.index_root, IndexParams.load(args.params),
                       args.version)
    return _print({"index_version": vdir.name, "path": str(vdir)})


def _canary_cli(args) -> int:
    params = IndexParams.load(args.params)
    verdict = canary(args.index_root, args.version, args.world, params.canary,
                     expected_model_version=args.expect_model)
    _print(asdict(verdict))
    if not verdict.passed:
        print(f"loupe canary: {args.version} FAILED: " + "; ".join(verdict.reasons),
              file=sys.stderr)
        return 1
    return 0


def _compact_cli(args) -> int:
    params = IndexParams.load(args.params)
    vdir = compact(args.index_root, params)
    try:
        verdict = require_canary(args.index_root, vdir.name, args.world, params.canary)
    except CanaryFailed as err:
        print(f"loupe compact: {err}", file=sys.stderr)
        return 1
    out = {"index_version": vdir.name, "canary": asdict(verdict)}
    if not args.no_cutover:
        out["cutover"] = pointer.cutover(args.index_root, vdir.name)
        out["delta_rows_pruned"] = prune_delta(args.index_root)
    return _print(out)
