"""Index kinds: how a shard of each kind is built and searched.

`hnsw_fp16`: FAISS HNSW over fp16-quantised vectors (`IndexHNSWSQ`, QT_fp16). `ivfpq`: IVF-PQ
whose top candidates are re-scored exactly against the raw vectors (`vectors.npy`,
memory-mapped). Labels are rows of the shard's `ids.npy`; items go to shards by a stable hash
of the item id (serving/shards/layout.py), and a version holds vectors of one model version.
The index stage (pipelines/index.py) builds versions with these; the shard stores and the
canary search them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from data_contracts.durable import atomic_dir
from data_contracts.schemas import EMBEDDING_DIM
from serving.shards import layout

log = logging.getLogger("loupe.index")

HNSW_FP16, IVFPQ = "hnsw_fp16", "ivfpq"
KINDS = (HNSW_FP16, IVFPQ)


@dataclass(frozen=True)
class ShardParams:
    """What shapes the shards of an index version (recorded in every shard's meta)."""

    kind: str = HNSW_FP16
    n_shards: int = 2
    hnsw_m: int = 24  # as params.yaml (its comment says why)
    ef_construction: int = 100
    ef_search: int = 32
    ivf_nlist: int = 256
    pq_m: int = 32
    pq_nbits: int = 8
    nprobe: int = 16
    rescore: int = 100  # IVF-PQ candidates re-scored exactly
    build_threads: int = 0  # 0: FAISS default (all cores)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {self.n_shards}")
        if EMBEDDING_DIM % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide the dimension {EMBEDDING_DIM}")

    def build_params(self) -> dict:
        """The parameters that shape a shard of this kind (recorded in its manifest)."""
        if self.kind == HNSW_FP16:
            return {"m": self.hnsw_m, "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search}
        return {"nlist": self.ivf_nlist, "m": self.pq_m, "nbits": self.pq_nbits,
                "nprobe": self.nprobe, "rescore": self.rescore}


# --------------------------------------------------------------------------- build
def _faiss_index(kind: str, p: dict, vectors: np.ndarray) -> faiss.Index:
    d = vectors.shape[1]
    if kind == HNSW_FP16:
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, p["m"])
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
        index.train(vectors)  # fp16 needs no statistics; marks the quantiser trained
    else:
        need = max(p["nlist"], 2 ** p["nbits"]) * 4
        if len(vectors) < need:
            raise ValueError(f"IVF-PQ (nlist={p['nlist']}, nbits={p['nbits']}) needs >= {need} "
                             f"vectors per shard to train, this shard has {len(vectors)}; use "
                             "kind hnsw_fp16 or a smaller ivf_nlist")
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["nlist"], p["m"], p["nbits"])
        index.cp.seed = 0
        index.train(vectors)
        index.nprobe = p["nprobe"]
    index.add(vectors)
    return index


