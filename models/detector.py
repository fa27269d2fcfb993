"""Room-scene object detector: CenterNet heads on a truncated EfficientNet-Lite0 trunk.

Design: CenterNet ("Objects as Points", Zhou, Wang & Krähenbühl, 2019). Every object is the
peak of a per-category heatmap at its box centre; two more maps regress the box size and the
sub-cell offset of the centre. Decoding is a 3x3 max-pool peak pick (the paper's NMS-free
decode) followed by a class-aware greedy NMS written in plain torch (torchvision ops do not
import here), which removes the rare same-class double peaks the max-pool misses.

Trunk: the ImageNet EfficientNet-Lite0 (Tan & Le 2019, "lite": ReLU6, no SE) cut after its
stride-16 stage (blocks 0-10); the head of the classifier (stride 32 + 1280-d conv) costs
a third of the compute and the world's objects (15-95 px at 192 px) do not need it. A
two-level FPN-style neck adds the stride-16 features to the stride-8 ones, and the heads run
at stride 8. The stem and blocks 0-4 (stride <= 8) stay frozen in eval mode: ImageNet edges
and textures are enough for the shop's shapes, and frozen layers let training cache their
output once instead of recomputing it every epoch on two shared CPU cores.

The network takes RGB floats in [0, 1] at `input_size` x `input_size` and normalises inside,
so the exported graph is self-contained; its single output packs
[heatmap logits (C) | box size (2) | centre offset (2)] at stride 8. `postprocess` turns that
into boxes normalised to [0, 1] (the tables' convention) and runs outside the graph, so the
Triton python model can call it on the exported model's output.

Salience (the default box offered to the user; see `pick_salient`):
    salience = score * sqrt(area) * exp(-d^2 / (2 * sigma^2))
with area the normalised box area and d the distance from the box centre to the image
centre (normalised units, sigma = 0.25). People centre what they photograph: sqrt(area) so a
big rug half out of frame does not beat the lamp in the middle, the Gaussian so an object at
the frame edge (d ~ 0.5, factor 0.14) wins only when it dwarfs the rest, and the score so a
confident detection beats a doubtful one of the same size and place.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data_contracts.durable import write_atomic, write_json_atomic
from models.backbones import load_efficientnet_lite
from models.preprocessing import LITE_MEAN, LITE_STD, resize_to_array

STRIDE = 8
FROZEN_BLOCKS = 5  # blocks 0-4: stride <= 8, frozen and cacheable
TRUNK_BLOCKS = 11  # blocks 0-10: up to the stride-16 stage
C3_CHANNELS = 40  # output of block 4 (stride 8)
C4_CHANNELS = 112  # output of block 10 (stride 16)
SALIENCE_SIGMA = 0.25


@dataclass(frozen=True)
class Detections:
    """One image's detections: boxes (N, 4) normalised x0,y0,x1,y1; scores (N,); labels (N,)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())


