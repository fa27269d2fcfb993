"""Contrastive embedder training (`loupe train`): harvested pairs -> exported embedder.

Recipe (PyTorch Lightning, CPU-minutes on the demo world):
- Model: `models.embedder.Embedder`; the frozen trunk runs once per image *view* (the plain
  crop plus `views - 1` augmented ones: jittered square crop, flip, brightness/contrast and
  colour-cast shifts) and its output is cached on disk (`FeatureCache`), one entry per photo
  content and box, so the debiased run, the naive run and a resumed run share it. Only the
  tuned blocks, the conv head and the projection train.
- Loss: `models.losses.weighted_info_nce` with the harvest weights, same-product in-batch
  masking and one mined hard negative per pair: at the start of every epoch the current
  model embeds the training items, and each query gets a random pick among its
  `hard_negative_pool` nearest items that are neither the positive's product nor anything
  that query engaged with ("looks close, was not engaged").
- Determinism: every random choice (pair order, views, hard-negative picks) is a function of
  (seed, epoch) or of (seed, photo bytes, box); each cache entry is computed on its own, so
  its bytes do not depend on which crops were cached with it or in what order; the fit runs
  on a fixed number of torch threads. Same params + seed -> the same weights, cold or warm
  cache, whatever the machine's core count, load or task order.
- Model selection follows `val_style_recall_at_10`: val-split queries of the style-level
  pairs (clicks, saves, board co-saves; not the near-duplicate same-product listings)
  retrieve among all items, a hit is any listing of the positive's product, and each pair
  counts with its harvest weight (the debiased run's inverse propensity), so the checkpoint
  is picked by what users engage with, not by where the logging ranker put it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from data_contracts.durable import (
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from models.embedder import Embedder, EmbedderSpec, frozen_baseline, save_embedder
from models.export import export_embedder, export_onnx, onnx_session
from models.losses import weighted_info_nce
from models.preprocessing import EMBED_PX, WHOLE_IMAGE, crop_to_box, resize_to_array
from pipelines.config import load as load_config
from pipelines.versions import resolved_versions

log = logging.getLogger(__name__)
PAIR_COLUMNS = ("query_image_path", "query_x0", "query_y0", "query_x1", "query_y1", "item_id",
                "positive_image_path", "weight", "source", "split")
STYLE_SOURCES = ("click", "save", "cosave")  # pairs that say "looks alike", not "same listing"
SELECT_METRIC = "val_style_recall_at_10"
AUGMENT_VERSION = 2  # bump when `augmented_view`/`view_inputs` change: cached features depend


@dataclass(frozen=True)
class TrainConfig:
    """params.yaml `train:` (the defaults are the demo recipe params.yaml spells out)."""

    backbone: str = "efficientnet-lite0"
    weights: str | None = None  # local backbone weights (other backbones)
    tuned_blocks: int = 0
    tune_conv_head: bool = False
    dim: int = 256
    hidden: int = 512
    views: int = 3  # cached views per image: plain + augmented
    batch_size: int = 256
    max_epochs: int = 15
    lr: float = 5e-4
    backbone_lr_scale: float = 0.1  # tuned backbone blocks learn slower than the new head
    weight_decay: float = 1e-4
    temperature: float = 0.07
    hard_negatives: bool = True
    hard_negative_pool: int = 20
    patience: int = 3
    val_k: int = 10
    seed: int = 0
    threads: int = 2  # torch threads of the fit: fixed, so the machine's core count is not an input
    progress_bar: bool = True
    rater_probe: bool = True  # rater recall@10 after each epoch (logged, never selects)

    def __post_init__(self) -> None:
        if self.views < 1 or self.batch_size < 2 or self.max_epochs < 1 or self.threads < 1:
            raise ValueError("train needs views >= 1, batch_size >= 2, max_epochs >= 1, "
                             "threads >= 1")

    @classmethod
    def load(cls, params: Path | None, **overrides) -> TrainConfig:
        return load_config(cls, params, "train", **overrides)

    def spec(self) -> EmbedderSpec:
        return EmbedderSpec(backbone=self.backbone, dim=self.dim, tuned_blocks=self.tuned_blocks,
                            tune_conv_head=self.tune_conv_head, hidden=self.hidden,
                            weights=self.weights, seed=self.seed)


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PairTable:
    """Pairs as integer indices into one image table (unique (path, box) crops)."""

    images: pd.DataFrame  # key, path, x0, y0, x1, y1, item_id (None for query photos)
    query: np.ndarray  # (P,) image row of the query crop
    positive: np.ndarray  # (P,) image row of the positive listing
    weight: np.ndarray  # (P,) float32
    group: np.ndarray  # (P,) product code of the positive (same code: not a negative)
    split: np.ndarray  # (P,) "train" / "val"
    source: np.ndarray  # (P,) click / save / cosave / same_product
    item_product: np.ndarray  # (n_images,) product code per image row, -1 for query photos


def _box_text(box: Sequence[float]) -> str:
    return ",".join(f"{float(v):.4f}" for v in box)


def _key(path: str, box: Sequence[float]) -> str:
    return f"{path}|{_box_text(box)}"


def load_pairs(pairs_path: Path, world: Path) -> PairTable:
    """Read harvest pairs and index their crops; every positive must be a catalog listing."""
    pairs_path = Path(pairs_path)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs not found: {pairs_path}")
    pairs = pd.read_parquet(pairs_path)
    missing = set(PAIR_COLUMNS) - set(pairs.columns)
    if missing:
        raise ValueError(f"{pairs_path}: missing columns {sorted(missing)}")
    if pairs.empty:
        raise ValueError(f"{pairs_path}: no pairs")
    if not set(pairs["split"]) <= {"train", "val"} or "train" not in set(pairs["split"]):
        raise ValueError(f"{pairs_path}: split must be train/val with some train rows")
    if (pairs["weight"] <= 0).any() or pairs["weight"].isna().any():
        raise ValueError(f"{pairs_path}: weights must be positive")
    catalog = pd.read_parquet(Path(world) / "tables" / "catalog.parquet",
                              columns=["item_id", "product_id", "image_path"])
    unknown = set(pairs["item_id"]) - set(catalog["item_id"])
    if unknown:
        raise ValueError(f"{pairs_path}: {len(unknown)} positives are not catalog items "
                         f"(e.g. {sorted(unknown)[0]})")
    box_cols = ["query_x0", "query_y0", "query_x1", "query_y1"]
    qkeys = [_key(p, b) for p, b in zip(pairs["query_image_path"],
                                        pairs[box_cols].to_numpy(float), strict=True)]
    pkeys = [_key(p, WHOLE_IMAGE) for p in pairs["positive_image_path"]]
    path_item = dict(zip(catalog["image_path"], catalog["item_id"], strict=True))
    rows: dict[str, tuple] = {}
    for key, path, box in zip(qkeys, pairs["query_image_path"],
                              pairs[box_cols].to_numpy(float), strict=True):
        rows.setdefault(key, (path, *box, path_item.get(path)))
    for key, path in zip(pkeys, pairs["positive_image_path"], strict=True):
        rows.setdefault(key, (path, *WHOLE_IMAGE, path_item.get(path)))
    images = pd.DataFrame([(k, *v) for k, v in rows.items()],
                          columns=["key", "path", "x0", "y0", "x1", "y1", "item_id"])
    row_of = {k: i for i, k in enumerate(images["key"])}
    product_code = {p: i for i, p in enumerate(sorted(catalog["product_id"].unique()))}
    item_code = {i: product_code[p] for i, p in zip(catalog["item_id"], catalog["product_id"],
                                                   strict=True)}
    return PairTable(
        images=images,
        query=np.array([row_of[k] for k in qkeys]),
        positive=np.array([row_of[k] for k in pkeys]),
        weight=pairs["weight"].to_numpy(np.float32),
        group=np.array([item_code[i] for i in pairs["item_id"]]),
        split=pairs["split"].to_numpy(str),
        source=pairs["source"].to_numpy(str),
        item_product=np.array([item_code.get(i, -1) if i is not None else -1
                               for i in images["item_id"]]),
    )


def augmented_view(image: Image.Image, box: Sequence[float], rng: np.random.Generator
                   ) -> np.ndarray:
    """One training view: a jittered square crop (scale 0.75-1, shifted), a flip, and a
    lighting change (brightness, contrast, per-channel colour cast), as casual user photos
    differ from studio listings."""
    crop = crop_to_box(image, box)
    w, h = crop.size
    side = rng.uniform(0.75, 1.0) * min(w, h)
    left, top = rng.uniform(0, w - side), rng.uniform(0, h - side)
    crop = crop.crop((int(left), int(top), int(left + side), int(top + side)))
    arr = resize_to_array(crop, EMBED_PX)
    if rng.random() < 0.5:
        arr = arr[:, :, ::-1]
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.85, 1.15, size=(3, 1, 1))
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.75, 1.25) + mean
    return np.ascontiguousarray(np.clip(arr * gain, 0.0, 1.0), dtype=np.float32)


def view_inputs(photo: bytes, box: Sequence[float], views: int, seed: int) -> np.ndarray:
    """(views, 3, S, S) from a photo's bytes: view 0 is the plain serving crop, the rest
    augmented, seeded by (seed, photo content, box), so a view is the same whatever else is
    computed with it and whatever the photo's file is called."""
    with Image.open(io.BytesIO(photo)) as img:
        image = img.convert("RGB")
    plain = resize_to_array(crop_to_box(image, box), EMBED_PX)
    digest = hashlib.sha256(f"{seed}|{hashlib.sha256(photo).hexdigest()}|{_box_text(box)}"
                            .encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.stack([plain] + [augmented_view(image, box, rng) for _ in range(views - 1)])


class FeatureCache:
    """Frozen-trunk features of image views on disk, one file per (photo content, box).

    The directory is named by what the numbers depend on: the frozen weights, the input size,
    the number of views, the seed, the augmentation version and the versions of the packages
    that decode and run the trunk (Pillow, numpy, onnxruntime). An entry is named by the
    sha256 of the photo's bytes and the box, so replacing a photo recomputes only its entries
    and a rewritten table or a renamed file recomputes nothing. Each entry runs through the
    trunk alone on a single-threaded session, so its bytes do not depend on the batch it was
    computed in, the build order or the thread count; it is written atomically, so parallel
    tasks never read a half-built entry (a lock only keeps them from doing the work twice).
    """

    def __init__(self, root: Path, model: Embedder, views: int, seed: int) -> None:
        h = hashlib.sha256(f"{EMBED_PX}|{views}|{seed}|{AUGMENT_VERSION}".encode())
        for package in ("pillow", "numpy", "onnxruntime"):
            h.update(f"|{package}={resolved_versions([package])[package]}".encode())
        for name, tensor in sorted(model.frozen.state_dict().items()):
            h.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        self.dir = Path(root) / h.hexdigest()[:16]
        self.model, self.views, self.seed = model, views, seed
        self.computed = 0  # entries computed by the last `features` call

    def entry(self, photo_sha: str, box: Sequence[float]) -> Path:
        name = hashlib.sha256(f"{photo_sha}|{_box_text(box)}".encode()).hexdigest()[:32]
        return self.dir / name[:2] / f"{name}.npy"

    def entries(self, world: Path, images: pd.DataFrame) -> list[Path]:
        """The entry file of every row of `images` (path, x0..y1), by photo content."""
        digests: dict[str, str] = {}
        for path in images["path"].unique():
            file = Path(world) / path
            if not file.is_file():
                raise FileNotFoundError(f"image not found: {file}")
            digests[path] = hashlib.sha256(file.read_bytes()).hexdigest()
        return [self.entry(digests[r[0]], r[1:]) for r in
                images[["path", "x0", "y0", "x1", "y1"]].itertuples(index=False)]

    def features(self, world: Path, images: pd.DataFrame, threads: int = 2) -> np.ndarray:
        """(n, views, C, h, w) float16 for the rows of `images` (path, x0..y1)."""
        files = self.entries(world, images)
        todo = {f: (path, box) for f, path, box in zip(
            files, images["path"], images[["x0", "y0", "x1", "y1"]].to_numpy(float),
            strict=True) if not f.is_file()}
        self.computed = 0
        if todo:
            with self._lock():
                self._compute([(f, *todo[f]) for f in todo if not f.is_file()], world, threads)
        return np.stack([np.load(f) for f in files])

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _compute(self, todo: list[tuple[Path, str, np.ndarray]], world: Path, threads: int
                 ) -> None:
        if not todo:
            return
        onnx = self.dir / "frozen.onnx"
        if not onnx.is_file():
            frozen = _Frozen(self.model)
            was = self.model.training
            with torch.random.fork_rng():  # the exporter's example input draws from torch's RNG
                write_atomic(onnx, lambda tmp: export_onnx(frozen, tmp, "images", "features"))
            self.model.train(was)  # export put the whole model in eval mode
        session = onnx_session(onnx, threads=1)

        def one(job: tuple[Path, str, np.ndarray]) -> None:
            file, path, box = job
            inputs = view_inputs((Path(world) / path).read_bytes(), box, self.views, self.seed)
            feats = session.run(["features"], {"images": inputs})[0].astype(np.float16)
            buf = io.BytesIO()
            np.save(buf, feats)
            write_bytes_atomic(file, buf.getvalue())

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for n, _ in enumerate(pool.map(one, todo), start=1):
                if n % 2048 == 0 or n == len(todo):
                    log.info("cached %d/%d crops x %d views (%.0f s)", n, len(todo),
                             self.views, time.perf_counter() - t0)
        self.computed = len(todo)


class _Frozen(nn.Module):
    def __init__(self, model: Embedder) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.frozen_features(images)


# --------------------------------------------------------------------------- Lightning
class EpochBatches(torch.utils.data.Sampler):
    """Batches of (pair, query view, positive view) rows, shuffled by (seed, epoch) with the
    epoch read from the trainer when iteration starts, so a resumed run replays the order."""

    def __init__(self, n_pairs: int, batch_size: int, views: int, seed: int,
                 epoch: Callable[[], int]) -> None:
        self.n, self.batch_size, self.views, self.seed, self.epoch = (
            n_pairs, min(batch_size, n_pairs), views, seed, epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size  # drop the ragged tail: in-batch negatives need company

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch()])
        order = rng.permutation(self.n)
        qv, pv = rng.integers(0, self.views, (2, self.n))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(int(i), int(qv[i]), int(pv[i])) for i in idx]


