"""Embed stage: re-embed the whole catalog with one model version, resumably.

A new embedding model makes every stored vector meaningless, so a model version gets its own
embeddings directory and every row carries the model version. The catalog is split into
partitions by a stable hash of the item id (the Airflow DAG maps one task per partition);
each partition writes one parquet part file per batch (temp file, contract check, rename)
and then moves its progress checkpoint. A killed run resumes at the checkpoint: part files
past it are orphans of the killed batch and are replaced, so nothing is embedded twice and
nothing is lost.

    <out_dir>/
      run.json                  model version, treatment, partition count, catalog fingerprint
      part-0003/
        progress.json           items_total, items_done, done, partition fingerprint
        rows-0000000.parquet    EMBEDDINGS schema rows [0, batch) of the partition
        rows-0000064.parquet    ...

`embed_fn(paths, boxes) -> (n, 256) float32 unit vectors` (paths relative to the world root)
is supplied by the caller. Every path that turns catalog photos into a model version's
vectors (the rollout's re-embed, `loupe serve`'s index build, streaming ingest) uses
`catalog_treatment`: the query path's detect -> pick a box (models.detector.PickPolicy) ->
crop -> embed with the exported embedder and detector, so both sides of a search describe
objects, not scenes, and one model version has one vector set. The detector version and pick
policy are recorded in run.json beside the model version (a resumed run with another
treatment is refused). `embed_fn_from_model` / `embed_fn_from_export` embed whole photos or
caller-given boxes (rater queries); `attribute_embed_fn` is the model-free stand-in for
worlds without images (benchmarks) and tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_contracts import schemas
from data_contracts.constants import UNIT_NORM_TOL
from data_contracts.durable import write_atomic, write_json_atomic
from pipelines.config import load_section
from serving.shards.layout import stable_bucket

if TYPE_CHECKING:  # torch-free at import: index, ingest and the CLI read this module
    from models.detector import PickPolicy

log = logging.getLogger("loupe.embed")

EmbedFn = Callable[[Sequence[str], np.ndarray | None], np.ndarray]
RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
QUARANTINE_DIR = "_quarantine"


@dataclass(frozen=True)
class EmbedParams:
    n_partitions: int = 8
    batch_size: int = 64  # images per model call
    # rows per parquet part file + checkpoint: the GE contract check of a part costs ~0.1 s
    # whatever its size, so a part spans many model batches (a kill redoes at most one part)
    part_rows: int = 2048
    validate: bool = True  # GE embeddings contract on every part file before it lands

    def __post_init__(self) -> None:
        if min(self.n_partitions, self.batch_size, self.part_rows) < 1:
            raise ValueError(f"n_partitions, batch_size and part_rows must be >= 1: {self}")

    @classmethod
    def load(cls, params_path: Path | None = None) -> EmbedParams:
        return cls(**load_section(params_path, "embed"))


def partition_of(item_id: str, n_partitions: int) -> int:
    """Stable partition of an item (independent of the shard assignment)."""
    return stable_bucket(item_id, n_partitions, "partition")


def part_dir(out_dir: Path, partition: int) -> Path:
    return Path(out_dir) / f"part-{partition:04d}"


def _fingerprint(items: pd.DataFrame) -> str:
    text = "\n".join(items["item_id"] + "\t" + items["image_path"])
    return hashlib.sha256(text.encode()).hexdigest()


def read_catalog(world_root: Path) -> pd.DataFrame:
    """item_id, product_id, image_path of every catalog item, sorted by item id."""
    path = Path(world_root) / "tables" / "catalog.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"catalog not found: {path}")
    cat = pq.read_table(path, columns=["item_id", "product_id", "image_path"]).to_pandas()
    if cat["item_id"].duplicated().any():
        raise ValueError(f"{path}: duplicate item ids, e.g. "
                         f"{cat.loc[cat['item_id'].duplicated(), 'item_id'].iloc[0]}")
    return cat.sort_values("item_id").reset_index(drop=True)


def _init_run(out_dir: Path, model_version: str, treatment: dict | None, n_partitions: int,
              catalog: pd.DataFrame) -> None:
    """Create run.json exclusively (partition tasks race for it) or check it matches."""
    want = {"model_version": model_version, "treatment": treatment,
            "n_partitions": n_partitions, "catalog_items": len(catalog),
            "catalog_fingerprint": _fingerprint(catalog)}
    path = Path(out_dir) / RUN_FILE
    if not path.exists():
        tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
        try:
            os.link(tmp, path)  # fails if another task created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    have = json.loads(path.read_text())
    for key in ("model_version", "treatment", "n_partitions"):
        if have.get(key) != want[key]:
            raise ValueError(f"{out_dir} holds an embedding run with {key}={have.get(key)!r}, "
                             f"not {want[key]!r}: use a new directory per model version")
    if have["catalog_fingerprint"] != want["catalog_fingerprint"]:
        raise ValueError(f"{out_dir}: the catalog changed since this embedding run started "
                         f"({have['catalog_items']} -> {want['catalog_items']} items); "
                         "re-embed into a new directory")


def require_unit_vectors(vectors: np.ndarray, n: int, where: str) -> np.ndarray:
    """(n, 256) finite unit-length float32, or a ValueError naming the first bad row."""
    vectors = np.asarray(vectors)
    if vectors.shape != (n, schemas.EMBEDDING_DIM):
        raise ValueError(f"{where}: embed_fn returned shape {vectors.shape}, expected "
                         f"({n}, {schemas.EMBEDDING_DIM})")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > UNIT_NORM_TOL))
    if len(bad):
        raise ValueError(f"{where}: {len(bad)} vectors are not finite unit vectors (row "
                         f"{bad[0]} has norm {norms[bad[0]]:.4g}); the embedder must "
                         "L2-normalise")
    return vectors


def embeddings_table(item_ids: Sequence[str], model_version: str, vectors: np.ndarray
                     ) -> pa.Table:
    """Rows in the EMBEDDINGS schema."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()),
                                               schemas.EMBEDDING_DIM)
    return pa.Table.from_arrays(
        [pa.array(list(item_ids), pa.string()),
         pa.array([model_version] * len(item_ids), pa.string()), column],
        schema=schemas.EMBEDDINGS)


