"""Triton python-backend model `embedder`: encoded image + normalised box -> unit vector.

The crop and resize are `models.preprocessing.embed_input`, the very function the training
data module and batch re-embedding call, and the graph is the exported ONNX file run by
`models.export.ExportedEmbedder`: serving cannot drift from training by re-implementing a
step. Dynamic batching hands `execute` several requests at once; they run as one
onnxruntime batch. A bad row (undecodable bytes, a box outside the image) fails its own
request with a message starting "BadImage:" (the API turns it into a 4xx) and never the
requests batched with it.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from models.export import ExportedEmbedder
from models.preprocessing import BadImage, check_box, decode_image, embed_input


def _param(args: dict, key: str, default: str) -> str:
    params = json.loads(args["model_config"]).get("parameters", {})
    return params.get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(_param(args, "ORT_THREADS", "1"))
        self.embedder = ExportedEmbedder(version_dir, threads=threads)
        self.loupe_version = json.loads((version_dir / "loupe.json").read_text())["model_version"]

    def _inputs(self, request) -> np.ndarray:
        images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
        boxes = pb_utils.get_input_tensor_by_name(request, "BOX").as_numpy().reshape(-1, 4)
        if len(images) != len(boxes):
            raise BadImage(f"{len(images)} images but {len(boxes)} boxes")
        return np.stack([embed_input(decode_image(bytes(img)), check_box(box))
                         for img, box in zip(images, boxes, strict=True)])

    def execute(self, requests):
        arrays: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                arrays.append(self._inputs(request))
                errors.append(None)
            except BadImage as err:  # this request only; the rest of the batch goes on
                arrays.append(None)
                errors.append(f"BadImage: {err}")
        good = [a for a in arrays if a is not None]
        vectors = self.embedder(np.concatenate(good)) if good else None
        responses, row = [], 0
        version = np.array([self.loupe_version.encode()], dtype=np.object_)
        for batch, error in zip(arrays, errors, strict=True):
            if batch is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            n = len(batch)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("EMBEDDING", vectors[row:row + n].astype(np.float32)),
                pb_utils.Tensor("MODEL_VERSION", np.repeat(version, n).reshape(n, 1)),
            ]))
            row += n
        return responses