class _Rows(torch.utils.data.Dataset):
    """The sampler's rows are the samples: the heavy features stay in the module."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: tuple) -> tuple:
        return row


PROBE_METRIC = "probe_rater_recall_at_10"


@dataclass(frozen=True)
class RaterProbe:
    """Rater recall@10 through the model being trained, after every epoch: the curve that
    shows whether engagement training moves what raters judge. It is logged, never used to
    pick the epoch (the rater set stays held out for evaluation), and its gallery is the
    pairs' listings plus every rater-judged listing, whole photos, so it reads above the
    full-catalog evaluation: a trend, not the gate's number."""

    queries: torch.Tensor  # frozen features of the rater query crops (view 0)
    gallery: torch.Tensor  # frozen features of the gallery listings (view 0)
    gallery_items: np.ndarray
    relevant: list[set[str]]

    @torch.no_grad()
    def recall_at_10(self, model: Embedder) -> float:
        from pipelines.evaluate import recall_at_k

        was = model.training
        model.eval()
        q = model.forward_from_frozen(self.queries.float())
        g = model.forward_from_frozen(self.gallery.float())
        model.train(was)
        top = torch.topk(q @ g.T, min(10, len(g)), dim=1).indices.numpy()
        ranked = [self.gallery_items[row].tolist() for row in top]
        return float(recall_at_k(ranked, self.relevant, (10,))[10].mean())


