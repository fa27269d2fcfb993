"""Registry stage: MLflow runs, registered model versions, aliases and the promotion gate.

Every evaluated model becomes a run (params, metrics, plots, HTML report, the exported
TorchScript/ONNX files under `model/`) and a version of the registered model
`loupe-embedder`. Its `model_version` string (`loupe-embedder/3`) is what re-embedding,
shards and serving carry, so vectors of two models can never mix silently.

Aliases: `challenger` moves to every new version; `champion` moves only through the
promotion gate, when the challenger's rater recall@10 beats the champion's by at least a
configured margin, on the same catalog and rater judgments (same eval fingerprint). The
decision and its reason land on the challenger's run (tags + `promotion/decision.json`) and
on the model version (tags).

Nothing is left half-registered by an outage: a version is created tagged
`loupe.registration=pending` and marked `complete` only after its tags and alias are
written, and a promotion is recorded `promoting` before `champion` moves. The next
registration or gate first settles what an interrupted one left (`settle_interrupted`).
An unreachable store is a `RegistryUnavailable` (transient: the Airflow task retries), never
a "not registered" bad-input error.

Tracking URI: explicit argument, else $MLFLOW_TRACKING_URI, else `sqlite:///<repo>/mlflow.db`
with artifacts under `<repo>/mlruns/` (next to any sqlite file, artifacts go to `mlruns/`
beside it). The registry needs a database-backed store. Browse it with `loupe mlflow-ui`,
i.e. `mlflow ui --backend-store-uri sqlite:///<repo>/mlflow.db --default-artifact-root
file://<repo>/mlruns --host 127.0.0.1 --port 5000`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACKING_URI = f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
EXPERIMENT = "loupe-embedder"
MODEL_NAME = "loupe-embedder"
CHALLENGER = "challenger"
CHAMPION = "champion"
HEADLINE = "rater_recall_at_10"
FINGERPRINT = "eval_fingerprint"
REGISTRATION = "loupe.registration"  # PENDING from creation until tags + aliases are written
PENDING, COMPLETE = "pending", "complete"
DECISION = "promotion_decision"  # PROMOTING is written before `champion` moves
PROMOTING = "promoting"
MODEL_ARTIFACT_DIR = "model"
DETECTOR_MODEL = "loupe-detector"  # pipelines/train_detector.py registers it
ATTRIBUTE_MODEL_PREFIX = "attributes/"  # model-free clustered vectors (pipelines/embed.py)
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


@dataclass(frozen=True)
class RegistryConfig:
    """Where runs and versions go, and how much better a challenger must be."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else the repo sqlite db
    experiment: str = EXPERIMENT
    model_name: str = MODEL_NAME
    promotion_margin: float = 0.01  # absolute rater recall@10 gain needed to take champion

    def __post_init__(self) -> None:
        if not 0.0 <= self.promotion_margin < 1.0:
            raise ValueError(f"promotion_margin must be in [0, 1), got {self.promotion_margin}")

    @property
    def uri(self) -> str:
        return resolve_tracking_uri(self.tracking_uri)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the repo's sqlite db; must be a DB."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in _DB_SCHEMES:
        raise ValueError(f"tracking URI {uri!r} is not database-backed; the model registry "
                         "needs one, e.g. sqlite:///mlflow.db")
    return uri


def artifact_root(uri: str) -> str | None:
    """`file://.../mlruns` beside a sqlite db file; None when a server decides."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if str(db) in ("", ":memory:"):
        raise ValueError(f"{uri!r}: an in-memory sqlite store cannot keep a registry")
    return (db.resolve().parent / "mlruns").as_uri()


def _client(cfg: RegistryConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.uri, registry_uri=cfg.uri)


class RegistryUnavailable(RuntimeError):
    """MLflow's tracking server or store did not answer (after the client's own retries).
    Transient, unlike a bad-input error: the task fails and Airflow retries it."""


def store_unreachable(err: BaseException) -> bool:
    """Whether `err` is MLflow failing to reach its store (a refused or timed-out HTTP
    request, a database that cannot be opened) rather than the store answering no."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return isinstance(err, MlflowException) and (
        err.error_code == "TEMPORARILY_UNAVAILABLE"  # the SQL store's OperationalError
        or str(err.message).startswith("API request to "))  # the REST client, after retries


