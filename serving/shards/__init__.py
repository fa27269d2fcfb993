"""Shard store: one shard of the live index version + the streaming delta, hot-swapped."""

from serving.shards.kinds import ShardIndex
from serving.shards.store import (
    Hit,
    NotReady,
    SearchResult,
    ShardStore,
    VersionMismatch,
)

__all__ = ["Hit", "NotReady", "SearchResult", "ShardIndex", "ShardStore", "VersionMismatch"]
