"""Rollout of a model version onto the live index, one plain function per rollout-DAG task:
plan, re-embed a catalog partition, build a shard, finalize, canary, install in Triton, cut
over, smoke-query; and the upkeep the other DAGs share (compaction, delta pruning, rollback).

Idempotency: outputs go to run-scoped paths or to versioned directories whose name derives
from the run (`index_version_for_run`), written through temp-and-rename by the stages, and
every `*_once` guard returns what an earlier try already finished instead of writing it again.
Serving attached (`api_url`): cutover and rollback go through the search API's admin
endpoints (token from the Variable `loupe_admin_token` or $LOUPE_ADMIN_TOKEN, read by the task,
never in XCom); not attached, the index pointer moves alone.

DAG files build their default_args from this module's exceptions while they are parsed, so it
imports only the standard library and stdlib-only modules at module level.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.monitor import HealthBreach
from pipelines.registry import (
    ATTRIBUTE_MODEL_PREFIX,
    fetch_registered,
    is_attribute_model,
    registered_embed_fn,
    resolve_detector,
)
from pipelines.run_config import LoupeConfig, slug

log = logging.getLogger("loupe.rollout")

ADMIN_TOKEN_VARIABLE = "loupe_admin_token"  # or $LOUPE_ADMIN_TOKEN; never in XCom or logs
ADMIN_TOKEN_ENV = "LOUPE_ADMIN_TOKEN"


class NothingLive(LookupError):
    """No index version has been cut over yet, so there is nothing to maintain or watch."""


class ServingUnavailable(RuntimeError):
    """The attached search API did not answer (down, restarting, 5xx): worth a retry."""


class RolloutInProgress(RuntimeError):
    """Another rollout holds the index root's lease: two at once would race their cutovers
    (the later build would silently replace the earlier one, or a rollback meet a half-done
    rollout)."""


# --------------------------------------------------------------------------- the lease
def _lease_path(cfg: LoupeConfig) -> Path:
    from serving.shards import layout

    return cfg.index / layout.ROLLOUT_LEASE


def rollout_holder(cfg: LoupeConfig) -> dict | None:
    """Who holds the rollout lease of this index root, or None."""
    try:
        return json.loads(_lease_path(cfg).read_text())
    except FileNotFoundError:
        return None


def _gone_local_holder(lease: dict) -> bool:
    """A `loupe rollout` process on this host that has exited (killed, crashed)."""
    if not lease.get("owner", "").startswith("local:") or lease.get("host") != \
            socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_rollout(cfg: LoupeConfig, owner: str, model_version: str) -> dict:
    """Take the index root's rollout lease for `owner` (a DAG run `airflow:<dag>/<run>`, or a
    process `local:...`), or raise `RolloutInProgress` naming the holder. The same owner
    claims again freely (a retried task); a local holder whose process is gone is taken
    over with a warning. The lease appears whole or not at all (written aside, then linked)."""
    path = _lease_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    lease = {"owner": owner, "model_version": model_version, "host": socket.gethostname(),
             "pid": os.getpid(), "since": datetime.now(UTC).isoformat(timespec="seconds")}
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    aside.write_text(json.dumps(lease))
    try:
        for _ in range(2):
            try:
                os.link(aside, path)
                return lease
            except FileExistsError:
                held = rollout_holder(cfg)
                if held is None:  # released meanwhile
                    continue
                if held["owner"] == owner:
                    return held
                if not _gone_local_holder(held):
                    raise RolloutInProgress(
                        f"refusing to roll out {model_version}: {held['owner']} has been "
                        f"rolling out {held['model_version']} onto {cfg.index} since "
                        f"{held['since']} (lease {path}). Wait for it to finish; if that run "
                        "is dead, delete the lease file and run again.") from None
                log.warning("taking over the rollout lease of %s: its process %s is gone",
                            held["owner"], held["pid"])
                path.unlink(missing_ok=True)
        raise RolloutInProgress(f"{path} changes hands too fast to claim; run again")
    finally:
        aside.unlink(missing_ok=True)


def release_rollout(cfg: LoupeConfig, owner: str) -> bool:
    """Give the lease back if `owner` holds it (never another run's); True when released."""
    held = rollout_holder(cfg)
    if held is None or held["owner"] != owner:
        return False
    _lease_path(cfg).unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- plan + build
def index_version_for_run(run_after: datetime, model_version: str, kind: str = "") -> str:
    """Index version id derived from the run (not the clock), so a re-run task finds the
    version its earlier try started; sortable like `pipelines.index.new_version_id`."""
    stamp = run_after.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return "-".join([stamp] + ([kind] if kind else []) + [slug(model_version)])


def plan_rollout(cfg: LoupeConfig, run_dir: Path, model_version: str, run_after: datetime,
                 n_shards: int | None, detector: str | None) -> dict:
    """Everything the mapped tasks need: partitions, shards, run-scoped and versioned paths,
    and the catalog treatment (detector, pick policy) every partition and Triton share."""
    from models.detector import PickPolicy
    from pipelines.embed import EmbedParams
    from pipelines.index import IndexParams
    from serving.shards import layout

    embed = EmbedParams.load(Path(cfg.params_file))
    shards = int(n_shards) if n_shards else IndexParams.load(Path(cfg.params_file)).n_shards
    if shards < 1:
        raise ValueError(f"shard count must be >= 1, got {shards}")
    version = index_version_for_run(run_after, model_version)
    treatment = None if is_attribute_model(model_version) else {
        "detector_version": resolve_detector(detector, cfg.mlflow_tracking_uri),
        "pick_policy": str(PickPolicy())}
    return {"model_version": model_version, "treatment": treatment, "index_version": version,
            "version_dir": str(layout.version_dir(cfg.index, version)),
            "embeddings_dir": str(Path(run_dir) / "embeddings" / slug(model_version)),
            "n_shards": shards, "partitions": list(range(embed.n_partitions)),
            "shards": list(range(shards))}


def embed_partition(cfg: LoupeConfig, model_version: str, treatment: Mapping[str, str] | None,
                    embeddings_dir: str, partition: int) -> dict:
    """One catalog partition; resumes from its checkpoint, so a retry never re-writes."""
    from pipelines.embed import EmbedParams, reembed

    p = EmbedParams.load(Path(cfg.params_file))
    summary = reembed(cfg.world, model_version, catalog_embed_fn(cfg, model_version, treatment),
                      Path(embeddings_dir), [partition], p.part_rows,
                      n_partitions=p.n_partitions, validate=p.validate, show_progress=False)
    return {"partition": partition, "embedded": summary["embedded"][partition]}


def build_shard_once(cfg: LoupeConfig, embeddings_dir: str, version_dir: str, shard: int,
                     n_shards: int) -> dict:
    """One shard of the version; a version already finalised by an earlier try is reused."""
    from pipelines.index import IndexParams, build_shard
    from serving.shards import layout

    vdir = Path(version_dir)
    if (vdir / layout.MANIFEST).is_file():
        manifest = layout.read_manifest(vdir)
        if manifest["n_shards"] != n_shards:
            raise ValueError(f"{vdir} is finalised with {manifest['n_shards']} shards, "
                             f"not {n_shards}")
        return json.loads((layout.shard_dir(vdir, shard) / layout.SHARD_META).read_text())
    meta = build_shard(Path(embeddings_dir), shard, n_shards,
                       IndexParams.load(Path(cfg.params_file)), vdir)
    return {k: meta[k] for k in ("shard_id", "count", "model_version", "build_seconds")}


def finalize_index_once(version_dir: str, n_shards: int, source: Mapping[str, Any]) -> dict:
    """Checksums + manifest (written last); an existing manifest of this version is kept."""
    from pipelines.embed import embedding_progress
    from pipelines.index import write_manifest
    from serving.shards import layout

    vdir = Path(version_dir)
    if (vdir / layout.MANIFEST).is_file():
        manifest = layout.read_manifest(vdir)
    else:
        treatment = embedding_progress(Path(source["embeddings_dir"]))["treatment"]
        manifest = write_manifest(vdir, n_shards, dict(source), treatment=treatment)
    return {k: manifest[k] for k in ("index_version", "model_version", "count", "n_shards")}


def canary_thresholds(base, overrides: Mapping[str, float | None] | None):
    """params.yaml's canary thresholds with the operator's overrides (the rollout trigger
    form's `canary_<name>` fields; None keeps the file's value)."""
    known = {f.name for f in dataclasses.fields(base)}
    chosen = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise ValueError(f"unknown canary threshold(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base, **chosen)


def run_canary(cfg: LoupeConfig, index_version: str, model_version: str,
               thresholds: Mapping[str, float | None] | None = None) -> dict:
    """Probe the built version; a failing verdict raises pipelines.index.CanaryFailed
    (nothing goes live). `thresholds` override params.yaml's (see canary_thresholds)."""
    from pipelines.index import IndexParams, require_canary

    params = canary_thresholds(IndexParams.load(Path(cfg.params_file)).canary, thresholds)
    # a real embedder also answers the rater queries
    queries = None if is_attribute_model(model_version) else registered_embed_fn(
        cfg.mlflow_tracking_uri, model_version, cfg.models_dir, cfg.world)
    verdict = require_canary(cfg.index, index_version, cfg.world, params, queries,
                             expected_model_version=model_version)
    return {"index_version": index_version, "passed": True, "metrics": verdict.metrics,
            "thresholds": dataclasses.asdict(params)}


# --------------------------------------------------------------------------- models
def catalog_embed_fn(cfg: LoupeConfig, model_version: str,
                     treatment: Mapping[str, str] | None):
    """The embed_fn that turns catalog photos into vectors of `model_version`: the catalog
    treatment (`pipelines.embed.catalog_treatment`) with the registered embedder and the
    detector and pick policy of `treatment` (`CatalogTreatment.metadata`, as the rollout plan
    and the index manifest carry it); model-free attribute vectors need none."""
    from models.detector import PickPolicy
    from pipelines.embed import attribute_embed_fn, catalog_treatment

    if is_attribute_model(model_version):
        return attribute_embed_fn(cfg.world, int(model_version.removeprefix(
            ATTRIBUTE_MODEL_PREFIX)))
    if not treatment:
        raise ValueError(f"{model_version}: catalog photos need a treatment (detector_version, "
                         "pick_policy) to become vectors; the rollout plan and the live "
                         "index manifest carry it")
    detector = treatment["detector_version"]
    return catalog_treatment(
        fetch_registered(cfg.mlflow_tracking_uri, model_version, cfg.models_dir),
        fetch_registered(cfg.mlflow_tracking_uri, detector, cfg.models_dir), cfg.world,
        detector, PickPolicy.parse(treatment["pick_policy"]))


def export_triton(cfg: LoupeConfig, model_version: str, treatment: Mapping[str, str] | None
                  ) -> dict:
    """Install the rollout's embedder and detector as Triton version N (N = the embedder's
    registry number) before anything goes live, so the cutover only has to load it.

    Versions are immutable: a re-run finds the same files and writes nothing; a version N
    that holds other bytes (another registry's N) is an error, never served silently.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    from serving.shards.layout import sha256_file
    from serving.triton import repository

    if is_attribute_model(model_version):
        raise AirflowSkipException(f"{model_version}: model-free attribute vectors have no "
                                   "model for Triton to serve")
    detector_version = treatment["detector_version"]  # the one the catalog was embedded with
    sources = {"embedder": fetch_registered(cfg.mlflow_tracking_uri, model_version,
                                            cfg.models_dir),
               "detector": fetch_registered(cfg.mlflow_tracking_uri, detector_version,
                                            cfg.models_dir)}
    number = repository.add_version(cfg.triton_repository, model_version,
                                    sources["embedder"], sources["detector"], detector_version)
    for name, src in sources.items():
        installed = cfg.triton_repository / name / str(number)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            there = installed / f.relative_to(src)
            if not there.is_file() or sha256_file(there) != sha256_file(f):
                raise ValueError(f"Triton version {number} in {cfg.triton_repository} holds "
                                 f"another {name} than registered {model_version} / "
                                 f"{detector_version} ({there.name} differs); refusing to "
                                 "serve it: point triton_repo at this registry's repository")
    return {"model_version": model_version, "detector_version": detector_version,
            "triton_version": number, "triton_repo": str(cfg.triton_repository)}


# --------------------------------------------------------------------------- serving
def admin_token() -> str:
    """The search API's admin token: Airflow Variable `loupe_admin_token`, else
    $LOUPE_ADMIN_TOKEN. Masked in task logs; callers never return it through XCom."""
    from airflow.sdk import Variable
    from airflow.sdk.log import mask_secret

    token = Variable.get(ADMIN_TOKEN_VARIABLE, default=None) or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ValueError(f"serving is attached (api_url) but no admin token is set: Variable "
                         f"{ADMIN_TOKEN_VARIABLE} or ${ADMIN_TOKEN_ENV}")
    mask_secret(token)
    return token


def call_api(cfg: LoupeConfig, method: str, path: str, token: str | None = None,
             body: Mapping[str, Any] | None = None, timeout_s: float = 30.0) -> dict:
    """One call to the attached search API. A refusal (4xx: bad token, unknown or failing
    version) is a ValueError, not retried; no answer or a 5xx is ServingUnavailable."""
    import httpx

    headers = {"X-Admin-Token": token} if token else {}
    try:
        r = httpx.request(method, f"{cfg.api_url}{path}", json=body, headers=headers,
                          timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ServingUnavailable(f"{method} {cfg.api_url}{path}: {err!r}") from err
    if 400 <= r.status_code < 500:
        raise ValueError(f"{method} {cfg.api_url}{path} refused ({r.status_code}): "
                         f"{r.text[:500]}")
    if r.status_code != 200:
        raise ServingUnavailable(f"{method} {cfg.api_url}{path} answered {r.status_code}: "
                                 f"{r.text[:500]}")
    return r.json()


def _switched(answer: Mapping[str, Any]) -> dict:
    """The API's switch answer as a move record (the pointer entry + what serves it)."""
    return {**answer["switched"], "via": "api", "model_version": answer["model_version"],
            "triton_version": answer["triton_version"]}


def cutover_once(cfg: LoupeConfig, index_version: str) -> dict:
    """Make the version live; a no-op if it already is.

    Serving attached (`api_url`): the API's POST /admin/cutover loads the Triton version the
    index names, re-points the shard replicas and moves the pointer as one switch, so the
    model and the index go live together. Not attached: the pointer moves (previous kept for
    rollback) and the Triton repository is set to serve the new model version beside the
    live one, so a serving stack started on it serves what is live.
    """
    from serving.shards import layout, pointer

    if cfg.api_url:
        live = call_api(cfg, "GET", "/readyz")
        if live["index_version"] == index_version:
            return {"action": "cutover", "to": index_version, "already_live": True,
                    "via": "api", "model_version": live["model_version"]}
        return _switched(call_api(cfg, "POST", "/admin/cutover", admin_token(),
                                  {"index_version": index_version}, timeout_s=300))
    live = pointer.read(cfg.index, layout.CURRENT)
    if live == index_version:
        return {"action": "cutover", "to": index_version, "already_live": True,
                "via": "pointer"}
    served = _serve_in_triton(cfg, [v for v in (live, index_version) if v is not None])
    moved = pointer.cutover(cfg.index, index_version)
    return {**moved, "via": "pointer", "triton_versions": served,
            "serving": "not attached (no api_url): moved the index pointer only"}


def _serve_in_triton(cfg: LoupeConfig, index_versions: Sequence[str]) -> list[int]:
    """Point the Triton repository's configs at the model versions these indexes name
    (attribute vectors have none); a missing Triton version is an error before any move."""
    from serving.shards import layout
    from serving.triton import repository

    models = [layout.read_manifest(layout.version_dir(cfg.index, v))["model_version"]
              for v in index_versions]
    numbers = [repository.triton_version(m) for m in models if not is_attribute_model(m)]
    if not numbers:
        return []
    installed = set(repository.installed_versions(cfg.triton_repository))
    if numbers[-1] not in installed:
        raise ValueError(f"{models[-1]} is not installed in the Triton repository "
                         f"{cfg.triton_repository} (the rollout's export_triton installs it)")
    return repository.serve_versions(cfg.triton_repository,
                                     [n for n in numbers if n in installed])


def smoke_query(cfg: LoupeConfig, index_version: str, probes_per_shard: int = 5,
                k: int = 10) -> dict:
    """Listings of every shard must find themselves in `index_version`: through the live
    search API when serving is attached (Triton embeds, replicas answer), else through the
    shard store directly."""
    if cfg.api_url:
        return smoke_query_api(cfg, index_version, probes_per_shard, k)
    return smoke_query_shards(cfg, index_version, probes_per_shard, k)


def smoke_query_shards(cfg: LoupeConfig, index_version: str, probes_per_shard: int = 5,
                       k: int = 10) -> dict:
    """Query every shard the way a shard server does after the pointer moved (ShardStore:
    follows `current`, verifies checksums, applies the delta, guards the model version) with
    listings of that shard; each must come back from `index_version` and find itself."""
    import numpy as np

    from serving.shards.kinds import load_version
    from serving.shards.store import ShardStore

    manifest, shards = load_version(cfg.index, index_version, verify=False)
    model = manifest["model_version"]
    found = asked = 0
    for shard in shards:
        store = ShardStore(cfg.index, shard.shard_id, model, keep_previous_s=0)
        try:
            store.load()
            serving = store.status()["index_version"]
            if serving != index_version:
                raise HealthBreach(f"shard {shard.shard_id} serves {serving}, not "
                                   f"{index_version}: the live pointer did not move")
            probes = np.asarray(shard.vectors[:probes_per_shard], np.float32)
            for item, result in zip(shard.ids[:probes_per_shard],
                                    store.search_batch(probes, k), strict=True):
                if result.index_version != index_version or result.model_version != model:
                    raise HealthBreach(f"shard {shard.shard_id} answered from "
                                       f"{result.index_version} ({result.model_version})")
                asked += 1
                found += any(h.item_id == item for h in result.hits)
        finally:
            store.stop()
    if found < asked:
        raise HealthBreach(f"smoke query on {index_version}: only {found} of {asked} listings "
                           "found themselves")
    return {"index_version": index_version, "model_version": model, "queries": asked,
            "self_hits": found}


def smoke_query_api(cfg: LoupeConfig, index_version: str, probes_per_shard: int = 5,
                    k: int = 10) -> dict:
    """The live API must be ready on `index_version` and its model, and the photo of each
    probe listing (available ones: the API filters sold items out; no box, so the API picks
    the most salient detection, as the catalog treatment's default policy did) must come back
    from that pair, complete, with itself among the results: the full query path, Triton
    included."""
    import httpx
    import pandas as pd

    from serving.shards.kinds import load_version

    manifest, shards = load_version(cfg.index, index_version, verify=False)
    model = manifest["model_version"]
    ready = call_api(cfg, "GET", "/readyz")
    if (ready["model_version"], ready["index_version"]) != (model, index_version):
        raise HealthBreach(f"the API serves {ready['model_version']} / "
                           f"{ready['index_version']}, not {model} / {index_version}")
    catalog = pd.read_parquet(cfg.world / "tables" / "catalog.parquet",
                              columns=["item_id", "image_path", "available"])
    photos = catalog.set_index("item_id")["image_path"]
    listed = set(catalog.loc[catalog["available"], "item_id"])  # the API drops sold items
    probes: list[str] = []
    for shard in shards:
        probes += [i for i in map(str, shard.ids) if i in listed][:probes_per_shard]
    found = 0
    with httpx.Client(base_url=cfg.api_url, timeout=30.0) as client:
        for item in probes:
            image = (cfg.world / photos[item]).read_bytes()
            try:
                r = client.post("/v1/search", files={"image": ("probe.jpg", image)},
                                data={"k": str(k)})
            except httpx.HTTPError as err:
                raise ServingUnavailable(f"POST {cfg.api_url}/v1/search: {err!r}") from err
            if r.status_code != 200:
                raise HealthBreach(f"smoke search for {item} answered {r.status_code}: "
                                   f"{r.text[:300]}")
            body = r.json()
            if (body["model_version"], body["index_version"]) != (model, index_version) \
                    or body["partial"]:
                raise HealthBreach(f"smoke search for {item} came from "
                                   f"{body['model_version']} / {body['index_version']} "
                                   f"(partial: {body['partial']})")
            found += any(hit["item_id"] == item for hit in body["items"])
    if found < len(probes):
        raise HealthBreach(f"smoke search on {index_version} through {cfg.api_url}: only "
                           f"{found} of {len(probes)} listings found themselves")
    return {"index_version": index_version, "model_version": model, "via": "api",
            "queries": len(probes), "self_hits": found}


# --------------------------------------------------------------------------- index upkeep
def live_index_version(cfg: LoupeConfig) -> str:
    from serving.shards import layout, pointer

    live = pointer.read(cfg.index, layout.CURRENT)
    if live is None:
        raise NothingLive(f"{cfg.index}: no index version is live yet")
    return live


def compact_once(cfg: LoupeConfig, run_after: datetime) -> dict:
    """Fold the delta into a rebuilt version named after the run (tombstones dropped)."""
    from pipelines.index import IndexParams, compact
    from serving.shards import layout

    live = live_index_version(cfg)
    model = layout.read_manifest(layout.version_dir(cfg.index, live))["model_version"]
    version = index_version_for_run(run_after, model, kind="compact")
    vdir = layout.version_dir(cfg.index, version)
    if not (vdir / layout.MANIFEST).is_file():
        compact(cfg.index, IndexParams.load(Path(cfg.params_file)), version)
    manifest = layout.read_manifest(vdir)
    return {"index_version": version, "model_version": model, "compacted_from": live,
            "count": manifest["count"], **{k: manifest["source"].get(k) for k in (
                "delta_upserts_folded", "tombstones_dropped")}}


def prune_delta_rows(cfg: LoupeConfig) -> dict:
    from pipelines.index import prune_delta

    return {"delta_rows_pruned": prune_delta(cfg.index)}


def rollback_live(cfg: LoupeConfig) -> dict:
    """One step back: through the API's /admin/rollback when serving is attached (the model
    and the index flip together), else the pointer alone."""
    from serving.shards.pointer import rollback

    if cfg.api_url:
        return _switched(call_api(cfg, "POST", "/admin/rollback", admin_token(),
                                  timeout_s=300))
    return {**rollback(cfg.index), "via": "pointer",
            "serving": "not attached (no api_url): moved the index pointer only"}



# --------------------------------------------------------------------------- in process
def rollout_local(cfg: LoupeConfig, model_version: str, run_after: datetime | None = None,
                  n_shards: int | None = None, detector: str | None = None,
                  dry_run: bool = False, run_dir: Path | None = None) -> dict:
    """The `loupe_model_rollout` DAG's tasks in this process, one after another, calling the
    same functions, so a bench, a test or a local stack gets the same files, guards and
    verdicts as a DAG run: plan, Triton install (registered models only), re-embed every
    partition, build every shard, finalize, canary, cutover (unless `dry_run`), smoke query.

    `model_version` is already resolved (pipelines.registry.resolve_model). The same
    `run_after` names the same index version, so a rerun after a failure resumes it.
    Holds the index root's rollout lease throughout (`RolloutInProgress` while another
    rollout runs). Returns each step's result under its DAG task id.
    """
    run_after = run_after or datetime.now(UTC)
    version = index_version_for_run(run_after, model_version)
    run_dir = run_dir or cfg.runs / "rollout_local" / version
    owner = f"local:{socket.gethostname()}:{os.getpid()}:{version}"
    claim_rollout(cfg, owner, model_version)
    try:
        return _rollout_steps(cfg, model_version, run_after, n_shards, detector, dry_run,
                              run_dir)
    finally:
        release_rollout(cfg, owner)


def _rollout_steps(cfg: LoupeConfig, model_version: str, run_after: datetime,
                   n_shards: int | None, detector: str | None, dry_run: bool,
                   run_dir: Path) -> dict:
    plan = plan_rollout(cfg, run_dir, model_version, run_after, n_shards, detector)
    done: dict[str, Any] = {"plan": plan}
    if not is_attribute_model(model_version):  # attribute vectors have no model to serve
        done["export_triton"] = export_triton(cfg, model_version, plan["treatment"])
    done["embed_partition"] = [embed_partition(cfg, model_version, plan["treatment"],
                                               plan["embeddings_dir"], p)
                               for p in plan["partitions"]]
    done["build_shard"] = [build_shard_once(cfg, plan["embeddings_dir"], plan["version_dir"],
                                            s, plan["n_shards"]) for s in plan["shards"]]
    done["finalize_index"] = finalize_index_once(plan["version_dir"], plan["n_shards"], {
        "embeddings_dir": plan["embeddings_dir"], "run": "rollout_local"})
    done["canary"] = run_canary(cfg, plan["index_version"], model_version)
    if not dry_run:
        done["cutover"] = cutover_once(cfg, plan["index_version"])
        done["smoke_query"] = smoke_query(cfg, plan["index_version"])
    return done
