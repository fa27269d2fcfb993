"""Train, evaluate and export the room-scene detector (`loupe train-detector`).

Training is PyTorch Lightning on the world's `scenes` / `scene_objects` tables (train split,
best checkpoint chosen on val mAP@0.5). The detector's stride-8 trunk is frozen (see
models/detector.py), so its features are computed once per scene (and once for its mirror
image, the flip augmentation) and training runs only the upper trunk, neck and heads: a few
minutes on two CPU cores. The exported ONNX graph, not the eager model, is then scored on the
held-out split (COCO-style 101-point AP, implemented here in numpy) and timed at batch 1, so
the reported numbers are those of what Triton serves.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from data_contracts.durable import atomic_dir, write_bytes_atomic, write_text_atomic
from models.detector import (
    CenterNetDetector,
    Detections,
    ExportedDetector,
    centernet_loss,
    encode_targets,
    export_onnx,
    postprocess,
    prepare_image,
)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's 0.5:0.05:0.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation
SPLITS = ("train", "val", "test")
EXPORT_DIR = "export"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
PREDICTIONS_PNG = "predictions.png"


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Knobs of the detector stage (params.yaml `detector:`)."""

    input_size: int = 192  # serving resolution; latency budget is 20 ms per image
    neck_channels: int = 64
    pretrained: bool = True  # ImageNet EfficientNet-Lite0 trunk
    epochs: int = 8  # val mAP@0.5 plateaus by epoch 5 on the demo world
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_share: float = 0.05  # linear warm-up share of all steps, then cosine to zero
    size_loss_weight: float = 0.1  # paper's weight on the L1 size loss
    flip: bool = True  # horizontal-flip augmentation (both views are cached)
    train_scenes: int | None = None  # first N train scenes only (smoke runs)
    eval_split: str = "test"
    eval_score_threshold: float = 0.01  # low, so AP sees the whole precision-recall curve
    serve_score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 20
    val_every_n_epochs: int = 1  # validation + checkpoint cadence
    num_threads: int = 2
    latency_runs: int = 100
    grid_scenes: int = 8
    seed: int = 0
    log_mlflow: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the repo's sqlite db
    experiment: str = "loupe-detector"

    def __post_init__(self) -> None:
        if self.eval_split not in SPLITS:
            raise ValueError(f"eval_split must be one of {SPLITS}, got {self.eval_split!r}")
        for name in ("epochs", "batch_size", "num_threads", "latency_runs", "max_detections",
                     "val_every_n_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_scenes is not None and self.train_scenes < 1:
            raise ValueError(f"train_scenes must be >= 1 or None, got {self.train_scenes}")
        if not 0 <= self.warmup_share < 1:
            raise ValueError(f"warmup_share must lie in [0, 1), got {self.warmup_share}")

    @classmethod
    def from_params(cls, params: dict) -> DetectorTrainConfig:
        """Config from a params.yaml block; unknown keys are an error, not silently ignored."""
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown detector params {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**params)


@dataclass
class SceneSet:
    """Scenes of one split with their ground truth; boxes normalised, labels index categories."""

    root: Path
    scene_ids: list[str]
    image_paths: list[Path]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    categories: list[str]

    def __len__(self) -> int:
        return len(self.scene_ids)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.image_paths[i]) as im:
            return im.convert("RGB")


@dataclass
class DetectorTrainResult:
    out_dir: Path
    metrics: dict
    best_checkpoint: Path
    export_dir: Path
    run_id: str | None
    seconds: float
    config: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)


# --------------------------------------------------------------------------- data
def scene_categories(world_root: Path) -> list[str]:
    """Label order: sorted category names of all scene objects (stable across splits)."""
    objects = _read_table(Path(world_root), "scene_objects")
    return sorted(objects["category"].unique().tolist())


def _read_table(root: Path, name: str) -> pd.DataFrame:
    path = root / "tables" / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"missing table {path} (generate a world with `loupe world`)")
    return pd.read_parquet(path)


