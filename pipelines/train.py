"""Contrastive embedder training (`loupe train`): harvested pairs -> exported embedder.

Recipe (PyTorch Lightning, CPU-minutes on the demo world):
- Model: `models.embedder.Embedder`; the frozen trunk runs once per image *view* (the plain
  crop plus `views - 1` augmented ones: jittered square crop, flip, brightness/contrast and
  colour-cast shifts) and its output is cached on disk (`FeatureCache`), keyed by the
  frozen weights, so the debiased run, the naive run and a resumed run share it. Only the
  tuned blocks, the conv head and the projection train.
- Loss: `models.losses.weighted_info_nce` with the harvest weights, same-product in-batch
  masking and one mined hard negative per pair: at the start of every epoch the current
  model embeds the training items, and each query gets a random pick among its
  `hard_negative_pool` nearest items that are neither the positive's product nor anything
  that query engaged with ("looks close, was not engaged").
- Every random choice (pair order, views, hard-negative picks) is a function of
  (seed, epoch), so a run resumed from a checkpoint continues exactly as an uninterrupted one.
- Early stopping and the best checkpoint follow validation recall@10: val-split queries
  retrieve among all items (exact search), a hit is any listing of the positive's product.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from models.embedder import Embedder, EmbedderSpec, frozen_baseline, save_embedder
from models.export import export_embedder, export_onnx, onnx_session
from models.losses import weighted_info_nce
from models.preprocessing import EMBED_PX, crop_to_box, resize_to_array
from pipelines.world import world_id

log = logging.getLogger(__name__)
PAIR_COLUMNS = ("query_image_path", "query_x0", "query_y0", "query_x1", "query_y1", "item_id",
                "positive_image_path", "weight", "source", "split")
AUGMENT_VERSION = 1  # bump when `augmented_view` changes: cached features are keyed by it


@dataclass(frozen=True)
class TrainConfig:
    """params.yaml `train:`; every field optional."""

    backbone: str = "efficientnet-lite0"
    weights: str | None = None  # local backbone weights (other backbones)
    tuned_blocks: int = 2
    tune_conv_head: bool = True
    dim: int = 256
    hidden: int = 512
    views: int = 3  # cached views per image: plain + augmented
    batch_size: int = 256
    max_epochs: int = 8
    lr: float = 2e-3
    backbone_lr_scale: float = 0.1  # tuned backbone blocks learn slower than the new head
    weight_decay: float = 1e-4
    temperature: float = 0.07
    hard_negatives: bool = True
    hard_negative_pool: int = 20
    patience: int = 2
    val_k: int = 10
    seed: int = 0
    progress_bar: bool = True

    @classmethod
    def load(cls, params: Path | None, **overrides) -> TrainConfig:
        from pipelines.params import load_section

        block = {**load_section(params, "train"), **overrides}
        unknown = set(block) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown train params: {sorted(unknown)}")
        cfg = cls(**block)
        if cfg.views < 1 or cfg.batch_size < 2 or cfg.max_epochs < 1:
            raise ValueError("train needs views >= 1, batch_size >= 2, max_epochs >= 1")
        return cfg

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
    item_product: np.ndarray  # (n_images,) product code per image row, -1 for query photos


def _key(path: str, box: Sequence[float]) -> str:
    return f"{path}|" + ",".join(f"{float(v):.4f}" for v in box)


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
    whole = (0.0, 0.0, 1.0, 1.0)
    pkeys = [_key(p, whole) for p in pairs["positive_image_path"]]
    path_item = dict(zip(catalog["image_path"], catalog["item_id"], strict=True))
    rows: dict[str, tuple] = {}
    for key, path, box in zip(qkeys, pairs["query_image_path"],
                              pairs[box_cols].to_numpy(float), strict=True):
        rows.setdefault(key, (path, *box, path_item.get(path)))
    for key, path in zip(pkeys, pairs["positive_image_path"], strict=True):
        rows.setdefault(key, (path, *whole, path_item.get(path)))
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


def view_inputs(world: Path, path: str, box: Sequence[float], views: int, seed: int
                ) -> np.ndarray:
    """(views, 3, S, S): view 0 is the plain serving crop, the rest augmented (seeded by the
    crop's key, so a view is the same whatever batch it is computed in)."""
    with Image.open(Path(world) / path) as img:
        image = img.convert("RGB")
    plain = resize_to_array(crop_to_box(image, None if tuple(box) == (0, 0, 1, 1) else box),
                            EMBED_PX)
    digest = hashlib.sha256(f"{seed}|{_key(path, box)}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.stack([plain] + [augmented_view(image, box, rng) for _ in range(views - 1)])


class FeatureCache:
    """Frozen-trunk features of image views on disk, in append-only chunks.

    The directory is named by a hash of the frozen weights, the input size, the number of
    views, the seed and the augmentation version, so a cache can never serve features of a
    different trunk; chunks are written to a temp name and renamed, so a crash loses at
    most the chunk in flight and the next run computes only what is missing.
    """

    def __init__(self, root: Path, model: Embedder, views: int, seed: int) -> None:
        h = hashlib.sha256(f"{EMBED_PX}|{views}|{seed}|{AUGMENT_VERSION}".encode())
        for name, tensor in sorted(model.frozen.state_dict().items()):
            h.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        self.dir = Path(root) / h.hexdigest()[:16]
        self.model, self.views, self.seed = model, views, seed

    def _chunks(self) -> list[Path]:
        return sorted(self.dir.glob("chunk_[0-9][0-9][0-9][0-9][0-9].npy"))

    def features(self, world: Path, images: pd.DataFrame, chunk: int = 1024,
                 threads: int = 2) -> np.ndarray:
        """(n, views, C, h, w) float16 for the rows of `images` (key, path, x0..y1)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:  # one writer at a time (parallel tasks)
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._compute_missing(world, images, chunk, threads)
        have = self._index()
        loaded = [np.load(c, mmap_mode="r") for c in self._chunks()]
        return np.stack([loaded[i][j] for i, j in (have[k] for k in images["key"])])

    def _index(self) -> dict[str, tuple[int, int]]:
        have: dict[str, tuple[int, int]] = {}
        for i, c in enumerate(self._chunks()):
            for j, key in enumerate(json.loads(c.with_suffix(".json").read_text())):
                have[key] = (i, j)
        return have

    def _compute_missing(self, world: Path, images: pd.DataFrame, chunk: int, threads: int
                         ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        todo = images[~images["key"].isin(self._index())]
        if len(todo):
            onnx = self.dir / "frozen.onnx"
            if not onnx.exists():
                export_onnx(_Frozen(self.model), onnx.with_suffix(".tmp.onnx"), "images",
                            "features")
                onnx.with_suffix(".tmp.onnx").replace(onnx)
            session = onnx_session(onnx, threads)
            n0 = len(self._chunks())
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                for c, start in enumerate(range(0, len(todo), chunk)):
                    part = todo.iloc[start:start + chunk]
                    inputs = np.concatenate(list(pool.map(
                        lambda r: view_inputs(
                            Path(world), r[0], (r[1], r[2], r[3], r[4]), self.views,
                            self.seed),
                        part[["path", "x0", "y0", "x1", "y1"]].itertuples(index=False))))
                    feats = np.concatenate([
                        session.run(["features"], {"images": inputs[i:i + 64]})[0]
                        for i in range(0, len(inputs), 64)])
                    feats = feats.reshape(len(part), self.views, *feats.shape[1:])
                    name = self.dir / f"chunk_{n0 + c:05d}"
                    np.save(name.with_suffix(".tmp.npy"), feats.astype(np.float16))
                    name.with_suffix(".json").write_text(json.dumps(part["key"].tolist()))
                    name.with_suffix(".tmp.npy").replace(name.with_suffix(".npy"))
                    log.info("cached %d/%d crops x %d views (%.0f s)", start + len(part),
                             len(todo), self.views, time.perf_counter() - t0)


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


class ContrastiveModule:
    """Factory for the LightningModule (keeps the `pytorch_lightning` import out of module
    import time, which the CLI and DAG parsing pay for)."""

    @staticmethod
    def build(model: Embedder, table: PairTable, feats: np.ndarray, cfg: TrainConfig):
        import pytorch_lightning as pl

        class _Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                self.cfg = cfg
                train = table.split == "train"
                self.pairs = np.flatnonzero(train)
                self.val_pairs = np.flatnonzero(~train)
                self.feats = torch.from_numpy(np.ascontiguousarray(feats))
                self.hard = np.full(len(table.query), -1)  # per pair: mined image row or -1
                self.engaged: dict[int, set[int]] = {}
                for q, p in zip(table.query, table.positive, strict=True):
                    self.engaged.setdefault(int(q), set()).add(int(table.item_product[p]))
                self.items = np.unique(table.positive)  # candidate rows (catalog listings)

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
                if not self.cfg.hard_negatives:
                    return
                uq, inverse = np.unique(table.query[self.pairs], return_inverse=True)
                near = self._neighbours(uq, self.cfg.hard_negative_pool + 8)
                rng = np.random.default_rng([self.cfg.seed, self.current_epoch, 7])
                for n, pair in enumerate(self.pairs):
                    q = int(table.query[pair])
                    engaged = self.engaged[q]
                    pool = [r for r in near[inverse[n]]
                            if table.item_product[r] not in engaged][:self.cfg.hard_negative_pool]
                    self.hard[pair] = pool[int(rng.integers(len(pool)))] if pool else -1

            def training_step(self, batch, _):
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
                self.log("train_loss", loss, prog_bar=True, batch_size=len(pair))
                return loss

            def on_train_epoch_end(self) -> None:
                recall = self.val_recall()
                self.log("val_recall_at_10", recall, prog_bar=True)
                loss = self.trainer.callback_metrics.get("train_loss")
                log.info("epoch %d: train_loss %.4f, val_recall_at_10 %.4f", self.current_epoch,
                         float("nan") if loss is None else float(loss), recall)

            @torch.no_grad()
            def val_recall(self) -> float:
                """Share of val pairs whose positive's product is among the top val_k."""
                pairs = self.val_pairs if len(self.val_pairs) else self.pairs
                near = self._neighbours(table.query[pairs], self.cfg.val_k)
                hits = (table.item_product[near] == table.group[pairs][:, None]).any(axis=1)
                return float(hits.mean())

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
                    batch_sampler=EpochBatches(len(self.pairs), self.cfg.batch_size,
                                               self.cfg.views, self.cfg.seed,
                                               self._sampling_epoch),
                    collate_fn=lambda rows: _as_pairs(rows, self.pairs))

        return _Module()


def _as_pairs(rows: list[tuple], pairs: np.ndarray) -> torch.Tensor:
    """Sampler rows index the train subset; map them to pair rows of the table."""
    arr = torch.tensor(rows, dtype=torch.long)
    arr[:, 0] = torch.from_numpy(pairs[arr[:, 0].numpy()])
    return arr


# --------------------------------------------------------------------------- entrypoints
@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    export_dir: Path
    metrics: dict


def train(world: Path, pairs_path: Path, out_dir: Path, cfg: TrainConfig | None = None,
          cache_dir: Path | None = None, resume: bool = False, fast_dev_run: bool = False,
          overfit_batches: int = 0) -> TrainResult:
    """Fit, keep the best checkpoint by val recall@10, save and export it; `out_dir` gets
    checkpoints/, embedder.pt, export/ and train.json."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

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
    # image paths repeat across generated worlds: one cache directory per world
    cache = FeatureCache((cache_dir or out_dir.parent / "feature_cache") / world_id(world),
                         model, cfg.views, cfg.seed)
    feats = cache.features(world, table.images)
    cache_s = time.perf_counter() - t0
    module = ContrastiveModule.build(model, table, feats, cfg)
    # best by val recall, and the latest epoch for resume (Lightning's save_last only
    # follows top-k saves, so "last" would lag behind an epoch that did not improve)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_recall_at_10",
                                 mode="max", save_on_train_epoch_end=True,
                                 enable_version_counter=False),
                 ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None,
                                 save_on_train_epoch_end=True, enable_version_counter=False),
                 EarlyStopping(monitor="val_recall_at_10", mode="max", patience=cfg.patience,
                               check_on_train_epoch_end=True)]
    trainer = pl.Trainer(
        max_epochs=cfg.max_epochs, accelerator="cpu", devices=1, deterministic=True,
        callbacks=None if fast_dev_run else callbacks, logger=False,
        enable_checkpointing=not fast_dev_run, fast_dev_run=fast_dev_run,
        overfit_batches=overfit_batches, limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=cfg.progress_bar, enable_model_summary=False)
    t1 = time.perf_counter()
    with warnings.catch_warnings():  # the frozen trunk is in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, ckpt_path=str(last) if resume else None)
    fit_s = time.perf_counter() - t1
    best_path = callbacks[0].best_model_path if not fast_dev_run else ""
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    model.eval()
    save_embedder(model, out_dir / "embedder.pt")
    export_dir = export_embedder(model, out_dir / "export", {"trained_on": str(pairs_path)})
    best = callbacks[0].best_model_score if not fast_dev_run else None
    metrics = {
        "train_seconds": round(time.perf_counter() - t0, 1), "cache_seconds": round(cache_s, 1),
        "fit_seconds": round(fit_s, 1), "epochs": int(trainer.current_epoch),
        "best_val_recall_at_10": None if best is None else round(float(best), 4),
        "final_val_recall_at_10": round(module.val_recall(), 4),
        "n_pairs_train": int((table.split == "train").sum()),
        "n_pairs_val": int((table.split == "val").sum()), "n_crops": len(table.images),
        "pairs": str(pairs_path), "config": asdict(cfg),
    }
    (out_dir / "train.json").write_text(json.dumps(metrics, indent=1))
    return TrainResult(out_dir, export_dir, metrics)


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
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = TrainConfig.load(args.params)
    if args.frozen_baseline:
        print(export_baseline(args.out, cfg))
        return 0
    if args.pairs is None or args.world is None:
        raise ValueError("--world and --pairs are required unless --frozen-baseline")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = train(args.world, args.pairs, args.out, cfg, args.cache, args.resume,
                   args.fast_dev_run)
    print(json.dumps(result.metrics, indent=1))
    return 0
