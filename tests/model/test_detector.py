"""Detector: hand-checked NMS / AP / salience, overfit, train-export-resume, export parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from models.detector import (
    CenterNetDetector,
    Detections,
    ExportedDetector,
    PickPolicy,
    encode_targets,
    nms,
    pick_salient,
    postprocess,
    prepare_image,
)
from pipelines.cli import main as loupe
from pipelines.registry import RegistryConfig, download_model
from pipelines.train_detector import (
    DetectorTrainConfig,
    evaluate_detections,
    evaluate_scenes,
    fit_detector,
    load_checkpoint_weights,
    load_scenes,
    register_detector,
    scene_categories,
    train_detector,
)

# --------------------------------------------------------------------------- NMS
NMS_BOXES = torch.tensor([
    [0, 0, 10, 10],   # 0  s .90 label 0
    [1, 1, 11, 11],   # 1  s .80 label 0: IoU(0, 1) = 81 / 119 = 0.68
    [1, 1, 11, 11],   # 2  s .70 label 1: same place as 1, other class
    [20, 20, 30, 30],  # 3  s .60 label 0: overlaps nothing
    [0, 0, 10, 5],    # 4  s .95 label 0: IoU(4, 0) = 0.5 exactly, IoU(4, 1) = 36 / 114
    [2, 2, 12, 12],   # 5  s .75 label 0: IoU(5, 0) = 64 / 136 = 0.47, IoU(5, 1) = 0.68
], dtype=torch.float32)
NMS_SCORES = torch.tensor([0.90, 0.80, 0.70, 0.60, 0.95, 0.75])
NMS_LABELS = torch.tensor([0, 0, 1, 0, 0, 0])


def test_nms_matches_hand_computed_case():
    # IoU must *exceed* 0.5 to suppress: 4 keeps 0; 0 drops 1; 1 is gone so 5 survives;
    # 2 is another class
    assert nms(NMS_BOXES, NMS_SCORES, NMS_LABELS, 0.5).tolist() == [4, 0, 5, 2, 3]
    # at 0.4, 4 drops 0, so 1 survives (0.32 with 4) and drops 5 (0.68): greedy, not pairwise
    assert nms(NMS_BOXES, NMS_SCORES, NMS_LABELS, 0.4).tolist() == [4, 1, 2, 3]
    # class-agnostic input (all one label) lets 1 suppress 2 as well
    assert nms(NMS_BOXES, NMS_SCORES, torch.zeros(6, dtype=torch.long), 0.5).tolist() == [
        4, 0, 5, 3]
    assert nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError, match="boxes must be"):
        nms(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- mAP
def _det(boxes, scores, labels) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))


def test_map_matches_hand_computed_case():
    """Category 0 has 3 objects over 2 images and 4 ranked detections:
    d1 hits A; d2 hits nothing; d3 overlaps B with IoU 0.62; d4 is B exactly.
    IoU <= 0.6: TP FP TP FP -> recall 1/3, 1/3, 2/3, 2/3; precision envelope 1, 2/3, 2/3, .5
        -> 101-point AP = (34 * 1 + 33 * 2/3) / 101 = 56 / 101.
    IoU >= 0.65: TP FP FP TP -> envelope 1, .5, .5, .5 -> (34 + 33 * .5) / 101 = 0.5.
    Category 1: one object found exactly -> AP 1. Category 2: no objects, one false alarm ->
    no AP (left out of the mean)."""
    a, b, c = [0.1, 0.1, 0.3, 0.3], [0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]
    gt_boxes = [np.array([a, [0.5, 0.5, 0.7, 0.9]]), np.array([b, c])]
    gt_labels = [np.array([0, 1]), np.array([0, 0])]
    dets = [
        _det([a, [0.5, 0.5, 0.7, 0.9]], [0.9, 0.5], [0, 1]),
        _det([[0.6, 0.0, 0.9, 0.3], [0.0, 0.0, 0.5, 0.31], b, [0.1, 0.6, 0.3, 0.8]],
             [0.8, 0.7, 0.6, 0.4], [0, 0, 0, 2]),
    ]
    m = evaluate_detections(dets, gt_boxes, gt_labels, ["lamp", "sofa", "mug"])
    ap50_lamp = 56 / 101
    ap50_95_lamp = (3 * 56 / 101 + 7 * 0.5) / 10
    assert m["ap50"] == {"lamp": round(ap50_lamp, 4), "sofa": 1.0, "mug": None}
    assert m["ap50_95"]["lamp"] == round(ap50_95_lamp, 4)
    assert m["map50"] == pytest.approx((ap50_lamp + 1) / 2, abs=1e-12)
    assert m["map50_95"] == pytest.approx((ap50_95_lamp + 1) / 2, abs=1e-12)
    assert m["n_objects"] == {"lamp": 3, "sofa": 1, "mug": 0}


def test_map_is_one_for_perfect_and_zero_for_missing_detections():
    gt_boxes = [np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]])]
    gt_labels = [np.array([0, 1])]
    perfect = evaluate_detections([_det(gt_boxes[0].tolist(), [0.9, 0.8], [0, 1])],
                                  gt_boxes, gt_labels, ["a", "b"])
    assert perfect["map50"] == 1.0 and perfect["map50_95"] == 1.0
    empty = evaluate_detections([_det([], [], [])], gt_boxes, gt_labels, ["a", "b"])
    assert empty["map50"] == 0.0
    with pytest.raises(ValueError, match="1 detection lists for 2"):
        evaluate_detections([_det([], [], [])], gt_boxes * 2, gt_labels * 2, ["a", "b"])


# --------------------------------------------------------------------------- salience
def test_salience_prefers_central_large_confident_boxes():
    left, centre, right = [0.0, 0.3, 0.3, 0.7], [0.35, 0.3, 0.65, 0.7], [0.7, 0.3, 1.0, 0.7]
    assert pick_salient(torch.tensor([left, centre, right]), torch.ones(3)) == 1
    small_centre = [0.45, 0.45, 0.55, 0.55]
    assert pick_salient(torch.tensor([small_centre, centre]), torch.ones(2)) == 1
    assert pick_salient(torch.tensor([centre, centre]), torch.tensor([0.4, 0.9])) == 1
    # a big rug cut by the frame edge loses to the lamp in the middle
    rug, lamp = [0.0, 0.3, 0.35, 0.9], [0.42, 0.3, 0.58, 0.7]
    assert pick_salient(torch.tensor([rug, lamp]), torch.ones(2)) == 1
    assert pick_salient(torch.zeros(0, 4), torch.zeros(0)) is None
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        pick_salient(torch.tensor([left, right]), torch.ones(1))


def test_salience_on_world_scenes_with_a_dominant_object(tiny_world):
    """In scenes where one object is both the largest and the most central, it must win."""
    objects = pd.read_parquet(tiny_world / "tables/scene_objects.parquet")
    checked = 0
    for _, g in objects.groupby("scene_id"):
        boxes = g[["x0", "y0", "x1", "y1"]].to_numpy()
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        dist = np.hypot(cx - 0.5, cy - 0.5)
        if np.argmax(area) != np.argmin(dist):
            continue
        assert pick_salient(torch.tensor(boxes), torch.ones(len(g))) == int(np.argmax(area))
        checked += 1
    assert checked >= 10


# --------------------------------------------------------------------------- targets / decode
def test_pick_policy_takes_the_first_rule_that_finds_a_box():
    """category > salient > whole: the salient box of the listing's category, else the most
    salient box, else the whole photo; the default is the query path's salient > whole."""
    categories = ["lamp", "sofa"]
    centre_sofa = [0.3, 0.3, 0.7, 0.7]  # most salient
    edge_lamp = [0.0, 0.0, 0.2, 0.3]
    det = _det([centre_sofa, edge_lamp], [0.9, 0.9], [1, 0])
    policy = PickPolicy.parse("category>salient>whole")
    assert str(policy) == "category>salient>whole"
    np.testing.assert_allclose(policy.pick(det, categories, "lamp"), edge_lamp)
    np.testing.assert_allclose(policy.pick(det, categories, "sofa"), centre_sofa)
    np.testing.assert_allclose(policy.pick(det, categories, "vase"), centre_sofa)
    np.testing.assert_allclose(policy.pick(det, categories, None), centre_sofa)
    none = _det(np.zeros((0, 4)), [], [])
    assert policy.pick(none, categories, "lamp") == (0.0, 0.0, 1.0, 1.0)
    default = PickPolicy()
    assert str(default) == "salient>whole"
    np.testing.assert_allclose(default.pick(det, categories, "lamp"), centre_sofa)
    assert PickPolicy.parse("whole").pick(det, categories, "lamp") == (0.0, 0.0, 1.0, 1.0)
    for bad in ("salient", "biggest>whole", "whole>salient", "salient>salient>whole", ""):
        with pytest.raises(ValueError, match="pick policy"):
            PickPolicy.parse(bad)