def rater_probe(world: Path, table: PairTable, feats: np.ndarray, cache: FeatureCache,
                threads: int) -> RaterProbe | None:
    """The probe's cached features (new entries only for rater crops and judged listings
    the pairs lack); None, with a warning, for a world without a rater set."""
    from pipelines.evaluate import load_catalog, load_rater_set

    tables = Path(world) / "tables"
    if not (tables / "rater_queries.parquet").is_file():
        log.warning("no rater set in %s: training runs without the rater probe", world)
        return None
    rater = load_rater_set(world)
    catalog = load_catalog(world)
    images = table.images
    in_pairs = (images["item_id"].notna() & (images[["x0", "y0", "x1", "y1"]].to_numpy(float)
                                             == WHOLE_IMAGE).all(axis=1)).to_numpy()
    have = set(images.loc[in_pairs, "item_id"])
    judged = sorted({i for rel in rater.relevant for i in rel} - have)
    extra = catalog[catalog["item_id"].isin(judged)]
    whole = pd.DataFrame({"path": extra["image_path"], "x0": 0.0, "y0": 0.0, "x1": 1.0,
                          "y1": 1.0})
    queries = pd.DataFrame({"path": rater.query_paths, **{
        c: rater.query_boxes[:, i] for i, c in enumerate(("x0", "y0", "x1", "y1"))}})
    new = cache.features(world, pd.concat([queries, whole], ignore_index=True), threads)
    gallery = np.concatenate([feats[in_pairs, 0], new[len(queries):, 0]])
    return RaterProbe(torch.from_numpy(new[:len(queries), 0]), torch.from_numpy(gallery),
                      np.concatenate([images.loc[in_pairs, "item_id"].to_numpy(str),
                                      extra["item_id"].to_numpy(str)]),
                      [set(rel) for rel in rater.relevant])


