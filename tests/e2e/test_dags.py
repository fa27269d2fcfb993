"""Every DAG end to end with `dag.test()` on the tiny world: real Airflow (SQLite metadata
DB), real FAISS shards, GE contracts, the change feed and delta log.

The index stages are driven with the model-free `attributes/<seed>` embedder (clustered
vectors from catalog attributes, pipelines/embed.py): different seeds are different,
incompatible "models".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.ingest import ChangeFeed, FeedEvent, StreamingIndexer
from pipelines.orchestration import CANARY_ASSET_URI, LIVE_ASSET_URI
from pipelines.run_config import REPO_ROOT, LoupeConfig, resolve_config, slug
from serving.shards import layout, pointer
from serving.shards.store import ShardStore

pytestmark = pytest.mark.e2e
DAGS = REPO_ROOT / "dags"
MODEL = "attributes/0"


# --------------------------------------------------------------------------- helpers
class FreshDags:
    """DAG objects parsed anew for every run: in-process `dag.test()` writes the run conf
    into the task objects' params, which would leak into the next run of the same object."""

    def __getitem__(self, dag_id: str):
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(str(DAGS / f"{dag_id}.py"))
        assert bag.import_errors == {}
        return bag.dags[dag_id]


@pytest.fixture(scope="module")
def dags() -> FreshDags:
    from airflow.utils import db

    db.initdb()
    return FreshDags()


