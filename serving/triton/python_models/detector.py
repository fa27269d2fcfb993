"""Triton python-backend model `detector`: encoded image -> boxes, scores, labels.

Decoding uses the shared limits (`models.preprocessing.decode_image`); the detector is
`models.detector.load_detector` (the trained CenterNet graph + decode + NMS, or the
pretrained COCO SSD), as in offline evaluation and the catalog indexer. Dynamic batching
merges concurrent requests (one image each) into one batch; boxes are normalised to each
original image, the coordinate system the API and the embedder share. A bad image fails
only its own request ("BadImage: ...").
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from models.detector import load_detector
from models.preprocessing import BadImage, decode_image


def _param(args: dict, key: str, default: str) -> str:
    params = json.loads(args["model_config"]).get("parameters", {})
    return params.get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = int(_param(args, "ORT_THREADS", "1"))
        self.detector = load_detector(version_dir, threads=threads)
        meta = json.loads((version_dir / "loupe.json").read_text())
        self.loupe_version = meta["detector_version"]

    def execute(self, requests):
        images, errors = [], []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            try:
                if len(raw) != 1:
                    raise BadImage(f"one image per detector request, got {len(raw)}")
                images.append(decode_image(bytes(raw[0])))
                errors.append(None)
            except BadImage as err:
                images.append(None)
                errors.append(f"BadImage: {err}")
        found = iter(self.detector.detect([im for im in images if im is not None]))
        version = np.array([[self.loupe_version.encode()]], dtype=np.object_)
        responses = []
        for image, error in zip(images, errors, strict=True):
            if image is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            det = next(found)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("BOXES", det.boxes.numpy().astype(np.float32).reshape(1, -1, 4)),
                pb_utils.Tensor("SCORES", det.scores.numpy().astype(np.float32).reshape(1, -1)),
                pb_utils.Tensor("LABELS", det.labels.numpy().astype(np.int32).reshape(1, -1)),
                pb_utils.Tensor("MODEL_VERSION", version),
            ]))
        return responses