class ContrastiveModule(pl.LightningModule):
    """Weighted InfoNCE with mined hard negatives over cached frozen features; `model` is
    the network being trained (its frozen trunk already applied by `feats`)."""

    def __init__(self, model: Embedder, table: PairTable, feats: np.ndarray,
                 cfg: TrainConfig, probe: RaterProbe | None = None) -> None:
        super().__init__()
        self.model, self.table, self.cfg, self.probe = model, table, cfg, probe
        train = table.split == "train"
        self.pairs = np.flatnonzero(train)
        self.val_pairs = np.flatnonzero(~train)
        self.feats = torch.from_numpy(np.ascontiguousarray(feats))
        self.hard = np.full(len(table.query), -1)  # per pair: mined image row or -1
        self.engaged: dict[int, set[int]] = {}
        for q, p in zip(table.query, table.positive, strict=True):
            self.engaged.setdefault(int(q), set()).add(int(table.item_product[p]))
        self.items = np.unique(table.positive)  # candidate rows (catalog listings)
        self.curve: list[dict] = []  # one row per finished epoch
        self.epoch_loss: list[float] = []

    def _embed_rows(self, rows: np.ndarray, view: int = 0) -> torch.Tensor:
        out = [self.model.forward_from_frozen(
            self.feats[torch.from_numpy(rows[i:i + 1024]), view].float())
            for i in range(0, len(rows), 1024)]
        return torch.cat(out)

    @torch.no_grad()
    def _neighbours(self, queries: np.ndarray, depth: int) -> np.ndarray:
        was = self.model.training
        self.model.eval()
        items = self._embed_rows(self.items)
        q = self._embed_rows(queries)
        self.model.train(was)
        top = torch.topk(q @ items.T, min(depth, len(self.items)), dim=1).indices
        return self.items[top.numpy()]

    def on_train_epoch_start(self) -> None:
        self.epoch_loss = []  # this epoch's batch losses, for the curve
        if not self.cfg.hard_negatives:
            return
        table = self.table
        uq, inverse = np.unique(table.query[self.pairs], return_inverse=True)
        near = self._neighbours(uq, self.cfg.hard_negative_pool + 8)
        rng = np.random.default_rng([self.cfg.seed, self.current_epoch, 7])
        for n, pair in enumerate(self.pairs):
            engaged = self.engaged[int(table.query[pair])]
            pool = [r for r in near[inverse[n]]
                    if table.item_product[r] not in engaged][:self.cfg.hard_negative_pool]
            self.hard[pair] = pool[int(rng.integers(len(pool)))] if pool else -1

    def training_step(self, batch, _):
        table = self.table
        pair, qv, pv = batch.T
        pair = pair.numpy()
        q_rows = torch.from_numpy(table.query[pair])
        p_rows = torch.from_numpy(table.positive[pair])
        q = self.model.forward_from_frozen(self.feats[q_rows, qv.long()].float())
        p = self.model.forward_from_frozen(self.feats[p_rows, pv.long()].float())
        hard = None
        h_rows = self.hard[pair]
        if self.cfg.hard_negatives and (h_rows >= 0).any():
            h = torch.from_numpy(h_rows[h_rows >= 0])
            hard = self.model.forward_from_frozen(self.feats[h, 0].float())
        loss = weighted_info_nce(q, p, torch.from_numpy(table.weight[pair]),
                                 torch.from_numpy(table.group[pair]), hard,
                                 self.cfg.temperature)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=len(pair))
        self.epoch_loss.append(float(loss.detach()))
        return loss


    def on_train_epoch_end(self) -> None:
        scores = self.validation()
        if self.probe is not None:
            scores[PROBE_METRIC] = self.probe.recall_at_10(self.model)
        for name, value in scores.items():
            self.log(name, value, prog_bar=name == SELECT_METRIC)
        row = {"epoch": int(self.current_epoch),
               "train_loss": round(float(np.mean(self.epoch_loss)), 5) if self.epoch_loss
               else None,
               **{k: round(v, 5) for k, v in scores.items()}}
        self.curve.append(row)
        log.info("epoch %d: %s", self.current_epoch,
                 ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))

    def _val_split(self, sources: Sequence[str] | None) -> np.ndarray:
        """Val pairs (of `sources`); the train pairs where the harvest held none out."""
        for pool in (self.val_pairs, self.pairs):
            chosen = pool if sources is None else pool[np.isin(self.table.source[pool], sources)]
            if len(chosen):
                return chosen
        return self.val_pairs if len(self.val_pairs) else self.pairs

    @torch.no_grad()
    def validation(self) -> dict[str, float]:
        """Recall@val_k of val queries among all items (a hit: any listing of the positive's
        product): over every val pair, and weighted over the style-level pairs (selection)."""
        table, out = self.table, {}
        for name, sources in (("val_recall_at_10", None), (SELECT_METRIC, STYLE_SOURCES)):
            pairs = self._val_split(sources)
            near = self._neighbours(table.query[pairs], self.cfg.val_k)
            hits = (table.item_product[near] == table.group[pairs][:, None]).any(axis=1)
            weight = table.weight[pairs] if sources is not None else np.ones(len(pairs))
            out[name] = float((hits * weight).sum() / weight.sum())
        return out

    def configure_optimizers(self):
        backbone = [p for p in self.model.tuned.parameters() if p.requires_grad]
        head = list(self.model.head.parameters())
        groups = [{"params": backbone, "lr": self.cfg.lr * self.cfg.backbone_lr_scale},
                  {"params": head, "lr": self.cfg.lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]],
                                 weight_decay=self.cfg.weight_decay)

    def _sampling_epoch(self) -> int:
        """overfit_batches must see the same batch every epoch."""
        return 0 if self.trainer.overfit_batches else self.current_epoch

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            _Rows(len(self.pairs)),
            batch_sampler=EpochBatches(len(self.pairs), self.cfg.batch_size, self.cfg.views,
                                       self.cfg.seed, self._sampling_epoch),
            collate_fn=lambda rows: _as_pairs(rows, self.pairs))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loupe_curve"] = self.curve  # a resumed run keeps the earlier epochs' rows

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.curve = list(checkpoint.get("loupe_curve", []))