class CenterNetDetector(nn.Module):
    """CenterNet on EfficientNet-Lite0 (blocks 0-10) with a stride-8 FPN neck; see module doc."""

    def __init__(self, num_classes: int, input_size: int = 192, neck_channels: int = 64,
                 pretrained: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if input_size % 32 or input_size < 64:
            raise ValueError(f"input_size must be a multiple of 32 and >= 64, got {input_size}")
        self.num_classes = num_classes
        self.input_size = input_size
        net = load_efficientnet_lite("efficientnet-lite0", input_size, pretrained)
        self.register_buffer("mean", torch.tensor(LITE_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD), persistent=False)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.frozen_blocks = nn.Sequential(*net._blocks[:FROZEN_BLOCKS])
        self.tuned_blocks = nn.Sequential(*net._blocks[FROZEN_BLOCKS:TRUNK_BLOCKS])
        for p in [*self.stem.parameters(), *self.frozen_blocks.parameters()]:
            p.requires_grad_(False)
        c = neck_channels
        self.lateral = nn.Conv2d(C3_CHANNELS, c, 1)
        self.top_down = nn.Conv2d(C4_CHANNELS, c, 1)
        self.smooth = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({
            name: nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, groups=c),  # depthwise-separable: ~1/8 the cost
                nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, out, 1))
            for name, out in (("heatmap", num_classes), ("size", 2), ("offset", 2))
        })
        # focal-loss prior (paper: -2.19, i.e. p = 0.1) so early training is not swamped
        nn.init.constant_(self.heads["heatmap"][-1].bias, -2.19)

    def train(self, mode: bool = True) -> CenterNetDetector:
        """Frozen stages keep ImageNet batch-norm statistics even while the rest trains."""
        super().train(mode)
        self.stem.eval()
        self.frozen_blocks.eval()
        return self

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """Stride-8 features of the frozen stages (what training caches)."""
        x = (images - self.mean) / self.std
        return self.frozen_blocks(self.stem(x))

    def forward_from_frozen(self, c3: torch.Tensor) -> torch.Tensor:
        c4 = self.tuned_blocks(c3)
        p3 = self.lateral(c3) + F.interpolate(self.top_down(c4), size=c3.shape[-2:],
                                              mode="nearest")
        p3 = self.smooth(p3)
        return torch.cat([self.heads["heatmap"](p3), self.heads["size"](p3),
                          self.heads["offset"](p3)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) RGB in [0, 1] -> raw (B, C + 4, S/8, S/8); see `postprocess`."""
        return self.forward_from_frozen(self.frozen_features(images))


# --------------------------------------------------------------------------- input
def prepare_array(image: Image.Image, input_size: int) -> np.ndarray:
    """Whole scene -> (3, S, S) float32 RGB in [0, 1]; boxes stay valid (normalised coords)."""
    return resize_to_array(image, input_size)


def prepare_image(image: Image.Image, input_size: int) -> torch.Tensor:
    """`prepare_array` as a tensor (training and eager evaluation)."""
    return torch.from_numpy(prepare_array(image, input_size))


# --------------------------------------------------------------------------- training targets
def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet/CenterNet radius: the largest centre shift that keeps IoU >= min_overlap."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def encode_targets(boxes: np.ndarray, labels: np.ndarray, num_classes: int, grid: int
                   ) -> dict[str, torch.Tensor]:
    """CenterNet targets on a grid x grid map for normalised boxes (N, 4) and labels (N,).

    heatmap (C, g, g): Gaussian peaks (1.0 at each centre cell); size / offset (2, g, g):
    box width-height in cells and centre offset inside its cell, defined where mask (1, g, g)
    is 1.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
    heat = np.zeros((num_classes, grid, grid), np.float32)
    size = np.zeros((2, grid, grid), np.float32)
    offset = np.zeros((2, grid, grid), np.float32)
    mask = np.zeros((1, grid, grid), np.float32)
    ys, xs = np.mgrid[0:grid, 0:grid]
    for (x0, y0, x1, y1), label in zip(boxes * grid, labels, strict=True):
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            raise ValueError(f"degenerate box {(x0, y0, x1, y1)} (grid units)")
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ix, iy = min(int(cx), grid - 1), min(int(cy), grid - 1)
        sigma = (2 * max(0, int(gaussian_radius(h, w))) + 1) / 6
        g = np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))
        heat[label] = np.maximum(heat[label], g)
        size[:, iy, ix] = (w, h)
        offset[:, iy, ix] = (cx - ix, cy - iy)
        mask[0, iy, ix] = 1.0
    return {"heatmap": torch.from_numpy(heat), "size": torch.from_numpy(size),
            "offset": torch.from_numpy(offset), "mask": torch.from_numpy(mask)}


def centernet_loss(raw: torch.Tensor, targets: dict[str, torch.Tensor], size_weight: float = 0.1
                   ) -> dict[str, torch.Tensor]:
    """Paper loss: penalty-reduced focal loss (alpha 2, beta 4) + L1 size (x0.1) + L1 offset."""
    c = targets["heatmap"].shape[1]
    logits, size, offset = raw[:, :c], raw[:, c:c + 2], raw[:, c + 2:c + 4]
    gt = targets["heatmap"]
    pos = gt.eq(1).float()
    n_pos = pos.sum().clamp(min=1.0)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = -(log_p * (1 - p) ** 2 * pos).sum()
    neg_loss = -(log_1mp * p**2 * (1 - gt) ** 4 * (1 - pos)).sum()
    focal = (pos_loss + neg_loss) / n_pos
    mask = targets["mask"]
    n_obj = mask.sum().clamp(min=1.0)
    size_l1 = (F.l1_loss(size, targets["size"], reduction="none") * mask).sum() / n_obj
    off_l1 = (F.l1_loss(offset, targets["offset"], reduction="none") * mask).sum() / n_obj
    total = focal + size_weight * size_l1 + off_l1
    return {"loss": total, "focal": focal, "size_l1": size_l1, "offset_l1": off_l1}


