"""What the search API serves now, and the one protocol that switches it.

A model version and an index version switch together: the live index names its embedder
(manifest `model_version`, "loupe-embedder/N"), served by Triton version N. `Switcher`
loads the Triton version, re-points the shard replicas, moves the index pointer, waits for
every replica to serve it, then switches the API, in that order, so no request ever meets
a model and an index that disagree. `POST /admin/cutover` and `/admin/rollback` call it;
the rollout reaches it through those routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from serving.api.errors import Conflict, Unavailable
from serving.api.triton_client import ModelUnavailable, TritonModels
from serving.shards import layout, pointer
from serving.triton import repository


@dataclass(frozen=True)
class Live:
    """What is served now; replaced as a whole at a switch, so a request reads one
    consistent (model, Triton version, index) triple."""

    model_version: str
    triton_version: int
    index_version: str
    built_at: datetime
    categories: list[str]


def live_from_index(index_root: Path, triton_repo: Path, version: str) -> Live:
    """The triple that serving index `version` means (ValueError when Triton lacks it)."""
    manifest = layout.read_manifest(layout.version_dir(Path(index_root), version))
    model_version = manifest["model_version"]
    number = repository.triton_version(model_version)
    served = repository.version_meta(Path(triton_repo), number)["model_version"]
    if served != model_version:
        raise ValueError(f"Triton version {number} holds {served!r}, index {version} needs "
                         f"{model_version!r}")
    check_treatment(manifest.get("treatment"), repository.version_meta(
        Path(triton_repo), number)["detector_version"], version)
    return Live(model_version, number, version, datetime.fromisoformat(manifest["built_at"]),
                repository.detector_categories(Path(triton_repo), number))


def check_treatment(treatment: dict | None, served_detector: str, version: str) -> None:
    """The index's catalog boxes must come from the detector Triton serves for queries, by a
    policy that picks what a user is offered (`PickPolicy()`, the salient box, else the
    whole photo; a catalog may first prefer its listing's category): otherwise catalog and
    query vectors describe different things, as with two model versions."""
    from models.detector import PickPolicy

    if not treatment:  # model-free attribute vectors (benchmarks): no boxes were picked
        return
    if treatment["detector_version"] != served_detector:
        raise ValueError(f"index {version} was embedded with boxes from "
                         f"{treatment['detector_version']}, but Triton serves "
                         f"{served_detector} for queries: roll the index out again with the "
                         "served detector, or install the detector it was built with")
    query = PickPolicy()
    rules = [r for r in PickPolicy.parse(treatment["pick_policy"]).rules if r != "category"]
    if tuple(rules) != query.rules:
        raise ValueError(f"index {version} picked catalog boxes by {treatment['pick_policy']!r}"
                         f", queries are cropped by {str(query)!r}: re-embed the catalog with "
                         f"{str(query)!r} (or 'category>{query}')")


class Switcher:
    """Owns `live` and every change of it (one switch at a time)."""

    def __init__(self, index_root: Path, triton_repo: Path, replicas: list[str],
                 admin_token: str, triton: TritonModels, http: httpx.AsyncClient,
                 timeout_s: float = 30.0, on_switch: Callable[[Live], None] = lambda _: None):
        self.index_root, self.triton_repo = Path(index_root), Path(triton_repo)
        self.replicas, self.admin_token, self.timeout_s = replicas, admin_token, timeout_s
        self.triton, self.http, self.on_switch = triton, http, on_switch
        self._lock = asyncio.Lock()
        current = pointer.read(self.index_root)
        if current is None:
            raise RuntimeError(f"{self.index_root}: no live index version (cutover first)")
        self.live = live_from_index(self.index_root, self.triton_repo, current)
        on_switch(self.live)

    async def cutover(self, index_version: str) -> dict:
        """Serve `index_version` (it must have a passing canary) and its model."""
        def move_pointer() -> dict:
            # an earlier switch moved the pointer, then timed out waiting for the replicas
            # (or its reply was lost): a retry finishes that switch instead of being refused
            if pointer.read(self.index_root) == index_version:
                return {"action": "cutover", "to": index_version, "resumed": True}
            return pointer.cutover(self.index_root, index_version)

        async with self._lock:
            return await self._switch(index_version, move_pointer)

    async def rollback(self) -> dict:
        """Serve the previous index version and its model again."""
        async with self._lock:
            previous = pointer.read(self.index_root, layout.PREVIOUS)
            if previous is None:
                raise Conflict("no previous index version to roll back to")
            return await self._switch(previous, lambda: pointer.rollback(self.index_root))

    async def _replicas(self, method: str, path: str, body: dict | None = None) -> list[dict]:
        headers = {"X-Admin-Token": self.admin_token}
        try:
            answers = await asyncio.gather(*(
                self.http.request(method, f"{u}{path}", json=body, headers=headers,
                                  timeout=10.0) for u in self.replicas))
        except httpx.HTTPError as err:
            raise Unavailable(f"shard replica unreachable: {err!r}") from err
        bad = [(u, r.status_code) for u, r in zip(self.replicas, answers, strict=True)
               if r.status_code != 200]
        if bad:
            raise Unavailable(f"shard replicas refused {path}: {bad}")
        return [r.json() for r in answers]

    async def _switch(self, target: str, move_pointer: Callable[[], dict]) -> dict:
        try:
            new = live_from_index(self.index_root, self.triton_repo, target)
        except (ValueError, FileNotFoundError) as err:
            raise Conflict(f"cannot switch to index {target}: {err}") from err
        old = self.live
        try:
            await asyncio.to_thread(repository.serve_versions, self.triton_repo,
                                    [old.triton_version, new.triton_version])
        except ValueError as err:
            raise Conflict(str(err)) from err
        try:
            await self.triton.load_models()
        except ModelUnavailable as err:
            raise Unavailable(str(err)) from err
        if not await self.triton.ready(new.triton_version):
            raise Unavailable(f"triton version {new.triton_version} did not load")
        await self._replicas("POST", "/admin/expect-model",
                             {"model_version": new.model_version})
        try:
            moved = await asyncio.to_thread(move_pointer)
        except ValueError as err:
            raise Conflict(str(err)) from err
        deadline = time.monotonic() + self.timeout_s
        while True:
            statuses = await self._replicas("GET", "/healthz")
            if all(s["index_version"] == target for s in statuses):
                break
            if time.monotonic() > deadline:
                raise Unavailable(f"replicas did not swap to {target}: "
                                  f"{[s.get('last_error') for s in statuses]}")
            await asyncio.sleep(0.05)
        self.live = new
        self.on_switch(new)
        return {"switched": moved, "model_version": new.model_version,
                "triton_version": new.triton_version, "index_version": target,
                "previous": {"model_version": old.model_version,
                             "index_version": old.index_version}}
