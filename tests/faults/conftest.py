"""Fault suite fixtures: one real serving stack shared by the suite, a load generator, and
the collector that writes `reports/faults.json` from the counts the tests record.

The report is merged, not replaced: a run of some of the fault tests updates their counts
and leaves the others' from the last run that ran them, so the committed file always holds
one count per fault, each from the latest run of its test.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# the committed report only when asked (LOUPE_WRITE_REPORTS=1): a plain test run leaves
# reports/ as it found it (tests/conftest.py guards that)
REPORT = (REPO_ROOT / "reports" / "faults.json" if os.environ.get("LOUPE_WRITE_REPORTS")
          else Path(tempfile.gettempdir()) / "loupe-faults.json")
MODEL_V1, DETECTOR_V1 = "loupe-embedder/1", "loupe-detector/1"
ADMIN_TOKEN = "fault-admin-token"

_RECORDED: dict[str, dict] = {}  # test name -> {"tried": str, "counts": {...}}
_OUTCOMES: dict[str, dict] = {}


class Counts:
    """What one fault test tried and what it counted; printed, and kept for the report."""

    def __init__(self, test: str):
        self.test = test
        self.entry = _RECORDED.setdefault(test, {"tried": "", "counts": {}})

    def tried(self, text: str) -> None:
        self.entry["tried"] = text
        print(f"[{self.test}] tried: {text}")

    def add(self, **counts: int | float) -> None:
        self.entry["counts"].update(counts)
        print(f"[{self.test}] " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@pytest.fixture()
def counts(request) -> Counts:
    return Counts(request.node.name)


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        name = report.nodeid.split("::")[-1]
        _OUTCOMES[name] = {"outcome": report.outcome, "seconds": round(report.duration, 2)}


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _RECORDED:
        return
    old = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    tests = old.get("tests", {})
    for name, entry in _RECORDED.items():
        tests[name] = {**entry, **_OUTCOMES.get(name, {}),
                       "at": datetime.now(UTC).isoformat(timespec="seconds")}
    flat = {k: v for entry in tests.values() for k, v in entry["counts"].items()}
    for total, parts in (("fuzz_requests", ("fuzz_schema_requests", "fuzz_corpus_requests")),
                         ("fuzz_5xx", ("fuzz_schema_5xx", "fuzz_corpus_5xx"))):
        flat[total] = sum(flat.get(p, 0) for p in parts)
    report = {**flat, "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "tests": dict(sorted(tests.items()))}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1) + "\n")


# --------------------------------------------------------------------------- serving stack
@dataclass
class FaultStack:
    stack: object  # serving.stack.ServingStack
    paths: object  # pipelines.serve.ServePaths
    world: Path
    admin_token: str = ADMIN_TOKEN
    model_version: str = MODEL_V1

    @property
    def url(self) -> str:
        return self.stack.url

    def box_query(self) -> tuple[bytes, str]:
        """A scene photo and a fixed box: skips the detector, so load stays CPU-cheap."""
        return (self.world / "images/scenes/scenes000002.jpg").read_bytes(), "0.2,0.2,0.8,0.8"

    def heal(self) -> None:
        """Bring every killed replica back, so each test starts from a whole stack."""
        for shard_id, procs in self.stack.shards.items():
            for replica, proc in enumerate(procs):
                if not proc.alive():
                    self.stack.restart_replica(shard_id, replica, self.model_version)


@pytest.fixture(scope="session")
def fault_stack(tiny_world, tiny_harvest, tmp_path_factory):
    """tritonserver + 2 shards x 2 replica processes + search API on the tiny world (the
    e2e serving recipe: frozen pretrained embedder, detector trained for 12 short epochs)."""
    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder
    from pipelines.serve import prepare
    from pipelines.train_detector import DetectorTrainConfig, train_detector
    from serving.stack import ServingStack

    base = tmp_path_factory.mktemp("fault-serving")
    export_embedder(frozen_baseline(EmbedderSpec(seed=0)).eval(), base / "embedder_v1")
    det_cfg = DetectorTrainConfig(input_size=128, epochs=12, batch_size=8, lr=4e-3,
                                  latency_runs=3, grid_scenes=2, num_threads=1,
                                  log_mlflow=False, val_every_n_epochs=12)
    detector_dir = train_detector(det_cfg, tiny_world, base / "detector").export_dir
    paths = prepare(tiny_world, base / "serve", base / "embedder_v1", MODEL_V1, detector_dir,
                    DETECTOR_V1, tiny_harvest)
    # a 1 s fan-out deadline: the faults here are dead processes, which fail fast; the
    # default 150 ms budget would turn a busy 2-core CI host's slow answers into partials
    stack = ServingStack(paths.triton_repo, paths.index_root, tiny_world, paths.features,
                         base / "run", ADMIN_TOKEN, replicas=2, deadline_s=1.0,
                         supervise=False).start()  # kills are timed by hand; see test_self_healing
    try:
        yield FaultStack(stack, paths, tiny_world)
    finally:
        stack.stop()


# --------------------------------------------------------------------------- load
@dataclass
class Answer:
    at: float  # monotonic time the request was sent
    status: int  # HTTP status, 0 when no response came back (timeout, refused)
    seconds: float
    body: dict = field(default_factory=dict)
    error: str = ""


class Load:
    """`threads` clients sending box searches back to back until stopped; every answer is
    kept with its send time, so a test counts what happened in each phase of a fault."""

    def __init__(self, url: str, image: bytes, box: str, threads: int = 3,
                 timeout_s: float = 10.0):
        self.url, self.image, self.box = url, image, box
        self.threads, self.timeout_s = threads, timeout_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v1/search",
                                    files={"image": ("q.jpg", self.image, "image/jpeg")},
                                    data={"box": self.box, "k": "5"})
                    try:
                        body = r.json()
                    except ValueError:
                        body = {"raw": r.text[:200]}
                    answer = Answer(t0, r.status_code, time.monotonic() - t0, body,
                                    "" if r.headers.get("content-type") == "application/json"
                                    else f"content-type {r.headers.get('content-type')}")
                except httpx.HTTPError as err:
                    answer = Answer(t0, 0, time.monotonic() - t0, error=repr(err))
                with self._lock:
                    self.answers.append(answer)
                if answer.status != 200:  # back off a little, as a real client would
                    self._stop.wait(0.02)

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(self.timeout_s + 5)

    def between(self, t0: float, t1: float = float("inf")) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if t0 <= a.at < t1]

    def wait_for(self, n: int, after: float, limit_s: float = 30.0) -> None:
        """Block until `n` answers sent after `after` are in (or `limit_s` passes)."""
        deadline = time.monotonic() + limit_s
        while len(self.between(after)) < n and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.fixture()
def load_factory(fault_stack):
    def make(threads: int = 3) -> Load:
        image, box = fault_stack.box_query()
        return Load(fault_stack.url, image, box, threads)

    yield make
    fault_stack.heal()
