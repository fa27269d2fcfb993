"""MLflow registry: runs, versions, aliases and the promotion gate, on a real sqlite store."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from pipelines import cli
from pipelines import registry as reg


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store per module (creating one runs every migration, seconds each)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def cfg(store, request) -> reg.RegistryConfig:
    """A model and experiment of this test's own in the shared store."""
    name = f"loupe-{request.node.name[5:40]}"
    return reg.RegistryConfig(f"sqlite:///{store}/mlflow.db", experiment=name, model_name=name,
                              promotion_margin=0.02)


def _client(cfg) -> MlflowClient:
    return MlflowClient(cfg.uri, cfg.uri)


def _evaluated(cfg, tmp_path: Path, recall: float, fingerprint: str = "fp-a"
               ) -> reg.ModelVersionRef:
    """Log a run with an exported model file and register it, as `loupe evaluate` does."""
    model = tmp_path / f"embedder-{recall}.onnx"
    model.write_bytes(f"onnx bytes {recall}".encode())
    run = reg.log_run(cfg, run_name=f"r{recall}", params={"backbone": "tiny_cnn"},
                      metrics={reg.HEADLINE: recall}, artifacts={}, model_files=[model])
    return reg.register_model_version(cfg, run, recall, fingerprint)


def _decision_artifact(cfg, ref: reg.ModelVersionRef) -> dict:
    run_id = _client(cfg).get_model_version(ref.name, ref.version).run_id
    path = download_artifacts(run_id=run_id, artifact_path="promotion/decision.json",
                              tracking_uri=cfg.uri)
    return json.loads(Path(path).read_text())


def test_run_holds_params_metrics_artifacts_and_registered_model(cfg, store, tmp_path):
    plot = tmp_path / "recall_at_k.png"
    plot.write_bytes(b"\x89PNG fake plot bytes")
    model = tmp_path / "embedder.ts"
    model.write_bytes(b"torchscript bytes")
    run = reg.log_run(cfg, run_name="eval", params={"lr": 0.001, "ks": [1, 5]},
                      metrics={"model/rater/recall_at_10": 0.7, "rater_recall_at_10": 0.7},
                      artifacts={"plots": [plot]}, model_files=[model], tags={"stage": "eval"})
    ref = reg.register_model_version(cfg, run, 0.7, "fp-a")

    client = _client(cfg)
    data = client.get_run(run.run_id).data
    assert data.params == {"lr": "0.001", "ks": "[1, 5]"}
    assert data.metrics == {"model/rater/recall_at_10": 0.7, "rater_recall_at_10": 0.7}
    assert data.tags["stage"] == "eval" and data.tags["model_version"] == f"{ref.name}/1"
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert run.artifact_uri.startswith((store / "mlruns").as_uri())  # beside the db
    assert {a.path for a in client.list_artifacts(run.run_id, "plots")} == {
        "plots/recall_at_k.png"}

    assert (ref.model_version, ref.uri) == (f"{cfg.model_name}/1", f"models:/{cfg.model_name}/1")
    mv = client.get_model_version(ref.name, ref.version)
    assert mv.run_id == run.run_id and mv.source == f"{run.artifact_uri}/model"
    assert mv.tags[reg.HEADLINE] == "0.7" and mv.tags["model_version"] == ref.model_version
    challenger = client.get_model_version_by_alias(ref.name, reg.CHALLENGER)
    served = Path(download_artifacts(
        client.get_model_version_download_uri(ref.name, challenger.version)))
    assert (served / "embedder.ts").read_bytes() == b"torchscript bytes"


def test_model_version_string_round_trips_to_files(cfg, tmp_path):
    ref = _evaluated(cfg, tmp_path, 0.42)
    assert reg.parse_model_version(ref.model_version) == ref
    files = reg.download_model(cfg, ref.model_version, tmp_path / "fetched")
    assert (files / "embedder-0.42.onnx").read_bytes() == b"onnx bytes 0.42"
    for bad in ("loupe-embedder", "loupe-embedder/latest", "/3"):
        with pytest.raises(ValueError, match="must look like 'loupe-embedder/3'"):
            reg.parse_model_version(bad)


