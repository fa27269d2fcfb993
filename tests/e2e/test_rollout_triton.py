"""The rollout and rollback DAGs (`dag.test()`) against a real serving stack on the tiny
world: real MLflow registry (two frozen-baseline embedders and the session's trained
detector, registered with their measured metrics), real tritonserver, shard replica
processes and the search API.

The first rollout runs with no serving attached (Triton version 1 installed, the pointer
moved); the stack then starts on what is live, and later runs attach to it (`api_url` + the
admin token from an Airflow Variable): the cutover is the API's /admin/cutover, which loads
the Triton version and swaps the index together, and the smoke query goes through
/v1/search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from pipelines.run_config import REPO_ROOT, LoupeConfig, resolve_config
from serving.shards import layout, pointer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # ~2.5 min, most of it Triton model loads
ADMIN_TOKEN = "rollout-test-admin-token"


def _dag(dag_id: str):
    """Parsed anew per run: dag.test() writes the run conf into the task objects."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(REPO_ROOT / "dags" / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def _python_stubs(stack) -> set[int]:
    return {p.pid for p in psutil.Process(stack.triton.process.pid).children()}


def _states(dr) -> dict:
    out: dict = {}
    for ti in sorted(dr.get_task_instances(), key=lambda t: t.map_index):
        state = str(getattr(ti.state, "value", ti.state))
        if ti.map_index >= 0:
            out.setdefault(ti.task_id, []).append(state)
        else:
            out[ti.task_id] = state
    return out


def _xcom(dr, task_id: str):
    ti = dr.get_task_instances()[0]
    return ti.xcom_pull(task_ids=task_id, dag_id=dr.dag_id, run_id=dr.run_id)


def _all_xcom_text(dr) -> str:
    return json.dumps([_xcom(dr, ti.task_id) for ti in dr.get_task_instances()], default=str)


def _register_frozen(cfg: LoupeConfig, world: Path, seed: int, out: Path) -> str:
    """Export the frozen pretrained embedder of `seed`, score it on the rater set and
    register it, as an MLflow model, with that score (what the retrain's evaluate step
    records)."""
    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder
    from pipelines import evaluate as ev
    from pipelines import registry as reg
    from pipelines.embed import embed_fn_from_export
    from pipelines.mlflow_model import save_embedder_model

    export_embedder(frozen_baseline(EmbedderSpec(seed=seed)).eval(), out)
    report = ev.evaluate_models({ev.CANDIDATE: embed_fn_from_export(out, world)}, world,
                                [ev.load_rater_set(world)])
    rcfg = reg.RegistryConfig(cfg.mlflow_tracking_uri)
    run = reg.log_run(rcfg, run_name=f"frozen-seed{seed}", params={"seed": seed},
                      metrics={reg.HEADLINE: report.headline}, artifacts={},
                      mlflow_model=save_embedder_model(out, out.parent / f"{out.name}-mlflow"),
                      tags={reg.FINGERPRINT: report.fingerprint})
    return reg.register_model_version(rcfg, run, report.headline,
                                      report.fingerprint).model_version


