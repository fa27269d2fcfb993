"""The Grafana dashboard (infra/monitoring/grafana-dashboard.json) against the live search
API: after real searches on the serving stack (Triton, 2 shards x 2 replicas), every API
series a panel queries is in the /metrics scrape, with the label values the panels group
and filter by. The monitoring-report gauges are checked in test_celery_rollout.py."""

from __future__ import annotations

import json
import re

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.health_export import METRIC_NAMES
from pipelines.run_config import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DASHBOARD = REPO_ROOT / "infra" / "monitoring" / "grafana-dashboard.json"


def test_dashboard_api_series_are_in_the_live_scrape(served, tiny_world):
    url = served.stack.url
    catalog = pd.read_parquet(tiny_world / "tables" / "catalog.parquet")
    for path in catalog["image_path"].iloc[:3]:
        r = httpx.post(f"{url}/v1/search", files={"image": ("q.jpg",
                                                            (tiny_world / path).read_bytes())},
                       timeout=30)
        assert r.status_code == 200, r.text
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    live = {s.name for s in samples}

    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
             for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(loupe_[a-z0-9_]+)", e)}
    api_used = used - METRIC_NAMES
    assert api_used and api_used <= live, api_used - live

    def labels(name: str, key: str) -> set[str]:
        return {s.labels[key] for s in samples if s.name == name}

    # no box given: detect -> pick -> crop -> embed is one Triton call
    assert labels("loupe_stage_seconds_count", "stage") >= {"detect_embed", "fanout",
                                                            "rerank", "total"}
    assert labels("loupe_shard_seconds_count", "shard") == {"0", "1"}
    filters = {(k, v) for e in exprs for k, v in re.findall(r'(\w+)="([^"]+)"', e)}
    for key, value in filters:  # every label filter in a panel matches a live series
        assert any(s.labels.get(key) == value for s in samples), (key, value)
    [info] = [s for s in samples if s.name == "loupe_model_version_info"]
    assert info.labels["model_version"] == served.model_version and info.value == 1.0