@contextmanager
def reachable(uri: str, doing: str) -> Iterator[None]:
    """Run MLflow calls, turning an unreachable store into RegistryUnavailable that names
    the store, what was being done and what to do."""
    try:
        yield
    except Exception as err:
        if not store_unreachable(err):
            raise
        cause = str(getattr(err, "message", err)).splitlines()[0][:300]
        raise RegistryUnavailable(
            f"MLflow at {uri} did not answer while {doing}: {cause}. Nothing is left "
            "half-registered (the next registration settles an interrupted one); start or "
            "fix the tracking server and retry (Airflow retries the task by itself)") from err


def needs_store(doing: str) -> Callable[[F], F]:
    """`reachable` around a function whose first argument is its RegistryConfig."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(cfg: RegistryConfig, *args: Any, **kwargs: Any) -> Any:
            with reachable(cfg.uri, doing):
                return fn(cfg, *args, **kwargs)
        return call  # type: ignore[return-value]
    return wrap


def end_run(client, run_id: str, status: str) -> None:
    """Mark a run ended; when the store is what failed, say so instead of masking the
    error that ended the run with a second one."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001 - best effort after the run's own failure
        if not store_unreachable(err):
            raise
        log.warning("run %s could not be marked %s: the store did not answer", run_id, status)


def _experiment_id(client, cfg: RegistryConfig) -> str:
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.experiment, artifact_location=artifact_root(cfg.uri))


# --------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    experiment_id: str
    artifact_uri: str


@needs_store("logging a run")
def log_run(cfg: RegistryConfig, *, run_name: str, params: Mapping[str, Any],
            metrics: Mapping[str, float], artifacts: Mapping[str, Sequence[Path]],
            model_files: Sequence[Path] = (), tags: Mapping[str, str] | None = None,
            mlflow_model: Path | None = None,
            inputs: Mapping[str, tuple[Path, str]] | None = None,
            tables: Mapping[str, Any] | None = None) -> LoggedRun:
    """One finished run: params, metrics, `artifacts` ({artifact dir: files}), and under
    `model/` either an MLflow model directory (`mlflow_model`, the embedder's: see
    pipelines/mlflow_model.py) or exported model files; `inputs` ({name: (file, context)},
    e.g. the catalog for "evaluation") as MLflow dataset inputs whose digest is the file's
    sha256, so two runs on the same data show the same digest; `tables` ({artifact file:
    DataFrame}) through `log_table`, sortable in the run's Evaluation view. A failure mid-way
    marks the run FAILED."""
    from mlflow.entities import Metric, Param, RunTag

    if mlflow_model is not None and model_files:
        raise ValueError("log an MLflow model or model files under 'model/', not both")
    files = [Path(p) for group in artifacts.values() for p in group] + list(map(Path,
                                                                              model_files))
    if mlflow_model is not None:
        files.append(Path(mlflow_model) / "MLmodel")
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"cannot log missing files: {missing}")
    client = _client(cfg)
    run = client.create_run(_experiment_id(client, cfg), run_name=run_name,
                            tags={k: str(v) for k, v in (tags or {}).items()})
    run_id = run.info.run_id
    try:
        now = int(datetime.now(UTC).timestamp() * 1000)
        items = list(metrics.items())
        for i in range(0, len(items), 900):  # MLflow takes at most 1000 entries per batch
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0)
                                              for k, v in items[i:i + 900]])
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("model_files", ",".join(p.name for p in
                                                              map(Path, model_files)))])
        for dest, group in artifacts.items():
            for p in group:
                client.log_artifact(run_id, str(p), artifact_path=dest or None)
        for artifact_file, frame in (tables or {}).items():
            client.log_table(run_id, data=frame, artifact_file=artifact_file)
        if inputs:
            client.log_inputs(run_id, datasets=[dataset_input(name, Path(path), context)
                                                for name, (path, context) in inputs.items()])
        if mlflow_model is not None:
            client.log_artifacts(run_id, str(mlflow_model), artifact_path=MODEL_ARTIFACT_DIR)
        for p in map(Path, model_files):
            if p.is_dir():
                client.log_artifacts(run_id, str(p), artifact_path=f"{MODEL_ARTIFACT_DIR}/"
                                                                   f"{p.name}")
            else:
                client.log_artifact(run_id, str(p), artifact_path=MODEL_ARTIFACT_DIR)
    except BaseException:
        end_run(client, run_id, "FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return LoggedRun(run_id, run.info.experiment_id, run.info.artifact_uri)


@contextmanager
def tracked_run(cfg: RegistryConfig, *, run_name: str, params: Mapping[str, Any],
                inputs: Mapping[str, tuple[Path, str]] | None = None,
                tags: Mapping[str, str] | None = None, run_id: str | None = None,
                system_metrics_interval_s: float = 5.0) -> Iterator[str]:
    """A run that stays open while its body works (training), yielding its id: created with
    its params and dataset inputs, or reopened by `run_id` (a retried task resumes its run);
    MLflow's system-metrics monitor samples CPU, memory, disk and network meanwhile; it ends
    FINISHED, or FAILED when the body raises."""
    from mlflow.entities import Param
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    client = _client(cfg)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(_experiment_id(client, cfg), run_name=run_name,
                                tags={k: str(v) for k, v in (tags or {}).items()})
        run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i:i + 100])
        if inputs:
            client.log_inputs(run_id, datasets=[dataset_input(name, Path(path), context)
                                                for name, (path, context) in inputs.items()])
    monitor = SystemMetricsMonitor(run_id, sampling_interval=system_metrics_interval_s,
                                   resume_logging=True, tracking_uri=cfg.uri)
    monitor.start()
    try:
        yield run_id
    except BaseException:
        monitor.finish()
        end_run(client, run_id, "FAILED")
        raise
    monitor.finish()
    client.set_terminated(run_id, status="FINISHED")