# --------------------------------------------------------------------------- decoding
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes (N, 4) and (M, 4) in x0,y0,x1,y1 -> (N, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
        iou_threshold: float = 0.5) -> torch.Tensor:
    """Class-aware greedy NMS: indices kept, by descending score.

    A box is dropped when a higher-scoring box of the same label overlaps it with
    IoU > iou_threshold; boxes of different labels never suppress each other.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    order = torch.argsort(scores, descending=True, stable=True)
    same_label = labels[order, None] == labels[None, order]
    overlap = (box_iou(boxes[order], boxes[order]) > iou_threshold) & same_label
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlap[i]
    return order[torch.tensor(keep, dtype=torch.long)]


def _max3x3(heat: torch.Tensor) -> torch.Tensor:
    """3x3 max filter from nine shifted views (the paper's max-pool peak test).

    Not F.max_pool2d: it splits these few thousand values over the intra-op thread pool,
    and with 2 threads on a busy host each call waited ~7 ms for the second core.
    """
    gh, gw = heat.shape[-2:]
    padded = F.pad(heat, (1, 1, 1, 1), value=-1.0)
    out = heat
    for dy in range(3):
        for dx in range(3):
            out = torch.maximum(out, padded[..., dy:dy + gh, dx:dx + gw])
    return out


def postprocess(raw: torch.Tensor, num_classes: int, score_threshold: float = 0.3,
                iou_threshold: float = 0.5, max_detections: int = 20) -> list[Detections]:
    """Network output (B, C + 4, g, g) -> per-image detections, boxes normalised to [0, 1]."""
    if raw.ndim != 4 or raw.shape[1] != num_classes + 4:
        raise ValueError(f"expected raw output (B, {num_classes + 4}, g, g), "
                         f"got {tuple(raw.shape)}")
    raw = torch.as_tensor(raw).float()
    b, _, gh, gw = raw.shape
    heat = torch.sigmoid(raw[:, :num_classes])
    peaks = heat * (_max3x3(heat) == heat)
    k = min(max_detections, num_classes * gh * gw)
    scores, flat = peaks.reshape(b, -1).topk(k, dim=1)
    labels = flat // (gh * gw)
    cell = flat % (gh * gw)
    iy, ix = cell // gw, cell % gw
    out: list[Detections] = []
    for i in range(b):
        size = raw[i, num_classes:num_classes + 2, iy[i], ix[i]].T  # (k, 2) in cells
        off = raw[i, num_classes + 2:num_classes + 4, iy[i], ix[i]].T
        cx = (ix[i].float() + off[:, 0]) / gw
        cy = (iy[i].float() + off[:, 1]) / gh
        w, h = size[:, 0].clamp(min=0) / gw, size[:, 1].clamp(min=0) / gh
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clamp(0, 1)
        # a box clipped to the frame, or decoded with a zero size, has no area to crop
        keep = ((scores[i] >= score_threshold) & (boxes[:, 2] > boxes[:, 0])
                & (boxes[:, 3] > boxes[:, 1]))
        boxes, s, lab = boxes[keep], scores[i][keep], labels[i][keep]
        kept = nms(boxes, s, lab, iou_threshold)
        out.append(Detections(boxes[kept], s[kept], lab[kept]))
    return out


# --------------------------------------------------------------------------- salience
def salience(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = SALIENCE_SIGMA
             ) -> torch.Tensor:
    """score * sqrt(area) * exp(-d^2 / 2 sigma^2) per box (normalised coordinates)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    d2 = (cx - 0.5) ** 2 + (cy - 0.5) ** 2
    return scores * area.sqrt() * torch.exp(-d2 / (2 * sigma**2))


def pick_salient(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = SALIENCE_SIGMA
                 ) -> int | None:
    """Index of the default box to crop (see module doc), or None when there is no box."""
    values = salience(boxes, scores, sigma)
    if values.numel() == 0:
        return None
    return int(torch.argmax(values))


WHOLE_PHOTO = (0.0, 0.0, 1.0, 1.0)
PICK_RULES = ("category", "salient", "whole")


@dataclass(frozen=True)
class PickPolicy:
    """Which box of a catalog photo gets cropped and embedded: the first rule that finds one.

    "category": the most salient detection whose category is the listing's; "salient": the
    most salient detection (`pick_salient`, the box a user is offered for the same photo);
    "whole": the whole photo. The default is the query path's rule; a policy is recorded with
    the vectors it made (`str(policy)`, e.g. "salient>whole") because another policy makes
    other vectors.
    """

    rules: tuple[str, ...] = ("salient", "whole")

    def __post_init__(self) -> None:
        rules = self.rules
        if (not rules or rules[-1] != "whole" or len(set(rules)) != len(rules)
                or set(rules) - set(PICK_RULES)):
            raise ValueError(f"pick policy {'>'.join(self.rules)!r}: rules must be distinct, "
                             f"from {PICK_RULES}, and end with 'whole' (e.g. "
                             "'category>salient>whole')")

    def __str__(self) -> str:
        return ">".join(self.rules)

    @classmethod
    def parse(cls, text: str) -> PickPolicy:
        return cls(tuple(text.split(">")))

    def pick(self, det: Detections, categories: list[str], category: str | None = None
             ) -> tuple[float, float, float, float]:
        """The box (normalised x0, y0, x1, y1) to crop from a photo with detections `det`;
        `categories` names the detector's labels, `category` is the listing's (or None)."""
        for rule in self.rules[:-1]:  # the last rule, "whole", always has its box
            keep = torch.arange(len(det))
            if rule == "category":
                if category is None:
                    continue
                keep = torch.tensor([i for i, lab in enumerate(det.labels.tolist())
                                     if categories[lab] == category], dtype=torch.long)
            best = pick_salient(det.boxes[keep], det.scores[keep])
            if best is not None:
                return tuple(float(v) for v in det.boxes[keep[best]])
        return WHOLE_PHOTO


# --------------------------------------------------------------------------- export
SPEC_FILE = "detector.json"
ONNX_FILE = "detector.onnx"


def export_onnx(model: CenterNetDetector, out_dir: Path, categories: list[str],
                score_threshold: float = 0.3, iou_threshold: float = 0.5,
                max_detections: int = 20) -> Path:
    """Write detector.onnx (the network, dynamic batch) and detector.json (what decodes it).

    The spec carries the category order, input size and decode settings so a server never
    pairs a graph with the wrong labels; both files are written atomically.
    """
    if len(categories) != model.num_classes:
        raise ValueError(f"{len(categories)} categories for a {model.num_classes}-class model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.rand(2, 3, model.input_size, model.input_size)
    program = torch.onnx.export(
        model, (example,), input_names=["images"], output_names=["raw"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=256)}},
        dynamo=True, verbose=False)
    write_atomic(out_dir / ONNX_FILE, lambda tmp: program.save(str(tmp)))
    spec = {"design": "CenterNet (Zhou et al. 2019) on EfficientNet-Lite0 blocks 0-10",
            "categories": list(categories), "input_size": model.input_size, "stride": STRIDE,
            "input": "images: float32 (B, 3, S, S) RGB in [0, 1]",
            "output": "raw: float32 (B, C + 4, S/8, S/8) = heatmap logits | size | offset",
            "score_threshold": score_threshold, "iou_threshold": iou_threshold,
            "max_detections": max_detections}
    write_json_atomic(out_dir / SPEC_FILE, spec, sort_keys=False)
    return out_dir / ONNX_FILE