@dataclass
class Deployment:
    root: Path
    world: Path
    cfg: LoupeConfig
    models: list[str]  # registered embedders: frozen seed 0, seed 1
    detector: str
    first: object  # the unattached rollout's DagRun
    stack: object  # serving.stack.ServingStack

    def run(self, dag_id: str, **conf):
        return _dag(dag_id).test(run_conf={"loupe_root": str(self.root),
                                           "world_root": str(self.world),
                                           "mlflow_tracking_uri": self.cfg.mlflow_tracking_uri,
                                           **conf})

    def ready(self) -> tuple[str, str]:
        r = httpx.get(f"{self.stack.url}/readyz", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["model_version"], r.json()["index_version"]

    def scene_search(self) -> dict:
        import pandas as pd

        scene = pd.read_parquet(self.world / "tables" / "scenes.parquet").iloc[0]
        r = httpx.post(f"{self.stack.url}/v1/search", data={"k": "10"}, timeout=30,
                       files={"image": ("s.jpg", (self.world / scene.image_path).read_bytes())})
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def deployment(tiny_world, tiny_harvest, tiny_detector, tmp_path_factory):
    from airflow.utils import db

    from pipelines.features import write_item_features
    from serving.stack import ServingStack

    db.initdb()
    root = tmp_path_factory.mktemp("rollout-triton")
    cfg = resolve_config({"loupe_root": str(root), "world_root": str(tiny_world)}, {}, {})
    detector = tiny_detector.register(cfg.mlflow_tracking_uri)
    models = [_register_frozen(cfg, tiny_world, seed, root / f"frozen-{seed}")
              for seed in (0, 1)]
    dep = Deployment(root, tiny_world, cfg, models, detector, None, None)
    dep.first = dep.run("loupe_model_rollout", model=models[0])  # no serving attached yet
    assert dep.first.state == "success", _states(dep.first)
    features = write_item_features(tiny_world, tiny_harvest, root / "item_features.parquet")
    dep.stack = ServingStack(cfg.triton_repository, cfg.index, tiny_world, features,
                             root / "serving", ADMIN_TOKEN, replicas=1).start()
    try:
        yield dep
    finally:
        dep.stack.stop()


def test_rollout_without_serving_exports_triton_and_moves_the_pointer(deployment):
    dep, cfg = deployment, deployment.cfg
    from serving.triton import repository

    assert dep.models == ["loupe-embedder/1", "loupe-embedder/2"]
    assert dep.detector == "loupe-detector/1"
    exported = _xcom(dep.first, "export_triton")
    assert exported == {"model_version": "loupe-embedder/1", "detector_version": dep.detector,
                        "triton_version": 1, "triton_repo": str(cfg.triton_repository)}
    assert repository.version_meta(cfg.triton_repository, 1) == {
        "model_version": "loupe-embedder/1", "detector_version": dep.detector}
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    served = text_format.Parse((cfg.triton_repository / "embedder" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert list(served.version_policy.specific.versions) == [1]
    moved = _xcom(dep.first, "cutover")
    live = _xcom(dep.first, "plan")["index_version"]
    assert (moved["via"], moved["to"], moved["triton_versions"]) == ("pointer", live, [1])
    assert moved["serving"].startswith("not attached")
    smoke = _xcom(dep.first, "smoke_query")
    assert "via" not in smoke and smoke["self_hits"] == smoke["queries"] == 10
    # the stack started afterwards serves exactly what the rollout made live
    assert dep.ready() == ("loupe-embedder/1", live)


def test_the_registered_champion_loads_as_an_mlflow_model_and_matches_triton(deployment):
    """`mlflow.pyfunc.load_model("models:/loupe-embedder@champion")` gives the vectors the
    served embedder (Triton version 1 = loupe-embedder/1, live) gives for the same photos."""
    import asyncio

    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    from models.preprocessing import check_box, decode_image, embed_input
    from pipelines import registry as reg
    from serving.api.triton_client import TritonModels

    dep, uri = deployment, deployment.cfg.mlflow_tracking_uri
    reg._client(reg.RegistryConfig(uri)).set_registered_model_alias(
        reg.MODEL_NAME, reg.CHAMPION, "1")
    mlflow.set_registry_uri(uri)
    try:
        champion = mlflow.pyfunc.load_model("models:/loupe-embedder@champion")
    finally:
        mlflow.set_registry_uri(None)
    photos = [(dep.world / p).read_bytes() for p in
              pd.read_parquet(dep.world / "tables" / "catalog.parquet").image_path[:4]]
    boxes = np.array([[0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]] * 2, dtype=np.float32)
    pixels = np.stack([embed_input(decode_image(b), check_box(box))
                       for b, box in zip(photos, boxes, strict=True)])

    async def served():
        triton = TritonModels(dep.stack.triton.grpc_url, timeout_s=30)
        try:
            return await triton.embed(photos, boxes, version=1)
        finally:
            await triton.close()

    vectors, model_version = asyncio.run(served())
    assert model_version == "loupe-embedder/1"
    np.testing.assert_allclose(champion.predict(pixels), vectors, atol=1e-5)


def test_attached_rollout_switches_model_and_index_together_canary_fail_and_rollback(
        deployment, tmp_path):
    from airflow.models.variable import Variable

    dep, cfg = deployment, deployment.cfg
    v1 = pointer.read(cfg.index)
    attached = {"api_url": dep.stack.url}
    Variable.set("loupe_admin_token", ADMIN_TOKEN)
    try:
        # 1. loupe-embedder/2: Triton version 2 exported beside the re-embed, then one switch
        serving_v1 = _python_stubs(dep.stack)
        dr = dep.run("loupe_model_rollout", model=dep.models[1], **attached)
        assert dr.state == "success", _states(dr)
        # the cutover loaded version 2 beside the live version 1 without reloading it
        assert serving_v1 < _python_stubs(dep.stack)
        v2 = _xcom(dr, "plan")["index_version"]
        assert _xcom(dr, "export_triton")["triton_version"] == 2
        moved = _xcom(dr, "cutover")
        assert (moved["via"], moved["from"], moved["to"]) == ("api", v1, v2)
        assert (moved["model_version"], moved["triton_version"]) == ("loupe-embedder/2", 2)
        assert _xcom(dr, "smoke_query") == {"index_version": v2, "via": "api",
                                            "model_version": "loupe-embedder/2",
                                            "queries": 10, "self_hits": 10}
        assert ADMIN_TOKEN not in _all_xcom_text(dr)
        assert dep.ready() == ("loupe-embedder/2", v2)
        triton = dep.stack.triton.http_url
        for model in ("embedder", "detector"):
            assert httpx.get(f"{triton}/v2/models/{model}/versions/2/ready").status_code == 200
        hits = dep.scene_search()
        assert (hits["model_version"], hits["index_version"]) == ("loupe-embedder/2", v2)
        assert len(hits["items"]) == 10 and not hits["partial"]
        assert (pointer.read(cfg.index), pointer.read(cfg.index, layout.PREVIOUS)) == \
            (v2, v1)

        # 2. a rollout whose canary fails never reaches the API: it stays on version 2
        params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        params["index"].update(kind="ivfpq", ivf_nlist=16, pq_m=8, pq_nbits=4, nprobe=1,
                               rescore=10)
        lossy = tmp_path / "params.yaml"
        lossy.write_text(yaml.safe_dump(params))
        dr = dep.run("loupe_model_rollout", model=dep.models[0], params_file=str(lossy),
                     **attached)
        assert dr.state == "failed"
        s = _states(dr)
        assert s["canary"] == "failed" and s["export_triton"] == "success"
        assert s["cutover"] == s["smoke_query"] == "upstream_failed"
        assert dep.ready() == ("loupe-embedder/2", v2)
        assert dep.scene_search()["index_version"] == v2

        # 3. rollback with a wrong token is refused at once; with the right one the API
        # flips model and index back together
        Variable.set("loupe_admin_token", "not-the-token")
        dr = dep.run("loupe_rollback", **attached)
        assert dr.state == "failed" and _states(dr)["rollback"] == "failed"
        assert dep.ready() == ("loupe-embedder/2", v2)
        Variable.set("loupe_admin_token", ADMIN_TOKEN)
        dr = dep.run("loupe_rollback", **attached)
        assert dr.state == "success", _states(dr)
        back = _xcom(dr, "rollback")
        assert (back["via"], back["to"], back["model_version"]) == ("api", v1,
                                                                     "loupe-embedder/1")
        assert _xcom(dr, "smoke_query")["via"] == "api"
        assert dep.ready() == ("loupe-embedder/1", v1)
        assert dep.scene_search()["model_version"] == "loupe-embedder/1"
    finally:
        Variable.delete("loupe_admin_token")

