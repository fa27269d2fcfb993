"""gRPC client for Loupe's two Triton models, and the contract they share with it.

`detector`: IMAGE (encoded bytes) -> BOXES (n, 4, normalised x0,y0,x1,y1), SCORES (n,),
LABELS (n,). `embedder`: IMAGE (encoded bytes) + BOX (4,) -> EMBEDDING (256,), unit norm; the
crop happens inside Triton with the shared crop policy, so the query path and the catalog
re-embedding path cut objects the same way. `detect_embed`: IMAGE -> the detector's outputs,
BOX (4,), the box the catalog treatment's rule picks, and its EMBEDDING, in one call (one
decode, one request): the search path when the user chose no box. All return MODEL_VERSION,
the Loupe model version that produced the answer, so the API checks versions per request,
not per deploy.
Every call pins the Triton version number that the live index was built with.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from serving.triton.repository import MODELS

BAD_IMAGE_PREFIX = "BadImage:"
# gRPC's reconnect backoff grows to 120 s by default, so after a Triton restart the API would
# keep answering 503 long after Triton is ready again (measured: ~8 s after a 20 s outage).
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 100,
                        "grpc.min_reconnect_backoff_ms": 100,
                        "grpc.max_reconnect_backoff_ms": 1000}


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options (unlimited messages, keepalive) plus a reconnect
    backoff capped at 1 s."""
    keepalive = KeepAliveOptions()
    return [("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            *RECONNECT_BACKOFF_MS.items()]


class ModelUnavailable(RuntimeError):
    """Triton could not answer (down, restarting, version not loaded): the API returns 503."""


class BadModelInput(ValueError):
    """The model refused the input itself (e.g. a truncated image): the API returns 422."""


@dataclass
class DetectorOutput:
    boxes: np.ndarray  # (n, 4) normalised
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,)
    detector_version: str


@dataclass
class DetectEmbedOutput:
    boxes: np.ndarray  # (n, 4) normalised
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,)
    box: np.ndarray  # (4,) the picked box, normalised
    vector: np.ndarray  # (dim,) unit norm
    model_version: str


def _bytes_input(name: str, values: list[bytes]) -> InferInput:
    arr = np.array([[v] for v in values], dtype=np.object_)
    inp = InferInput(name, list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


class TritonModels:
    """Async client; create it inside the event loop that uses it (gRPC aio channels are
    bound to one loop)."""

    def __init__(self, url: str, timeout_s: float = 2.0):
        self.url, self.timeout_s = url, timeout_s
        self._client = grpcaio.InferenceServerClient(url, channel_args=channel_args())

    async def close(self) -> None:
        await self._client.close()

    async def _infer(self, model: str, inputs: list, outputs: list[str], version: int
                     ) -> list[np.ndarray]:
        try:
            result = await self._client.infer(
                model, inputs, model_version=str(version),
                outputs=[InferRequestedOutput(o) for o in outputs],
                client_timeout=self.timeout_s)
        except InferenceServerException as err:
            message = err.message() or str(err)
            if BAD_IMAGE_PREFIX in message:
                raise BadModelInput(message.split(BAD_IMAGE_PREFIX, 1)[1].strip()) from err
            raise ModelUnavailable(f"triton {model}/{version} at {self.url}: {message}"
                                   ) from err
        return [result.as_numpy(o) for o in outputs]

    async def detect(self, image: bytes, version: int) -> DetectorOutput:
        boxes, scores, labels, mv = await self._infer(
            "detector", [_bytes_input("IMAGE", [image])],
            ["BOXES", "SCORES", "LABELS", "MODEL_VERSION"], version)
        return DetectorOutput(boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1),
                              mv.reshape(-1)[0].decode())

    async def detect_embed(self, image: bytes, version: int) -> DetectEmbedOutput:
        """Detections, the picked box and its unit vector, from one call."""
        boxes, scores, labels, box, vec, mv = await self._infer(
            "detect_embed", [_bytes_input("IMAGE", [image])],
            ["BOXES", "SCORES", "LABELS", "BOX", "EMBEDDING", "MODEL_VERSION"], version)
        return DetectEmbedOutput(boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1),
                                 box.reshape(4), vec.reshape(-1), mv.reshape(-1)[0].decode())

    async def embed(self, images: list[bytes], boxes: np.ndarray, version: int
                    ) -> tuple[np.ndarray, str]:
        """Unit vectors for the boxed objects, and the model version that made them."""
        box = InferInput("BOX", [len(images), 4], "FP32")
        box.set_data_from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        vec, mv = await self._infer("embedder", [_bytes_input("IMAGE", images), box],
                                    ["EMBEDDING", "MODEL_VERSION"], version)
        return vec, mv.reshape(-1)[0].decode()

    async def ready(self, version: int) -> bool:
        try:
            if not await self._client.is_server_ready():
                return False
            for model in MODELS:
                if not await self._client.is_model_ready(model, str(version)):
                    return False
            return True
        except InferenceServerException:
            return False

    async def load_models(self) -> None:
        """Re-read the configs (the served-versions list) and load what they name, the three
        models at once: Triton reloads every served version of a model whose config changed,
        and one after another took 11 s on two idle cores, at once 5.5 to 7.8 s."""
        try:
            await asyncio.gather(*(self._client.load_model(model) for model in MODELS))
        except InferenceServerException as err:
            raise ModelUnavailable(f"triton at {self.url} failed to load models: "
                                   f"{err.message() or err}") from err