def _as_pairs(rows: list[tuple], pairs: np.ndarray) -> torch.Tensor:
    """Sampler rows index the train subset; map them to pair rows of the table."""
    arr = torch.tensor(rows, dtype=torch.long)
    arr[:, 0] = torch.from_numpy(pairs[arr[:, 0].numpy()])
    return arr


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- entrypoints
@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    export_dir: Path
    metrics: dict


def weights_digest(model: nn.Module) -> str:
    """sha256 of the state dict's bytes: two runs trained the same weights iff it matches."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(world: Path, pairs_path: Path, out_dir: Path, cfg: TrainConfig | None = None,
          cache_dir: Path | None = None, resume: bool = False, fast_dev_run: bool = False,
          overfit_batches: int = 0, callbacks: Sequence[pl.Callback] = (),
          logger: pl.loggers.Logger | None = None) -> TrainResult:
    """Fit, keep the best checkpoint by `SELECT_METRIC`, save and export it; `out_dir` gets
    checkpoints/, embedder.pt, export/ and train.json (metrics, per-epoch curve, the
    resolved package versions). `callbacks` join the checkpointing ones; `logger` (e.g.
    Lightning's MLFlowLogger, see `run_train`) receives every logged metric."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.exists():
        raise FileNotFoundError(f"nothing to resume: {last} does not exist")
    if not resume and last.exists() and not fast_dev_run:
        raise FileExistsError(f"{out_dir} already holds a run: pass resume=True (--resume) or "
                              "choose another --out; nothing was overwritten")
    t0 = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    table = load_pairs(pairs_path, world)
    model = Embedder(cfg.spec())
    cache = FeatureCache(cache_dir or out_dir.parent / "feature_cache", model, cfg.views,
                         cfg.seed)
    feats = cache.features(world, table.images, threads=cfg.threads)
    pair_entries_computed = cache.computed
    probe = rater_probe(world, table, feats, cache, cfg.threads) if cfg.rater_probe else None
    cache_s = time.perf_counter() - t0
    module = ContrastiveModule(model, table, feats, cfg, probe)
    # best by the selection metric, and the latest epoch for resume (Lightning's save_last
    # only follows top-k saves, so "last" would lag behind an epoch that did not improve)
    best_ckpt = _checkpoint(ckpt_dir, "best", SELECT_METRIC)
    own = [best_ckpt, _checkpoint(ckpt_dir, "last", None),
           pl.callbacks.EarlyStopping(monitor=SELECT_METRIC, mode="max", patience=cfg.patience,
                                      check_on_train_epoch_end=True)]
    trainer = pl.Trainer(
        max_epochs=cfg.max_epochs, accelerator="cpu", devices=1, deterministic=True,
        callbacks=[*([] if fast_dev_run else own), *callbacks], logger=logger or False,
        log_every_n_steps=10,
        enable_checkpointing=not fast_dev_run, fast_dev_run=fast_dev_run,
        overfit_batches=overfit_batches, limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=cfg.progress_bar, enable_model_summary=False)
    t1 = time.perf_counter()
    with warnings.catch_warnings(), _torch_threads(cfg.threads):
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, ckpt_path=str(last) if resume else None)
        fit_s = time.perf_counter() - t1
        best_path = best_ckpt.best_model_path if not fast_dev_run else ""
        if best_path:
            state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
            module.load_state_dict(state)
        model.eval()
        final = module.validation()
    save_embedder(model, out_dir / "embedder.pt")
    export_dir = export_embedder(model, out_dir / "export", {"trained_on": str(pairs_path)})
    best = best_ckpt.best_model_score if not fast_dev_run else None
    best_epoch, note = _selection(module)
    metrics = {
        "train_seconds": round(time.perf_counter() - t0, 1), "cache_seconds": round(cache_s, 1),
        "fit_seconds": round(fit_s, 1), "epochs": int(trainer.current_epoch),
        "selected_by": SELECT_METRIC,
        "best_val_style_recall_at_10": None if best is None else round(float(best), 4),
        "best_epoch": best_epoch, "selection_note": note,
        "final_val_recall_at_10": round(final["val_recall_at_10"], 4),
        "final_val_style_recall_at_10": round(final[SELECT_METRIC], 4),
        "final_probe_rater_recall_at_10": None if probe is None else round(
            probe.recall_at_10(model), 4),
        "curve": module.curve, "weights_sha256": weights_digest(model),
        "n_pairs_train": int((table.split == "train").sum()),
        "n_pairs_val": int((table.split == "val").sum()), "n_crops": len(table.images),
        "cache_entries_computed": pair_entries_computed,
        "probe_cache_entries_computed": cache.computed if probe is not None else 0,
        "pairs": str(pairs_path),
        "config": asdict(cfg), "versions": resolved_versions(),
    }
    write_json_atomic(out_dir / "train.json", metrics, sort_keys=False)
    return TrainResult(out_dir, export_dir, metrics)