def build_shard_from_arrays(item_ids: np.ndarray, vectors: np.ndarray, model_version: str,
                            shard_id: int, params: ShardParams, version_dir: Path) -> dict:
    """Build shard `shard_id` of `version_dir` from the items that hash to it."""
    version_dir = Path(version_dir)
    if (version_dir / layout.MANIFEST).exists():
        raise ValueError(f"{version_dir} is finalised (has a manifest) and immutable; "
                         "build a new version instead")
    if not 0 <= shard_id < params.n_shards:
        raise ValueError(f"shard {shard_id} outside [0, {params.n_shards})")
    for other in version_dir.glob("shard-*/" + layout.SHARD_META):
        meta = json.loads(other.read_text())
        if meta["model_version"] != model_version:
            raise ValueError(f"{version_dir} already has shards of model "
                             f"{meta['model_version']!r}; refusing to add {model_version!r}")
    if params.n_shards == 1:  # every item: no mask and no copy of a (memory-mapped) array
        ids, vecs = np.asarray(item_ids, dtype=str), np.ascontiguousarray(vectors, np.float32)
    else:
        mine = np.array([layout.shard_of(i, params.n_shards) == shard_id for i in item_ids],
                        dtype=bool)
        ids = np.asarray(item_ids, dtype=str)[mine]
        vecs = np.ascontiguousarray(vectors[mine], dtype=np.float32)
    if params.build_threads:
        faiss.omp_set_num_threads(params.build_threads)
    t0 = time.perf_counter()
    index = _faiss_index(params.kind, params.build_params(), vecs)
    seconds = time.perf_counter() - t0
    meta = {"shard_id": shard_id, "n_shards": params.n_shards, "count": int(len(ids)),
            "model_version": model_version, "kind": params.kind,
            "params": params.build_params(), "dim": int(vectors.shape[1]),
            "build_seconds": round(seconds, 3)}
    version_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(layout.shard_dir(version_dir, shard_id)) as tmp:
        faiss.write_index(index, str(tmp / layout.INDEX_FILE))
        np.save(tmp / layout.IDS_FILE, ids, allow_pickle=False)
        np.save(tmp / layout.VECTORS_FILE, vecs, allow_pickle=False)
        (tmp / layout.SHARD_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    log.info("built shard %d of %s: %d vectors in %.2fs", shard_id, version_dir.name,
             len(ids), seconds)
    return meta


# --------------------------------------------------------------------------- search
class ShardIndex:
    """One built shard: a read-only FAISS index whose labels are rows of `ids`/`vectors`."""

    def __init__(self, meta: dict, index: faiss.Index, ids: np.ndarray, vectors: np.ndarray):
        self.meta, self.index, self.ids, self.vectors = meta, index, ids, vectors
        self.kind: str = meta["kind"]
        self.params: dict = meta["params"]
        self.shard_id: int = meta["shard_id"]
        self.label_of = {item: row for row, item in enumerate(ids.tolist())}

    @classmethod
    def load(cls, vdir: Path, shard_id: int, manifest: dict, verify: bool = True
             ) -> ShardIndex:
        """Load a shard of a finished version, checking every file against the manifest."""
        sdir = layout.shard_dir(vdir, shard_id)
        entry = next((s for s in manifest["shards"] if s["shard_id"] == shard_id), None)
        if entry is None:
            raise ValueError(f"{vdir}: manifest has no shard {shard_id} "
                             f"(n_shards={manifest['n_shards']})")
        if verify:
            for name, info in entry["files"].items():
                got = layout.sha256_file(sdir / name)
                if got != info["sha256"]:
                    raise ValueError(f"{sdir / name}: sha256 {got[:12]}... does not match the "
                                     f"manifest ({info['sha256'][:12]}...): corrupted shard")
        meta = json.loads((sdir / layout.SHARD_META).read_text())
        index = faiss.read_index(str(sdir / layout.INDEX_FILE))
        ids = np.load(sdir / layout.IDS_FILE, allow_pickle=False)
        vectors = np.load(sdir / layout.VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        if not (index.ntotal == len(ids) == len(vectors) == meta["count"]):
            raise ValueError(f"{sdir}: index holds {index.ntotal} vectors, ids {len(ids)}, "
                             f"vectors {len(vectors)}, shard.json {meta['count']}")
        return cls(meta, index, ids, vectors)

    def search(self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels), each (nq, k); label -1 where fewer than k items qualify."""
        if self.index.ntotal == 0:
            return (np.full((len(queries), k), -np.inf, np.float32),
                    np.full((len(queries), k), -1, np.int64))
        if self.kind == HNSW_FP16:
            params = faiss.SearchParametersHNSW(efSearch=max(k, self.params["ef_search"]))
            if selector is not None:
                params.sel = selector
            dist, labels = self.index.search(queries, k, params=params)
            return 1.0 - dist / 2.0, labels  # squared L2 of unit vectors -> cosine
        if self.kind == IVFPQ:
            params = faiss.SearchParametersIVF(nprobe=self.params["nprobe"])
            if selector is not None:
                params.sel = selector
            n_cand = max(k, self.params["rescore"])
            _, cand = self.index.search(queries, n_cand, params=params)
            return _rescore(self.vectors, queries, cand, k)
        raise ValueError(f"unknown shard index kind {self.kind!r}")


def _rescore(vectors: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each query with its PQ candidates (raw vectors), best k first."""
    safe = np.where(cand >= 0, cand, 0)
    exact = np.einsum("qcd,qd->qc", np.asarray(vectors[safe.ravel()]).reshape(
        *cand.shape, -1), queries)
    exact = np.where(cand >= 0, exact, -np.inf).astype(np.float32)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)


def load_version(index_root: Path, version: str, verify: bool = True
                 ) -> tuple[dict, list[ShardIndex]]:
    vdir = layout.version_dir(index_root, version)
    manifest = layout.read_manifest(vdir)
    return manifest, [ShardIndex.load(vdir, s, manifest, verify)
                      for s in range(manifest["n_shards"])]


def search_shards(shards: list[ShardIndex], queries: np.ndarray, k: int
                  ) -> list[list[tuple[str, float]]]:
    """Top-k over every shard of a version, merged by score (what the fan-out does)."""
    per_shard = [s.search(queries, k) for s in shards]
    out = []
    for q in range(len(queries)):
        cands = [(str(shard.ids[lab]), float(sc)) for shard, (scores, labels) in
                 zip(shards, per_shard, strict=True)
                 for sc, lab in zip(scores[q], labels[q], strict=True) if lab >= 0]
        out.append(sorted(cands, key=lambda c: -c[1])[:k])
    return out
