"""infra/ against the code it deploys: every manifest parses (no duplicate keys), the process
command lines use flags the real CLIs accept, ports/probes/service names line up, the API
settings address every shard replica of the StatefulSet, the Triton production configs parse
as Triton ModelConfigs and keep the serving contract of the CPU repository, the Grafana
dashboard only queries metrics the code exports, and the cluster policy routes the catalog
re-embedding to GPU under both executors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.run_config import REPO_ROOT

INFRA = REPO_ROOT / "infra"
K8S = INFRA / "k8s"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last)."""


def _mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value
            if k.tag != "tag:yaml.org,2002:merge"]  # `<<: *anchor` may be overridden
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}",
                                                node.start_mark)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(path: Path) -> list:
    return [d for d in yaml.load_all(path.read_text(), Loader=_UniqueKeyLoader) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, over every Kubernetes manifest in infra/k8s/."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            if "kind" in doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def container(obj: dict, index: int = 0) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][index]


def cli_options(main) -> tuple[set[str], set[str]]:
    """(all options, required options) of an argparse `main(argv)`, from its real --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    text = out.getvalue()
    usage = text.split("\n\n")[0]
    optional = set(re.findall(r"\[(--[a-z-]+)", usage))
    options = set(re.findall(r"(--[a-z][a-z-]+)", text)) - {"--help"}
    return options, {o for o in re.findall(r"(--[a-z][a-z-]+)", usage)} - optional - {"--help"}


def flags(tokens: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            out[name] = value if eq else (nxt if nxt and not nxt.startswith("--") else None)
    return out


def port_named(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


# --------------------------------------------------------------------------- parsing
def test_every_manifest_in_infra_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert len(files) >= 12
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else load_docs(path)
        assert docs, path
        if path.parent == K8S and not path.name.startswith("airflow-values"):
            for doc in docs:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), (path, doc.keys())
    objs = k8s_objects()
    for (kind, name), obj in objs.items():  # every PVC / ConfigMap / Secret used is declared
        if kind not in {"Deployment", "StatefulSet"}:
            continue
        for vol in obj["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) \
                    in objs, (name, vol)
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in objs, (name, vol)


# --------------------------------------------------------------------------- serving
def test_shard_statefulset_runs_the_real_shard_server_cli():
    from serving.shards import server
    from serving.shards.store import ShardStore

    objs = k8s_objects()
    sts, svc = objs[("StatefulSet", "loupe-shard")], objs[("Service", "loupe-shard")]
    c = container(sts)
    cmd = shlex.split(c["args"][0])
    assert cmd[:3] == ["exec", "python", "-m"] and cmd[3] == "serving.shards.server"
    given = flags(cmd[4:])
    options, required = cli_options(server.main)
    assert set(given) <= options and required <= set(given), (set(given), options, required)
    assert given["--shard"] == "$((POD_INDEX%LOUPE_N_SHARDS))"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    n_shards = int(env["LOUPE_N_SHARDS"]["value"])
    assert sts["spec"]["replicas"] % n_shards == 0 and sts["spec"]["serviceName"] == "loupe-shard"
    port = int(given["--port"])
    assert port_named(c, "http") == port and given["--host"] == "0.0.0.0"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(port, "http")]
    assert svc["spec"]["clusterIP"] == "None"
    # probes hit routes the shard app really serves
    app = server.create_shard_app(ShardStore(REPO_ROOT / "no-index", 0, "attributes/0"))
    routes = {r.path for r in app.routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes and c[probe]["httpGet"]["port"] == "http"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert any(given["--index-root"].startswith(m) for m in mounts)


def test_search_api_settings_address_every_shard_replica(tmp_path):
    from serving.api import app as api

    objs = k8s_objects()
    deploy, sts = objs[("Deployment", "loupe-search-api")], objs[("StatefulSet", "loupe-shard")]
    c = container(deploy)
    assert c["command"] == ["python", "-m", "serving.api.app"]
    given = flags(c["args"])
    options, required = cli_options(api.main)
    assert set(given) <= options and required <= set(given)
    assert port_named(c, "http") == int(given["--port"]) and given["--host"] == "0.0.0.0"
    secret = objs[("Secret", "loupe-api-settings")]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "settings")
    assert given["--settings"] == f"{mount['mountPath']}/api.json"
    path = tmp_path / "api.json"
    path.write_text(secret["stringData"]["api.json"])
    settings = api.ApiSettings.from_json(path)  # the real loader accepts every key
    n_shards = int(next(e["value"] for e in container(sts)["env"]
                        if e["name"] == "LOUPE_N_SHARDS"))
    replicas = sts["spec"]["replicas"] // n_shards
    assert sorted(settings.shards) == list(range(n_shards))
    shard_port = port_named(container(sts), "http")
    for shard, urls in settings.shards.items():
        assert len(urls) == replicas
        for url in urls:
            m = re.fullmatch(r"http://loupe-shard-(\d+)\.loupe-shard\.loupe\.svc\.cluster\.local:"
                             r"(\d+)", url)
            assert m, url
            pod, port = int(m.group(1)), int(m.group(2))
            assert pod < sts["spec"]["replicas"] and pod % n_shards == shard  # pod i: i % N
            assert port == shard_port
    assert len({u for urls in settings.shards.values() for u in urls}) == sts["spec"]["replicas"]
    triton = objs[("Service", "loupe-triton")]
    host, port = settings.triton_url.split(":")
    assert host.split(".")[0] == "loupe-triton"
    assert int(port) == next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "grpc")
    routes = {r.path for r in api.create_app(settings).routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes


# --------------------------------------------------------------------------- Triton
def _model_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _io(cfg) -> tuple:
    return tuple((t.name, t.data_type, tuple(t.dims)) for t in (*cfg.input, *cfg.output))


def test_triton_serves_the_repository_the_rollout_writes(tmp_path):
    """The configs come from Triton's ModelConfig protobuf and round-trip through Triton's
    text format; the Deployment serves the path the search API names, on CPU (no GPU path
    is built: infra/triton/README.md)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.triton import repository

    for model in repository.MODELS:
        for n in (3, 4):
            (tmp_path / model / str(n)).mkdir(parents=True)
    cfg = repository.TritonModelConfig(instances=2, detect_embed_instances=3, ort_threads=3,
                                       embedding_dim=128)
    assert repository.serve_versions(tmp_path, [4, 3], cfg) == [3, 4]
    configs = {m: _model_config((tmp_path / m / "config.pbtxt").read_text())
               for m in repository.MODELS}
    for name, served in configs.items():
        assert served == repository.model_config(name, [3, 4], cfg)
        assert served.name == name and served.backend == "python"
        assert list(served.version_policy.specific.versions) == [3, 4]
        assert [(g.kind, g.count) for g in served.instance_group] == [
            (mc.ModelInstanceGroup.KIND_CPU, 3 if name == "detect_embed" else 2)]
        assert served.parameters["ORT_THREADS"].string_value == "3"
        assert served.HasField("dynamic_batching")
    assert _io(configs["embedder"]) == (("IMAGE", mc.TYPE_STRING, (1,)),
                                        ("BOX", mc.TYPE_FP32, (4,)),
                                        ("EMBEDDING", mc.TYPE_FP32, (128,)),
                                        ("MODEL_VERSION", mc.TYPE_STRING, (1,)))
    assert [t.name for t in configs["detector"].output] == ["BOXES", "SCORES", "LABELS",
                                                            "MODEL_VERSION"]
    with pytest.raises(ValueError, match="not installed"):
        repository.serve_versions(tmp_path, [5], cfg)
    assert not (INFRA / "triton" / "model_repository").exists()  # no unbuilt GPU configs
    triton = container(k8s_objects()[("Deployment", "loupe-triton")])
    args = flags(triton["args"])
    assert args["--model-control-mode"] == "explicit"
    api = json.loads(k8s_objects()[("Secret", "loupe-api-settings")]["stringData"]["api.json"])
    assert args["--model-repository"] == api["triton_repo"]
    assert "nvidia.com/gpu" not in json.dumps(triton["resources"])
    for name in ("http", "grpc", "metrics"):
        assert int(args[f"--{name}-port"]) == port_named(triton, name)


# --------------------------------------------------------------------------- monitoring
def exported_series() -> set[str]:
    """Every series name the API's /metrics can emit (from its metric objects) plus the
    health exporter's gauges."""
    from pipelines import health_export
    from serving.api.metrics import Metrics

    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",),
                "gauge": ("",)}
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return names | set(health_export.METRIC_NAMES)