def load_scenes(world_root: Path, split: str, limit: int | None = None,
                categories: list[str] | None = None) -> SceneSet:
    """Scenes of `split` (sorted by id) with boxes and labels; checks the boxes are sane."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(world_root)
    scenes = _read_table(root, "scenes")
    objects = _read_table(root, "scene_objects")
    categories = categories or scene_categories(root)
    unknown = set(objects["category"]) - set(categories)
    if unknown:
        raise ValueError(f"scene_objects has categories outside {categories}: {sorted(unknown)}")
    coords = objects[["x0", "y0", "x1", "y1"]].to_numpy()
    bad = ~((coords >= 0) & (coords <= 1)).all(1) | (coords[:, 2] <= coords[:, 0]) | (
        coords[:, 3] <= coords[:, 1])
    if bad.any():
        raise ValueError(f"{int(bad.sum())} scene_objects boxes are not normalised x0<x1, y0<y1 "
                         f"in [0, 1], e.g. {objects[bad].iloc[0].to_dict()}")
    chosen = scenes[scenes["split"] == split].sort_values("scene_id")
    if limit is not None:
        chosen = chosen.head(limit)
    if chosen.empty:
        raise ValueError(f"no scenes in split {split!r} of {root}")
    label_of = {c: i for i, c in enumerate(categories)}
    by_scene = {sid: g for sid, g in objects.groupby("scene_id")}
    boxes, labels, paths = [], [], []
    for sid, rel in zip(chosen["scene_id"], chosen["image_path"], strict=True):
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"scene image missing: {path}")
        g = by_scene.get(sid, objects.iloc[:0])
        boxes.append(g[["x0", "y0", "x1", "y1"]].to_numpy(np.float32))
        labels.append(g["category"].map(label_of).to_numpy(np.int64))
        paths.append(path)
    return SceneSet(root, chosen["scene_id"].tolist(), paths, boxes, labels, list(categories))


def _prepared_batch(scenes: SceneSet, indices: Sequence[int], size: int) -> torch.Tensor:
    return torch.stack([prepare_image(scenes.image(i), size) for i in indices])


CHANNELS_LAST = torch.channels_last  # ~1.7x faster depthwise convs on CPU, train and cache


@torch.no_grad()
def cache_features(model: CenterNetDetector, scenes: SceneSet, flip: bool,
                   batch_size: int = 16) -> torch.Tensor:
    """Frozen stride-8 features (N, V, 40, S/8, S/8) in float16; view 1 is the mirror image.

    Small batches: at 64 the stem's activations outgrow the cache and each image costs 5x.
    """
    model.eval()
    views = []
    for start in range(0, len(scenes), batch_size):
        batch = _prepared_batch(scenes, range(start, min(start + batch_size, len(scenes))),
                                model.input_size).contiguous(memory_format=CHANNELS_LAST)
        per_view = [model.frozen_features(batch)]
        if flip:
            per_view.append(model.frozen_features(batch.flip(-1)))
        views.append(torch.stack(per_view, 1).half())
    return torch.cat(views)


def _mirror(boxes: np.ndarray) -> np.ndarray:
    return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)


class CachedSceneDataset(Dataset):
    """Cached frozen features + CenterNet targets; picks a random view (flip) per draw."""

    def __init__(self, features: torch.Tensor, scenes: SceneSet, num_classes: int, grid: int,
                 seed: int) -> None:
        self.features = features
        self.targets = [
            [encode_targets(b if view == 0 else _mirror(b), lab, num_classes, grid)
             for view in range(features.shape[1])]
            for b, lab in zip(scenes.boxes, scenes.labels, strict=True)
        ]
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n_views = self.features.shape[1]
        view = int(torch.randint(n_views, (1,), generator=self.generator)) if n_views > 1 else 0
        return self.features[i, view].float(), self.targets[i][view]


# --------------------------------------------------------------------------- lightning
class DetectorModule(pl.LightningModule):
    """Trains the detector on cached frozen features; validates with mAP@0.5."""

    def __init__(self, model: CenterNetDetector, cfg: DetectorTrainConfig,
                 val_scenes: SceneSet | None = None, val_features: torch.Tensor | None = None
                 ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.val_scenes = val_scenes
        self.val_features = val_features
        self._val_raw: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        features, targets = batch
        features = features.contiguous(memory_format=CHANNELS_LAST)
        losses = centernet_loss(self.model.forward_from_frozen(features), targets,
                                self.cfg.size_loss_weight)
        self.log_dict({f"train_{k}": v for k, v in losses.items()}, on_step=False,
                      on_epoch=True, batch_size=len(features))
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        features = batch[0].float().contiguous(memory_format=CHANNELS_LAST)
        self._val_raw.append(self.model.forward_from_frozen(features))

    def on_validation_epoch_end(self) -> None:
        raw = torch.cat(self._val_raw)
        self._val_raw.clear()
        dets = postprocess(raw, self.model.num_classes, self.cfg.eval_score_threshold,
                           self.cfg.nms_iou, self.cfg.max_detections)
        metrics = evaluate_scenes(dets, self.val_scenes)
        self.log("val_map50", _finite(metrics["map50"]))
        self.log("val_map50_95", _finite(metrics["map50_95"]))

    def val_dataloader(self):
        return DataLoader(torch.utils.data.TensorDataset(self.val_features[:, 0]),
                          batch_size=64)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.cfg.warmup_share * total))

        def factor(step: int) -> float:  # recomputed from cfg on resume, so epochs may grow
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _score(value: torch.Tensor | None) -> float:
    return float("nan") if value is None else float(value)


def _finite(value: float) -> float:
    return 0.0 if not math.isfinite(value) else float(value)


def fit_detector(model: CenterNetDetector, train: SceneSet, val: SceneSet,
                 cfg: DetectorTrainConfig, checkpoint_dir: Path, logger=False,
                 resume_from: Path | None = None) -> pl.Trainer:
    """Lightning fit on cached features; checkpoints best (val mAP@0.5) and last."""
    _require_checkpoint(resume_from)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model.to(memory_format=CHANNELS_LAST)
    train_features = cache_features(model, train, cfg.flip)
    val_features = cache_features(model, val, flip=False)
    grid = model.input_size // 8
    data = CachedSceneDataset(train_features, train, model.num_classes, grid, cfg.seed)
    loader = DataLoader(data, batch_size=min(cfg.batch_size, len(data)), shuffle=True,
                        drop_last=len(data) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed))
    module = DetectorModule(model, cfg, val, val_features)
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val_map50",
                                 mode="max", save_last=True)
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[checkpoint], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=cfg.val_every_n_epochs,
                         log_every_n_steps=1, deterministic=False)
    trainer.fit(module, train_dataloaders=loader,
                ckpt_path=str(resume_from) if resume_from is not None else None)
    return trainer


def _require_checkpoint(resume_from: Path | None) -> None:
    if resume_from is not None and not Path(resume_from).is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {resume_from}")


def load_checkpoint_weights(model: CenterNetDetector, checkpoint: Path) -> CenterNetDetector:
    """Lightning checkpoint -> the detector's weights (the module stores them as `model.`)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.eval()