def test_targets_decode_back_to_the_boxes():
    """Ground-truth targets fed through `postprocess` give back the boxes (round trip)."""
    boxes = np.array([[0.1, 0.2, 0.35, 0.6], [0.5, 0.1, 0.9, 0.95]], np.float32)
    t = encode_targets(boxes, np.array([2, 5]), num_classes=8, grid=24)
    logits = torch.logit(t["heatmap"].clamp(1e-4, 1 - 1e-4))
    raw = torch.cat([logits, t["size"], t["offset"]])[None]
    det = postprocess(raw, 8, score_threshold=0.99)[0]
    order = torch.argsort(det.labels)
    assert det.labels[order].tolist() == [2, 5]
    assert torch.allclose(det.boxes[order], torch.from_numpy(boxes), atol=1e-5)
    with pytest.raises(ValueError, match="expected raw output"):
        postprocess(raw, 7)
    # a confident peak with zero height (an undertrained size head) is no box to crop
    flat = raw.clone()
    flat[0, 8 + 1] = 0.0  # every cell's height
    assert len(postprocess(flat, 8, score_threshold=0.99)[0]) == 0


# --------------------------------------------------------------------------- training
def test_overfits_a_few_scenes(tiny_world, tmp_path):
    torch.set_num_threads(1)  # on a busy 2-core CI host, 2 threads ran 5x slower
    scenes = load_scenes(tiny_world, "train", limit=6)
    cfg = DetectorTrainConfig(input_size=128, epochs=30, batch_size=3, lr=4e-3, flip=False,
                              val_every_n_epochs=30, log_mlflow=False)
    model = CenterNetDetector(len(scenes.categories), cfg.input_size)
    fit_detector(model, scenes, scenes, cfg, tmp_path / "ckpt")
    model.eval()
    with torch.inference_mode():
        batch = torch.stack([prepare_image(scenes.image(i), 128) for i in range(len(scenes))])
        dets = postprocess(model(batch), model.num_classes, 0.01)
    assert evaluate_scenes(dets, scenes)["map50"] > 0.9


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """One short run on the tiny world with real MLflow (sqlite + local artifacts)."""
    base = tmp_path_factory.mktemp("detector")
    cfg = DetectorTrainConfig(input_size=128, epochs=2, batch_size=8, train_scenes=16,
                              latency_runs=5, grid_scenes=6, num_threads=1,
                              tracking_uri=f"sqlite:///{base}/mlflow.db")
    return cfg, base, train_detector(cfg, tiny_world, base / "run")