def link_runs(cfg: RegistryConfig, evaluation_run_id: str, training_run_id: str,
              model_version: str) -> bool:
    """Tag the training run with the evaluation that measured it and the version it became
    (and the evaluation run with its training run); False, with a warning, when the training
    run lives in another store."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    client.set_tag(evaluation_run_id, "training_run_id", training_run_id)
    try:
        client.set_tag(training_run_id, "evaluation_run_id", evaluation_run_id)
        client.set_tag(training_run_id, "model_version", model_version)
    except MlflowException as err:
        log.warning("training run %s is not in %s (%s): its evaluation is not linked back",
                    training_run_id, cfg.uri, err.message)
        return False
    return True


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, the first 16 hex digits (MLflow shows dataset digests
    short)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dataset_input(name: str, path: Path, context: str):
    """A local table file as an MLflow dataset input: name, content digest, its path, and
    its row count and columns (parquet metadata only, the rows are not read)."""
    import pyarrow.parquet as pq
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = schema = None
    if path.suffix == ".parquet":
        meta = pq.read_metadata(path)
        profile = json.dumps({"num_rows": meta.num_rows})
        schema = json.dumps({"columns": meta.schema.to_arrow_schema().names})
    dataset = Dataset(name, file_digest(path), "local", json.dumps({"uri": str(path.resolve())}),
                      schema, profile)
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])


# --------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str

    @property
    def model_version(self) -> str:
        """The string vectors, shards and the serving embedder carry: `loupe-embedder/3`."""
        return f"{self.name}/{self.version}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@needs_store("registering a model version")
def register_model_version(cfg: RegistryConfig, run: LoggedRun, recall_at_10: float,
                           fingerprint: str) -> ModelVersionRef:
    """Register the run's `model/` files as a new version and point `challenger` at it."""
    client = _client(cfg)
    names = {a.path for a in client.list_artifacts(run.run_id, MODEL_ARTIFACT_DIR)}
    if not names:
        raise ValueError(f"run {run.run_id} has no exported model files under "
                         f"'{MODEL_ARTIFACT_DIR}/'; nothing to register")
    return create_version(client, cfg.model_name, run.run_id, run.artifact_uri,
                          {HEADLINE: repr(float(recall_at_10)), FINGERPRINT: fingerprint},
                          description="Loupe image embedder (256-d, L2-normalised); aliases: "
                                      "challenger = newest, champion = serving",
                          aliases=(CHALLENGER,))