# --------------------------------------------------------------------------- metrics
def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_detections(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray,
                     iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """COCO greedy matching in one image, one category: (T, N) true-positive flags.

    Detections are taken by descending score; each takes the unmatched ground-truth box of
    highest IoU >= the threshold, if any.
    """
    order = np.argsort(-det_scores, kind="mergesort")
    tp = np.zeros((len(iou_thresholds), len(det_boxes)), bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    ious = _iou_matrix(det_boxes[order], gt_boxes)
    for t, threshold in enumerate(iou_thresholds):
        taken = np.zeros(len(gt_boxes), bool)
        for rank, d in enumerate(order):
            candidates = np.where(taken, -1.0, ious[rank])
            g = int(np.argmax(candidates))
            if candidates[g] >= threshold:
                taken[g] = True
                tp[t, d] = True
    return tp


def average_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP from all detections' scores and TP flags; NaN if no GT."""
    if n_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    hits = tp[order].astype(np.float64)
    cum_tp, cum_fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = cum_tp / n_gt
    precision = cum_tp / (cum_tp + cum_fp)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def evaluate_detections(detections: Sequence[Detections], gt_boxes: Sequence[np.ndarray],
                        gt_labels: Sequence[np.ndarray], categories: Sequence[str]) -> dict:
    """Per-category AP at IoU 0.5 and 0.5:0.95 (COCO-style); means skip absent categories.

    `detections[i]`, `gt_boxes[i]` (K, 4) and `gt_labels[i]` (K,) describe image i; labels
    index `categories`.
    """
    if not len(detections) == len(gt_boxes) == len(gt_labels):
        raise ValueError(f"{len(detections)} detection lists for {len(gt_boxes)} box lists "
                         f"and {len(gt_labels)} label lists")
    n_cls, n_t = len(categories), len(IOU_THRESHOLDS)
    scores: list[list[np.ndarray]] = [[] for _ in range(n_cls)]
    hits: list[list[np.ndarray]] = [[] for _ in range(n_cls)]
    n_gt = np.zeros(n_cls, int)
    for det, boxes_i, labels_i in zip(detections, gt_boxes, gt_labels, strict=True):
        boxes, sc, lab = (np.asarray(det.boxes, np.float64), np.asarray(det.scores, np.float64),
                          np.asarray(det.labels, np.int64))
        boxes_i = np.asarray(boxes_i, np.float64).reshape(-1, 4)
        labels_i = np.asarray(labels_i, np.int64).reshape(-1)
        for c in range(n_cls):
            d, g = lab == c, labels_i == c
            n_gt[c] += int(g.sum())
            scores[c].append(sc[d])
            hits[c].append(match_detections(boxes[d], sc[d], boxes_i[g]))
    ap = np.full((n_cls, n_t), np.nan)
    for c in range(n_cls):
        s = np.concatenate(scores[c])
        tp = np.concatenate(hits[c], axis=1)
        for t in range(n_t):
            ap[c, t] = average_precision(s, tp[t], int(n_gt[c]))
    present = n_gt > 0
    return {
        "map50": float(np.mean(ap[present, 0])) if present.any() else float("nan"),
        "map50_95": float(np.mean(ap[present])) if present.any() else float("nan"),
        "ap50": {c: _json_float(ap[i, 0]) for i, c in enumerate(categories)},
        "ap50_95": {c: _json_float(np.mean(ap[i])) for i, c in enumerate(categories)},
        "n_objects": {c: int(n_gt[i]) for i, c in enumerate(categories)},
    }


def evaluate_scenes(detections: Sequence[Detections], scenes: SceneSet) -> dict:
    return evaluate_detections(detections, scenes.boxes, scenes.labels, scenes.categories)


def _json_float(v: float) -> float | None:
    return round(float(v), 4) if math.isfinite(v) else None


# --------------------------------------------------------------------------- evaluation
def detect_scenes(detector: ExportedDetector, scenes: SceneSet, score_threshold: float,
                  batch_size: int = 32) -> list[Detections]:
    out: list[Detections] = []
    for start in range(0, len(scenes), batch_size):
        images = [scenes.image(i) for i in range(start, min(start + batch_size, len(scenes)))]
        out.extend(detector.detect(images, score_threshold))
    return out


def measure_latency(export_dir: Path, image: Image.Image, threads: int, runs: int = 100
                    ) -> dict[str, float]:
    """Batch-1 wall time of `detect` (resize + ONNX graph + decode + NMS): p50 / p90 in ms."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        detector = ExportedDetector(export_dir, threads=threads)
        for _ in range(10):
            detector.detect([image])
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            detector.detect([image])
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(previous)
    return {"p50": round(statistics.median(times), 3),
            "p90": round(float(np.percentile(times, 90)), 3)}


def draw_predictions(scenes: SceneSet, detections: Sequence[Detections], out_png: Path,
                     n: int = 8, columns: int = 4) -> Path:
    """Grid of scenes: ground truth thin white, predictions coloured with label and score."""
    colours = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230)]
    n = min(n, len(scenes))
    tiles = []
    for i in range(n):
        img = scenes.image(i)
        w, h = img.size
        draw = ImageDraw.Draw(img)
        for box in scenes.boxes[i]:
            draw.rectangle([box[0] * w, box[1] * h, box[2] * w, box[3] * h],
                           outline=(255, 255, 255), width=1)
        det = detections[i]
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(),
                                     det.labels.tolist(), strict=True):
            colour = colours[label % len(colours)]
            draw.rectangle([box[0] * w, box[1] * h, box[2] * w, box[3] * h], outline=colour,
                           width=2)
            draw.text((box[0] * w + 2, box[1] * h + 1),
                      f"{scenes.categories[label]} {score:.2f}", fill=colour)
        tiles.append(img)
    rows = math.ceil(n / columns)
    tw, th = tiles[0].size
    sheet = Image.new("RGB", (tw * min(n, columns), th * rows), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tw, (i // columns) * th))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(out_png)
    return out_png


# --------------------------------------------------------------------------- stage
def train_detector(cfg: DetectorTrainConfig, world_root: Path, out_dir: Path,
                   resume_from: Path | None = None) -> DetectorTrainResult:
    """Train on the world's scenes, export ONNX, score and time the export, log to MLflow.

    Writes into a temporary sibling of `out_dir` that replaces it only on success:
    checkpoints/{best,last}.ckpt, export/{detector.onnx,detector.json}, metrics.json and
    predictions.png (test scenes, boxes drawn).
    """
    t0 = time.perf_counter()
    world_root, out_dir = Path(world_root), Path(out_dir)
    _require_checkpoint(resume_from)
    torch.set_num_threads(cfg.num_threads)
    categories = scene_categories(world_root)
    train = load_scenes(world_root, "train", cfg.train_scenes, categories)
    val = load_scenes(world_root, "val", categories=categories)
    held_out = load_scenes(world_root, cfg.eval_split, categories=categories)
    with torch.random.fork_rng():  # the heads' initial weights: from the seed, not from
        torch.manual_seed(cfg.seed)  # whatever drew on torch's RNG earlier in the process
        model = CenterNetDetector(len(categories), cfg.input_size, cfg.neck_channels,
                                  cfg.pretrained)
    logger = _mlflow_logger(cfg)
    try:
        metrics, best_name = _train_into(cfg, model, train, val, held_out, out_dir, logger,
                                         resume_from, t0)
    except BaseException:
        if logger:
            logger.experiment.set_terminated(logger.run_id, "FAILED")
        raise
    run_id = None
    if logger:
        run_id = logger.run_id
        _log_run_outputs(logger, metrics, out_dir)
    return DetectorTrainResult(out_dir, metrics, out_dir / CHECKPOINT_DIR / best_name,
                               out_dir / EXPORT_DIR, run_id, metrics["seconds"], cfg)


def _train_into(cfg: DetectorTrainConfig, model: CenterNetDetector, train: SceneSet,
                val: SceneSet, held_out: SceneSet, out_dir: Path, logger,
                resume_from: Path | None, t0: float) -> tuple[dict, str]:
    """The body of `train_detector`, writing into a temporary sibling of `out_dir`."""
    with atomic_dir(out_dir) as tmp:
        t_fit = time.perf_counter()
        trainer = fit_detector(model, train, val, cfg, tmp / CHECKPOINT_DIR, logger, resume_from)
        fit_seconds = time.perf_counter() - t_fit
        best = tmp / CHECKPOINT_DIR / "best.ckpt"
        if not best.is_file():  # a resumed run that never beat the old best
            best = tmp / CHECKPOINT_DIR / "last.ckpt"
        load_checkpoint_weights(model, best)
        export_onnx(model, tmp / EXPORT_DIR, held_out.categories, cfg.serve_score_threshold,
                    cfg.nms_iou, cfg.max_detections)
        detector = ExportedDetector(tmp / EXPORT_DIR, threads=cfg.num_threads)
        dets = detect_scenes(detector, held_out, cfg.eval_score_threshold)
        scores = evaluate_scenes(dets, held_out)
        sample = held_out.image(0)
        lat1 = measure_latency(tmp / EXPORT_DIR, sample, 1, cfg.latency_runs)
        lat2 = measure_latency(tmp / EXPORT_DIR, sample, 2, cfg.latency_runs)
        metrics = {
            "map50": _json_float(scores["map50"]), "map50_95": _json_float(scores["map50_95"]),
            "latency_ms_p50": lat1["p50"], "latency_ms_p90": lat1["p90"],
            "latency_ms_p50_2threads": lat2["p50"], "latency_ms_p90_2threads": lat2["p90"],
            "ap50": scores["ap50"], "ap50_95": scores["ap50_95"],
            "eval_split": cfg.eval_split, "eval_scenes": len(held_out),
            "eval_objects": scores["n_objects"], "train_scenes": len(train),
            "epochs": trainer.current_epoch, "global_step": trainer.global_step,
            "best_val_map50": _json_float(_score(trainer.checkpoint_callback.best_model_score)),
            "input_size": cfg.input_size, "fit_seconds": round(fit_seconds, 1),
            "latency_note": "batch 1, resize + onnxruntime graph + decode + NMS, median of "
                            f"{cfg.latency_runs}",
        }
        serve_dets = [_above(d, cfg.serve_score_threshold) for d in dets]
        draw_predictions(held_out, serve_dets, tmp / PREDICTIONS_PNG, cfg.grid_scenes)
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics, best.name


def _above(det: Detections, threshold: float) -> Detections:
    keep = det.scores >= threshold
    return Detections(det.boxes[keep], det.scores[keep], det.labels[keep])


def _mlflow_logger(cfg: DetectorTrainConfig):
    """Lightning's MLflow logger on the registry's store (artifacts in mlruns/ beside it)."""
    if not cfg.log_mlflow:
        return False
    from pytorch_lightning.loggers import MLFlowLogger

    from pipelines.registry import artifact_root, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)
    logger = MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=uri,
                          artifact_location=artifact_root(uri), run_name="train-detector")
    logger.log_hyperparams(asdict(cfg))
    return logger


def _log_run_outputs(logger, metrics: dict, out_dir: Path) -> None:
    """Final held-out metrics (overall and per category), the report files, and the exported
    detector as an MLflow pyfunc model under `model/`, where the registry looks."""
    import tempfile

    from pipelines.mlflow_model import save_detector_model
    from pipelines.registry import MODEL_ARTIFACT_DIR

    client, run_id = logger.experiment, logger.run_id
    flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    for prefix in ("ap50", "ap50_95"):
        flat.update({f"{prefix}_{c}": v for c, v in metrics[prefix].items() if v is not None})
    for key, value in flat.items():
        client.log_metric(run_id, f"test_{key}" if key.startswith(("map", "ap")) else key,
                          float(value))
    client.log_artifact(run_id, str(out_dir / METRICS_FILE))
    client.log_artifact(run_id, str(out_dir / PREDICTIONS_PNG))
    with tempfile.TemporaryDirectory() as tmp:
        model = save_detector_model(out_dir / EXPORT_DIR, Path(tmp) / "model")
        client.log_artifacts(run_id, str(model), MODEL_ARTIFACT_DIR)
    client.set_terminated(run_id)


def register_detector(run_id: str, tracking_uri: str | None = None,
                      name: str = "loupe-detector"):
    """Register a run's exported detector as a version of `name` (`loupe-detector/N`) by the
    embedder's scheme (pipelines.registry.create_version), so `download_model` fetches it.
    Aliases and any promotion gate on mAP are not set here. Returns the ModelVersionRef."""
    from mlflow import MlflowClient

    from pipelines.registry import MODEL_ARTIFACT_DIR, create_version, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(run_id)
    files = {a.path for a in client.list_artifacts(run_id, MODEL_ARTIFACT_DIR)}
    if f"{MODEL_ARTIFACT_DIR}/MLmodel" not in files:
        raise ValueError(f"run {run_id} has no MLflow model under {MODEL_ARTIFACT_DIR}/; "
                         "nothing to register")
    map50 = run.data.metrics.get("test_map50", float("nan"))
    return create_version(client, name, run_id, run.info.artifact_uri,
                          {"test_map50": repr(map50)},
                          description="Loupe scene detector (CenterNet on EfficientNet-Lite0, "
                                      "ONNX + decode spec)")


def write_report(result: DetectorTrainResult, reports_dir: Path) -> dict:
    """reports/detector.json (DVC metrics) and reports/detector_predictions.png."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    report = dict(result.metrics)
    write_text_atomic(reports_dir / "detector.json", json.dumps(report, indent=1) + "\n")
    write_bytes_atomic(reports_dir / "detector_predictions.png",
                       (result.out_dir / PREDICTIONS_PNG).read_bytes())
    return report


def add_cli(sub) -> None:
    p = sub.add_parser("train-detector", help="train, export and score the scene detector")
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reports", type=Path, default=None,
                   help="write detector.json + detector_predictions.png here")
    p.add_argument("--params", type=Path, default=None, help="params.yaml with a detector: block")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: config's)")
    p.add_argument("--resume-from", type=Path, default=None, help="Lightning checkpoint")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from pipelines.config import load_section

    overrides = load_section(args.params, "detector")
    if args.tracking_uri is not None:
        overrides["tracking_uri"] = args.tracking_uri
    cfg = DetectorTrainConfig.from_params(overrides)
    result = train_detector(cfg, args.world, args.out, args.resume_from)
    summary = {"out": str(result.out_dir), "run_id": result.run_id,
               "map50": result.metrics["map50"], "map50_95": result.metrics["map50_95"],
               "latency_ms_p50": result.metrics["latency_ms_p50"], "seconds": result.seconds}
    if args.reports is not None:
        write_report(result, args.reports)
        summary["reports"] = str(args.reports)
    print(json.dumps(summary, indent=1))
    return 0
