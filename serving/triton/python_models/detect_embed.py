"""Triton python-backend model `detect_embed`: encoded image -> boxes, the picked box and its
unit vector, in one call.

The camera path's default (no box chosen by the user) in one request: the image is decoded
once, detected, the box picked by the catalog treatment's rule (`models.detector.PickPolicy`,
the salient box else the whole photo, so query and catalog vectors describe the same kind of
thing), cropped by `models.preprocessing.embed_input` and embedded, with no second decode, no
second request and no second python-stub hop (measured in bench/serve.py). The graphs are the
`detector` and `embedder` files of the same Triton version (this model's version directory
holds only this file and loupe.json), so the three models cannot serve different weights.
A bad image fails only its own request ("BadImage: ...").
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from models.detector import PickPolicy, load_detector
from models.export import ExportedEmbedder
from models.preprocessing import BadImage, decode_image, embed_input


def _param(args: dict, key: str, default: str) -> str:
    params = json.loads(args["model_config"]).get("parameters", {})
    return params.get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        repo = Path(args["model_repository"]).parent
        version = args["model_version"]
        threads = int(_param(args, "ORT_THREADS", "1"))
        self.detector = load_detector(repo / "detector" / version, threads=threads)
        self.embedder = ExportedEmbedder(repo / "embedder" / version, threads=threads)
        meta = json.loads((repo / "detect_embed" / version / "loupe.json").read_text())
        self.loupe_version = meta["model_version"]
        self.policy = PickPolicy()

    def execute(self, requests):
        images, errors = [], []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)
            try:
                if len(raw) != 1:
                    raise BadImage(f"one image per detect_embed request, got {len(raw)}")
                images.append(decode_image(bytes(raw[0])))
                errors.append(None)
            except BadImage as err:
                images.append(None)
                errors.append(f"BadImage: {err}")
        good = [im for im in images if im is not None]
        found = self.detector.detect(good) if good else []
        boxes = [self.policy.pick(det, self.detector.categories) for det in found]
        vectors = self.embedder(np.stack([embed_input(im, box) for im, box in
                                          zip(good, boxes, strict=True)])) if good else None
        version = np.array([[self.loupe_version.encode()]], dtype=np.object_)
        responses, row = [], 0
        for image, error in zip(images, errors, strict=True):
            if image is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            det = found[row]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("BOXES", det.boxes.numpy().astype(np.float32).reshape(1, -1, 4)),
                pb_utils.Tensor("SCORES", det.scores.numpy().astype(np.float32).reshape(1, -1)),
                pb_utils.Tensor("LABELS", det.labels.numpy().astype(np.int32).reshape(1, -1)),
                pb_utils.Tensor("BOX", np.asarray(boxes[row], dtype=np.float32).reshape(1, 4)),
                pb_utils.Tensor("EMBEDDING", vectors[row:row + 1].astype(np.float32)),
                pb_utils.Tensor("MODEL_VERSION", version),
            ]))
            row += 1
        return responses
