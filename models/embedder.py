"""The embedder: image crop -> 256-d L2-normalised vector. Nearness must mean "looks alike".

Backbone options (`EmbedderSpec.backbone`):
- `efficientnet-lite0` with the installed ImageNet weights (default). Frozen with a fixed
  random projection (`head="random"`) it is the first-milestone baseline; fine-tuning the
  last `tuned_blocks` MBConv blocks, the 1x1 conv head and an MLP projection with the
  contrastive loss is the production model. Everything before the tuned blocks stays frozen
  in eval mode, so training computes it once per image view and caches it (two CPU cores).
- other EfficientNet-Lite variants (or re-trained weights) from a local `weights` file.
- `tiny_cnn`: a small CNN from scratch for fast unit tests.

Every network takes RGB floats in [0, 1] at EMBED_PX and normalises inside (see
`models.preprocessing`), so the exported TorchScript file is all that serving needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.backbones import LITE_VARIANTS, load_efficientnet_lite
from models.preprocessing import EMBED_PX, LITE_MEAN, LITE_STD, embed_input

TINY_CNN = "tiny_cnn"
BACKBONES = (*LITE_VARIANTS, TINY_CNN)
HEADS = ("mlp", "random")


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything needed to rebuild an embedder's architecture (weights come separately)."""

    backbone: str = "efficientnet-lite0"
    dim: int = 256
    tuned_blocks: int = 2  # trailing backbone blocks fine-tuned; earlier ones frozen + cached
    tune_conv_head: bool = True  # train the backbone's 1x1 conv head (else cache pooled output)
    head: str = "mlp"  # mlp (trained) | random (fixed random projection: frozen baseline)
    hidden: int = 512
    pretrained: bool = True
    weights: str | None = None  # local backbone state dict (other backbones / weights)
    seed: int = 0  # random-projection seed

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {BACKBONES}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {HEADS}")
        if self.dim < 2 or self.tuned_blocks < 0:
            raise ValueError(f"need dim >= 2 and tuned_blocks >= 0, got {self.dim}, "
                             f"{self.tuned_blocks}")
        if self.tuned_blocks and not self.tune_conv_head:
            raise ValueError("tuned blocks under a frozen conv head cannot learn: set "
                             "tune_conv_head or tuned_blocks=0")