def run(dags: FreshDags, dag_id: str, root: Path, world: Path, **conf):
    return dags[dag_id].test(run_conf={"loupe_root": str(root), "world_root": str(world),
                                       "mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                                       **conf})


def states(dr) -> dict[str, str | list[str]]:
    """task id -> state (a list of states, by map index, for mapped tasks)."""
    out: dict = {}
    for ti in sorted(dr.get_task_instances(), key=lambda t: t.map_index):
        state = str(ti.state.value if hasattr(ti.state, "value") else ti.state)
        if ti.map_index >= 0:
            out.setdefault(ti.task_id, []).append(state)
        else:
            out[ti.task_id] = state
    return out


def tries(dr, task_id: str) -> int:
    return next(ti.try_number for ti in dr.get_task_instances() if ti.task_id == task_id)


def xcom(dr, task_id: str):
    ti = dr.get_task_instances()[0]
    return ti.xcom_pull(task_ids=task_id, dag_id=dr.dag_id, run_id=dr.run_id)


def asset_events(dr) -> dict[str, list[dict]]:
    """The run's asset events (what its page lists): uri -> extras."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    out: dict[str, list[dict]] = {}
    with create_session() as session:
        for e in session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id):
            out.setdefault(e.uri, []).append(dict(e.extra))
    return out


def config(root: Path, world: Path, **extra) -> LoupeConfig:
    return resolve_config({"loupe_root": str(root), "world_root": str(world), **extra}, {}, {})


def alerts(cfg: LoupeConfig) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cfg.alerts_dir.glob("*.json"))]


def params_file(tmp_path: Path, **sections) -> Path:
    """params.yaml with some section keys replaced."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def live(dags, tiny_world, tmp_path_factory):
    """A root with one rollout of attributes/0 done; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("live")
    dr = run(dags, "loupe_model_rollout", root, tiny_world, model=MODEL)
    return root, dr


def copy_root(live, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(live[0], root, symlinks=True)
    return root


def pointers(cfg: LoupeConfig) -> tuple[str | None, str | None]:
    return pointer.read(cfg.index, layout.CURRENT), pointer.read(cfg.index, layout.PREVIOUS)


# --------------------------------------------------------------------------- retrain
def test_retrain_harvests_trains_evaluates_registers_and_promotes(dags, tiny_world, tmp_path,
                                                                  tiny_detector):
    cfg = config(tmp_path, tiny_world)
    # the detector the rollout will install: evaluation embeds catalog photos with it
    detector = tiny_detector.register(cfg.mlflow_tracking_uri)
    dr = run(dags, "loupe_monthly_retrain", tmp_path, tiny_world,
             params_file=str(params_file(tmp_path, train={"max_epochs": 3, "views": 2})))
    assert dr.state == "success", states(dr)
    run_dir = cfg.run_dir("loupe_monthly_retrain", dr.run_id)
    assert xcom(dr, "validate_logs")["rows"]["impressions"] == 16000
    out = xcom(dr, "harvest_pairs")
    assert out["harvest_dir"] == str(run_dir / "harvest")
    pairs = pd.read_parquet(run_dir / "harvest" / "pairs_debiased.parquet")
    naive = pd.read_parquet(run_dir / "harvest" / "pairs_naive.parquet")
    assert out["pairs_by_split"] == pairs["split"].value_counts().to_dict()
    assert len(pairs) == len(naive) > 500
    assert naive.drop(columns="weight").equals(pairs.drop(columns="weight"))
    naive_clicks = naive[naive["source"] == "click"]
    assert naive_clicks["weight"].nunique() == 1  # no position correction
    clicks = pairs[pairs["source"] == "click"]
    engaged = pairs[pairs["source"].isin(["click", "save"])]
    # IPS at work, self-normalised: deep clicks outweigh top ones, engagement weights average 1
    assert engaged["weight"].mean() == pytest.approx(1.0)
    assert clicks.loc[clicks["position"] >= 5, "weight"].mean() > 1.5 * clicks.loc[
        clicks["position"] == 1, "weight"].mean()
    assert (run_dir / "reports" / "propensity.png").stat().st_size > 10_000
    assert list((run_dir / "data_docs").rglob("index.html"))
    assert not cfg.quarantine_dir.exists() and alerts(cfg) == []
    # three models: trained on debiased and on naive pairs, and the frozen baseline
    models = {m["variant"]: m for m in xcom(dr, "train_embedder")}
    assert set(models) == {"debiased", "naive", "frozen"}
    for m in models.values():
        assert (Path(m["export_dir"]) / "embedder.onnx").is_file()
    trained = json.loads(Path(models["debiased"]["train_json"]).read_text())
    assert trained["epochs"] >= 1 and trained["config"]["views"] == 2
    # evaluation: one MLflow run, a registered challenger, and (no champion yet) promotion
    result = xcom(dr, "evaluate_and_register")
    assert result["model_version"] == "loupe-embedder/1" and result["promoted"]
    metrics = json.loads(Path(result["eval_json"]).read_text())
    for key in ("recall_at_10", "baseline_recall_at_10", "naive_recall_at_10", "recall_at_k",
                "train_seconds"):
        assert key in metrics, key
    assert 0.0 < metrics["baseline_recall_at_10"] <= 1.0
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_tracking_uri, cfg.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias("loupe-embedder", "champion")
    run_data = client.get_run(champion.run_id).data
    assert run_data.metrics["rater_recall_at_10"] == pytest.approx(metrics["recall_at_10"],
                                                                 abs=1e-4)
    assert run_data.metrics["train_seconds"] == metrics["train_seconds"]
    assert run_data.params["catalog_treatment"] == f"detect({detector})>salient>whole"
    assert xcom(dr, "announce_champion") == "loupe-embedder/1"
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = [e for e in session.query(AssetEvent).all()
                  if e.source_run_id == dr.run_id]
    assert [e.extra["model_version"] for e in events] == ["loupe-embedder/1"]
    # the champion rolls out: installed in Triton with the registered detector, catalog
    # re-embedded by the registered graph, canary with rater queries, cutover; shards,
    # manifest and Triton version carry the registry's model version
    rollout = run(dags, "loupe_model_rollout", tmp_path, tiny_world, model="champion",
                  params_file=str(params_file(tmp_path, train={"max_epochs": 3, "views": 2})))
    assert rollout.state == "success", states(rollout)
    canary = xcom(rollout, "canary")
    assert canary["metrics"]["rater_recall"] >= 0.3
    assert canary["thresholds"]["min_rater_recall"] == 0.3  # params.yaml: no form override
    live = pointer.read(cfg.index, layout.CURRENT)
    manifest = json.loads((layout.version_dir(cfg.index, live) / "manifest.json").read_text())
    assert manifest["model_version"] == "loupe-embedder/1"
    assert xcom(rollout, "export_triton") == {
        "model_version": "loupe-embedder/1", "detector_version": detector,
        "triton_version": 1, "triton_repo": str(cfg.triton_repository)}
    assert xcom(rollout, "cutover")["triton_versions"] == [1]


def test_corrupted_impressions_stop_the_retrain_before_training(dags, tiny_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    impressions = world / "tables" / "impressions.parquet"
    table = pq.read_table(impressions)
    positions = table.column("position").to_numpy().copy()
    mask = np.zeros(len(positions), bool)
    mask[::97] = True  # 165 rows lose their position
    table = table.set_column(table.schema.get_field_index("position"),
                             table.schema.field("position"),
                             pa.array(positions, type=table.schema.field("position").type,
                                      mask=mask))
    pq.write_table(table, impressions)

    dr = run(dags, "loupe_monthly_retrain", tmp_path, world)
    assert dr.state == "failed"
    assert states(dr) == {"configure": "success", "validate_logs": "failed",
                          "harvest_pairs": "upstream_failed",
                          "train_embedder": ["upstream_failed"] * 3,
                          "evaluate_and_register": "upstream_failed",
                          "announce_champion": "upstream_failed"}
    assert tries(dr, "validate_logs") == 1  # bad input is not retried
    cfg = config(tmp_path, world)
    assert not cfg.run_dir("loupe_monthly_retrain", dr.run_id).joinpath("harvest").exists()
    quarantined = list(cfg.quarantine_dir.glob("*_impressions/impressions.parquet"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes() == impressions.read_bytes()  # a copy; the user's stays
    report = json.loads((quarantined[0].parent / "report.json").read_text())
    nulls = [f for f in report["failures"] if f["column"] == "position"
             and f["expectation"] == "expect_column_values_to_not_be_null"]
    assert nulls and nulls[0]["unexpected_count"] == int(mask.sum())
    [alert] = alerts(cfg)
    assert alert["task_id"] == "validate_logs" and "ContractViolation" in alert["error"]

    from pipelines.registry import RegistryConfig, version_for_alias

    assert version_for_alias(RegistryConfig(cfg.mlflow_tracking_uri), "challenger") is None


# --------------------------------------------------------------------------- rollout
def test_rollout_embeds_builds_canaries_and_cuts_over(live, tiny_world):
    root, dr = live
    assert dr.state == "success", states(dr)
    s = states(dr)
    assert s["embed_partition"] == ["success"] * 8 and s["build_shard"] == ["success"] * 2
    assert s["export_triton"] == "skipped"  # attribute vectors have no model to serve
    plan = xcom(dr, "plan")
    cfg = config(root, tiny_world)
    assert plan["model_version"] == MODEL and plan["n_shards"] == 2
    assert plan["embeddings_dir"].startswith(str(cfg.run_dir("loupe_model_rollout",
                                                             dr.run_id)))
    assert pointers(cfg) == (plan["index_version"], None)
    manifest = layout.read_manifest(Path(plan["version_dir"]))
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet")
    assert manifest["model_version"] == MODEL and manifest["count"] == len(catalog) == 217
    assert sum(p["embedded"] for p in xcom(dr, "embed_partition")) == 217
    verdict = json.loads(layout.verdict_path(cfg.index, plan["index_version"]).read_text())
    assert verdict["passed"] and verdict["metrics"]["probe_recall"] > 0.9
    assert xcom(dr, "smoke_query") == {"index_version": plan["index_version"],
                                       "model_version": MODEL, "queries": 10, "self_hits": 10}
    history = [json.loads(line) for line in (cfg.index / layout.HISTORY).read_text()
               .splitlines()]
    assert history == [{**history[0], "action": "cutover", "from": None,
                        "to": plan["index_version"]}]
    moved = xcom(dr, "cutover")
    assert (moved["via"], moved["triton_versions"]) == ("pointer", [])
    assert moved["serving"].startswith("not attached")


def test_canary_failure_fails_the_rollout_and_leaves_live_untouched(dags, live, tiny_world,
                                                                   tmp_path):
    root = copy_root(live, tmp_path)
    cfg = config(root, tiny_world)
    before = pointers(cfg)
    lossy = params_file(tmp_path, index={"kind": "ivfpq", "ivf_nlist": 16, "pq_m": 8,
                                         "pq_nbits": 4, "nprobe": 1, "rescore": 10})
    dr = run(dags, "loupe_model_rollout", root, tiny_world, model="attributes/1",
             params_file=str(lossy))
    assert dr.state == "failed"
    s = states(dr)
    assert s["canary"] == "failed" and tries(dr, "canary") == 1
    assert s["cutover"] == s["smoke_query"] == "upstream_failed"
    assert pointers(cfg) == before
    version = xcom(dr, "plan")["index_version"]
    verdict = json.loads(layout.verdict_path(cfg.index, version).read_text())
    assert not verdict["passed"] and verdict["metrics"]["exact_overlap"] < 0.9
    assert verdict["reasons"] == [f"overlap with exact search "
                                  f"{verdict['metrics']['exact_overlap']:.3f} < 0.9"]
    [alert] = alerts(cfg)
    assert alert["task_id"] == "canary" and "live traffic untouched" in alert["error"]


def test_dry_run_builds_and_canaries_but_does_not_cut_over(dags, live, tiny_world, tmp_path):
    root = copy_root(live, tmp_path)
    cfg = config(root, tiny_world)
    before = pointers(cfg)
    dr = run(dags, "loupe_model_rollout", root, tiny_world, model="attributes/1", dry_run=True)
    assert dr.state == "success"
    s = states(dr)
    assert s["canary"] == "success" and s["cutover"] == s["smoke_query"] == "skipped"
    assert pointers(cfg) == before
    assert xcom(dr, "canary")["passed"] is True
    events = asset_events(dr)
    assert [e["passed"] for e in events[CANARY_ASSET_URI]] == [True]
    assert LIVE_ASSET_URI not in events  # nothing went live


def test_second_rollout_with_more_shards_then_rollback(dags, live, tiny_world, tmp_path):
    root = copy_root(live, tmp_path)
    cfg = config(root, tiny_world)
    first, _ = pointers(cfg)
    dr = run(dags, "loupe_model_rollout", root, tiny_world, model="attributes/1", n_shards=3)
    assert dr.state == "success", states(dr)
    assert states(dr)["build_shard"] == ["success"] * 3
    second = xcom(dr, "plan")["index_version"]
    assert pointers(cfg) == (second, first)
    events = asset_events(dr)  # the run's page: the canary's verdict and what went live
    [verdict] = events[CANARY_ASSET_URI]
    assert verdict["passed"] is True and verdict["index_version"] == second
    assert verdict["model_version"] == "attributes/1" and "thresholds" in verdict
    [went_live] = events[LIVE_ASSET_URI]
    assert went_live["action"] == "rollout" and went_live["index_version"] == second
    assert went_live["model_version"] == "attributes/1"
    assert layout.read_manifest(layout.version_dir(cfg.index, second))["model_version"] == \
        "attributes/1"

    dr = run(dags, "loupe_rollback", root, tiny_world)
    assert dr.state == "success", states(dr)
    assert pointers(cfg) == (first, None)
    assert xcom(dr, "smoke_query")["model_version"] == MODEL
    [went_live] = asset_events(dr)[LIVE_ASSET_URI]
    assert went_live == {**went_live, "action": "rollback", "index_version": first,
                         "model_version": MODEL, "rolled_back_from": second}

    dr = run(dags, "loupe_rollback", root, tiny_world)  # nothing left to roll back to
    assert dr.state == "failed" and tries(dr, "rollback") == 1
    assert pointers(cfg) == (first, None)


def test_rerunning_rollout_tasks_writes_nothing_twice(live, tiny_world, tmp_path):
    from pipelines import rollout

    root = copy_root(live, tmp_path)
    plan = {k: v.replace(str(live[0]), str(root)) if isinstance(v, str) else v
            for k, v in xcom(live[1], "plan").items()}
    cfg = config(root, tiny_world)
    files = sorted(p for p in Path(plan["version_dir"]).rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    history = (cfg.index / layout.HISTORY).read_text()

    redo = rollout.embed_partition(cfg, MODEL, plan["treatment"], plan["embeddings_dir"], 3)
    assert redo["embedded"] == 0
    meta = rollout.build_shard_once(cfg, plan["embeddings_dir"], plan["version_dir"], 1, 2)
    assert meta["shard_id"] == 1 and meta["model_version"] == MODEL
    assert rollout.finalize_index_once(plan["version_dir"], 2, {})["count"] == 217
    assert rollout.cutover_once(cfg, plan["index_version"])["already_live"] is True
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert (cfg.index / layout.HISTORY).read_text() == history


# --------------------------------------------------------------------------- ingest + compaction
def _catalog(world: Path) -> pd.DataFrame:
    return pd.read_parquet(world / "tables" / "catalog.parquet").sort_values("item_id")


def test_stream_ingest_then_weekly_compaction(dags, live, tiny_world, tmp_path):
    root = copy_root(live, tmp_path)
    cfg = config(root, tiny_world)
    catalog = _catalog(tiny_world)
    updated, sold = catalog.iloc[:5], catalog.iloc[5:8]
    feed = ChangeFeed(Path(cfg.change_feed))
    feed.append([FeedEvent("updated", r.item_id, r.image_path) for r in updated.itertuples()]
                + [FeedEvent("sold_out", item) for item in sold["item_id"]])
    feed.close()

    dr = run(dags, "loupe_stream_ingest", root, tiny_world)
    assert dr.state == "success", states(dr)
    got = xcom(dr, "ingest")
    assert (got["upserts"], got["deletes"], got["pending_events"], got["checkpoint"]) == \
        (5, 3, 0, 8)
    first, _ = pointers(cfg)
    hits = _search_all(cfg, sold["item_id"].tolist() + updated["item_id"].tolist())
    assert not set(sold["item_id"]) & hits and set(updated["item_id"]) <= hits

    dr = run(dags, "loupe_weekly_compaction", root, tiny_world)
    assert dr.state == "success", states(dr)
    compacted = xcom(dr, "compact")
    assert compacted["compacted_from"] == first and compacted["count"] == 217 - 3
    assert (compacted["delta_upserts_folded"], compacted["tombstones_dropped"]) == (5, 3)
    assert pointers(cfg) == (compacted["index_version"], first)
    assert xcom(dr, "smoke_query")["self_hits"] == 10
    ids = np.concatenate([np.load(p) for p in sorted(
        layout.version_dir(cfg.index, compacted["index_version"]).glob("shard-*/ids.npy"))])
    assert len(ids) == 214 and not set(sold["item_id"]) & set(ids.tolist())
    # the previous version has not folded the delta yet, so no row may be pruned
    assert xcom(dr, "prune_delta") == {"delta_rows_pruned": 0}


def _search_all(cfg: LoupeConfig, items: list[str]) -> set[str]:
    """Items found when every shard of the live index is queried with their own vectors."""
    _, shards = _load_live(cfg)
    vectors = {i: v for s in shards for i, v in zip(s.ids.tolist(), np.asarray(s.vectors),
                                                    strict=True)}
    queries = np.stack([vectors[i] for i in items]).astype(np.float32)
    found = set()
    for s in range(len(shards)):
        with ShardStore(cfg.index, s, MODEL, poll_s=0.05) as store:
            for result in store.search_batch(queries, 5):
                found |= {h.item_id for h in result.hits} & set(items)
    return found


def _load_live(cfg: LoupeConfig):
    from serving.shards.kinds import load_version

    return load_version(cfg.index, pointer.read(cfg.index), verify=False)


def test_ingest_lag_fails_loudly(dags, live, tiny_world, tmp_path):
    root = copy_root(live, tmp_path)
    slow = params_file(tmp_path, ingest={"batch_size": 1})
    cfg = config(root, tiny_world, params_file=str(slow))
    catalog = _catalog(tiny_world)
    feed = ChangeFeed(Path(cfg.change_feed))
    feed.append([FeedEvent("updated", r.item_id, r.image_path)
                 for _ in range(100) for r in catalog.itertuples()])  # 21,700 events
    feed.close()
    dr = run(dags, "loupe_stream_ingest", root, tiny_world, params_file=str(slow),
             max_seconds=1, max_pending_events=100)
    assert dr.state == "failed"
    assert states(dr) == {"configure": "success", "ingest": "success", "check_lag": "failed"}
    got = xcom(dr, "ingest")
    assert got["pending_events"] > 100 and got["checkpoint"] == got["events"] < 21_700
    [alert] = alerts(cfg)
    assert alert["task_id"] == "check_lag" and "ingest lags" in alert["error"]


# --------------------------------------------------------------------------- monitoring
def test_monitoring_healthy_then_breach_on_another_models_vectors(dags, live, tiny_world,
                                                                  tmp_path):
    root = copy_root(live, tmp_path)
    cfg = config(root, tiny_world)
    version, _ = pointers(cfg)
    verdict_before = layout.verdict_path(cfg.index, version).read_text()

    dr = run(dags, "loupe_monitoring", root, tiny_world)
    assert dr.state == "success", states(dr)
    report = json.loads((cfg.run_dir("loupe_monitoring", dr.run_id) / "health.json")
                        .read_text())
    assert report["healthy"] and report["index_version"] == version
    replay = report["metrics"]["replay_canary"]
    assert replay["probe_recall"] == replay["recorded_probe_recall"] > 0.9
    assert report["metrics"]["embedding_drift"]["streamed_items"] == 0
    assert report["metrics"]["index_age"]["live_age_h"] < 1.0
    assert set(report["metrics"]["shard_latency"]["shards"]) == {"0", "1"}
    assert json.loads((cfg.runs / "monitoring" / "latest.json").read_text()) == report
    assert layout.verdict_path(cfg.index, version).read_text() == verdict_before

    # an embedder silently swapped for another model streams vectors under the live label
    from pipelines.embed import attribute_embed_fn

    catalog = _catalog(tiny_world).iloc[:60]
    feed = ChangeFeed(Path(cfg.change_feed))
    feed.append([FeedEvent("updated", r.item_id, r.image_path) for r in catalog.itertuples()])
    indexer = StreamingIndexer(feed, cfg.index, attribute_embed_fn(tiny_world, 1), MODEL)
    indexer.run(until_caught_up=True)
    indexer.close()
    feed.close()

    dr = run(dags, "loupe_monitoring", root, tiny_world)
    assert dr.state == "failed"
    s = states(dr)
    assert s["report_health"] == "failed" and tries(dr, "report_health") == 1
    assert all(s[c] == "success" for c in ("replay_canary", "embedding_drift", "index_age",
                                           "shard_latency"))
    report = json.loads((cfg.run_dir("loupe_monitoring", dr.run_id) / "health.json")
                        .read_text())
    drift = report["metrics"]["embedding_drift"]
    assert drift["streamed_items"] == 60 and drift["neighbour_psi"] > 1.0
    assert not report["healthy"] and len(report["breaches"]) == 1
    assert report["breaches"][0].startswith("streamed embeddings drifted")
    [alert] = alerts(cfg)
    assert alert["task_id"] == "report_health" and "HealthBreach" in alert["error"]


def test_upkeep_dags_skip_while_nothing_is_live_and_read_variables(dags, tiny_world,
                                                                   tmp_path):
    from airflow.models.variable import Variable

    index_root = tmp_path / "elsewhere" / "index"
    Variable.set("loupe_index_root", str(index_root))
    try:
        for dag_id, first in (("loupe_monitoring", "find_live"),
                              ("loupe_weekly_compaction", "compact"),
                              ("loupe_stream_ingest", "ingest")):
            dr = run(dags, dag_id, tmp_path, tiny_world)
            assert dr.state == "success", (dag_id, states(dr))
            s = states(dr)
            assert s[first] == "skipped" and xcom(dr, "configure")["index_root"] == \
                str(index_root)
            assert all(v == "skipped" for k, v in s.items() if k != "configure"), s
    finally:
        Variable.delete("loupe_index_root")
    assert not index_root.exists()


def test_config_resolution_order(tmp_path):
    env = {"LOUPE_ROOT": str(tmp_path), "MLFLOW_TRACKING_URI": "sqlite:///env.db"}
    cfg = resolve_config({}, {}, env)
    assert cfg.world_root == str(tmp_path / "data" / "demo")
    assert cfg.index_root == str(tmp_path / "runs" / "demo" / "index")
    assert cfg.mlflow_tracking_uri == "sqlite:///env.db"
    assert cfg.triton_repo == str(tmp_path / "runs" / "demo" / "triton")
    assert cfg.api_url is None  # no serving attached unless configured
    cfg = resolve_config({}, {"api_url": "http://127.0.0.1:8000/"},
                         {**env, "LOUPE_TRITON_REPO": "/srv/triton"})
    assert (cfg.api_url, cfg.triton_repository) == ("http://127.0.0.1:8000", Path("/srv/triton"))
    cfg = resolve_config({"runs_dir": None}, {"runs_dir": "/var/loupe/runs"}, env)
    assert cfg.index_root == "/var/loupe/runs/index"
    cfg = resolve_config({"runs_dir": "/mnt/r"}, {"runs_dir": "/var/loupe/runs"}, env)
    assert cfg.runs_dir == "/mnt/r" and cfg.run_dir("d", "manual__2026-01-01T00:00:00+00:00") \
        == Path("/mnt/r/airflow/d") / slug("manual__2026-01-01T00:00:00+00:00")
    with pytest.raises(ValueError, match="not database-backed"):
        resolve_config({"mlflow_tracking_uri": "file:///tmp/mlruns"}, {}, env)


def test_airflow_run_cli_reports_per_task_times_and_creates_pools(tmp_path):
    import os
    import sqlite3
    import subprocess
    import sys

    report = tmp_path / "dags.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    cmd = [sys.executable, "-m", "pipelines.cli", "airflow-run", "loupe_monitoring",
           "--conf", json.dumps({"loupe_root": str(tmp_path)}),
           "--airflow-home", str(tmp_path / "home"), "--report", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(report.read_text())["loupe_monitoring"]
    assert summary["state"] == "success" and summary["wall_seconds"] > 0
    assert summary["tasks"]["configure"]["state"] == "success"
    assert summary["tasks"]["find_live"]["state"] == "skipped"  # nothing is live here
    assert set(summary["tasks"]) == {"configure", "find_live", "replay_canary",
                                     "embedding_drift", "index_age", "shard_latency",
                                     "report_health"}
    with sqlite3.connect(tmp_path / "home" / "airflow.db") as db:
        assert db.execute("SELECT slots FROM slot_pool WHERE pool = 'loupe_shard_builds'"
                          ).fetchall() == [(2,)]
