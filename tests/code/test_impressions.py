"""Impression log + /v1/events: durable, validated, exported in the harvester's schema."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from data_contracts.validation import ContractViolation
from serving.api.events import events_router
from serving.api.impressions import Grid, ImpressionLog, ShownItem, export_impressions

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)


def _grid(request_id: str, items: list[str], user: str = "u1", team: str = "",
          policy: str = "ranker") -> Grid:
    return Grid(request_id=request_id, user_id=user, client_session_id="s1", ts=T0,
                query_image=b"\xff\xd8fake-jpeg-" + request_id.encode(), box=(0, 0, 1, 1),
                experiment="exp1", arm="champion", logging_policy=policy,
                model_version="loupe-embedder/1", index_version="v1",
                items=[ShownItem(it, k, 1.0 / k, team) for k, it in enumerate(items, 1)])


@pytest.fixture
def log(tmp_path) -> ImpressionLog:
    log = ImpressionLog(tmp_path / "log")
    log.log_grid(_grid("r1", ["a", "b", "c"]))
    return log


@pytest.fixture
def client(log) -> TestClient:
    app = FastAPI()
    app.include_router(events_router(log))
    return TestClient(app)


def _event(request_id="r1", position=2, item_id="b", type_="click"):
    return {"request_id": request_id, "position": position, "item_id": item_id, "type": type_,
            "ts": (T0 + timedelta(seconds=5)).isoformat()}


def test_events_fill_clicked_and_saved_and_survive_restart(log, client, tmp_path):
    assert client.post("/v1/events", json=_event()).status_code == 201
    assert client.post("/v1/events", json=_event(type_="save")).status_code == 201
    assert client.post("/v1/events", json=_event(position=3, item_id="c")).status_code == 201
    log.close()
    reopened = ImpressionLog(tmp_path / "log")
    assert reopened.counts() == {"requests": 1, "shown": 3, "events": 3}
    f = reopened.frame().set_index("position")
    assert f["clicked"].astype(bool).tolist() == [False, True, True]
    assert f["saved"].astype(bool).tolist() == [False, True, False]
    assert (tmp_path / "log" / f.loc[1, "query_image_path"]).read_bytes().endswith(b"r1")


@pytest.mark.parametrize(("event", "status", "reason"), [
    (_event(request_id="nope"), 404, "unknown request id"),
    (_event(position=4, item_id="c"), 422, "outside the grid"),
    (_event(position=0), 422, "outside the grid"),
    (_event(position=2, item_id="a"), 422, "showed 'b' at position 2"),
    (_event(type_="save"), 409, "without a click"),
    ({**_event(), "type": "purchase"}, 422, "click"),
])
def test_bad_events_get_a_clear_4xx_and_store_nothing(log, client, event, status, reason):
    before = log.counts()
    response = client.post("/v1/events", json=event)
    assert response.status_code == status
    assert reason in str(response.json()["detail"])
    assert log.counts() == before


def test_duplicate_click_is_409_and_stored_once(log, client):
    assert client.post("/v1/events", json=_event()).status_code == 201
    again = client.post("/v1/events", json=_event())
    assert again.status_code == 409 and "duplicate click" in again.json()["detail"]
    assert log.counts()["events"] == 1


def test_bad_grids_are_refused_whole(log):
    with pytest.raises(ValueError, match="already logged"):
        log.log_grid(_grid("r1", ["x", "y"]))
    with pytest.raises(ValueError, match="shows an item twice"):
        log.log_grid(_grid("r2", ["x", "x"]))
    with pytest.raises(ValueError, match="logging_policy"):
        log.log_grid(_grid("r3", ["x"], policy="greedy"))
    assert log.counts() == {"requests": 1, "shown": 3, "events": 0}


def test_export_passes_the_impressions_contract(tmp_path, tiny_world):
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    items = catalog["item_id"].tolist()
    log = ImpressionLog(tmp_path / "log")
    log.log_grid(_grid("r1", items[:20]))
    log.log_grid(_grid("r2", items[5:25], user="u2", team="A", policy="shuffle_top20"))
    log.record_event("r2", 3, items[7], "click", T0 + timedelta(seconds=1))
    paths = export_impressions(log, tmp_path / "out", tiny_world / "tables/catalog.parquet")
    imp = pd.read_parquet(paths["impressions"])
    ctx = pd.read_parquet(paths["impression_context"])
    assert len(imp) == 40 and imp["clicked"].sum() == 1
    assert imp.loc[imp["clicked"], "impression_id"].item() == "r2-03"
    assert set(imp["logging_policy"]) == {"ranker", "shuffle_top20"}
    assert ctx.set_index("impression_id").loc["r2-03", ["team", "model_version"]].tolist() == \
        ["A", "loupe-embedder/1"]


def test_export_refuses_items_unknown_to_the_catalog(tmp_path, tiny_world):
    log = ImpressionLog(tmp_path / "log")
    log.log_grid(_grid("r1", ["not-an-item"]))
    with pytest.raises(ContractViolation, match="item_id_not_in_catalog"):
        export_impressions(log, tmp_path / "out", tiny_world / "tables/catalog.parquet")
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_publish_refuses_a_bad_merge_and_keeps_the_old_table(tmp_path, tiny_world):
    from serving.api.impressions import publish_to_data_root

    tables = tmp_path / "data" / "tables"
    tables.mkdir(parents=True)
    for name in ("catalog", "impressions"):
        shutil.copy(tiny_world / f"tables/{name}.parquet", tables)
    before = (tables / "impressions.parquet").read_bytes()
    log = ImpressionLog(tmp_path / "log")
    log.log_grid(_grid("r1", ["not-an-item"]))
    with pytest.raises(ContractViolation, match="item_id_not_in_catalog"):
        publish_to_data_root(log, tmp_path / "data")
    assert (tables / "impressions.parquet").read_bytes() == before
    assert sorted(p.name for p in tables.iterdir()) == ["catalog.parquet",
                                                        "impressions.parquet"]


_WRITER = """
import sys
from datetime import UTC, datetime
from serving.api.impressions import Grid, ImpressionLog, ShownItem
log = ImpressionLog(sys.argv[1])
for n in range(100_000):
    log.log_grid(Grid(f"r{n}", "u", "s", datetime.now(UTC), b"jpeg", (0, 0, 1, 1), "e",
                      "champion", "ranker", "m/1", "v1", [ShownItem("a", 1, 1.0)]))
    log.record_event(f"r{n}", 1, "a", "click")
    print(f"r{n}", flush=True)
"""


def test_every_acknowledged_write_survives_a_kill(tmp_path):
    """SIGKILL a writer mid-stream: every grid and click it acknowledged is still there."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "log")],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    acked = [proc.stdout.readline().strip() for _ in range(40)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = ImpressionLog(tmp_path / "log")
    frame = log.frame()
    assert set(acked) <= set(frame["request_id"])
    assert frame.set_index("request_id").loc[acked, "clicked"].all()
    counts = log.counts()
    assert counts["requests"] == counts["shown"] >= 40
    assert counts["events"] in (counts["requests"], counts["requests"] - 1)  # a grid may
    # have committed without its click when the kill landed between the two