TRAIN_RUN_FILE = "mlflow_run_id"  # in the run directory: a resumed training reopens its run


def run_train(cfg: TrainConfig, world: Path, pairs_path: Path, out_dir: Path, *,
              cache_dir: Path | None = None, resume: bool = False,
              tracking_uri: str | None = None, log_mlflow: bool = True,
              run_name: str | None = None, system_metrics_interval_s: float = 5.0,
              callbacks: Sequence[pl.Callback] = ()) -> TrainResult:
    """The train stage for the CLI, DVC and the retrain DAG: `train` as its own MLflow run
    (Lightning's MLFlowLogger: per-step and per-epoch loss, validation and rater-probe
    curves; system metrics; the pairs and catalog as dataset inputs; train.json as an
    artifact). train.json records the run id, and the evaluation links back to it."""
    if not log_mlflow:
        return train(world, pairs_path, out_dir, cfg, cache_dir, resume, callbacks=callbacks)
    from pytorch_lightning.loggers import MLFlowLogger

    from pipelines import registry

    reg = registry.RegistryConfig(tracking_uri)
    out_dir, pairs_path = Path(out_dir), Path(pairs_path)
    id_file = out_dir / TRAIN_RUN_FILE
    reopen = id_file.read_text().strip() if resume and id_file.is_file() else None
    inputs = {"training_pairs": (pairs_path, "training"),
              "catalog": (Path(world) / "tables" / "catalog.parquet", "training")}
    with registry.tracked_run(
            reg, run_name=run_name or f"train-{out_dir.name}", run_id=reopen,
            params={**{f"train.{k}": v for k, v in asdict(cfg).items()},
                    "pairs": str(pairs_path), "world": str(world)},
            inputs=inputs, tags={"loupe.stage": "train"},
            system_metrics_interval_s=system_metrics_interval_s) as run_id:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(id_file, run_id + "\n")
        logger = MLFlowLogger(experiment_name=reg.experiment, tracking_uri=reg.uri,
                              run_id=run_id)
        result = train(world, pairs_path, out_dir, cfg, cache_dir, resume,
                       callbacks=callbacks, logger=logger)
        result.metrics["mlflow_run_id"] = run_id
        write_json_atomic(out_dir / "train.json", result.metrics, sort_keys=False)
        summary = {k: float(v) for k, v in result.metrics.items()
                   if k.endswith(("_seconds", "_recall_at_10")) and v is not None}
        logger.log_metrics({f"final/{k}": v for k, v in summary.items()})
        logger.experiment.log_artifact(run_id, str(out_dir / "train.json"))
    return result


