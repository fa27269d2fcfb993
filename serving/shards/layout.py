"""On-disk layout of an index root, shared by the builders (pipelines/index.py), the streaming
indexer (pipelines/ingest.py) and the shard stores that serve it.

    <index_root>/
      versions/<version>/            one index version; immutable once manifest.json exists
        shard-000/ index.faiss ids.npy vectors.npy shard.json
        ...
        manifest.json                written last: model version, shard files + sha256, counts
      verdicts/<version>.json        canary verdicts (kept outside the immutable version dir)
      current -> versions/<version>  the live version: a symlink replaced by atomic rename
      previous -> versions/<version> one step back, for rollback
      history.jsonl                  every cutover and rollback, appended
      pointer-move.json              only while a pointer move is in flight (or was killed)
      delta.sqlite                   streaming upserts + tombstones and the indexer checkpoint

Shard assignment is a stable hash of the item id, so a rebuild, the streaming indexer and
every replica agree on where an item lives without a lookup table.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

VERSIONS = "versions"
VERDICTS = "verdicts"
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
VECTORS_FILE = "vectors.npy"
SHARD_FILES = (INDEX_FILE, IDS_FILE, VECTORS_FILE, SHARD_META)
CURRENT = "current"
PREVIOUS = "previous"
HISTORY = "history.jsonl"
PENDING_MOVE = "pointer-move.json"
DELTA_DB = "delta.sqlite"


def stable_bucket(key: str, n: int, salt: str) -> int:
    """Bucket of `key` among `n`, identical in every process and Python version (no hash())."""
    if n < 1:
        raise ValueError(f"bucket count must be >= 1, got {n}")
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def shard_of(item_id: str, n_shards: int) -> int:
    """The shard that holds `item_id` in an index of `n_shards` shards."""
    return stable_bucket(item_id, n_shards, "shard")


def shard_dir(version_dir: Path, shard_id: int) -> Path:
    return Path(version_dir) / f"shard-{shard_id:03d}"


def version_dir(index_root: Path, version: str) -> Path:
    if (not version or "/" in version or "\0" in version or version.startswith(".")
            or len(version.encode()) > 255):  # 255: the longest file name Linux allows
        raise ValueError(f"invalid index version id {version[:80]!r}")
    return Path(index_root) / VERSIONS / version


def verdict_path(index_root: Path, version: str) -> Path:
    return Path(index_root) / VERDICTS / f"{version}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(vdir: Path) -> dict:
    """The manifest of a finished index version (FileNotFoundError while it is being built)."""
    path = Path(vdir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"index version {vdir} has no {MANIFEST}: not built or "
                                "not finalised")
    return json.loads(path.read_text())


def live_manifest(index_root: Path) -> dict:
    """The manifest of the version `current` names (FileNotFoundError when nothing is live)."""
    current = pointer(index_root)
    if current is None:
        raise FileNotFoundError(f"{index_root}: no live index version (cutover first)")
    return read_manifest(version_dir(index_root, current))


def pointer(index_root: Path, name: str = CURRENT) -> str | None:
    """The version a pointer (`current` / `previous`) names, or None when it is not set.

    A move of both pointers commits when `current` is renamed (pipelines/index.py); while a
    move is in flight, or after one was killed, `previous` is read from its intent record,
    on the side of the commit that `current` shows, so the pair a reader sees is always
    one that a whole move produced."""
    link = Path(index_root) / name
    if name == PREVIOUS:
        pending = pending_move(index_root)
        if pending is not None:
            committed = pointer(index_root, CURRENT) == pending["to"]
            return pending["previous_after" if committed else "previous_before"]
    try:
        return Path(os.readlink(link)).name
    except FileNotFoundError:
        return None


def pending_move(index_root: Path) -> dict | None:
    """The intent record of a pointer move that has not finished, or None."""
    try:
        return json.loads((Path(index_root) / PENDING_MOVE).read_text())
    except FileNotFoundError:
        return None


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temp sibling, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
