"""The serving stack for the e2e serving tests: real tritonserver, 2 shards x 2 replica
processes and the search API over the tiny world, started once per test session.

Models: the frozen pretrained embedder (ImageNet EfficientNet-Lite0 + fixed projection:
no training needed, and it finds the same product in the tiny world's scenes) and a detector
trained for 12 short epochs on the tiny world's scenes (~15 s, once per session; tests that
need it in their own MLflow registry register its export there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_V1 = "loupe-embedder/1"
DETECTOR_V1 = "loupe-detector/1"
ADMIN_TOKEN = "test-admin-token"


@dataclass
class TinyDetector:
    export_dir: Path
    metrics: dict

    def register(self, tracking_uri: str) -> str:
        """Log the trained export with its measured metrics as a run of the detector
        experiment and register it (`loupe-detector/N`), as `loupe demo` does."""
        import tempfile

        from pipelines.mlflow_model import save_detector_model
        from pipelines.registry import RegistryConfig, log_run
        from pipelines.train_detector import register_detector

        metrics = {f"test_{k}" if k.startswith("map") else k: v
                   for k, v in self.metrics.items() if isinstance(v, int | float)}
        with tempfile.TemporaryDirectory() as tmp:
            run = log_run(RegistryConfig(tracking_uri, experiment="loupe-detector"),
                          run_name="train-detector", params={}, metrics=metrics, artifacts={},
                          mlflow_model=save_detector_model(self.export_dir,
                                                           Path(tmp) / "model"))
        return register_detector(run.run_id, tracking_uri).model_version


@pytest.fixture(scope="session")
def tiny_detector(tiny_world, tmp_path_factory) -> TinyDetector:
    from pipelines.train_detector import DetectorTrainConfig, train_detector

    det_cfg = DetectorTrainConfig(input_size=128, epochs=12, batch_size=8, lr=4e-3,
                                  latency_runs=3, grid_scenes=2, num_threads=1,
                                  log_mlflow=False, val_every_n_epochs=12)
    result = train_detector(det_cfg, tiny_world, tmp_path_factory.mktemp("detector") / "tiny")
    return TinyDetector(result.export_dir, result.metrics)


@dataclass
class Served:
    stack: object  # serving.stack.ServingStack
    paths: object  # pipelines.serve.ServePaths
    embedder: object  # the eager torch module behind MODEL_V1
    embedder_dir: Path
    detector_dir: Path
    base: Path
    model_version: str = MODEL_V1
    detector_version: str = DETECTOR_V1
    admin_token: str = ADMIN_TOKEN


@pytest.fixture(scope="session")
def served(tiny_world, tiny_harvest, tiny_detector, tmp_path_factory):
    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder
    from pipelines.serve import prepare
    from serving.stack import ServingStack

    base = tmp_path_factory.mktemp("serving")
    embedder = frozen_baseline(EmbedderSpec(seed=0)).eval()
    export_embedder(embedder, base / "embedder_v1")
    detector_dir = tiny_detector.export_dir
    paths = prepare(tiny_world, base / "serve", base / "embedder_v1", MODEL_V1, detector_dir,
                    DETECTOR_V1, tiny_harvest)
    stack = ServingStack(paths.triton_repo, paths.index_root, tiny_world, paths.features,
                         base / "run", ADMIN_TOKEN, replicas=2,
                         supervise=False).start()  # the tests kill and restart by hand
    try:
        yield Served(stack, paths, embedder, base / "embedder_v1", detector_dir, base)
    finally:
        stack.stop()
