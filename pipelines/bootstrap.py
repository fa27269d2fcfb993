"""`loupe bootstrap`: cold start, an imported catalog searchable before any logs or training.

    loupe bootstrap --world data/myshop [--runs runs/myshop] [--detector loupe-detector/N]

The first milestone of a shop standing Loupe up: the frozen pretrained embedder becomes the
first `champion` (pipelines.pretrained), the pretrained COCO detector (or the named one)
picks the boxes, and the champion is rolled out through the rollout DAG's own tasks
(`pipelines.rollout.rollout_local`: Triton install, detect -> pick -> crop -> embed every
catalog photo, shard builds, canary, cutover). Once impressions exist the monthly retrain's
challenger is compared with this champion re-scored on the rater set, and takes over through
the normal gate and rollout.

Re-running is safe: an existing champion is kept (never replaced by the frozen model), a
registered COCO detector is reused, and a live index that already serves the champion with
this treatment is left as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.run_config import LoupeConfig, resolve_config


@dataclass(frozen=True)
class BootstrapResult:
    model_version: str
    detector_version: str
    index_version: str
    registered: list[str]  # versions this run registered (empty on a re-run)
    rolled_out: bool  # False: the live index already served this model and treatment


def newest_coco_detector(tracking_uri: str) -> str | None:
    """The newest registered `loupe-detector` version of the pretrained COCO kind."""
    from mlflow import MlflowClient

    from models.coco_detector import KIND
    from pipelines.registry import DETECTOR_MODEL

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = [int(mv.version) for mv in client.search_model_versions(f"name='{DETECTOR_MODEL}'")
             if mv.tags.get("detector_kind") == KIND]
    return f"{DETECTOR_MODEL}/{max(found)}" if found else None


def _live_serves(cfg: LoupeConfig, model_version: str, detector_version: str) -> str | None:
    from serving.shards import layout, pointer

    current = pointer.read(cfg.index)
    if current is None:
        return None
    manifest = layout.read_manifest(layout.version_dir(cfg.index, current))
    treatment = manifest.get("treatment") or {}
    if (manifest["model_version"] == model_version
            and treatment.get("detector_version") == detector_version):
        return current
    return None


def run_bootstrap(cfg: LoupeConfig, detector: str | None = None,
                  graph_dir: Path | None = None, category_map: Path | None = None,
                  n_shards: int | None = None, champion: bool = True) -> BootstrapResult:
    """Champion (frozen, unless one exists) + detector + rollout; see the module doc.
    `champion=False` rolls out a frozen version without taking the alias (`loupe demo`'s
    first shop: the first retrain then promotes its challenger as the first champion)."""
    from pipelines.pretrained import (
        current_champion,
        register_coco_detector,
        register_frozen_embedder,
    )
    from pipelines.registry import CHAMPION, resolve_detector
    from pipelines.rollout import rollout_local

    if not (cfg.world / "tables" / "catalog.parquet").is_file():
        raise FileNotFoundError(f"{cfg.world} holds no catalog (tables/catalog.parquet): "
                                "import one first (`loupe import-catalog`)")
    registered: list[str] = []
    model = current_champion(cfg.mlflow_tracking_uri) if champion else None
    if model is None:
        model = register_frozen_embedder(cfg.mlflow_tracking_uri,
                                         CHAMPION if champion else None)
        registered.append(model)
    if detector:
        detector_version = resolve_detector(detector, cfg.mlflow_tracking_uri)
    else:
        detector_version = newest_coco_detector(cfg.mlflow_tracking_uri)
        if detector_version is None or category_map is not None:
            detector_version = register_coco_detector(cfg.mlflow_tracking_uri, graph_dir,
                                                      category_map)
            registered.append(detector_version)
    live = _live_serves(cfg, model, detector_version)
    if live is not None:
        return BootstrapResult(model, detector_version, live, registered, False)
    done = rollout_local(cfg, model, n_shards=n_shards, detector=detector_version)
    return BootstrapResult(model, detector_version, done["plan"]["index_version"],
                           registered, True)


def add_cli(sub) -> None:
    p = sub.add_parser("bootstrap", help="cold start: frozen champion + pretrained detector "
                                         "-> a live index, no logs or training needed")
    p.add_argument("--world", type=Path, required=True, help="an imported world (data/NAME)")
    p.add_argument("--runs", type=Path, default=None,
                   help="runs dir: index, Triton repository, fetched models (default: "
                        "runs/<world name>)")
    p.add_argument("--detector", default=None,
                   help="a registered loupe-detector/N (default: the pretrained COCO detector)")
    p.add_argument("--graph-dir", type=Path, default=None,
                   help="directory with the COCO SSD graph files (default: loupe[coco])")
    p.add_argument("--category-map", type=Path, default=None,
                   help="your COCO class -> category table (default: the shipped one)")
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=_cli)


def config_for_world(world: Path, runs: Path | None = None, tracking_uri: str | None = None
                     ) -> LoupeConfig:
    """A run configuration rooted at one imported world (its runs beside the demo's)."""
    world = Path(world).resolve()
    runs = Path(runs) if runs is not None else world.parent.parent / "runs" / world.name
    return resolve_config({"world_root": str(world), "runs_dir": str(runs),
                           "mlflow_tracking_uri": tracking_uri})


def _cli(args) -> int:
    cfg = config_for_world(args.world, args.runs, args.tracking_uri)
    result = run_bootstrap(cfg, args.detector, args.graph_dir, args.category_map, args.shards)
    print(json.dumps(result.__dict__, indent=1))
    return 0