def create_version(client, name: str, run_id: str, artifact_uri: str, tags: dict[str, str],
                   description: str, aliases: Sequence[str] = ()) -> ModelVersionRef:
    """A new version of `name` (created on first use) whose files are the run's `model/`
    artifacts, its `name/N` string tagged on the version and the run, `aliases` pointed at
    it: the one registration scheme of the embedder and the detector, which `download_model`
    reads back. Pending until all of that is written, so an outage mid-way leaves a version
    the next registration removes, never one that looks registered."""
    from mlflow.exceptions import MlflowException

    settle_interrupted(client, name)
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, source=f"{artifact_uri}/{MODEL_ARTIFACT_DIR}",
                                     run_id=run_id, tags={**tags, REGISTRATION: PENDING})
    ref = ModelVersionRef(name, str(mv.version))
    client.set_model_version_tag(ref.name, ref.version, "model_version", ref.model_version)
    client.set_tag(run_id, "model_version", ref.model_version)
    for alias in aliases:
        client.set_registered_model_alias(ref.name, alias, ref.version)
    client.set_model_version_tag(ref.name, ref.version, REGISTRATION, COMPLETE)
    return ref


def half_registered(client, name: str) -> list[str]:
    """Versions an interrupted registration or promotion left: registration still pending,
    or a promotion recorded as `promoting`."""
    return sorted((mv.version for mv in client.search_model_versions(f"name='{name}'")
                   if mv.tags.get(REGISTRATION) == PENDING
                   or mv.tags.get(DECISION) == PROMOTING), key=int)


def settle_interrupted(client, name: str) -> list[str]:
    """Finish what an interrupted registration or promotion left, before a new one starts:
    a pending version is deleted (its run and files stay; the retry registers anew), a
    `promoting` version becomes `promoted` if `champion` did move to it, else `rejected`.
    Returns what it settled, each also logged as a warning."""
    from mlflow.exceptions import MlflowException

    settled = []
    for version in half_registered(client, name):
        mv = client.get_model_version(name, version)
        if mv.tags.get(REGISTRATION) == PENDING:
            client.delete_model_version(name, version)
            what = "registration interrupted: version deleted (its run and files are kept)"
        else:
            try:
                champion = client.get_model_version_by_alias(name, CHAMPION).version
            except MlflowException:
                champion = None
            moved = str(champion) == str(version)
            client.set_model_version_tag(name, version, DECISION,
                                         "promoted" if moved else "rejected")
            if not moved:
                client.set_model_version_tag(
                    name, version, "promotion_reason", f"promotion interrupted before "
                    f"`{CHAMPION}` moved (the store did not answer); run the gate again")
            what = f"promotion interrupted: recorded as {'promoted' if moved else 'rejected'}"
        log.warning("%s/%s: %s", name, version, what)
        settled.append(f"{name}/{version}: {what}")
    return settled


def parse_model_version(model_version: str) -> ModelVersionRef:
    """`loupe-embedder/3` -> ModelVersionRef; anything else is a readable error."""
    name, sep, version = str(model_version).rpartition("/")
    if not sep or not name or not version.isdigit():
        raise ValueError(f"model version must look like 'loupe-embedder/3', got "
                         f"{model_version!r}")
    return ModelVersionRef(name, version)


def download_model(cfg: RegistryConfig, model_version: str, dst: Path) -> Path:
    """Fetch a registered version's `model/` artifacts into `dst`; the export directory
    (inside the MLflow model, for an embedder) is what is returned."""
    from mlflow.artifacts import download_artifacts

    from pipelines.mlflow_model import export_dir_of

    ref = parse_model_version(model_version)
    client = _client(cfg)
    with reachable(cfg.uri, f"fetching {model_version}"):
        mv = client.get_model_version(ref.name, ref.version)  # clear MlflowException if unknown
        if mv.tags.get(REGISTRATION) == PENDING:
            raise ValueError(f"{model_version} is not fully registered (an interrupted "
                             "registration); serve a complete version")
        uri = client.get_model_version_download_uri(ref.name, ref.version)
        Path(dst).mkdir(parents=True, exist_ok=True)
        return export_dir_of(Path(download_artifacts(artifact_uri=uri, dst_path=str(dst))))


