"""Prometheus exporter for the hourly monitoring DAG's report (`<runs_dir>/monitoring/
latest.json`, written by `pipelines.monitor.report_health`): canary replay recall, embedding
drift (norm and neighbour PSI), index age and per-shard latency become gauges, so the
Grafana dashboard (infra/monitoring/) shows them next to the API's own metrics.

The report is re-read at every scrape (a missing or unreadable report is itself a metric,
`loupe_health_report_up 0`), so the exporter needs no restart when the DAG writes a new one:

    python -m pipelines.health_export --runs-dir runs/demo --port 9108
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# (check, metric key in the report) -> (Prometheus name, help); every gauge carries the
# live index version as a label
CHECK_GAUGES = {
    ("replay_canary", "probe_recall"): ("loupe_canary_probe_recall",
                                        "canary replay recall on the live index"),
    ("replay_canary", "recorded_probe_recall"): ("loupe_canary_recorded_probe_recall",
                                                 "canary recall recorded at cutover"),
    ("replay_canary", "exact_overlap"): ("loupe_canary_exact_overlap",
                                         "overlap of the live index with exact search"),
    ("replay_canary", "mean_vector_norm"): ("loupe_canary_mean_vector_norm",
                                            "norm of the mean live vector (collapse check)"),
    ("embedding_drift", "norm_psi"): ("loupe_drift_norm_psi",
                                      "PSI of streamed embedding norms vs the live build"),
    ("embedding_drift", "neighbour_psi"): ("loupe_drift_neighbour_psi",
                                           "PSI of nearest-neighbour cosine vs the live build"),
    ("embedding_drift", "streamed_items"): ("loupe_drift_streamed_items",
                                            "items streamed in since the live build"),
    ("index_age", "live_age_h"): ("loupe_index_live_age_hours", "age of the live index build"),
    ("index_age", "delta_rows_since_build"): ("loupe_index_delta_rows",
                                              "delta-log rows since the live build"),
    ("index_age", "base_items"): ("loupe_index_base_items", "items in the live build"),
}
SHARD_GAUGES = {"p50_ms": ("loupe_shard_search_p50_ms", "per-shard search p50 (monitoring)"),
                "p99_ms": ("loupe_shard_search_p99_ms", "per-shard search p99 (monitoring)")}
REPORT_GAUGES = {
    "loupe_health_report_up": "1 if the monitoring report could be read",
    "loupe_health_healthy": "1 if the last monitoring run found no breach",
    "loupe_health_breaches": "breaches in the last monitoring run",
    "loupe_health_checked_timestamp_seconds": "when the last monitoring run checked",
}
METRIC_NAMES = frozenset([name for name, _ in CHECK_GAUGES.values()]
                         + [name for name, _ in SHARD_GAUGES.values()] + list(REPORT_GAUGES))


class HealthReportCollector(Collector):
    """Gauges from the latest monitoring report, read at collect time."""

    def __init__(self, report_path: Path) -> None:
        self.report_path = Path(report_path)

    def collect(self):
        up = GaugeMetricFamily("loupe_health_report_up", REPORT_GAUGES["loupe_health_report_up"])
        try:
            report = json.loads(self.report_path.read_text())
            live = str(report["index_version"])
        except (OSError, ValueError, KeyError, TypeError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, value in (("loupe_health_healthy", float(bool(report.get("healthy")))),
                            ("loupe_health_breaches", float(len(report.get("breaches", [])))),
                            ("loupe_health_checked_timestamp_seconds",
                             datetime.fromisoformat(report["checked_at"]).timestamp())):
            g = GaugeMetricFamily(name, REPORT_GAUGES[name], labels=["index_version"])
            g.add_metric([live], value)
            yield g
        metrics = report.get("metrics") or {}
        for (check, key), (name, help_text) in CHECK_GAUGES.items():
            value = (metrics.get(check) or {}).get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                g = GaugeMetricFamily(name, help_text, labels=["index_version"])
                g.add_metric([live], float(value))
                yield g
        shards = ((metrics.get("shard_latency") or {}).get("shards")) or {}
        for key, (name, help_text) in SHARD_GAUGES.items():
            g = GaugeMetricFamily(name, help_text, labels=["index_version", "shard"])
            for shard, values in sorted(shards.items()):
                if isinstance(values.get(key), int | float):
                    g.add_metric([live, str(shard)], float(values[key]))
            yield g


def main(argv: list[str] | None = None) -> None:
    from prometheus_client import start_http_server
    from prometheus_client.registry import CollectorRegistry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, required=True,
                   help="the runs dir the monitoring DAG writes (monitoring/latest.json)")
    p.add_argument("--port", type=int, default=9108)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    args = p.parse_args(argv)
    registry = CollectorRegistry()
    registry.register(HealthReportCollector(args.runs_dir / "monitoring" / "latest.json"))
    start_http_server(args.port, args.host, registry=registry)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
