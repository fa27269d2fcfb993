"""The embedder as an MLflow model: a `pyfunc` over the exported ONNX graph, with a tensor
signature and an input example, so a registered version loads with
`mlflow.pyfunc.load_model("models:/loupe-embedder@champion")` and gives the vectors Triton
serves (both run `models.export.ExportedEmbedder` over the same `embedder.onnx`).

The export directory travels inside the MLflow model as the artifact `export`
(`model/artifacts/export/`); `pipelines.registry.download_model` hands that directory to
the rollout, Triton install and re-scoring, which read export directories.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from models.export import SPEC_FILE, ExportedEmbedder, export_files

EXPORT_ARTIFACT = "export"
MLMODEL_FILE = "MLmodel"


class EmbedderModel(mlflow.pyfunc.PythonModel):
    """predict: float32 (B, 3, S, S) RGB in [0, 1] -> float32 (B, dim) unit vectors."""

    def load_context(self, context) -> None:
        self.embedder = ExportedEmbedder(Path(context.artifacts[EXPORT_ARTIFACT]))

    def predict(self, context, model_input, params=None):
        return self.embedder(np.asarray(model_input, dtype=np.float32))


def export_dir_of(model_dir: Path) -> Path:
    """The export directory inside a saved or downloaded MLflow model directory; a plain
    export directory (a version registered before models were MLflow models) is itself."""
    model_dir = Path(model_dir)
    if (model_dir / MLMODEL_FILE).is_file():
        return model_dir / "artifacts" / EXPORT_ARTIFACT
    return model_dir


def save_embedder_model(export_dir: Path, dst: Path) -> Path:
    """Write `dst` as an MLflow pyfunc model wrapping `export_dir` (see module doc)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    files = export_files(Path(export_dir))
    spec = json.loads((Path(export_dir) / SPEC_FILE).read_text())
    px, dim = int(spec["input_px"]), int(spec["dim"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, px, px))]),  # an ndarray in
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim), "embeddings")]))
    example = np.random.default_rng(0).random((1, 3, px, px), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / EXPORT_ARTIFACT  # the artifact's folder name inside the model
        staged.mkdir()
        for f in files:
            shutil.copy2(f, staged / f.name)
        mlflow.pyfunc.save_model(
            str(dst), python_model=EmbedderModel(), artifacts={EXPORT_ARTIFACT: str(staged)},
            signature=signature, input_example=example,
            # named, not inferred: inference re-imports the model in a subprocess (slow)
            pip_requirements=[f"{name}=={version(name)}" for name in
                              ("mlflow", "numpy", "onnxruntime")] + ["loupe"],
            metadata={"dim": dim, "input_px": px, "loupe_spec": spec.get("spec", {})})
    return Path(dst)