def _write_part(path: Path, table: pa.Table, validate: bool, quarantine: Path) -> None:
    def write(tmp: Path) -> None:
        pq.write_table(table, tmp)
        if validate:
            from data_contracts.validation import validate_table

            validate_table("embeddings", tmp, quarantine_dir=quarantine, docs_dir=None)

    write_atomic(path, write)


def _embed_partition(items: pd.DataFrame, partition: int, model_version: str,
                     embed_fn: EmbedFn, out_dir: Path, part_rows: int, validate: bool,
                     show_progress: bool) -> int:
    """Embed one partition from its checkpoint on; returns how many items it embedded."""
    pdir = part_dir(out_dir, partition)
    pdir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(items)
    progress_path = pdir / PROGRESS_FILE
    done = 0
    if progress_path.exists():
        progress = json.loads(progress_path.read_text())
        if progress["fingerprint"] != fingerprint:
            raise ValueError(f"{pdir}: partition items changed since its checkpoint")
        done = int(progress["items_done"])
    for orphan in pdir.glob("rows-*.parquet"):  # written by a killed batch, never checkpointed
        if int(orphan.stem.split("-")[1]) >= done:
            orphan.unlink()
    for stale in pdir.glob(".rows-*.tmp"):
        stale.unlink()
    total = len(items)
    start_done = done
    with tqdm(total=total, initial=done, desc=f"embed part {partition}", unit="item",
              disable=not show_progress, file=sys.stderr, leave=False) as bar:
        while done < total:
            batch = items.iloc[done: done + part_rows]
            vectors = require_unit_vectors(embed_fn(batch["image_path"].tolist(), None),
                                           len(batch), f"partition {partition} rows {done}..")
            table = embeddings_table(batch["item_id"].tolist(), model_version, vectors)
            _write_part(pdir / f"rows-{done:07d}.parquet", table, validate,
                        Path(out_dir) / QUARANTINE_DIR)
            done += len(batch)
            write_json_atomic(progress_path, {
                "partition": partition, "items_total": total, "items_done": done,
                "done": done == total, "fingerprint": fingerprint})
            bar.update(len(batch))
    if total == 0:
        write_json_atomic(progress_path, {"partition": partition, "items_total": 0,
                                          "items_done": 0, "done": True,
                                          "fingerprint": fingerprint})
    return done - start_done