def test_first_version_becomes_champion_and_every_new_version_is_challenger(cfg, tmp_path):
    v1 = _evaluated(cfg, tmp_path, 0.40)
    assert reg.version_for_alias(cfg, reg.CHALLENGER) == v1
    assert reg.version_for_alias(cfg, reg.CHAMPION) is None
    decision = reg.promotion_gate(cfg, v1)
    assert decision.promoted and "no champion yet" in decision.reason
    assert reg.version_for_alias(cfg, reg.CHAMPION) == v1
    v2 = _evaluated(cfg, tmp_path, 0.30)
    assert reg.version_for_alias(cfg, reg.CHALLENGER) == v2
    assert reg.version_for_alias(cfg, reg.CHAMPION) == v1
    again = reg.promotion_gate(cfg, v1)
    assert not again.promoted and "already champion" in again.reason


def test_gate_keeps_champion_below_margin_and_moves_it_above(cfg, tmp_path):
    v1 = _evaluated(cfg, tmp_path, 0.50)
    reg.promotion_gate(cfg, v1)

    v2 = _evaluated(cfg, tmp_path, 0.51)  # +0.01 < margin 0.02
    kept = reg.promotion_gate(cfg, v2)
    assert not kept.promoted
    assert (kept.champion, kept.champion_recall, kept.challenger_recall) == (
        v1.model_version, 0.50, 0.51)
    assert "gain +0.0100 does not beat the margin 0.0200" in kept.reason
    assert reg.version_for_alias(cfg, reg.CHAMPION) == v1
    run_id = _client(cfg).get_model_version(v2.name, v2.version).run_id
    tags = _client(cfg).get_run(run_id).data.tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.reason"] == kept.reason
    assert _decision_artifact(cfg, v2)["promoted"] is False

    v3 = _evaluated(cfg, tmp_path, 0.53)  # +0.03 >= margin
    moved = reg.promotion_gate(cfg, v3)
    assert moved.promoted and "gain +0.0300 beats the margin" in moved.reason
    assert reg.version_for_alias(cfg, reg.CHAMPION) == v3
    assert _decision_artifact(cfg, v3) == {**moved.__dict__}
    mv3 = _client(cfg).get_model_version(v3.name, v3.version)
    assert mv3.tags["promotion_decision"] == "promoted"


def test_gate_refuses_numbers_from_a_different_eval_set(cfg, tmp_path):
    reg.promotion_gate(cfg, _evaluated(cfg, tmp_path, 0.50, fingerprint="fp-a"))
    v2 = _evaluated(cfg, tmp_path, 0.90, fingerprint="fp-b")
    refused = reg.promotion_gate(cfg, v2)
    assert not refused.promoted and "different catalog or rater set" in refused.reason
    remeasured = reg.promotion_gate(cfg, v2, champion_recall=0.60)  # champion on fp-b
    assert remeasured.promoted and remeasured.champion_recall == 0.60
    assert reg.version_for_alias(cfg, reg.CHAMPION) == v2


def test_gate_refuses_when_the_champion_moved_during_the_evaluation(cfg, tmp_path):
    v1 = _evaluated(cfg, tmp_path, 0.50)
    reg.promotion_gate(cfg, v1)
    v2 = _evaluated(cfg, tmp_path, 0.90)
    stale = reg.promotion_gate(cfg, v2, champion_recall=0.40, measured_champion="loupe-embedder/9")
    assert not stale.promoted and f"champion moved to {v1.model_version}" in stale.reason
    assert reg.version_for_alias(cfg, reg.CHAMPION) == v1
    fresh = reg.promotion_gate(cfg, v2, champion_recall=0.40, measured_champion=v1.model_version)
    assert fresh.promoted and fresh.champion_recall == 0.40


