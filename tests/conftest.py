"""Shared fixtures. Airflow reads its environment at first import, so set it here, first.

The suite never writes to the user's stores: MLflow and the orchestration root point into
temp dirs (each test gets its own tracking store), and a session guard fails the run if the
checkout's mlflow.db, mlruns/, runs/ or reports/ changed while it ran.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SCRATCH = Path(tempfile.mkdtemp(prefix="loupe-tests-"))
(_SCRATCH / "airflow").mkdir()
os.environ.setdefault("AIRFLOW_HOME", str(_SCRATCH / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# forced, not defaulted: a user's own store in the environment must not receive test runs
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SCRATCH / 'mlflow.db'}"
os.environ["LOUPE_ROOT"] = str(_SCRATCH / "loupe")

import pytest  # noqa: E402

from pipelines.world import generate_world  # noqa: E402

# what a test run must leave as it found it (reports/faults.json only with LOUPE_WRITE_REPORTS)
GUARDED = ("mlflow.db", "mlruns", "runs", "reports")


def checkout_fingerprint(repo: Path = REPO) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under the guarded paths."""
    out: dict[str, tuple[int, int]] = {}
    for name in GUARDED:
        top = repo / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:  # a temp file renamed away while we listed
                continue
            out[str(f.relative_to(repo))] = (st.st_size, st.st_mtime_ns)
    if os.environ.get("LOUPE_WRITE_REPORTS"):
        out.pop("reports/faults.json", None)
    return out


_TEST_SPANS: list[tuple[float, float, str]] = []  # (start, stop, nodeid) of every test phase


def pytest_sessionstart(session) -> None:
    session.config._loupe_fingerprint = checkout_fingerprint()


def pytest_runtest_logreport(report) -> None:
    _TEST_SPANS.append((report.start, report.stop, report.nodeid))


def _writer_of(mtime_ns: int) -> str:
    """The test running when a file was written (by its mtime), so the error names it."""
    t = mtime_ns / 1e9
    hits = [nodeid for start, stop, nodeid in _TEST_SPANS if start - 1 <= t <= stop + 1]
    return hits[-1] if hits else "outside any test (collection or fixtures)"


def pytest_sessionfinish(session, exitstatus) -> None:
    before = getattr(session.config, "_loupe_fingerprint", None)
    if before is None:
        return
    after = checkout_fingerprint()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        lines = [f"{k} (written during {_writer_of(after[k][1])})" if k in after
                 else f"{k} (deleted)" for k in changed[:10]]
        session.config._loupe_guard_error = (
            "the test suite changed the checkout's stores; tests must write to temp dirs "
            "(MLFLOW_TRACKING_URI, LOUPE_ROOT, tmp_path):\n  " + "\n  ".join(lines)
            + (f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else ""))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Printed last, above the counts line, where a CI log's tail shows it."""
    error = getattr(config, "_loupe_guard_error", None)
    if error:
        terminalreporter.section("checkout guard", sep="=", red=True, bold=True)
        terminalreporter.write_line("ERROR: " + error, red=True)


@pytest.fixture(autouse=True)
def _own_tracking_store(tmp_path_factory, monkeypatch):
    """Each test's MLflow runs land in a store of its own."""
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture
def http_apps():
    """`serve(app) -> base URL`: an ASGI app over real loopback HTTP (uvicorn in a thread, no
    lifespan), so clients are tested with their own transport; all stop after the test."""
    import socket
    import threading
    import time

    import uvicorn

    running = []

    def serve(app) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="critical",
                                               access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("test HTTP server did not start")
            time.sleep(0.005)
        running.append((server, thread))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, _ in running:
        server.should_exit = True
    for _, thread in running:
        thread.join(10)


@pytest.fixture(scope="session")
def bomb_png() -> bytes:
    """A valid grey PNG of 20000 x 20000 zeros, streamed through zlib row by row (the image
    never exists in memory here): under 1 MB on disk, 400 Mpx once decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    side = 20000
    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def real_photos() -> dict[str, tuple[Path, str]]:
    """Real photographs shipped by installed packages (scikit-image, scikit-learn,
    matplotlib), never generated: name -> (file, category). Read-only."""
    from bench.real_data import real_photos

    return real_photos()


@pytest.fixture(scope="session")
def every_real_photo() -> dict[str, tuple[Path, str]]:
    """Every photo of bench/real_photos.py: the PyPI ones and those Debian packages ship
    (darknet, opencv-doc; fetched once into .cache/real_photos by `make real-photos`)."""
    from bench.real_photos import real_photos

    return real_photos()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """The tiny world (seed 0), generated once per test session; treat it as read-only."""
    out = tmp_path_factory.mktemp("world") / "tiny"
    generate_world("tiny", 0, out)
    return out


@pytest.fixture(scope="session")
def tiny_harvest(tiny_world, tmp_path_factory) -> Path:
    """Harvest output for the tiny world (pairs_debiased/naive.parquet, ...); read-only."""
    from pipelines.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("harvest") / "tiny"
    return harvest(tiny_world, out, HarvestConfig(bootstrap=20),
                   quarantine_dir=out.parent / "quarantine").out_dir