def version_for_alias(cfg: RegistryConfig, alias: str) -> ModelVersionRef | None:
    """The version an alias points at, or None if the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        with reachable(cfg.uri, f"looking up alias {alias!r}"):
            mv = _client(cfg).get_model_version_by_alias(cfg.model_name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return ModelVersionRef(cfg.model_name, str(mv.version))


# --------------------------------------------------------------------------- rollout lookups
def is_attribute_model(model_version: str) -> bool:
    return model_version.startswith(ATTRIBUTE_MODEL_PREFIX)


def resolve_model(spec: str, tracking_uri: str, promoted_version: str | None = None) -> str:
    """The model version a rollout serves: an alias (`champion`, `challenger`), a registered
    version (`loupe-embedder/3`), or `attributes/<seed>` (model-free vectors, benchmarks).

    A rollout started by the champion asset passes the promoted version, so a champion that
    moves again meanwhile cannot change what this run rolls out.
    """
    spec = str(spec).strip()
    if spec in (CHAMPION, CHALLENGER):
        if spec == CHAMPION and promoted_version:
            spec = promoted_version
        else:
            cfg = RegistryConfig(tracking_uri)
            ref = version_for_alias(cfg, spec)
            if ref is None:
                raise ValueError(f"no version of {cfg.model_name!r} has the alias {spec!r} in "
                                 f"{tracking_uri}; run the retrain first or name a version")
            return ref.model_version
    if is_attribute_model(spec):
        seed = spec.removeprefix(ATTRIBUTE_MODEL_PREFIX)
        if not seed.isdigit():
            raise ValueError(f"attribute model must be 'attributes/<seed>', got {spec!r}")
        return spec
    ref = parse_model_version(spec)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        with reachable(tracking_uri, f"looking up {spec}"):
            MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri
                         ).get_model_version(ref.name, ref.version)
    except MlflowException as err:
        raise ValueError(f"model version {spec} is not registered in {tracking_uri}: "
                         f"{err.message}") from err
    return ref.model_version


def fetch_registered(tracking_uri: str, model_version: str, models_dir: Path) -> Path:
    """A registered version's exported files in `<models_dir>/<name>-<N>/`, fetched once.

    Each caller downloads into its own temp dir and renames it into place, so parallel tasks
    (mapped partitions, the Triton export) never see or write a half-fetched directory.
    """
    ref = parse_model_version(model_version)
    local = Path(models_dir) / f"{ref.name}-{ref.version}"
    if local.is_dir():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        fetched = download_model(RegistryConfig(tracking_uri), model_version, tmp)
        try:
            fetched.rename(local)
        except OSError:
            if not local.is_dir():  # not lost to a concurrent fetch of the same version
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def registered_embed_fn(tracking_uri: str, model_version: str, models_dir: Path, world: Path):
    """Rater queries (photo + box) through a registered embedder's exported graph (the
    canary's queries; catalog photos go through `pipelines.rollout.catalog_embed_fn`)."""
    from pipelines.embed import embed_fn_from_export

    return embed_fn_from_export(fetch_registered(tracking_uri, model_version, models_dir), world)


def resolve_detector(spec: str | None, tracking_uri: str) -> str:
    """The registered detector a rollout installs beside the embedder: the named
    `loupe-detector/N`, else the newest registered version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if spec is not None and str(spec).strip():
        ref = parse_model_version(str(spec).strip())
        if ref.name != DETECTOR_MODEL:
            raise ValueError(f"detector must be a version of {DETECTOR_MODEL!r} "
                             f"('{DETECTOR_MODEL}/N'), got {spec!r}")
        try:
            with reachable(tracking_uri, f"looking up {ref.model_version}"):
                client.get_model_version(ref.name, ref.version)
        except MlflowException as err:
            raise ValueError(f"detector {ref.model_version} is not registered in "
                             f"{tracking_uri}: {err.message}") from err
        return ref.model_version
    with reachable(tracking_uri, f"listing {DETECTOR_MODEL} versions"):
        versions = [int(mv.version) for mv in
                    client.search_model_versions(f"name='{DETECTOR_MODEL}'")
                    if mv.tags.get(REGISTRATION) != PENDING]
    if not versions:
        raise ValueError(f"no {DETECTOR_MODEL} version is registered in {tracking_uri}, and "
                         "Triton serves the detector beside the embedder: train one "
                         "(`loupe train-detector`), register it "
                         "(pipelines.train_detector.register_detector), or name one with the "
                         "`detector` param")
    return f"{DETECTOR_MODEL}/{max(versions)}"


# --------------------------------------------------------------------------- promotion
@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    challenger: str  # model_version string
    challenger_recall: float
    champion: str | None  # champion before the decision
    champion_recall: float | None
    margin: float
    decided_at: str
    note: str | None = None  # who asked and why (`loupe promote VERSION --reason ...`)


def _recorded(mv, key: str) -> str:
    if key not in mv.tags:
        raise ValueError(f"{mv.name}/{mv.version} has no '{key}' tag: it was not registered by "
                         "`loupe evaluate`, so it has no comparable rater recall@10")
    return mv.tags[key]


def decide_promotion(challenger_recall: float, champion_recall: float | None, margin: float
                     ) -> tuple[bool, str]:
    """The gate's rule: promote with no champion, or on a gain > 0 and >= margin."""
    if champion_recall is None:
        return True, f"no champion yet; challenger rater recall@10 {challenger_recall:.4f}"
    gain = round(challenger_recall - champion_recall, 9)
    verdict = "beats" if gain > 0 and gain >= margin else "does not beat"
    return verdict == "beats", (
        f"challenger rater recall@10 {challenger_recall:.4f} vs champion "
        f"{champion_recall:.4f}: gain {gain:+.4f} {verdict} the margin {margin:.4f}")


