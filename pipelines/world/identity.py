"""Identity of a world, which scopes every cache computed from its images."""

from __future__ import annotations

import hashlib
from pathlib import Path


def world_id(world: Path) -> str:
    """Identity of a world: caches of anything computed from its images are scoped by it,
    since paths repeat across worlds. A generated world is its world.json (size, seed,
    params, counts); a world assembled from real tables is its table files' names, sizes and
    modification times."""
    world = Path(world)
    meta = world / "world.json"
    digest = hashlib.sha256()
    if meta.is_file():
        digest.update(meta.read_bytes())
    else:
        tables = sorted((world / "tables").glob("*.parquet"))
        if not tables:
            raise FileNotFoundError(f"{world} is not a Loupe world: it has neither world.json "
                                    "nor tables/*.parquet")
        for table in tables:
            st = table.stat()
            digest.update(f"{table.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]
