"""Shard store: one shard of the live index version + the streaming delta, hot-swapped."""

from serving.shards.store import (
    Hit,
    NotReady,
    SearchResult,
    ShardIndex,
    ShardStore,
    VersionMismatch,
)

__all__ = ["Hit", "NotReady", "SearchResult", "ShardIndex", "ShardStore", "VersionMismatch"]