def reembed(world_root: Path, model_version: str, embed_fn: EmbedFn, out_dir: Path,
            partitions: Sequence[int] | None = None, part_rows: int = 2048, *,
            n_partitions: int = 8, validate: bool = True, show_progress: bool = True) -> dict:
    """Embed the catalog partitions `partitions` (all when None) into `out_dir`, `part_rows`
    per part file and checkpoint, resuming each from its checkpoint (`embed_fn` batches the
    model calls itself). Returns items embedded per partition and the elapsed time.
    A `CatalogTreatment` embed_fn's detector version and pick policy go into run.json."""
    if not model_version:
        raise ValueError("model_version is required: vectors always carry their model")
    if n_partitions < 1 or part_rows < 1:
        raise ValueError(f"n_partitions ({n_partitions}) and part_rows ({part_rows}) "
                         "must be >= 1")
    parts = list(range(n_partitions)) if partitions is None else [int(p) for p in partitions]
    bad = [p for p in parts if not 0 <= p < n_partitions]
    if bad:
        raise ValueError(f"partitions {bad} outside [0, {n_partitions})")
    catalog = read_catalog(world_root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    treatment = embed_fn.metadata if isinstance(embed_fn, CatalogTreatment) else None
    _init_run(out_dir, model_version, treatment, n_partitions, catalog)
    bucket = np.array([partition_of(i, n_partitions) for i in catalog["item_id"]])
    t0 = time.perf_counter()
    embedded = {}
    for p in parts:
        items = catalog[bucket == p].reset_index(drop=True)
        embedded[p] = _embed_partition(items, p, model_version, embed_fn, out_dir,
                                       part_rows, validate, show_progress)
        log.info("embed %s: partition %d/%d: %d new vectors, %d total", model_version, p,
                 n_partitions, embedded[p], len(items))
    return {"model_version": model_version, "treatment": treatment, "out_dir": str(out_dir),
            "embedded": embedded, "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Embeddings:
    item_ids: np.ndarray  # str, sorted
    vectors: np.ndarray  # (n, 256) float32 unit
    model_version: str
    treatment: dict | None = None  # CatalogTreatment.metadata of the run, None for attributes


def embedding_progress(embeddings_dir: Path) -> dict:
    """run.json plus each partition's progress (what `loupe embed --status` prints)."""
    run_path = Path(embeddings_dir) / RUN_FILE
    if not run_path.is_file():
        raise FileNotFoundError(f"{embeddings_dir} is not an embedding run (no {RUN_FILE})")
    run = json.loads(run_path.read_text())
    parts = {}
    for p in range(run["n_partitions"]):
        path = part_dir(embeddings_dir, p) / PROGRESS_FILE
        parts[p] = json.loads(path.read_text()) if path.is_file() else None
    return {**run, "partitions": parts,
            "complete": all(v is not None and v["done"] for v in parts.values())}


def load_embeddings(embeddings_dir: Path) -> Embeddings:
    """All vectors of a finished embedding run; refuses an unfinished run, duplicate items
    and any row whose model version differs from the run's."""
    status = embedding_progress(embeddings_dir)
    missing = [p for p, v in status["partitions"].items() if v is None or not v["done"]]
    if missing:
        raise ValueError(f"{embeddings_dir}: embedding run incomplete, partitions {missing} "
                         "not done; resume it with the same command")
    tables = [pq.read_table(f) for p in status["partitions"]
              for f in sorted(part_dir(embeddings_dir, p).glob("rows-*.parquet"))]
    table = pa.concat_tables(tables) if tables else schemas.EMBEDDINGS.empty_table()
    versions = set(table.column("model_version").unique().to_pylist())
    if versions - {status["model_version"]}:
        raise ValueError(f"{embeddings_dir}: mixed model versions {sorted(versions)} in a run "
                         f"of {status['model_version']!r}; refusing to mix them")
    ids = np.array(table.column("item_id").to_pylist(), dtype=str)
    if len(ids) != status["catalog_items"]:
        raise ValueError(f"{embeddings_dir}: {len(ids)} vectors for "
                         f"{status['catalog_items']} catalog items")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{embeddings_dir}: duplicate item ids across part files")
    vectors = (table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
               .reshape(len(ids), schemas.EMBEDDING_DIM).astype(np.float32, copy=False))
    order = np.argsort(ids, kind="stable")
    return Embeddings(ids[order], np.ascontiguousarray(vectors[order]),
                      status["model_version"], status.get("treatment"))


# --------------------------------------------------------------------------- embed_fns
def _unit(seed: int, key: str, dim: int) -> np.ndarray:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    v = np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(dim)
    return v / np.linalg.norm(v)


def attribute_vectors(catalog: pd.DataFrame, seed: int = 0, dim: int = schemas.EMBEDDING_DIM,
                      weights: tuple[float, float, float, float] = (0.6, 1.0, 0.7, 0.45)
                      ) -> np.ndarray:
    """Deterministic clustered unit vectors from public catalog attributes, no model.

    vector ∝ w_c·u(category) + w_s·u(style) + w_p·u(product) + w_i·u(listing), with u(key) a
    random unit direction seeded by (seed, key) and style = (category, shape, palette,
    pattern, material). Listings of one product are near neighbours, the same style comes
    next: the structure a good embedder gives, for benchmarks on worlds without images and
    for tests. A different `seed` is a different (incompatible) "model".
    """
    need = {"item_id", "product_id", "category", "shape_family", "palette", "pattern",
            "material"}
    if need - set(catalog.columns):
        raise ValueError(f"catalog lacks columns {sorted(need - set(catalog.columns))}")
    wc, ws, wp, wi = weights
    cache: dict[str, np.ndarray] = {}

    def unit(key: str) -> np.ndarray:
        if key not in cache:
            cache[key] = _unit(seed, key, dim)
        return cache[key]

    out = np.empty((len(catalog), dim), np.float32)
    for row, r in enumerate(catalog.itertuples(index=False)):
        style = f"style:{r.category}|{r.shape_family}|{r.palette}|{r.pattern}|{r.material}"
        v = (wc * unit(f"cat:{r.category}") + ws * unit(style)
             + wp * unit(f"product:{r.product_id}") + wi * _unit(seed, f"item:{r.item_id}", dim))
        out[row] = v / np.linalg.norm(v)
    return out


def attribute_embed_fn(world_root: Path, seed: int = 0) -> EmbedFn:
    """embed_fn over catalog image paths backed by `attribute_vectors` (see there)."""
    path = Path(world_root) / "tables" / "catalog.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"catalog not found: {path}")
    catalog = pd.read_parquet(path)
    vectors = attribute_vectors(catalog, seed)
    row_of = {p: i for i, p in enumerate(catalog["image_path"])}

    def embed(paths: Sequence[str], boxes: np.ndarray | None) -> np.ndarray:
        unknown = [p for p in paths if p not in row_of]
        if unknown:
            raise ValueError(f"attribute vectors exist only for catalog photos, not {unknown[0]}")
        return vectors[[row_of[p] for p in paths]]

    return embed


def attribute_model_version(seed: int) -> str:
    return f"attributes/{seed}"


def embed_fn_from_model(model, root: Path, batch_size: int = 64) -> EmbedFn:
    """embed_fn over an embedder (torch module or ExportedEmbedder): whole photos, or the
    caller's boxes, through the shared preprocessing of `models.embedder.embed_images`."""
    from models.embedder import embed_images

    root = Path(root)

    def embed(paths: Sequence[str], boxes: np.ndarray | None) -> np.ndarray:
        return embed_images(model, root, list(paths), boxes, batch_size=batch_size)

    return embed


def embed_fn_from_export(export_dir: Path, root: Path, batch_size: int = 64) -> EmbedFn:
    """embed_fn over an export directory (models.export: embedder.onnx run by onnxruntime):
    the artifact that is registered and served is the one measured."""
    from models.export import ExportedEmbedder

    return embed_fn_from_model(ExportedEmbedder(Path(export_dir)), root, batch_size)


@dataclass(frozen=True)
class CatalogTreatment:
    """The catalog treatment: detect -> pick a box (`policy`) -> crop -> embed.

    It is the query path's treatment (the search page offers the salient box of the user's
    photo), so a catalog vector and a query vector describe the same kind of thing: one
    object. `detector` has `detect(images)` and `categories` (either kind
    `models.detector.load_detector` reads); `embedder` is what
    `models.embedder.embed_images` runs. Boxes given by the caller (a rater query's box) skip
    detection. `categories` maps image path -> listing category for the policy's "category"
    rule.
    """

    embedder: Any
    detector: Any
    root: Path
    detector_version: str
    policy: PickPolicy
    categories: Mapping[str, str] = field(default_factory=dict)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.detector_version:
            raise ValueError("detector_version is required: catalog vectors record the "
                             "detector that picked their boxes")

    @property
    def metadata(self) -> dict:
        """What run.json records: another detector or policy makes other vectors."""
        return {"detector_version": self.detector_version, "pick_policy": str(self.policy)}

    def boxes(self, paths: Sequence[str]) -> np.ndarray:
        """The box the policy picks in each photo, (n, 4) normalised. Photos are decoded and
        detected `batch_size` at a time: evaluation hands over the whole catalog at once,
        and 20k decoded photos plus their detector inputs would not fit in memory."""
        from PIL import Image

        picked = []
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            images = []
            for path in chunk:
                with Image.open(Path(self.root) / path) as im:
                    images.append(im.convert("RGB"))
            picked += [self.policy.pick(det, self.detector.categories, self.categories.get(path))
                       for path, det in zip(chunk, self.detector.detect(images), strict=True)]
        return np.array(picked, dtype=np.float64).reshape(-1, 4)

    def __call__(self, paths: Sequence[str], boxes: np.ndarray | None = None) -> np.ndarray:
        from models.embedder import embed_images

        if boxes is None:
            boxes = self.boxes(paths)
        return embed_images(self.embedder, Path(self.root), list(paths), boxes,
                            batch_size=self.batch_size)


def catalog_treatment(embedder_dir: Path, detector_dir: Path, root: Path,
                      detector_version: str, policy: PickPolicy | None = None,
                      batch_size: int = 64, threads: int = 2) -> CatalogTreatment:
    """The catalog treatment over a model version's exported embedder and detector (the files
    Triton serves), the one way catalog photos become that version's vectors. No `policy`:
    the query path's rule (`PickPolicy()`: the salient box, else the whole photo)."""
    from models.detector import PickPolicy, load_detector
    from models.export import ExportedEmbedder

    policy = PickPolicy() if policy is None else policy

    categories: dict[str, str] = {}
    if "category" in policy.rules:
        catalog = pq.read_table(Path(root) / "tables" / "catalog.parquet",
                                columns=["image_path", "category"]).to_pandas()
        categories = dict(zip(catalog["image_path"], catalog["category"], strict=True))
    return CatalogTreatment(ExportedEmbedder(Path(embedder_dir), threads=threads),
                            load_detector(Path(detector_dir), threads=threads), Path(root),
                            detector_version, policy, categories, batch_size)


# --------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    p = sub.add_parser("embed", help="re-embed the catalog with one model version (resumable)")
    p.add_argument("--world", type=Path, required=True, help="world / data root")
    p.add_argument("--out", type=Path, required=True, help="embeddings dir for this model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", default=None,
                       help="a registered embedder: champion, challenger or loupe-embedder/N "
                            "(the catalog treatment, as the rollout embeds)")
    which.add_argument("--attribute-vectors", type=int, default=None, metavar="SEED",
                       help="no model: clustered vectors from catalog attributes (benchmarks)")
    p.add_argument("--detector", default=None,
                   help="registered detector picking the boxes (default: the newest)")
    p.add_argument("--pick-policy", default="salient>whole",
                   help="which box of a catalog photo is embedded, e.g. category>salient>whole")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--partition", type=int, action="append", default=None,
                   help="embed only this partition (repeatable; default: all)")
    p.add_argument("--params", type=Path, default=None)
    p.add_argument("--status", action="store_true", help="print progress and exit")
    p.set_defaults(func=_cli)


def _registered_catalog_embed_fn(args) -> tuple[str, EmbedFn]:
    """The rollout's catalog treatment for a registered embedder, from the command line."""
    from pipelines.registry import resolve_detector, resolve_model
    from pipelines.rollout import catalog_embed_fn
    from pipelines.run_config import resolve_config

    cfg = resolve_config({"world_root": str(args.world),
                          "mlflow_tracking_uri": args.tracking_uri})
    model_version = resolve_model(args.model, cfg.mlflow_tracking_uri)
    detector = resolve_detector(args.detector, cfg.mlflow_tracking_uri)
    return model_version, catalog_embed_fn(cfg, model_version, {
        "detector_version": detector, "pick_policy": args.pick_policy})


def _cli(args) -> int:
    if args.status:
        print(json.dumps(embedding_progress(args.out), indent=1))
        return 0
    params = EmbedParams.load(args.params)
    if args.model is not None:
        model_version, embed_fn = _registered_catalog_embed_fn(args)
    else:
        model_version = attribute_model_version(args.attribute_vectors)
        embed_fn = attribute_embed_fn(args.world, args.attribute_vectors)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = reembed(args.world, model_version, embed_fn, args.out, args.partition,
                      params.part_rows, n_partitions=params.n_partitions,
                      validate=params.validate)
    print(json.dumps(summary, indent=1))
    return 0
