"""The index pointers: `current` (the live version) and `previous` (one step back).

This module alone writes and reads them. A move of both pointers is one step: an intent
record (`pointer-move.json`) first, then `previous`, then `current` (the rename of `current`
is the commit point), the history entry, and the record removed; a reader sees the pair a
whole move produced, and the next mover completes or undoes a move a killed process left.
`cutover` moves only to a version whose canary verdict passed (verdicts/, written by the
index stage's canary); `rollback` is one step back. Shard stores watch `current` and
hot-swap (serving/shards/store.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from data_contracts.durable import write_json_atomic
from serving.shards import layout

log = logging.getLogger("loupe.index")


# --------------------------------------------------------------------------- reads
def live_manifest(index_root: Path) -> dict:
    """The manifest of the version `current` names (FileNotFoundError when nothing is live)."""
    current = read(index_root)
    if current is None:
        raise FileNotFoundError(f"{index_root}: no live index version (cutover first)")
    return layout.read_manifest(layout.version_dir(index_root, current))


def read(index_root: Path, name: str = layout.CURRENT) -> str | None:
    """The version a pointer (`current` / `previous`) names, or None when it is not set.

    A move of both pointers commits when `current` is renamed (`_move`); while a move is
    in flight, or after one was killed, `previous` is read from its intent record,
    on the side of the commit that `current` shows, so the pair a reader sees is always
    one that a whole move produced."""
    link = Path(index_root) / name
    if name == layout.PREVIOUS:
        pending = pending_move(index_root)
        if pending is not None:
            committed = read(index_root, layout.CURRENT) == pending["to"]
            return pending["previous_after" if committed else "previous_before"]
    try:
        return Path(os.readlink(link)).name
    except FileNotFoundError:
        return None


def pending_move(index_root: Path) -> dict | None:
    """The intent record of a pointer move that has not finished, or None."""
    try:
        return json.loads((Path(index_root) / layout.PENDING_MOVE).read_text())
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- verdicts
@dataclass
class CanaryVerdict:
    """A canary's judgement of one index version; `cutover` requires a passing one whose
    manifest is unchanged since."""

    index_version: str
    model_version: str
    passed: bool
    reasons: list[str]
    metrics: dict
    manifest_sha256: str
    checked_at: str
    params: dict


def read_verdict(index_root: Path, version: str) -> CanaryVerdict | None:
    path = layout.verdict_path(index_root, version)
    return CanaryVerdict(**json.loads(path.read_text())) if path.is_file() else None


def write_verdict(index_root: Path, verdict: CanaryVerdict) -> Path:
    return write_json_atomic(layout.verdict_path(index_root, verdict.index_version),
                             asdict(verdict))


# --------------------------------------------------------------------------- moves
@contextmanager
def _pointer_lock(index_root: Path) -> Iterator[None]:
    """Serialise pointer moves (two operators, or the DAG and a human, at once)."""
    Path(index_root).mkdir(parents=True, exist_ok=True)
    with open(Path(index_root) / ".pointer.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _set_pointer(index_root: Path, name: str, version: str | None) -> None:
    """Point `name` at `version` by renaming a fresh symlink over it (atomic for readers)."""
    link = Path(index_root) / name
    if version is None:
        link.unlink(missing_ok=True)
        return
    tmp = link.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(f"{layout.VERSIONS}/{version}", tmp)
    os.replace(tmp, link)


def _append_history(index_root: Path, entry: dict) -> None:
    with open(Path(index_root) / layout.HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _last_history_id(index_root: Path) -> str | None:
    path = Path(index_root) / layout.HISTORY
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]).get("id") if lines else None


def _finish_pending(index_root: Path) -> None:
    """Complete or undo a pointer move that a killed process left (hold the pointer lock).

    The rename of `current` is the commit point: when `current` already names the move's
    target, the move happened and only its `previous` and history entry are completed;
    otherwise it never happened and `previous` is put back."""
    root = Path(index_root)
    pending = pending_move(root)
    if pending is not None:
        committed = read(root, layout.CURRENT) == pending["to"]
        _set_pointer(root, layout.PREVIOUS,
                     pending["previous_after" if committed else "previous_before"])
        if committed and _last_history_id(root) != pending["id"]:
            _append_history(root, pending["entry"])
        log.warning("finished a pointer move a killed process left: %s %s -> %s (%s)",
                    pending["entry"]["action"], pending["entry"]["from"], pending["to"],
                    "completed" if committed else "undone")
        (root / layout.PENDING_MOVE).unlink()
    for name in (layout.CURRENT, layout.PREVIOUS, layout.PENDING_MOVE):
        for tmp in root.glob(f".{name}.*.tmp"):  # a killed mover's half-made link or record
            tmp.unlink()


def _move(index_root: Path, action: str, to: str, previous_after: str | None) -> dict:
    """Move `current` to `to` and `previous` to `previous_after` as one step (hold the
    pointer lock): an intent record first, then `previous`, then `current` (the commit),
    the history entry, and the record removed; `_finish_pending` completes or undoes a move
    killed anywhere in between, and `read` reads through it meanwhile."""
    root = Path(index_root)
    live = read(root, layout.CURRENT)
    entry = {"at": datetime.now(UTC).isoformat(), "action": action, "from": live, "to": to,
             "id": uuid.uuid4().hex}
    write_json_atomic(root / layout.PENDING_MOVE, {
        "id": entry["id"], "to": to, "previous_before": read(root, layout.PREVIOUS),
        "previous_after": previous_after, "entry": entry})
    _set_pointer(root, layout.PREVIOUS, previous_after)
    _set_pointer(root, layout.CURRENT, to)
    _append_history(root, entry)
    (root / layout.PENDING_MOVE).unlink()
    return entry


def _require_passing(index_root: Path, version: str) -> None:
    vdir = layout.version_dir(index_root, version)
    layout.read_manifest(vdir)
    verdict = read_verdict(index_root, version)
    if verdict is None:
        raise ValueError(f"index version {version} has no canary verdict; run `loupe canary`")
    if not verdict.passed:
        raise ValueError(f"index version {version} failed its canary: "
                         + "; ".join(verdict.reasons))
    if verdict.manifest_sha256 != layout.sha256_file(vdir / layout.MANIFEST):
        raise ValueError(f"index version {version}: manifest changed after its canary")


def cutover(index_root: Path, version: str) -> dict:
    """Make `version` live (it must have a passing canary); the live one becomes previous."""
    with _pointer_lock(index_root):
        _finish_pending(index_root)
        _require_passing(index_root, version)
        live = read(index_root, layout.CURRENT)
        if live == version:
            raise ValueError(f"index version {version} is already live")
        previous = live if live is not None else read(index_root, layout.PREVIOUS)
        return _move(index_root, "cutover", version, previous)


def rollback(index_root: Path) -> dict:
    """One step back: `previous` becomes live again and the rolled-back version is unset."""
    with _pointer_lock(index_root):
        _finish_pending(index_root)
        prev = read(index_root, layout.PREVIOUS)
        if prev is None:
            raise ValueError(f"{index_root}: no previous index version to roll back to")
        _require_passing(index_root, prev)
        return _move(index_root, "rollback", prev, None)


def index_status(index_root: Path) -> dict:
    root = Path(index_root)
    versions = sorted(p.name for p in (root / layout.VERSIONS).glob("*") if p.is_dir()) \
        if (root / layout.VERSIONS).exists() else []
    out = {"current": read(root, layout.CURRENT),
           "previous": read(root, layout.PREVIOUS), "versions": {}}
    for v in versions:
        vdir = layout.version_dir(root, v)
        verdict = read_verdict(root, v)
        m = json.loads((vdir / layout.MANIFEST).read_text()) \
            if (vdir / layout.MANIFEST).exists() else None
        out["versions"][v] = {
            "finalised": m is not None, "model_version": m and m["model_version"],
            "count": m and m["count"],
            "canary": None if verdict is None else ("pass" if verdict.passed else "fail")}
    return out
