"""Export the embedder for serving and batch embedding, and run the exported graph.

`export_embedder` writes, atomically, one directory per model:
- `embedder.onnx`: what Triton's python model and batch re-embedding run (onnxruntime is
  ~7x faster than eager torch for EfficientNet-Lite's depthwise convs on CPU: 1.2 vs 9 ms
  per 128-px image on two cores);
- `embedder.ts`: TorchScript of the same network (for a libtorch backend; parity-tested);
- `embedder.json`: dimension, input contract and the spec it was built from.
Both graphs take float32 (B, 3, EMBED_PX, EMBED_PX) RGB in [0, 1] and return (B, dim) unit
vectors; `ExportedEmbedder` is the runner every consumer shares.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_contracts.durable import atomic_dir
from models.embedder import Embedder
from models.preprocessing import EMBED_PX

ONNX_FILE = "embedder.onnx"
TORCHSCRIPT_FILE = "embedder.ts"
SPEC_FILE = "embedder.json"
EXPORT_FILES = (ONNX_FILE, TORCHSCRIPT_FILE, SPEC_FILE)


def export_onnx(module: nn.Module, path: Path, input_name: str = "images",
                output_name: str = "output") -> Path:
    """Any image module -> ONNX with a dynamic batch dimension (TorchScript-based exporter:
    it handles the EfficientNet blocks' static padding without graph breaks)."""
    module = module.eval()
    example = torch.rand(2, 3, EMBED_PX, EMBED_PX)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=[output_name], dynamic_axes={input_name: {0: "batch"}},
                          dynamo=False)
    return path


def export_embedder(model: Embedder, out_dir: Path, extra: dict | None = None) -> Path:
    """Write the export directory (see module doc) atomically: a reader never sees a
    half-written model."""
    model = model.eval()
    with atomic_dir(Path(out_dir)) as tmp:
        export_onnx(model, tmp / ONNX_FILE, "images", "embeddings")
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.rand(2, 3, EMBED_PX, EMBED_PX))
        traced.save(str(tmp / TORCHSCRIPT_FILE))
        spec = {"spec": asdict(model.spec), "dim": model.spec.dim, "input_px": EMBED_PX,
                "input": "images: float32 (B, 3, S, S) RGB in [0, 1]",
                "output": "embeddings: float32 (B, dim), L2-normalised", **(extra or {})}
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    return Path(out_dir)


def export_files(export_dir: Path) -> list[Path]:
    """The files of an export directory, as logged and registered."""
    files = [Path(export_dir) / name for name in EXPORT_FILES]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"export incomplete: {missing[0]} is missing")
    return files


def onnx_session(path: Path, threads: int = 2):
    """An onnxruntime CPU session that does not busy-wait between calls (the spinning steals
    the core that image decoding and the other models need)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ExportedEmbedder:
    """The exported embedder as served: `embedder(batch)` maps (B, 3, S, S) float32 in
    [0, 1] to (B, dim) float32 unit vectors with onnxruntime."""

    def __init__(self, export_dir: Path, threads: int = 2) -> None:
        export_dir = Path(export_dir)
        for name in (ONNX_FILE, SPEC_FILE):
            if not (export_dir / name).is_file():
                raise FileNotFoundError(f"exported embedder incomplete: {export_dir / name}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.export_dir = export_dir
        self.spec = json.loads((export_dir / SPEC_FILE).read_text())
        self.dim = int(self.spec["dim"])
        self.session = onnx_session(export_dir / ONNX_FILE, threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(batch, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, EMBED_PX, EMBED_PX):
            raise ValueError(f"expected (B, 3, {EMBED_PX}, {EMBED_PX}) images, "
                             f"got {images.shape}")
        return self.session.run(["embeddings"], {"images": images})[0]
