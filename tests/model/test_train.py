"""Contrastive training on the tiny world: fast_dev_run, overfit a batch, resume, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.embedder import load_embedder
from pipelines.train import FeatureCache, TrainConfig, load_pairs, train

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
    import pytorch_lightning as pl

    cfg = TrainConfig(**{**FAST, "max_epochs": 30, "patience": 100, "hard_negatives": False,
                         "lr": 3e-3})
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    train(tiny_world, _pairs(tiny_harvest), tmp_path / "run", cfg, cache_dir,
          overfit_batches=1, callbacks=(Record(),))
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
    cache = FeatureCache(cache_dir, model, views=2, seed=0)  # the runs above filled it
    first = cache.features(tiny_world, table.images)
    assert cache.computed == 0
    again = cache.features(tiny_world, table.images.iloc[::-1])
    assert cache.computed == 0  # nothing recomputed, whatever the order
    assert np.array_equal(again, first[::-1])
    other = Embedder(EmbedderSpec(tuned_blocks=1))
    assert FeatureCache(cache_dir, other, views=2, seed=0).dir != cache.dir
    assert FeatureCache(cache_dir, model, views=2, seed=1).dir != cache.dir
    assert first.shape[:2] == (len(table.images), 2)
    # view 0 is the plain serving crop: the cached trunk output matches a fresh forward pass
    from models.embedder import load_inputs

    plain = torch.from_numpy(load_inputs(tiny_world, table.images["path"][:4].tolist(), None))
    with torch.no_grad():
        fresh = model.eval().frozen_features(plain).numpy()
    assert np.allclose(first[:4, 0], fresh, atol=2e-2)


def test_feature_cache_is_keyed_by_photo_content(tiny_world, tiny_harvest, tmp_path):
    """Replacing one photo recomputes only its entries; rewriting a table or copying the
    world elsewhere recomputes nothing; a half-written entry is never read."""
    import shutil

    from models.embedder import Embedder, EmbedderSpec

    listed = load_pairs(_pairs(tiny_harvest), tiny_world).images
    listed = listed[listed["item_id"].notna()].drop_duplicates("path").reset_index(drop=True)
    images, stranger = listed.head(12), listed["path"][12]
    world = tmp_path / "world"
    for path in images["path"]:
        (world / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_world / path, world / path)
    shutil.copytree(tiny_world / "tables", world / "tables")
    cache = FeatureCache(tmp_path / "cache", Embedder(EmbedderSpec()), views=2, seed=0)
    first = cache.features(world, images)
    assert cache.computed == len(images)
    table = world / "tables" / "catalog.parquet"
    pd.read_parquet(table).to_parquet(table)  # touched: new bytes and mtime, same content
    cache.features(world, images)
    assert cache.computed == 0
    moved = tmp_path / "moved"
    shutil.copytree(world, moved)
    assert np.array_equal(cache.features(moved, images), first) and cache.computed == 0
    swap = images["path"][0]
    shutil.copy(tiny_world / stranger, world / swap)  # another photo, same name
    after = cache.features(world, images)
    assert cache.computed == 1
    assert not np.array_equal(after[0], first[0]) and np.array_equal(after[1:], first[1:])
    entries = sorted(cache.dir.glob("*/*.npy"))
    assert len(entries) == len(images) + 1
    assert not list(cache.dir.glob("*/.*.tmp"))  # every entry was renamed into place whole


def test_same_seed_same_weights_cold_or_warm_and_any_thread_count(tiny_world, tiny_harvest,
                                                                   cache_dir, tmp_path):
    """Issue 21: a cold cache built by this run with 2 threads, a warm cache built earlier by
    another pair set in another order with 1 thread, the caller's own torch thread setting,
    and the retrain DAG's task body reading the recipe from a params file, all train
    identical weights. The fit's thread count is part of the recipe (`train.threads`): on an
    AVX-512/AMX Xeon, fits on 1 and 2 threads differ in the last bits and then diverge."""
    import yaml

    from models.embedder import Embedder
    from pipelines.config import DEFAULT_PARAMS
    from pipelines.orchestration import train_embedder
    from pipelines.run_config import resolve_config

    base = {**FAST, "max_epochs": 2, "patience": 100}
    cold = train(tiny_world, _pairs(tiny_harvest), tmp_path / "cold",
                 TrainConfig(**base, threads=2), tmp_path / "cold_cache")
    assert cold.metrics["cache_entries_computed"] == cold.metrics["n_crops"]
    warm_cache = tmp_path / "warm_cache"
    naive = load_pairs(tiny_harvest / "pairs_naive.parquet", tiny_world)
    FeatureCache(warm_cache, Embedder(TrainConfig(**base).spec()), base["views"], 0).features(
        tiny_world, naive.images.iloc[::-1], threads=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's setting must not matter either
    try:
        warm = train(tiny_world, _pairs(tiny_harvest), tmp_path / "warm",
                     TrainConfig(**base, threads=2), warm_cache)
    finally:
        torch.set_num_threads(previous)
    assert warm.metrics["cache_entries_computed"] == 0
    assert warm.metrics["weights_sha256"] == cold.metrics["weights_sha256"]
    assert warm.metrics["curve"] == cold.metrics["curve"]
    assert len(cold.metrics["curve"]) == 2
    for key in ("final_val_recall_at_10", "final_val_style_recall_at_10",
                "best_val_style_recall_at_10"):
        assert warm.metrics[key] == cold.metrics[key], key
    # the DAG's train task: recipe from params.yaml, cache under the run's runs_dir
    params = yaml.safe_load(DEFAULT_PARAMS.read_text())
    params["train"] = {**params["train"], **base, "threads": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = resolve_config({"loupe_root": str(tmp_path), "world_root": str(tiny_world),
                          "params_file": str(tmp_path / "params.yaml")})
    dag = train_embedder(cfg, tmp_path / "dag_run", str(tiny_harvest), "debiased")
    by_dag = json.loads(Path(dag["train_json"]).read_text())
    assert by_dag["weights_sha256"] == cold.metrics["weights_sha256"]
    assert by_dag["curve"] == json.loads(json.dumps(cold.metrics["curve"]))


def test_train_json_records_curves_and_versions(tiny_world, tiny_harvest, cache_dir, tmp_path):
    res = train(tiny_world, _pairs(tiny_harvest), tmp_path / "run",
                TrainConfig(**{**FAST, "max_epochs": 2, "patience": 100}), cache_dir)
    stored = json.loads((tmp_path / "run" / "train.json").read_text())
    assert stored == json.loads(json.dumps(res.metrics))
    assert [row["epoch"] for row in stored["curve"]] == [0, 1]
    for row in stored["curve"]:
        assert 0.0 <= row["val_style_recall_at_10"] <= 1.0 and row["train_loss"] > 0
    assert stored["best_val_style_recall_at_10"] == round(max(
        row["val_style_recall_at_10"] for row in stored["curve"]), 4)
    assert stored["versions"]["torch"].startswith("2.13.0")
    assert {"numpy", "pillow", "onnxruntime", "faiss-cpu", "pytorch-lightning", "mlflow",
            "pandas", "pyarrow"} <= set(stored["versions"])


def test_train_config_defaults_are_params_yaml():
    """The dataclass defaults and params.yaml's train: block agree (one recipe, two spellings
    would drift), and an unknown key is one clear ValueError naming it."""
    import dataclasses

    import yaml

    from pipelines.config import DEFAULT_PARAMS

    block = yaml.safe_load(DEFAULT_PARAMS.read_text())["train"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {k: defaults[k] for k in block} == block
    assert TrainConfig.load(DEFAULT_PARAMS) == TrainConfig()
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.load(None, learning_rate=1.0)


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


def test_selection_without_validation_pairs_says_so(tiny_world, tiny_harvest, cache_dir,
                                                    tmp_path):
    """Issue 16: with no validation pairs the epochs were ranked on training pairs without a
    word; train.json and the log now say so, and still name the chosen epoch."""
    pairs = pd.read_parquet(_pairs(tiny_harvest)).assign(split="train")
    pairs.to_parquet(tmp_path / "pairs.parquet", index=False)
    res = train(tiny_world, tmp_path / "pairs.parquet", tmp_path / "run",
                TrainConfig(**{**FAST, "max_epochs": 2, "patience": 100}), cache_dir)
    assert res.metrics["n_pairs_val"] == 0
    assert "no validation pairs" in res.metrics["selection_note"]
    assert res.metrics["best_epoch"] in (0, 1)


def test_training_is_its_own_mlflow_run_linked_to_its_evaluation(tiny_world, tiny_harvest,
                                                                   cache_dir, tmp_path):
    """run_train: per-epoch loss, validation and rater-probe curves via MLFlowLogger, system
    metrics, dataset inputs with digests; a resumed training reopens the same run; the
    evaluation run and the training run point at each other."""
    from mlflow import MlflowClient

    from pipelines import evaluate as ev
    from pipelines.registry import file_digest
    from pipelines.train import PROBE_METRIC, run_train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = {**FAST, "patience": 100}
    out = tmp_path / "run"
    first = run_train(TrainConfig(**base, max_epochs=2), tiny_world, _pairs(tiny_harvest), out,
                      cache_dir=cache_dir, tracking_uri=uri, system_metrics_interval_s=0.2)
    done = run_train(TrainConfig(**base, max_epochs=3), tiny_world, _pairs(tiny_harvest), out,
                     cache_dir=cache_dir, tracking_uri=uri, resume=True,
                     system_metrics_interval_s=0.2)
    run_id = done.metrics["mlflow_run_id"]
    assert run_id == first.metrics["mlflow_run_id"]  # the retry continued its run
    assert json.loads((out / "train.json").read_text())["mlflow_run_id"] == run_id
    client = MlflowClient(uri, uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["loupe.stage"] == "train"
    assert run.data.params["train.max_epochs"] == "2"  # params are the first attempt's
    for name in ("train_loss_epoch", "val_style_recall_at_10", PROBE_METRIC):
        history = client.get_metric_history(run_id, name)
        assert len(history) == 3, name  # one point per epoch, across the resume
    curve_probe = [row[PROBE_METRIC] for row in done.metrics["curve"]]
    assert len(curve_probe) == 3 and all(0.0 < v <= 1.0 for v in curve_probe)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {"training_pairs": file_digest(_pairs(tiny_harvest)),
                      "catalog": file_digest(tiny_world / "tables/catalog.parquet")}
    assert "train.json" in {a.path for a in client.list_artifacts(run_id)}
    # the probe is a real rater number: the exported model scores the same rater queries
    # against the whole catalog no higher than against the probe's smaller gallery
    full = ev.evaluate_models({"model": ev.embed_fn_from_export(done.export_dir, tiny_world)},
                              tiny_world, [ev.load_rater_set(tiny_world)]).headline
    assert full <= done.metrics["final_probe_rater_recall_at_10"] + 1e-6
    evaluated = ev.run_evaluate(ev.EvaluateConfig(), tiny_world, done.export_dir, {},
                                tmp_path / "eval", train_json=out / "train.json",
                                tracking_uri=uri)
    eval_run = client.get_run(evaluated.published.run_id)
    assert eval_run.data.tags["training_run_id"] == run_id
    linked = client.get_run(run_id).data.tags
    assert linked["evaluation_run_id"] == eval_run.info.run_id
    assert linked["model_version"] == evaluated.published.model_version
    assert evaluated.report.headline == pytest.approx(full)