def test_dashboard_queries_only_exported_metrics_and_covers_the_api():
    from serving.api.metrics import Metrics

    dash = json.loads((INFRA / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(loupe_[a-z0-9_]+)", e)}
    exported = exported_series()
    assert used and used <= exported, used - exported
    families = {f.name for f in Metrics().registry.collect()}
    assert all(any(u.startswith(f) for u in used) for f in families), families
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_prometheus_scrapes_the_services_that_export_metrics():
    from pipelines import health_export

    prom = load_docs(INFRA / "monitoring" / "prometheus.yml")[0]
    objs = k8s_objects()
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for job, service in (("loupe-search-api", "loupe-search-api"),
                         ("loupe-triton", "loupe-triton")):
        keep = {tuple(r["source_labels"]): r["regex"] for r in jobs[job]["relabel_configs"]
                if r.get("action") == "keep"}
        assert keep[("__meta_kubernetes_service_name",)] == service
        ports = {p["name"] for p in objs[("Service", service)]["spec"]["ports"]}
        assert keep[("__meta_kubernetes_endpoint_port_name",)] in ports
    [target] = jobs["loupe-health"]["static_configs"][0]["targets"]
    host, port = target.split(":")
    svc = objs[("Service", host.split(".")[0])]
    assert int(port) == svc["spec"]["ports"][0]["port"]
    exporter = container(objs[("Deployment", "loupe-health-exporter")])
    assert exporter["command"] == ["python", "-m", "pipelines.health_export"]
    given = flags(exporter["args"])
    options, required = cli_options(health_export.main)
    assert set(given) <= options and required <= set(given) and int(given["--port"]) == int(port)


def test_health_exporter_reports_an_unreadable_report_as_down(tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from pipelines.health_export import HealthReportCollector

    registry = CollectorRegistry()
    registry.register(HealthReportCollector(tmp_path / "monitoring" / "latest.json"))
    assert "loupe_health_report_up 0.0" in generate_latest(registry).decode()
    (tmp_path / "monitoring").mkdir()
    (tmp_path / "monitoring" / "latest.json").write_text("{not json")
    assert "loupe_health_report_up 0.0" in generate_latest(registry).decode()


# --------------------------------------------------------------------------- Airflow
def _policy():
    spec = importlib.util.spec_from_file_location("loupe_airflow_local_settings",
                                                  INFRA / "airflow_local_settings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("executor", ["CeleryExecutor", "KubernetesExecutor"])
def test_cluster_policy_sends_reembedding_to_gpu(executor, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    policy = _policy()
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
    bag = DagBag(str(REPO_ROOT / "dags" / "loupe_model_rollout.py"))
    assert bag.import_errors == {}
    dag = bag.dags["loupe_model_rollout"]
    before = {t.task_id: (t.queue, t.executor_config) for t in dag.tasks}
    for task in dag.tasks:
        policy.task_policy(task)
    changed = {t.task_id for t in dag.tasks if (t.queue, t.executor_config) != before[t.task_id]}
    assert changed == {"embed_partition"}
    task = dag.get_task("embed_partition")
    if executor == "CeleryExecutor":
        assert task.queue == policy.GPU_QUEUE == "gpu"
    else:
        assert task.executor_config == {"pod_template_file": policy.GPU_POD_TEMPLATE}


def test_gpu_routes_exist_in_every_deployment_variant():
    policy = _policy()
    text = (INFRA / "airflow_local_settings.py").read_text()
    k8s_values = load_docs(K8S / "airflow-values-kubernetes.yaml")[0]
    celery_values = load_docs(K8S / "airflow-values-celery.yaml")[0]
    assert k8s_values["executor"] == "KubernetesExecutor"
    assert celery_values["executor"] == "CeleryExecutor"
    for values in (k8s_values, celery_values):
        assert values["airflowLocalSettings"] == text  # one policy, not two copies drifting
        assert values["airflowVersion"].startswith("3.3")
    # KubernetesExecutor: the scheduler mounts the GPU pod template where the policy points
    [mount] = k8s_values["scheduler"]["extraVolumeMounts"]
    assert policy.GPU_POD_TEMPLATE == f"{mount['mountPath']}/gpu-pod-template.yaml"
    [pod] = load_docs(K8S / "gpu-pod-template.yaml")
    base = pod["spec"]["containers"][0]
    assert base["name"] == "base" and base["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # CeleryExecutor: GPU workers consume the policy's queue, in k8s and in compose
    worker = container(k8s_objects()[("Deployment", "loupe-airflow-worker-gpu")])
    assert flags(worker["args"])["--queues"] == policy.GPU_QUEUE
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    compose = load_docs(INFRA / "airflow-celery" / "docker-compose.yaml")[0]
    gpu = compose["services"]["airflow-worker-gpu"]["command"]
    assert gpu[gpu.index("--queues") + 1] == policy.GPU_QUEUE
    for name, service in compose["services"].items():
        if name.startswith("airflow"):
            assert service["env_file"] == ["airflow.env"], name


# --------------------------------------------------------------------------- capacity
def _quoted(doc: str, row: str) -> float:
    """The first number in the measured-inputs table row that starts with `row`."""
    line = next(x for x in doc.splitlines() if x.startswith(f"| {row}"))
    return float(re.search(r"\|\s*([\d,.]+)", line[len(row) + 2:]).group(1).replace(",", ""))


def test_capacity_model_quotes_the_reports_and_sizes_the_statefulset():
    """docs/capacity.md quotes reports/bench_index.json's machine-independent numbers (recall,
    bytes per vector; QPS depends on how busy the host was), and the shard StatefulSet has
    the shard count, replica count and memory the model derives."""
    bench = json.loads((REPO_ROOT / "reports" / "bench_index.json").read_text())
    doc = (REPO_ROOT / "docs" / "capacity.md").read_text()
    assert _quoted(doc, "recall@10, HNSW") == pytest.approx(bench["recall_at_10"], abs=0.01)
    assert _quoted(doc, "bytes per vector in RAM, HNSW") == pytest.approx(
        bench["bytes_per_vector_hnsw"], rel=0.05)
    assert _quoted(doc, "bytes per vector in RAM, IVF-PQ") == pytest.approx(
        bench["bytes_per_vector_pq"], rel=0.05)
    shards = int(re.search(r"1e9 / (\d+) shards", doc).group(1))
    replicas, vcpu = map(int, re.search(r"replicas\s+= (\d+) x (\d+) vCPU", doc).groups())
    sts = k8s_objects()[("StatefulSet", "loupe-shard")]
    c = container(sts)
    assert int(next(e["value"] for e in c["env"] if e["name"] == "LOUPE_N_SHARDS")) == shards
    assert sts["spec"]["replicas"] == shards * replicas
    ram = 1e9 / shards * (bench["bytes_per_vector_hnsw"] + 64)  # A1: 64 B per item id
    request = c["resources"]["requests"]["memory"]
    assert request.endswith("Gi") and ram < int(request[:-2]) * 2**30 * 0.95
    assert c["resources"]["requests"]["cpu"] == str(vcpu)