def test_decide_promotion_boundary():
    assert reg.decide_promotion(0.62, 0.60, 0.02)[0]  # exactly the margin counts
    assert not reg.decide_promotion(0.619, 0.60, 0.02)[0]
    assert not reg.decide_promotion(0.60, 0.60, 0.0)[0]  # a tie never beats
    assert reg.decide_promotion(0.1, None, 0.5)[0]
    with pytest.raises(ValueError, match="promotion_margin"):
        reg.RegistryConfig(promotion_margin=-0.1)


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert reg.resolve_tracking_uri() == f"sqlite:///{reg.REPO_ROOT}/mlflow.db"
    assert reg.artifact_root(reg.resolve_tracking_uri()) == (reg.REPO_ROOT / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert reg.resolve_tracking_uri() == f"sqlite:///{tmp_path}/env.db"
    assert reg.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert reg.artifact_root("http://127.0.0.1:5000") is None
    with pytest.raises(ValueError, match="not database-backed"):
        reg.resolve_tracking_uri(str(tmp_path / "mlruns"))


def test_bad_inputs_fail_before_anything_is_stored(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot log missing files"):
        reg.log_run(cfg, run_name="x", params={}, metrics={}, artifacts={},
                    model_files=[tmp_path / "absent.onnx"])
    assert _client(cfg).get_experiment_by_name(cfg.experiment) is None  # nothing created
    run = reg.log_run(cfg, run_name="x", params={}, metrics={}, artifacts={})
    with pytest.raises(ValueError, match="no exported model files"):
        reg.register_model_version(cfg, run, 0.5, "fp")
    with pytest.raises(ValueError, match="not registered by `loupe evaluate`"):
        model = tmp_path / "m.onnx"
        model.write_bytes(b"x")
        run = reg.log_run(cfg, run_name="y", params={}, metrics={}, artifacts={},
                          model_files=[model])
        client = _client(cfg)
        client.create_registered_model(cfg.model_name)
        client.create_model_version(cfg.model_name, f"{run.artifact_uri}/model", run.run_id)
        reg.promotion_gate(cfg, "1")


def test_rollout_model_spec_resolves_aliases_versions_and_the_promoted_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="no version of 'loupe-embedder' has the alias"):
        reg.resolve_model("champion", uri)
    cfg = reg.RegistryConfig(uri)
    for recall in (0.5, 0.6):
        model = tmp_path / f"embedder-{recall}.ts"
        model.write_bytes(b"exported model bytes")
        run = reg.log_run(cfg, run_name=f"r{recall}", params={}, metrics={reg.HEADLINE: recall},
                          artifacts={}, model_files=[model])
        ref = reg.register_model_version(cfg, run, recall, "fp")
        if recall == 0.5:
            reg.promotion_gate(cfg, ref)
    assert reg.resolve_model("champion", uri) == "loupe-embedder/1"
    assert reg.resolve_model("challenger", uri) == "loupe-embedder/2"
    assert reg.resolve_model("champion", uri, promoted_version="loupe-embedder/2") == \
        "loupe-embedder/2"
    assert reg.resolve_model(" loupe-embedder/1 ", uri) == "loupe-embedder/1"
    assert reg.resolve_model("attributes/7", uri) == "attributes/7"
    with pytest.raises(ValueError, match="not registered"):
        reg.resolve_model("loupe-embedder/9", uri)
    with pytest.raises(ValueError, match="attributes/<seed>"):
        reg.resolve_model("attributes/x", uri)
    with pytest.raises(ValueError, match="must look like"):
        reg.resolve_model("latest", uri)
    # the detector Triton serves beside the embedder must be registered too
    with pytest.raises(ValueError, match="no loupe-detector version is registered"):
        reg.resolve_detector(None, uri)
    with pytest.raises(ValueError, match="must be a version of 'loupe-detector'"):
        reg.resolve_detector("loupe-embedder/1", uri)
    with pytest.raises(ValueError, match="loupe-detector/3 is not registered"):
        reg.resolve_detector("loupe-detector/3", uri)


def test_registered_files_are_fetched_once_into_the_models_dir(cfg, tmp_path):
    ref = _evaluated(cfg, tmp_path, 0.33)
    models = tmp_path / "models"
    local = reg.fetch_registered(cfg.uri, ref.model_version, models)
    assert local == models / f"{cfg.model_name}-1"
    assert (local / "embedder-0.33.onnx").read_bytes() == b"onnx bytes 0.33"
    assert [p.name for p in models.iterdir()] == [local.name]  # no temp dir left behind
    # fetched once: a second call reads the local copy, even with the store unreachable
    assert reg.fetch_registered("sqlite:///absent/elsewhere.db", ref.model_version,
                                models) == local
    with pytest.raises(ValueError, match="must look like 'loupe-embedder/3'"):
        reg.fetch_registered(cfg.uri, "loupe-embedder/latest", models)
    assert reg.is_attribute_model("attributes/3") and not reg.is_attribute_model(
        ref.model_version)


def test_promote_cli(cfg, tmp_path, capsys):
    args = ["promote", "--tracking-uri", cfg.uri, "--model-name", cfg.model_name,
            "--margin", "0.02", "--reason", "weekly review: beats champion on rater set"]
    assert cli.main(args) == 2  # nothing registered yet: a clear error, no traceback
    assert "no 'challenger' version" in capsys.readouterr().err
    _evaluated(cfg, tmp_path, 0.5)
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["promoted"] and out["challenger"] == f"{cfg.model_name}/1"
    assert out["note"] == "weekly review: beats champion on rater set"
    client = reg._client(cfg)
    mv = client.get_model_version(cfg.model_name, "1")
    assert mv.tags["promotion_note"] == out["note"]
    assert client.get_run(mv.run_id).data.tags["promotion.note"] == out["note"]
    # a version that does not beat champion by the margin: refused, exit 1, champion stays
    _evaluated(cfg, tmp_path, 0.51)
    assert cli.main(args[:-2] + [f"{cfg.model_name}/2", "--reason", "try"]) == 1
    assert not json.loads(capsys.readouterr().out)["promoted"]
    assert reg.version_for_alias(cfg, reg.CHAMPION).version == "1"
    with pytest.raises(SystemExit):  # the reason is required: promotion is an explicit act
        cli.main(args[:-2])
    assert cli.main(args[:-2] + ["other-model/2", "--reason", "x"]) == 2
    assert "is not a version of" in capsys.readouterr().err


def test_mlflow_ui_serves_the_same_store_on_localhost(cfg, store, tmp_path):
    v1 = _evaluated(cfg, tmp_path, 0.5)
    reg.promotion_gate(cfg, v1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = reg.mlflow_ui_command(cfg.uri, port)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/alias?" \
          f"name={cfg.model_name}&alias=champion"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert body["model_version"]["version"] == "1"
    assert body["model_version"]["source"].startswith((store / "mlruns").as_uri())


def test_a_bootstrap_champion_is_rescored_before_a_retrain_replaces_it(tmp_path):
    """Cold start registers the frozen embedder as champion with no rater recall; the first
    retrain's challenger is compared with it re-scored on the challenger's rater set."""
    from pipelines.pretrained import BOOTSTRAP_FINGERPRINT, register_frozen_embedder

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    boot = register_frozen_embedder(uri)
    cfg = reg.RegistryConfig(uri, promotion_margin=0.02)
    assert reg.version_for_alias(cfg, reg.CHAMPION).model_version == boot
    challenger = _evaluated(cfg, tmp_path, 0.40)
    refused = reg.promotion_gate(cfg, challenger.version)
    assert not refused.promoted and BOOTSTRAP_FINGERPRINT in refused.reason
    decision = reg.promotion_gate(cfg, challenger.version, champion_recall=0.30,
                                  measured_champion=boot)
    assert decision.promoted and decision.champion == boot
    assert decision.champion_recall == 0.30 and "re-evaluated" in decision.reason
    assert reg.version_for_alias(cfg, reg.CHAMPION).version == challenger.version
