"""What a shard server process holds: one shard of the live index version, merged at query time
with the streaming delta, hot-swapped when the `current` pointer moves.

Concurrency design (FAISS indexes are not safe for add + search at once): nothing a query
touches is ever mutated. The base FAISS index is read-only after load; the delta (new and
updated items, searched exactly) and the tombstone mask are immutable snapshots that the one
writer (the refresh loop) rebuilds and publishes by a single reference assignment
(swap-on-write). A query reads `self._live` once and answers entirely from that object, so it
never fails during a swap and never mixes two versions; every answer names the index version
and model version it came from.

Version guard: the store is told the embedder's model version. It refuses to load an index
built with another model, refuses queries whose vector comes from a model it does not hold,
and keeps the previous version warm for `keep_previous_s`, so a rollback (or a query still
embedded by the old model during a model switch) is answered without a reload.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from serving.shards import layout, pointer
from serving.shards.delta import DELETE, UPSERT, DeltaLog, DeltaRow
from serving.shards.kinds import ShardIndex

log = logging.getLogger("loupe.shards")

class VersionMismatch(RuntimeError):
    """An index or a query vector comes from a model other than the one being served."""


class NotReady(RuntimeError):
    """No index version is loaded yet."""


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float  # cosine similarity (vectors are unit length)


@dataclass(frozen=True)
class SearchResult:
    """Top-k of one query, best first, as two columns: building a Hit per candidate costs
    more than the ANN search at k=150, so the binary shard route never does."""

    item_ids: list[str]
    scores: list[float]
    index_version: str
    model_version: str
    shard_id: int

    @property
    def hits(self) -> list[Hit]:
        return [Hit(item, score) for item, score in zip(self.item_ids, self.scores,
                                                        strict=True)]


# --------------------------------------------------------------------------- delta
@dataclass(frozen=True)
class _DeltaView:
    """Immutable snapshot a query reads: delta rows [0, count), their liveness, base mask."""

    matrix: np.ndarray
    ids: np.ndarray
    alive: np.ndarray
    selector: faiss.IDSelector | None
    bitmap: np.ndarray | None  # owns the selector's memory
    n_masked: int
    n_live: int


class _DeltaState:
    """Writer-side delta of one loaded version; publishes `_DeltaView` snapshots.

    Rows are appended to a growable buffer; a query's view covers only rows published before
    it, and growing or compacting allocates new arrays, so the writer never touches what a
    query reads.
    """

    def __init__(self, base: ShardIndex, n_shards: int, model_version: str, dim: int):
        self.base, self.n_shards, self.model_version = base, n_shards, model_version
        self.buffer = np.zeros((16, dim), np.float32)
        self.ids = np.empty(16, dtype=object)
        self.alive = np.zeros(16, bool)
        self.count = 0
        self.row_of: dict[str, int] = {}
        self.base_masked = np.zeros(len(base.ids), bool)
        self.skipped_other_model = 0

    def apply(self, rows: list[DeltaRow]) -> None:
        for r in rows:
            if layout.shard_of(r.item_id, self.n_shards) != self.base.shard_id:
                continue
            if r.op == UPSERT and r.model_version != self.model_version:
                self.skipped_other_model += 1  # never merge another model's vector
                continue
            label = self.base.label_of.get(r.item_id)
            if label is not None:  # an update or a removal hides the base copy
                self.base_masked[label] = True
            old = self.row_of.pop(r.item_id, None)
            if old is not None:
                self.alive[old] = False
            if r.op == UPSERT:
                self._append(r.item_id, r.vector)
            elif r.op != DELETE:
                raise ValueError(f"unknown delta op {r.op!r}")

    def _append(self, item_id: str, vector: np.ndarray) -> None:
        if self.count == len(self.buffer):  # grow into fresh arrays: published views keep theirs
            cap = 2 * len(self.buffer)
            self.buffer = np.concatenate([self.buffer, np.zeros_like(self.buffer)])[:cap]
            self.ids = np.concatenate([self.ids, np.empty(cap - len(self.ids), object)])
            self.alive = np.concatenate([self.alive, np.zeros(cap - len(self.alive), bool)])
        self.buffer[self.count] = vector
        self.ids[self.count] = item_id
        self.alive[self.count] = True
        self.row_of[item_id] = self.count
        self.count += 1

    def _compact(self) -> None:
        """Drop dead rows (superseded or deleted delta items) into fresh arrays."""
        keep = np.flatnonzero(self.alive[: self.count])
        cap = max(16, 2 * len(keep))
        buffer = np.zeros((cap, self.buffer.shape[1]), np.float32)
        buffer[: len(keep)] = self.buffer[keep]
        ids = np.empty(cap, dtype=object)
        ids[: len(keep)] = self.ids[keep]
        alive = np.zeros(cap, bool)
        alive[: len(keep)] = True
        self.buffer, self.ids, self.alive, self.count = buffer, ids, alive, len(keep)
        self.row_of = {item: row for row, item in enumerate(ids[: len(keep)])}

    def publish(self) -> _DeltaView:
        dead = self.count - len(self.row_of)
        if dead > max(64, self.count // 4):  # queries over-fetch dead rows: keep them few
            self._compact()
        n_masked = int(self.base_masked.sum())
        selector = bitmap = None
        if n_masked:
            bitmap = np.packbits(~self.base_masked, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(self.base_masked), faiss.swig_ptr(bitmap))
        alive = self.alive[: self.count].copy()
        return _DeltaView(self.buffer[: self.count], self.ids[: self.count], alive, selector,
                          bitmap, n_masked, int(alive.sum()))


# --------------------------------------------------------------------------- served version
class _Served:
    """One loaded index version of this shard (base + its delta), as queries see it."""

    def __init__(self, version: str, manifest: dict, base: ShardIndex):
        self.version = version
        self.manifest = manifest
        self.model_version: str = manifest["model_version"]
        self.base = base
        self.delta_seq: int = int(manifest.get("delta_seq", 0))
        self.state = _DeltaState(base, manifest["n_shards"], self.model_version,
                                 manifest["dim"])
        self.view = self.state.publish()

    def apply(self, rows: list[DeltaRow]) -> None:
        fresh = [r for r in rows if r.seq > self.delta_seq]
        if fresh:
            self.state.apply(fresh)
            self.view = self.state.publish()  # one reference assignment: the swap

    def search(self, queries: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        """(item ids, scores) per query, best first; numpy end to end (no per-hit objects)."""
        view = self.view  # read once: the whole answer comes from one snapshot
        base_scores, labels = self.base.search(queries, k, view.selector)
        out = []
        delta_scores = delta_rows = None
        if view.n_live:  # exact search over the small delta; dead rows are over-fetched
            kk = min(len(view.matrix), k + len(view.matrix) - view.n_live)
            delta_scores, delta_rows = faiss.knn(queries, view.matrix, kk,
                                                 metric=faiss.METRIC_INNER_PRODUCT)
        for q in range(len(queries)):
            found = labels[q] >= 0
            ids, scores = self.base.ids[labels[q][found]], base_scores[q][found]
            if delta_scores is not None:
                rows, delta = delta_rows[q], delta_scores[q]
                live = np.flatnonzero((rows >= 0) & view.alive[np.maximum(rows, 0)])[:k]
                ids = np.concatenate([ids.astype(object), view.ids[rows[live]]])
                scores = np.concatenate([scores, delta[live]])
            best = np.argsort(-scores, kind="stable")[:k]
            out.append((ids[best].tolist(), scores[best].astype(np.float64).tolist()))
        return out


# --------------------------------------------------------------------------- store
class ShardStore:
    """Serves shard `shard_id` of whatever version `<index_root>/current` names.

    Call `refresh()` (or `start()` a background loop) to follow the pointer and the delta log.
    """

    def __init__(self, index_root: Path, shard_id: int, expected_model_version: str, *,
                 keep_previous_s: float = 300.0, poll_s: float = 0.1,
                 verify_checksums: bool = True):
        if not expected_model_version:
            raise ValueError("expected_model_version is required (the embedder's version)")
        self.index_root = Path(index_root)
        self.shard_id = shard_id
        self.expected_model_version = expected_model_version
        self.keep_previous_s, self.poll_s = keep_previous_s, poll_s
        self.verify_checksums = verify_checksums
        self._live: _Served | None = None
        # version -> (served, expires at); replaced on every change, never mutated in place
        self._warm: dict[str, tuple[_Served, float]] = {}
        self._refused: dict[str, str] = {}  # pointer target -> why it was not loaded
        self._write_lock = threading.RLock()
        self._delta: DeltaLog | None = None
        self._delta_seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.swaps = 0

    # ---------------------------------------------------------------- queries
    def search(self, vector: np.ndarray, k: int, model_version: str | None = None
               ) -> SearchResult:
        return self.search_batch(np.asarray(vector, np.float32)[None, :], k, model_version)[0]

    def search_batch(self, vectors: np.ndarray, k: int, model_version: str | None = None
                     ) -> list[SearchResult]:
        """Top-k per query vector, tombstones applied, from one version whose model matches
        `model_version` (default: the expected embedder's)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        served = self._pick(model_version or self.expected_model_version)
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != served.base.index.d:
            raise ValueError(f"query vectors must be (n, {served.base.index.d}), "
                             f"got {queries.shape}")
        return [SearchResult(ids, scores, served.version, served.model_version, self.shard_id)
                for ids, scores in served.search(queries, k)]

    def _pick(self, model_version: str) -> _Served:
        live = self._live
        if live is None:
            raise NotReady(f"shard {self.shard_id}: no index version loaded yet"
                           + (f" ({self.last_error})" if self.last_error else ""))
        if live.model_version == model_version:
            return live
        for served, _ in self._warm.values():  # the dict is replaced, never mutated
            if served.model_version == model_version:
                return served
        raise VersionMismatch(f"shard {self.shard_id}: query vector is from model "
                              f"{model_version!r} but the loaded index versions hold "
                              f"{sorted({live.model_version, *self._warm_models()})}")

    def _warm_models(self) -> set[str]:
        return {s.model_version for s, _ in self._warm.values()}

    # ---------------------------------------------------------------- lifecycle
    def load(self) -> None:
        """First load of the live version; raises (VersionMismatch, FileNotFoundError) if it
        cannot be served, so a misconfigured server fails at start, not per query."""
        with self._write_lock:
            target = pointer.read(self.index_root)
            if target is None:
                raise FileNotFoundError(f"{self.index_root}/{layout.CURRENT} is not set: "
                                        "no index version has been cut over yet")
            if self._live is None or self._live.version != target:  # idempotent
                self._swap_to(target, strict=True)
            self._tail_delta()

    def refresh(self) -> None:
        """One poll: follow the pointer (hot-swap), apply new delta rows, expire warm ones."""
        with self._write_lock:
            target = pointer.read(self.index_root)
            live = self._live
            if target is not None and (live is None or target != live.version) \
                    and target not in self._refused:
                self._swap_to(target, strict=False)
            self._tail_delta()
            now = time.monotonic()
            expired = [v for v, (_, expires) in self._warm.items() if now >= expires]
            if expired:
                self._warm = {v: w for v, w in self._warm.items() if v not in expired}
                log.info("shard %d: dropped warm versions %s", self.shard_id, expired)

    def expect_model_version(self, model_version: str) -> None:
        """The embedder switched models: serve indexes of `model_version` from now on and
        retry a pointer target refused for the old one."""
        with self._write_lock:
            self.expected_model_version = model_version
            self._refused.clear()
        self.refresh()

    def _swap_to(self, version: str, strict: bool) -> None:
        try:
            served = self._warm[version][0] if version in self._warm else \
                self._load_version(version)
            if served.model_version != self.expected_model_version:
                raise VersionMismatch(
                    f"shard {self.shard_id}: index version {version} was built with model "
                    f"{served.model_version!r}, the embedder serves "
                    f"{self.expected_model_version!r}: refusing to serve it")
        except (VersionMismatch, ValueError, FileNotFoundError, RuntimeError) as err:
            self.last_error = str(err)
            if strict:
                raise
            self._refused[version] = str(err)
            log.error("%s", err)
            return
        old, self._live = self._live, served  # the swap: one reference assignment
        self.swaps += 1
        warm = {v: w for v, w in self._warm.items() if v != version}
        if old is not None:
            warm[old.version] = (old, time.monotonic() + self.keep_previous_s)
        self._warm = warm  # replaced, never mutated: queries iterate it without a lock
        self.last_error = None
        log.info("shard %d: serving %s (model %s)", self.shard_id, version,
                 served.model_version)

    def _load_version(self, version: str) -> _Served:
        vdir = layout.version_dir(self.index_root, version)
        manifest = layout.read_manifest(vdir)
        base = ShardIndex.load(vdir, self.shard_id, manifest, self.verify_checksums)
        served = _Served(version, manifest, base)
        delta = self._delta_log()
        if delta is not None and self._delta_seq > served.delta_seq:  # catch up to the others
            served.apply(delta.rows_after(served.delta_seq, upto=self._delta_seq))
        return served

    def _delta_log(self) -> DeltaLog | None:
        if self._delta is None and (self.index_root / layout.DELTA_DB).exists():
            self._delta = DeltaLog(self.index_root / layout.DELTA_DB, create=False)
        return self._delta

    def _tail_delta(self) -> None:
        delta = self._delta_log()
        if delta is None:
            return
        rows = delta.rows_after(self._delta_seq)
        if not rows:
            return
        for served in [s for s in [self._live] if s is not None] + \
                [s for s, _ in self._warm.values()]:
            served.apply(rows)
        self._delta_seq = rows[-1].seq

    # ---------------------------------------------------------------- background loop
    def start(self) -> ShardStore:
        """Load the live version (unless loaded), then follow pointer and delta every
        `poll_s` seconds."""
        self.load()
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"shard-{self.shard_id}-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - keep serving the loaded version
                self.last_error = f"refresh failed: {err}"
                log.exception("shard %d: refresh failed", self.shard_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._write_lock:
            if self._delta is not None:
                self._delta.close()
                self._delta = None

    def __enter__(self) -> ShardStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- introspection
    def status(self) -> dict:
        live = self._live
        view = live.view if live else None
        return {
            "shard_id": self.shard_id,
            "ready": live is not None,
            "index_version": live.version if live else None,
            "model_version": live.model_version if live else None,
            "expected_model_version": self.expected_model_version,
            "base_items": len(live.base.ids) if live else 0,
            "delta_items": view.n_live if view else 0,
            "masked_base_items": view.n_masked if view else 0,
            "delta_seq": self._delta_seq,
            "warm_versions": sorted(self._warm),
            "refused": dict(self._refused),
            "swaps": self.swaps,
            "last_error": self.last_error,
        }
