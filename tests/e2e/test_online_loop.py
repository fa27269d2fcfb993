"""The loop: serve -> simulated users click -> served logs published -> harvest -> train.

The grids come from the experiment front door over truth-based rankers (the live
Triton/shard search stack is not in this loop); everything after serving is the real
production path: the durable impression log, the contract-validated publication into the
data root, `harvest` and `train`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipelines.harvest import HarvestConfig, harvest
from pipelines.simulate_traffic import BehaviourWorld, TruthRanker, drive_api, image_rank_fn
from pipelines.train import TrainConfig, train
from serving.api.experiments import DEFAULT_CONFIG, ExperimentConfig
from serving.api.impressions import ImpressionLog, publish_to_data_root
from serving.api.online import RankerBackend, create_online_app

SERVED_PHOTO = re.compile(r"^images/queries/[0-9a-f]{32}\.jpg$")


@pytest.mark.slow
@pytest.mark.e2e
def test_served_clicks_become_training_pairs(tiny_world, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_world, root)
    world = BehaviourWorld.load(root)
    cfg = replace(ExperimentConfig.load(DEFAULT_CONFIG), rankers={})
    backends = {name: RankerBackend(image_rank_fn(root, TruthRanker(world, noise, seed)),
                                    f"truth/{noise}", "world")
                for name, noise, seed in (("champion", 0.25, 1), ("challenger", 0.5, 2))}
    log = ImpressionLog(tmp_path / "log")
    summary = drive_api(TestClient(create_online_app(cfg, backends, log)), root, 300, seed=3,
                        world=world)
    assert summary.clicks > 300 and summary.rejected_events == 0

    published = publish_to_data_root(log, root)
    assert published == {"history_rows": 16_000, "served_rows": 6_000, "rows": 22_000}
    assert publish_to_data_root(log, root) == published  # idempotent

    # eval_days=0: every session before the newest one may train, the served ones included
    result = harvest(root, tmp_path / "harvest", HarvestConfig(bootstrap=20, eval_days=0.0))
    pairs = pd.read_parquet(result.out_dir / "pairs_debiased.parquet")
    served_pairs = pairs[pairs["query_image_path"].str.match(SERVED_PHOTO)]
    assert len(served_pairs) > 50
    assert set(served_pairs["source"]) == {"click", "save"}
    assert (served_pairs["split"].isin(["train", "val"])).all()

    run = train(root, result.out_dir / "pairs_debiased.parquet", tmp_path / "train",
                TrainConfig(backbone="efficientnet-lite0", tuned_blocks=0,
                            tune_conv_head=False, views=2, batch_size=64, progress_bar=False,
                            hard_negative_pool=5),
                tmp_path / "cache", fast_dev_run=True)
    metrics = json.loads((tmp_path / "train" / "train.json").read_text())
    assert metrics["n_pairs_train"] == int((pairs["split"] == "train").sum())
    assert (run.export_dir / "embedder.onnx").exists()
