"""Contrastive training on the tiny world: fast_dev_run, overfit a batch, resume, caching."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.embedder import load_embedder
from pipelines.train import FeatureCache, TrainConfig, load_pairs, train
from pipelines.world import world_id

# the demo's recipe (head on cached pooled features); test_tuned_blocks_train covers the rest
FAST = dict(backbone="efficientnet-lite0", tuned_blocks=0, tune_conv_head=False, views=2,
            batch_size=64, progress_bar=False, hard_negative_pool=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One frozen-feature cache for the module: every run below reuses it."""
    return tmp_path_factory.mktemp("feature_cache")


def _pairs(tiny_harvest):
    return tiny_harvest / "pairs_debiased.parquet"


def test_fast_dev_run_exports_a_working_model(tiny_world, tiny_harvest, cache_dir, tmp_path):
    res = train(tiny_world, _pairs(tiny_harvest), tmp_path / "run", TrainConfig(**FAST),
                cache_dir, fast_dev_run=True)
    assert {p.name for p in res.export_dir.iterdir()} == {"embedder.onnx", "embedder.ts",
                                                          "embedder.json"}
    metrics = json.loads((tmp_path / "run" / "train.json").read_text())
    assert metrics["n_pairs_train"] > 500 and metrics["n_pairs_val"] > 0
    assert 0.0 <= metrics["final_val_recall_at_10"] <= 1.0
    model = load_embedder(tmp_path / "run" / "embedder.pt")
    assert model.spec.dim == 256


def test_overfits_one_batch(tiny_world, tiny_harvest, cache_dir, tmp_path):
    """On one repeated batch the loss must collapse: the model can learn what it is shown."""
    cfg = TrainConfig(**{**FAST, "max_epochs": 30, "patience": 100, "hard_negatives": False,
                         "lr": 3e-3})
    losses = []

    import pytorch_lightning as pl

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    from pipelines import train as train_mod

    real_trainer = pl.Trainer

    def trainer_with_recorder(**kw):
        kw["callbacks"] = [*(kw.get("callbacks") or []), Record()]
        return real_trainer(**kw)

    train_mod_pl = pytest.MonkeyPatch()
    train_mod_pl.setattr(pl, "Trainer", trainer_with_recorder)
    try:
        train_mod.train(tiny_world, _pairs(tiny_harvest), tmp_path / "run", cfg, cache_dir,
                        overfit_batches=1)
    finally:
        train_mod_pl.undo()
    assert len(losses) == 30
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


def test_resume_continues_exactly(tiny_world, tiny_harvest, cache_dir, tmp_path):
    """2 epochs + resume to 3 == 3 epochs straight: order, views and negatives are seeded
    by (seed, epoch), and Lightning restores weights and optimiser state."""
    base = {**FAST, "patience": 100}
    straight = train(tiny_world, _pairs(tiny_harvest), tmp_path / "a",
                     TrainConfig(**base, max_epochs=3), cache_dir)
    train(tiny_world, _pairs(tiny_harvest), tmp_path / "b", TrainConfig(**base, max_epochs=2),
          cache_dir)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_world, _pairs(tiny_harvest), tmp_path / "b",
              TrainConfig(**base, max_epochs=3), cache_dir)
    resumed = train(tiny_world, _pairs(tiny_harvest), tmp_path / "b",
                    TrainConfig(**base, max_epochs=3), cache_dir, resume=True)
    assert straight.metrics["epochs"] == resumed.metrics["epochs"] == 3
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_world, _pairs(tiny_harvest), tmp_path / "c", TrainConfig(**base),
              cache_dir, resume=True)


def test_feature_cache_is_reused_and_keyed_by_the_frozen_trunk(tiny_world, tiny_harvest,
                                                               cache_dir):
    from models.embedder import Embedder, EmbedderSpec

    table = load_pairs(_pairs(tiny_harvest), tiny_world)
    model = Embedder(EmbedderSpec(tuned_blocks=0, tune_conv_head=False))
    # the training runs above cached into the world's own directory (paths repeat across worlds)
    cache = FeatureCache(cache_dir / world_id(tiny_world), model, views=2, seed=0)
    assert cache.dir.is_dir()
    first = cache.features(tiny_world, table.images)
    chunks = sorted(cache.dir.glob("chunk_*.npy"))
    again = cache.features(tiny_world, table.images.iloc[::-1])
    assert sorted(cache.dir.glob("chunk_*.npy")) == chunks  # nothing recomputed
    assert np.array_equal(again, first[::-1])
    other = Embedder(EmbedderSpec(tuned_blocks=1))
    assert FeatureCache(cache_dir, other, views=2, seed=0).dir != cache.dir
    assert first.shape[:2] == (len(table.images), 2)
    # view 0 is the plain serving crop: the cached trunk output matches a fresh forward pass
    from models.embedder import load_inputs

    plain = torch.from_numpy(load_inputs(tiny_world, table.images["path"][:4].tolist(), None))
    with torch.no_grad():
        fresh = model.eval().frozen_features(plain).numpy()
    assert np.allclose(first[:4, 0], fresh, atol=2e-2)


def test_bad_pairs_are_refused(tiny_world, tiny_harvest, tmp_path):
    pairs = pd.read_parquet(_pairs(tiny_harvest))
    bad = pairs.assign(item_id="it-missing")
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="not catalog items"):
        load_pairs(tmp_path / "bad.parquet", tiny_world)
    pairs.assign(weight=0.0).to_parquet(tmp_path / "w.parquet")
    with pytest.raises(ValueError, match="weights"):
        load_pairs(tmp_path / "w.parquet", tiny_world)
    pairs.drop(columns="split").to_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        load_pairs(tmp_path / "c.parquet", tiny_world)
    with pytest.raises(ValueError, match="unknown train params"):
        TrainConfig.load(None, learning_rate=1.0)


def test_tuned_blocks_train(tiny_world, tiny_harvest, tmp_path):
    """With tuned_blocks the last MBConv block and the conv head learn; the trunk does not."""
    from models.embedder import Embedder, EmbedderSpec

    cfg = TrainConfig(**{**FAST, "tuned_blocks": 1, "tune_conv_head": True, "max_epochs": 1,
                         "batch_size": 32})
    res = train(tiny_world, _pairs(tiny_harvest), tmp_path / "run", cfg, tmp_path / "cache",
                fast_dev_run=True)
    trained = load_embedder(res.out_dir / "embedder.pt")
    start = Embedder(EmbedderSpec(tuned_blocks=1))
    assert torch.equal(trained.frozen[0].weight, start.frozen[0].weight)
    assert not torch.equal(trained.tuned[0]._project_conv.weight,
                           start.tuned[0]._project_conv.weight)