class ExportedDetector:
    """The exported detector as served: onnxruntime graph + `postprocess` in plain torch.

    This is what the Triton python model (and the indexer) call: `detect(images)` takes
    decoded PIL images of any size and returns boxes normalised to the original image.
    """

    def __init__(self, export_dir: Path, threads: int = 1) -> None:
        from models.export import onnx_session

        export_dir = Path(export_dir)
        for name in (ONNX_FILE, SPEC_FILE):
            if not (export_dir / name).is_file():
                raise FileNotFoundError(f"exported detector incomplete: {export_dir / name}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.spec = json.loads((export_dir / SPEC_FILE).read_text())
        self.categories: list[str] = list(self.spec["categories"])
        self.input_size = int(self.spec["input_size"])
        self.session = onnx_session(export_dir / ONNX_FILE, threads)

    def raw(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Network output for a prepared batch (B, 3, S, S)."""
        images = np.asarray(batch, dtype=np.float32)
        return torch.from_numpy(self.session.run(["raw"], {"images": images})[0])

    def detect(self, images: list[Image.Image], score_threshold: float | None = None
               ) -> list[Detections]:
        """Decoded PIL images (any size) -> detections with boxes normalised to each image."""
        if not images:
            return []
        batch = np.stack([prepare_array(im, self.input_size) for im in images])
        threshold = self.spec["score_threshold"] if score_threshold is None else score_threshold
        return postprocess(self.raw(batch), len(self.categories), threshold,
                           self.spec["iou_threshold"], self.spec["max_detections"])


def load_detector(export_dir: Path, threads: int = 1):
    """Either detector kind from its export directory, by the spec's `kind`: the trained
    CenterNet (`ExportedDetector`, no kind recorded) or the pretrained COCO SSD
    (`models.coco_detector.CocoDetector`). Triton, the catalog treatment and evaluation load
    through this, so a registered version is served the same way whichever kind it is."""
    from models.coco_detector import KIND as COCO_KIND

    spec_path = Path(export_dir) / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"exported detector incomplete: {spec_path}")
    if json.loads(spec_path.read_text()).get("kind") == COCO_KIND:
        from models.coco_detector import CocoDetector

        return CocoDetector(Path(export_dir), threads=threads)
    return ExportedDetector(Path(export_dir), threads=threads)