def _selection(module: ContrastiveModule) -> tuple[int | None, str | None]:
    """The epoch the selection metric chose, and a loud note when that choice means little:
    no validation pairs (ranked on training pairs) or a metric flat across epochs."""
    scores = [row[SELECT_METRIC] for row in module.curve]
    if not scores:
        return None, None
    best_epoch = int(module.curve[int(np.argmax(scores))]["epoch"])
    style_val = np.isin(module.table.source[module.val_pairs], STYLE_SOURCES).sum()
    note = None
    if style_val == 0:
        note = (f"no validation pairs of {STYLE_SOURCES}: epochs were ranked on training "
                "pairs, so the chosen epoch may be overfit (the harvest's val split is empty)")
    elif len(scores) > 1 and max(scores) - min(scores) < 1e-9:
        note = (f"{SELECT_METRIC} was {scores[0]:.4f} every epoch: the selection signal is "
                "degenerate and the first epoch was kept")
    if note:
        log.warning("checkpoint selection: %s", note)
    return best_epoch, note


def _checkpoint(ckpt_dir: Path, filename: str, monitor: str | None) -> pl.Callback:
    return pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename=filename, monitor=monitor,
                                        mode="max", save_on_train_epoch_end=True,
                                        enable_version_counter=False)


def export_baseline(out_dir: Path, cfg: TrainConfig | None = None) -> Path:
    """The frozen pretrained backbone + fixed random projection, exported like a trained model."""
    cfg = cfg or TrainConfig()
    return export_embedder(frozen_baseline(cfg.spec()), Path(out_dir) / "export",
                           {"baseline": "frozen backbone + fixed random projection"})