@needs_store("running the promotion gate")
def promotion_gate(cfg: RegistryConfig, version: str | ModelVersionRef,
                   champion_recall: float | None = None, measured_champion: str | None = None,
                   note: str | None = None) -> PromotionDecision:
    """Move `champion` to `version` if its rater recall@10 beats the champion's by the margin.

    Recall figures come from the versions' tags, or for the champion from `champion_recall`
    measured on the challenger's eval set (the evaluate stage scores the champion beside the
    candidate and names it in `measured_champion`; a champion that moved meanwhile is a
    refusal). Different eval fingerprints without a re-measured champion are a refusal too:
    the two numbers come from different catalogs or judgments.
    """
    ref = version if isinstance(version, ModelVersionRef) else ModelVersionRef(
        cfg.model_name, str(version))
    client = _client(cfg)
    settle_interrupted(client, ref.name)
    mv = client.get_model_version(ref.name, ref.version)
    if mv.tags.get(REGISTRATION) == PENDING:
        raise ValueError(f"{ref.model_version} is not fully registered (an interrupted "
                         "registration); register the run again")
    challenger_recall = float(_recorded(mv, HEADLINE))
    champ = version_for_alias(cfg, CHAMPION)
    if champ is not None and champ.version == ref.version:
        promoted, reason, champ_recall = False, f"{ref.model_version} is already champion", None
    elif champ is None:
        champ_recall = None
        promoted, reason = decide_promotion(challenger_recall, None, cfg.promotion_margin)
    elif measured_champion is not None and measured_champion != champ.model_version:
        promoted, champ_recall = False, None
        reason = (f"champion moved to {champ.model_version} while {measured_champion} was "
                  "being measured as the champion; evaluate again to compare with the new one")
    else:
        champ_mv = client.get_model_version(champ.name, champ.version)
        same_set = _recorded(champ_mv, FINGERPRINT) == _recorded(mv, FINGERPRINT)
        remeasured = ""
        if champion_recall is not None and not same_set:
            remeasured = (f" (champion re-evaluated on this set: it was scored on fingerprint "
                          f"{champ_mv.tags[FINGERPRINT]}, this set is {mv.tags[FINGERPRINT]})")
        if champion_recall is None and not same_set:
            promoted, champ_recall = False, None
            reason = (f"champion {champ.model_version} was scored on a different catalog or "
                      f"rater set (fingerprint {champ_mv.tags[FINGERPRINT]} vs "
                      f"{mv.tags[FINGERPRINT]}); re-evaluate it on this set before comparing")
        else:
            champ_recall = (float(champion_recall) if champion_recall is not None
                            else float(champ_mv.tags[HEADLINE]))
            promoted, reason = decide_promotion(challenger_recall, champ_recall,
                                                cfg.promotion_margin)
            reason += remeasured
    decision = PromotionDecision(
        promoted, reason, ref.model_version, challenger_recall,
        None if champ is None else champ.model_version, champ_recall, cfg.promotion_margin,
        datetime.now(UTC).isoformat(timespec="seconds"), note)
    if champ is not None and champ.version == ref.version:
        return decision  # decided when it was promoted; that record stands
    if promoted:  # `promoting` first: an outage before the end leaves a settleable record
        client.set_model_version_tag(mv.name, mv.version, DECISION, PROMOTING)
        client.set_registered_model_alias(ref.name, CHAMPION, ref.version)
    _record_decision(client, mv, decision)
    return decision


