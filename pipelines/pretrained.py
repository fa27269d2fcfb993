"""Registering the models a shop has before any training: the frozen pretrained embedder and
the COCO-pretrained real-photo detector.

Both are logged as an MLflow run of the Loupe experiment (parameters, the exported files
under `model/`) and registered by the one scheme every version uses
(`pipelines.registry.create_version`), so rollout, Triton install and `loupe serve` fetch
them exactly like trained versions. The frozen embedder carries no rater recall (nothing was
evaluated): its version is tagged with a `bootstrap` fingerprint, so the first retrain's
promotion gate re-scores it on the challenger's rater set before comparing
(`pipelines.registry.promotion_gate`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipelines.registry import (
    CHAMPION,
    DETECTOR_MODEL,
    FINGERPRINT,
    HEADLINE,
    MODEL_NAME,
    RegistryConfig,
    create_version,
    log_run,
    version_for_alias,
)

BOOTSTRAP_FINGERPRINT = "bootstrap: not evaluated"  # no rater set compares with it


def _mlflow(cfg: RegistryConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)


def register_coco_detector(tracking_uri: str | None = None, graph_dir: Path | None = None,
                           category_map: Path | str | None = None,
                           score_threshold: float = 0.4) -> str:
    """Export the pretrained COCO detector with `category_map` and register it as the next
    `loupe-detector/N`; returns that version string."""
    from models.coco_detector import KIND, export_coco_detector
    from pipelines.mlflow_model import save_detector_model

    cfg = RegistryConfig(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_coco_detector(Path(tmp) / "export", graph_dir, category_map,
                                      score_threshold)
        spec = json.loads((export / "detector.json").read_text())
        run = log_run(cfg, run_name="register-coco-detector",
                      params={"kind": KIND, "categories": ",".join(spec["categories"]),
                              "category_map": str(category_map or "shipped table"),
                              "score_threshold": score_threshold},
                      metrics={"n_categories": len(spec["categories"]),
                               "n_coco_classes_kept": len(spec["coco_to_label"])},
                      artifacts={},
                      mlflow_model=save_detector_model(export, Path(tmp) / "model"),
                      tags={"detector_kind": KIND})
        ref = create_version(_mlflow(cfg), DETECTOR_MODEL, run.run_id, run.artifact_uri,
                             {"detector_kind": KIND},
                             description="Loupe detector (trained CenterNet or pretrained "
                                         "COCO SSD; detector.json says which)")
    return ref.model_version


def register_frozen_embedder(tracking_uri: str | None = None, alias: str | None = CHAMPION
                             ) -> str:
    """Export the frozen pretrained embedder (EfficientNet-Lite0 + fixed projection), register
    it as the next `loupe-embedder/N` and point `alias` at it; returns the version string."""
    from pipelines.mlflow_model import save_embedder_model
    from pipelines.train import TrainConfig, export_baseline

    cfg = RegistryConfig(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        export = export_baseline(Path(tmp) / "frozen", TrainConfig())
        run = log_run(cfg, run_name="bootstrap-frozen-embedder",
                      params={"model": "frozen_pretrained", "trained": False},
                      metrics={}, artifacts={},
                      mlflow_model=save_embedder_model(export, Path(tmp) / "model"),
                      tags={"bootstrap": "frozen pretrained embedder, no training"})
        client = _mlflow(cfg)
        ref = create_version(client, MODEL_NAME, run.run_id, run.artifact_uri,
                             {HEADLINE: repr(float("nan")), FINGERPRINT: BOOTSTRAP_FINGERPRINT,
                              "bootstrap": "true"},
                             description="Loupe image embedder (256-d, L2-normalised); "
                                         "aliases: challenger = newest, champion = serving",
                             aliases=(alias,) if alias else ())
        if alias:
            client.set_model_version_tag(ref.name, ref.version, "promotion_decision",
                                         "promoted")
            client.set_model_version_tag(ref.name, ref.version, "promotion_reason",
                                         "cold start: frozen pretrained embedder, no logs yet")
    return ref.model_version


def current_champion(tracking_uri: str | None = None) -> str | None:
    ref = version_for_alias(RegistryConfig(tracking_uri), CHAMPION)
    return None if ref is None else ref.model_version
