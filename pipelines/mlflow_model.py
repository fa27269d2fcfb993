"""The embedder and the detector as MLflow models: `pyfunc`s over the exported graphs, with
signatures and input examples, so a registered version loads with
`mlflow.pyfunc.load_model("models:/loupe-embedder@champion")` (or `models:/loupe-detector/N`)
and answers what Triton serves (both run the same export: `models.export.ExportedEmbedder`,
`models.detector.load_detector`).

The export directory travels inside the MLflow model as the artifact `export`
(`model/artifacts/export/`); `pipelines.registry.download_model` hands that directory to
the rollout, Triton install and re-scoring, which read export directories.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

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


DETECTION_COLUMNS = ("image", "x0", "y0", "x1", "y1", "score", "label", "category")


class DetectorModel(mlflow.pyfunc.PythonModel):
    """predict: a DataFrame column `image` of encoded photos (JPEG/PNG bytes) -> one row per
    detection: the input row it came from, its box normalised to that photo (x0, y0, x1,
    y1), score, label index and category."""

    def load_context(self, context) -> None:
        from models.detector import load_detector

        self.detector = load_detector(Path(context.artifacts[EXPORT_ARTIFACT]))

    def predict(self, context, model_input, params=None):
        from PIL import Image

        images = []
        for data in model_input["image"]:
            with Image.open(io.BytesIO(bytes(data))) as im:
                images.append(im.convert("RGB"))
        rows = [(i, *map(float, box), float(score), int(label),
                 self.detector.categories[int(label)])
                for i, det in enumerate(self.detector.detect(images))
                for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(),
                                             det.labels.tolist(), strict=True)]
        return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def _save(python_model, export_files_: Sequence[Path], dst: Path, **kwargs) -> Path:
    """One MLflow pyfunc model directory with the export files as its `export` artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / EXPORT_ARTIFACT  # the artifact's folder name inside the model
        staged.mkdir()
        for f in export_files_:
            shutil.copy2(f, staged / f.name)
        mlflow.pyfunc.save_model(
            str(dst), python_model=python_model, artifacts={EXPORT_ARTIFACT: str(staged)},
            # named, not inferred: inference re-imports the model in a subprocess (slow)
            pip_requirements=[f"{name}=={version(name)}" for name in
                              ("mlflow", "numpy", "onnxruntime")] + ["loupe"], **kwargs)
    return Path(dst)


def save_detector_model(export_dir: Path, dst: Path) -> Path:
    """Write `dst` as an MLflow pyfunc model wrapping a detector export (either kind); the
    input example is one small encoded JPEG (it shows the input's form, not a scene)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buf, format="JPEG")
    example_photo = buf.getvalue()

    export_dir = Path(export_dir)
    files = sorted(p for p in export_dir.iterdir() if p.is_file())
    spec = json.loads((export_dir / "detector.json").read_text())
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "image"), *[ColSpec("double", c) for c in
                                                    ("x0", "y0", "x1", "y1", "score")],
                        ColSpec("long", "label"), ColSpec("string", "category")]))
    return _save(DetectorModel(), files, dst, signature=signature,
                 input_example=pd.DataFrame({"image": [example_photo]}),
                 metadata={"categories": list(spec["categories"]),
                           "kind": spec.get("kind", "centernet")})


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
    return _save(EmbedderModel(), files, dst, signature=signature, input_example=example,
                 metadata={"dim": dim, "input_px": px, "loupe_spec": spec.get("spec", {})})