def _record_decision(client, mv, decision: PromotionDecision) -> None:
    """The decision on the run (tags + `promotion/decision.json`), then on the version, whose
    outcome tag is written last: it is what `half_registered` checks."""
    outcome = "promoted" if decision.promoted else "rejected"
    if mv.run_id:
        client.set_tag(mv.run_id, "promotion.decision", outcome)
        client.set_tag(mv.run_id, "promotion.reason", decision.reason)
        if decision.note:
            client.set_tag(mv.run_id, "promotion.note", decision.note)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "decision.json"
            path.write_text(json.dumps(asdict(decision), indent=1))
            client.log_artifact(mv.run_id, str(path), artifact_path="promotion")
    client.set_model_version_tag(mv.name, mv.version, "promotion_reason", decision.reason)
    if decision.note:
        client.set_model_version_tag(mv.name, mv.version, "promotion_note", decision.note)
    client.set_model_version_tag(mv.name, mv.version, DECISION, outcome)


# --------------------------------------------------------------------------- UI + CLI
def mlflow_ui_command(uri: str, port: int = 5000) -> list[str]:
    """`mlflow ui` on 127.0.0.1 over the same backend store (and artifact root) we log to."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(int(port)), "--workers", "1"]
    root = artifact_root(uri)
    if root is not None:
        cmd += ["--default-artifact-root", root]
    return cmd


def add_cli(sub) -> None:
    p = sub.add_parser("promote", help="promotion gate: move alias champion if the challenger "
                                       "beats it on rater recall@10")
    p.add_argument("version", nargs="?", default=CHALLENGER,
                   help="N, loupe-embedder/N or 'challenger' (default)")
    p.add_argument("--reason", required=True,
                   help="why you ask, recorded with the gate's decision on the version and run")
    p.add_argument("--margin", type=float, default=RegistryConfig.promotion_margin)
    p.add_argument("--champion-recall", type=float, default=None,
                   help="champion's rater recall@10 re-measured on the challenger's eval set")
    _common(p)
    p.set_defaults(func=_promote_cli)
    u = sub.add_parser("mlflow-ui", help="open the MLflow UI on 127.0.0.1 (same store)")
    u.add_argument("--port", type=int, default=5000)
    _common(u)
    u.set_defaults(func=_ui_cli)


def _common(p) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI}")
    p.add_argument("--model-name", default=MODEL_NAME)


def _promote_cli(args) -> int:
    """The one manual way to move `champion` (DVC and `loupe evaluate` register a challenger
    only): the same gate as the retrain DAG's, the operator's reason recorded beside it."""
    cfg = RegistryConfig(args.tracking_uri, model_name=args.model_name,
                         promotion_margin=args.margin)
    if not args.reason.strip():
        raise ValueError("--reason must say why (it is recorded with the decision)")
    version = str(args.version).strip()
    if version == CHALLENGER:
        ref = version_for_alias(cfg, CHALLENGER)
        if ref is None:
            raise ValueError(f"model {cfg.model_name!r} has no '{CHALLENGER}' version; "
                             "run `loupe evaluate` first")
        version = ref.version
    elif not version.isdigit():
        ref = parse_model_version(version)
        if ref.name != cfg.model_name:
            raise ValueError(f"{version} is not a version of {cfg.model_name!r}")
        version = ref.version
    decision = promotion_gate(cfg, version, args.champion_recall, note=args.reason.strip())
    print(json.dumps(asdict(decision), indent=1))
    return 0 if decision.promoted else 1


def _ui_cli(args) -> int:
    cmd = mlflow_ui_command(resolve_tracking_uri(args.tracking_uri), args.port)
    print(f"MLflow UI on http://127.0.0.1:{args.port}  ({' '.join(cmd[1:])})", flush=True)
    return subprocess.call(cmd)