class TinyCNN(nn.Module):
    """Four stride-2 conv blocks: a from-scratch backbone for unit tests (~0.1 M params)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4]
        self.body = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(b), nn.ReLU(inplace=True))
            for a, b in zip(chans[:-1], chans[1:], strict=True)])
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Embedder(nn.Module):
    """frozen trunk -> tuned trunk -> global average pool -> head -> L2 normalise."""

    def __init__(self, spec: EmbedderSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or EmbedderSpec()
        self.register_buffer("mean", torch.tensor(LITE_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD), persistent=False)
        if spec.backbone == TINY_CNN:
            self.frozen = nn.Identity()
            self.tuned = TinyCNN()
            channels = self.tuned.out_channels
        else:
            net = load_efficientnet_lite(spec.backbone, EMBED_PX, spec.pretrained,
                                         Path(spec.weights) if spec.weights else None)
            n = len(net._blocks)
            if spec.tuned_blocks > n:
                raise ValueError(f"{spec.backbone} has {n} blocks; tuned_blocks="
                                 f"{spec.tuned_blocks}")
            cut = n - spec.tuned_blocks
            conv_head = [net._conv_head, net._bn1, nn.ReLU6()]
            frozen = [net._conv_stem, net._bn0, nn.ReLU6(), *net._blocks[:cut]]
            if spec.tune_conv_head:
                self.tuned = nn.Sequential(*net._blocks[cut:], *conv_head)
            else:  # head-only training caches the pooled 1280-d vector
                frozen += [*conv_head, nn.AdaptiveAvgPool2d(1)]
                self.tuned = nn.Identity()
            self.frozen = nn.Sequential(*frozen)
            channels = net._conv_head.out_channels
            for p in self.frozen.parameters():
                p.requires_grad_(False)
            if spec.head == "random":
                for p in self.tuned.parameters():
                    p.requires_grad_(False)
        self.channels = channels
        if spec.head == "mlp":
            self.head = nn.Sequential(nn.Linear(channels, spec.hidden), nn.ReLU(inplace=True),
                                      nn.Linear(spec.hidden, spec.dim))
        else:
            gen = torch.Generator().manual_seed(spec.seed)
            proj = torch.randn(channels, spec.dim, generator=gen) / spec.dim ** 0.5
            self.register_buffer("projection", proj)
            self.head = None
        self.train()  # frozen parts start (and stay) in eval mode

    def train(self, mode: bool = True) -> Embedder:
        """The frozen trunk keeps its ImageNet batch-norm statistics while the rest trains."""
        super().train(mode)
        self.frozen.eval()
        if self.spec.head == "random":
            self.tuned.eval()
        return self

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the frozen trunk for images (B, 3, S, S) in [0, 1] (what training caches)."""
        return self.frozen((images - self.mean) / self.std)

    def forward_from_frozen(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.tuned(features).mean(dim=(2, 3))
        out = self.head(pooled) if self.head is not None else pooled @ self.projection
        return F.normalize(out, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, EMBED_PX, EMBED_PX) RGB in [0, 1] -> (B, dim) unit vectors."""
        return self.forward_from_frozen(self.frozen_features(images))


def frozen_baseline(spec: EmbedderSpec | None = None) -> Embedder:
    """The pretrained backbone, untouched, with a fixed random projection to `dim`
    (Johnson-Lindenstrauss: cosines survive): the seed's first milestone."""
    base = spec or EmbedderSpec()
    return Embedder(EmbedderSpec(backbone=base.backbone, dim=base.dim, tuned_blocks=0,
                                 tune_conv_head=False, head="random", pretrained=base.pretrained,
                                 weights=base.weights, seed=base.seed)).eval()


def save_embedder(model: Embedder, path: Path) -> Path:
    """Spec + weights in one file (`weights_only`-loadable: the spec is stored as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"spec_json": json.dumps(asdict(model.spec)), "state_dict": state}, path)
    return path


def load_embedder(path: Path) -> Embedder:
    """Rebuild an embedder saved by `save_embedder` (the backbone's own file is not needed:
    the saved state dict covers every layer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedder file not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "spec_json" not in blob:
        raise ValueError(f"{path} is not an embedder saved by save_embedder")
    spec = EmbedderSpec(**{**json.loads(blob["spec_json"]), "pretrained": False,
                           "weights": None})
    model = Embedder(spec)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


# --------------------------------------------------------------------------- batch embedding
def load_inputs(root: Path, paths: Sequence[str], boxes: np.ndarray | None,
                threads: int = 2) -> np.ndarray:
    """Decode + crop + resize a list of world-relative image paths: (n, 3, S, S) float32."""
    root = Path(root)
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(boxes)} boxes")

    def one(i: int) -> np.ndarray:
        path = root / paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as img:
            return embed_input(img.convert("RGB"), None if boxes is None else boxes[i])

    if len(paths) == 0:
        return np.zeros((0, 3, EMBED_PX, EMBED_PX), np.float32)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return np.stack(list(pool.map(one, range(len(paths)))))


def embed_arrays(model, arrays: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run an embedder over preprocessed inputs -> (n, dim) float32. `model` is a torch
    module (eager or TorchScript) or a numpy callable such as `models.export.ExportedEmbedder`."""
    if len(arrays) == 0:
        raise ValueError("nothing to embed")
    if isinstance(model, nn.Module):
        with torch.inference_mode():
            outs = [model(torch.from_numpy(arrays[i:i + batch_size])).float().numpy()
                    for i in range(0, len(arrays), batch_size)]
    else:
        outs = [np.asarray(model(arrays[i:i + batch_size]))
                for i in range(0, len(arrays), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False)


def embed_images(model, root: Path, paths: Sequence[str], boxes: np.ndarray | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """Embed world-relative image paths (each optionally cropped to its normalised box) with
    the shared preprocessing. Decoding goes in chunks so memory stays flat."""
    if len(paths) == 0:
        raise ValueError("no images to embed")
    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    chunk = batch_size * 16
    try:
        out = [embed_arrays(model, load_inputs(root, paths[i:i + chunk],
                                               None if boxes is None else boxes[i:i + chunk]),
                            batch_size)
               for i in range(0, len(paths), chunk)]
    finally:
        if is_module:
            model.train(was_training)
    return np.concatenate(out)
