"""On-disk layout of an index root, shared by the builders (serving/shards/kinds.py), the
pointer moves (serving/shards/pointer.py), the streaming indexer and the shard stores.

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
ROLLOUT_LEASE = "rollout-lease.json"  # who is rolling out onto this index root now
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