def add_cli(sub) -> None:
    p = sub.add_parser("train", help="contrastive embedder training on harvested pairs")
    p.add_argument("--world", type=Path, help="world / data root (required to train)")
    p.add_argument("--pairs", type=Path, help="pairs_debiased.parquet or pairs_naive.parquet")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--params", type=Path, default=None, help="params.yaml (train: block)")
    p.add_argument("--cache", type=Path, default=None, help="frozen-feature cache dir")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--fast-dev-run", action="store_true", help="one batch, no checkpoints")
    p.add_argument("--frozen-baseline", action="store_true",
                   help="export the untrained baseline to OUT/export instead of training")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the training run (default: $MLFLOW_TRACKING_URI or "
                        "the repo's mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="train without an MLflow run")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = TrainConfig.load(args.params)
    if args.frozen_baseline:
        print(export_baseline(args.out, cfg))
        return 0
    if args.pairs is None or args.world is None:
        raise ValueError("--world and --pairs are required unless --frozen-baseline")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.fast_dev_run:
        result = train(args.world, args.pairs, args.out, cfg, args.cache, args.resume,
                       fast_dev_run=True)
    else:
        result = run_train(cfg, args.world, args.pairs, args.out, cache_dir=args.cache,
                           resume=args.resume, tracking_uri=args.tracking_uri,
                           log_mlflow=not args.no_mlflow)
    print(json.dumps(result.metrics, indent=1))
    return 0