def test_same_seed_same_detector_whatever_drew_on_torch_rng_before(trained, tiny_world,
                                                                   tmp_path):
    """The heads' initial weights come from the config's seed: a run after other code drew
    on torch's global RNG (other tests, other stages in one process) trains the same
    detector, so a test's or a stage's result does not depend on what ran before it."""
    from dataclasses import replace

    cfg, _, first = trained
    torch.rand(1000)  # any earlier user of the global RNG
    again = train_detector(replace(cfg, log_mlflow=False), tiny_world, tmp_path / "again")
    assert again.metrics["map50"] == first.metrics["map50"]
    a = torch.load(first.best_checkpoint, weights_only=False)["state_dict"]
    b = torch.load(again.best_checkpoint, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_writes_checkpoints_export_metrics_and_mlflow_run(trained, tiny_world):
    cfg, base, result = trained
    out = result.out_dir
    for rel in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "export/detector.onnx",
                "export/detector.json", "metrics.json", "predictions.png"):
        assert (out / rel).is_file(), rel
    assert not out.with_name(out.name + ".tmp").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    categories = scene_categories(tiny_world)
    assert set(metrics["ap50"]) == set(categories)
    assert 0.0 <= metrics["map50_95"] <= metrics["map50"] <= 1.0
    assert metrics["latency_ms_p50"] > 0 and metrics["latency_ms_p50_2threads"] > 0
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * (16 // 8)
    assert metrics["eval_scenes"] == 6  # the tiny world's test split
    assert Image.open(out / "predictions.png").size == (4 * 256, 2 * 256)

    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["test_map50"] == pytest.approx(metrics["map50"])
    assert run.data.params["input_size"] == "128"
    assert "val_map50" in run.data.metrics and "train_loss" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts", "model/input_example.json"} <= logged
    exported = {a.path for a in client.list_artifacts(result.run_id, "model/artifacts/export")}
    assert exported == {"model/artifacts/export/detector.onnx",
                        "model/artifacts/export/detector.json"}

    ref = register_detector(result.run_id, cfg.tracking_uri)
    assert ref.model_version == "loupe-detector/1"
    assert client.get_model_version("loupe-detector", "1").tags["model_version"] == \
        "loupe-detector/1"
    # the registry's own download path hands back a detector that serves the same boxes
    fetched = download_model(RegistryConfig(tracking_uri=cfg.tracking_uri), ref.model_version,
                             base / "fetched")
    image = load_scenes(tiny_world, "test").image(0)
    local = ExportedDetector(result.export_dir).detect([image], 0.05)[0]
    remote = ExportedDetector(fetched).detect([image], 0.05)[0]
    assert torch.equal(local.labels, remote.labels) and torch.equal(local.boxes, remote.boxes)


def test_resume_continues_from_last_checkpoint(trained, tiny_world):
    cfg, base, first = trained
    resumed_cfg = DetectorTrainConfig(**{**cfg.__dict__, "epochs": 3, "log_mlflow": False})
    result = train_detector(resumed_cfg, tiny_world, base / "resumed",
                            resume_from=first.out_dir / "checkpoints/last.ckpt")
    assert result.metrics["epochs"] == 3
    assert result.metrics["global_step"] == 3 * (16 // 8)  # one epoch on top of two
    with pytest.raises(FileNotFoundError, match="checkpoint to resume from"):
        train_detector(resumed_cfg, tiny_world, base / "bad", resume_from=base / "nope.ckpt")
    assert not (base / "bad").exists()


def test_exported_onnx_matches_eager_model(trained, tiny_world):
    cfg, _, result = trained
    scenes = load_scenes(tiny_world, "test")
    model = CenterNetDetector(len(scenes.categories), cfg.input_size, pretrained=False)
    load_checkpoint_weights(model, result.best_checkpoint)
    exported = ExportedDetector(result.export_dir)
    for n in (1, 3):  # dynamic batch axis
        batch = torch.stack([prepare_image(scenes.image(i), cfg.input_size) for i in range(n)])
        with torch.inference_mode():
            eager = model(batch)
        onnx = exported.raw(batch)
        assert onnx.shape == eager.shape == (n, len(scenes.categories) + 4, 16, 16)
        assert torch.allclose(onnx, eager, atol=1e-4, rtol=1e-4)
        for e, o in zip(postprocess(eager, model.num_classes, 0.05),
                        postprocess(onnx, model.num_classes, 0.05), strict=True):
            assert e.labels.tolist() == o.labels.tolist()
            assert torch.allclose(e.boxes, o.boxes, atol=1e-4)


def test_bad_input_gets_clear_errors(tmp_path, tiny_world):
    assert loupe(["train-detector", "--world", str(tmp_path / "none"),
                  "--out", str(tmp_path / "o")]) == 2
    params = tmp_path / "params.yaml"
    params.write_text("detector:\n  epoch: 3\n")
    with pytest.raises(ValueError, match="unknown detector params \\['epoch'\\]"):
        DetectorTrainConfig.from_params({"epoch": 3})
    assert loupe(["train-detector", "--world", str(tiny_world), "--out", str(tmp_path / "o"),
                  "--params", str(params)]) == 2
    with pytest.raises(ValueError, match="split must be one of"):
        load_scenes(tiny_world, "holdout")
    with pytest.raises(ValueError, match="input_size must be a multiple of 32"):
        CenterNetDetector(8, 100, pretrained=False)
    with pytest.raises(FileNotFoundError, match="exported detector incomplete"):
        ExportedDetector(tmp_path)
    assert math.isclose(prepare_image(Image.new("RGB", (50, 80), (255, 0, 0)), 64)[0].mean(), 1.0)
