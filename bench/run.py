"""`make bench`: every benchmark on the `large` world, end to end, into reports/bench.json and
a markdown table in reports/bench.md.

    .venv/bin/python bench/run.py [--work /tmp/loupe-bench] [--reuse index --reuse rollout]

Steps, each a fresh process writing its own JSON (so FAISS/onnxruntime thread settings and
Airflow's one-time configuration do not leak between them):
  bench/index.py    shard recall@10 vs exact, QPS next to hnswlib, bytes/vector, streaming
  bench/shard_protocol.py  one shard call's CPU, float32 route vs JSON route, on that index
  bench/serve.py    the real serving stack: latency vs concurrency, per stage, compute bound
  bench/rollout.py  the rollout DAG on the large world, wall time per stage
  bench/reembed.py  re-embed images/s through the exported embedder on real photos
  bench/gpu.py      GPU variant; prints why it is skipped where no GPU is visible
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports"
CONCURRENCY = ("1", "4", "8")
STEPS = {"index": "index.py", "shard_protocol": "shard_protocol.py", "serve": "serve.py",
         "rollout": "rollout.py", "reembed": "reembed.py", "gpu": "gpu.py"}
STAGES = ("detect_embed_ms", "fanout_ms", "rerank_ms", "api_other_ms", "outside_api_ms")


def step(script: str, *args: str) -> None:
    cmd = [sys.executable, str(REPO / "bench" / script), *args]
    print(f"\n== {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.2f})", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"== {script}: {time.perf_counter() - t0:.0f} s", flush=True)


def aggregate(index: dict, serve: dict, rollout: dict, reembed: dict, gpu: dict) -> dict:
    """The headline numbers of every benchmark in one document (sources keep the rest)."""
    items = index["items"]
    return {
        "machine": {"cores": serve["cores"], "serve_loadavg": serve["loadavg"]},
        "serving": {
            "what": serve["what"], "index": serve["index"], "queries": serve["queries"],
            "latency": {c: {k: serve["levels"][c][k] for k in ("p50_ms", "p95_ms", "p99_ms",
                                                               "qps")} for c in CONCURRENCY},
            "stages_p50_ms": {c: {s: serve["stages"][c][s]["p50"] for s in STAGES}
                              for c in CONCURRENCY},
            "stages_p95_ms": {c: {s: serve["stages"][c][s]["p95"] for s in STAGES}
                              for c in CONCURRENCY},
            "cpu_ms_per_query": {c: serve["levels"][c]["cpu_ms_per_query"]
                                 for c in CONCURRENCY},
            "alone_cpu_ms_per_query": serve["alone"]["total_cpu_ms_per_query"],
            "compute_bound_qps": serve["compute_bound_qps"],
            "qps_c8_over_compute_bound": serve["qps_c8_over_compute_bound"],
            "p95_c1_over_floor": serve["p95_c1_over_floor"],
            "stack_cpu_bound_qps_c8": serve["stack_cpu_bound_qps_c8"],
            "machinery_cpu_ms_per_query_c8": serve["machinery_cpu_ms_per_query_c8"],
            "cores_used_share": {c: serve["levels"][c]["cpu_utilization"] for c in CONCURRENCY},
            "aims": serve["aims"]},
        "index": {k: index[k] for k in (
            "items", "n_shards", "recall_at_10", "qps_per_shard", "qps_per_shard_faiss_index",
            "hnswlib_qps_at_equal_recall", "qps_ratio_vs_hnswlib", "shard_qps_over_hnswlib",
            "store_over_faiss_index", "bytes_per_vector_hnsw",
            "bytes_per_vector_pq", "hnswlib_bytes_per_vector")}
        | {"recall_at_10_pq": index["ivfpq"]["recall_at_10"], "qps_per_shard_pq":
           index["ivfpq"]["qps"], "loadavg": index.get("loadavg", "not recorded")},
        "streaming": {"inserts_per_s": index["inserts_per_s"],
                      "ingest_to_searchable_p50_s":
                          index["streaming"]["ingest_to_searchable_p50_s"],
                      "ingest_to_searchable_p95_s": index["ingest_to_searchable_p95_s"]},
        "reembed": reembed | {
            "projected_large_world_hours": round(items / reembed["images_per_s"] / 3600, 2)},
        "rollout": rollout,
        "gpu": gpu,
        "sources": ["reports/bench_index.json", "reports/bench_serve.json"],
    }


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head, rows) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows), ""]


def markdown(report: dict) -> str:
    s, ix, st = report["serving"], report["index"], report["streaming"]
    lines = ["# Loupe benchmarks (`make bench`)", "",
             f"Machine: {report['machine']['cores']} cores, shared with other work; load "
             f"average (1/5/15 min) at the start of each serving level: " + ", ".join(
                 f"c={c} {report['machine']['serve_loadavg'][c]['before']}"
                 for c in CONCURRENCY) + ".",
             "", "## Serving: POST /v1/search end to end", "", s["what"] + ".",
             f"Index: {s['index']}. Queries: {s['queries']}.", ""]
    lines += _table(["concurrency", "p50 ms", "p95 ms", "p99 ms", "QPS"],
                    [(c, *(f"{s['latency'][c][k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms",
                                                                   "qps")))
                     for c in CONCURRENCY])
    lines += ["Per stage (API timings; p50 / p95 ms):", ""]
    lines += _table(["concurrency", *(x.removesuffix("_ms") for x in STAGES)],
                    [(c, *(f"{s['stages_p50_ms'][c][x]:.1f} / {s['stages_p95_ms'][c][x]:.1f}"
                           for x in STAGES)) for c in CONCURRENCY])
    lines += [f"Models + ANN alone: {s['alone_cpu_ms_per_query']} CPU ms per query -> "
              f"compute_bound_qps {s['compute_bound_qps']}; qps_c8 / compute_bound = "
              f"{s['qps_c8_over_compute_bound']}; p95 at c=1 / the compute floor = "
              f"{s['p95_c1_over_floor']}. Aims: " + "; ".join(
                  f"{k}: {'met' if v else 'NOT met'}" for k, v in s["aims"].items()) + ".",
              f"The whole stack spends {s['machinery_cpu_ms_per_query_c8']} CPU ms per query "
              f"beyond the models and the ANN (c=8), which alone caps it at "
              f"{s['stack_cpu_bound_qps_c8']} QPS on these cores.", "",
              "CPU ms per query by process, and the share of the machine's cores the stack "
              "got (the rest went to other work on the shared machine):", ""]
    procs = list(s["cpu_ms_per_query"]["1"])
    lines += _table(["concurrency", *procs, "cores used"],
                    [(c, *(s["cpu_ms_per_query"][c][p] for p in procs),
                      f"{s['cores_used_share'][c]:.0%}") for c in CONCURRENCY])
    lines += [f"## Index (per shard, one thread; load average {ix['loadavg']})", ""]
    lines += _table(["metric", "value"], [
        ("items / shards", f"{ix['items']} / {ix['n_shards']}"),
        ("recall@10 vs exact, HNSW fp16", ix["recall_at_10"]),
        ("QPS ShardStore.search / FAISS index", f"{ix['qps_per_shard']:.0f} / "
                                                 f"{ix['qps_per_shard_faiss_index']:.0f}"),
        ("QPS hnswlib at equal recall", f"{ix['hnswlib_qps_at_equal_recall']:.0f}"),
        ("QPS ratio FAISS / hnswlib", f"{ix['qps_ratio_vs_hnswlib']:.2f}"),
        ("QPS ratio ShardStore / hnswlib (shard_qps_over_hnswlib)",
         f"{ix['shard_qps_over_hnswlib']:.2f}"),
        ("bytes / vector HNSW fp16 / hnswlib fp32 / IVF-PQ",
         f"{ix['bytes_per_vector_hnsw']:.0f} / {ix['hnswlib_bytes_per_vector']:.0f} / "
         f"{ix['bytes_per_vector_pq']:.0f}"),
        ("recall@10 / QPS IVF-PQ + re-score", f"{ix['recall_at_10_pq']:.4f} / "
                                              f"{ix['qps_per_shard_pq']:.0f}"),
        ("inserts / s (feed -> delta)", f"{st['inserts_per_s']:.0f}"),
        ("ingest -> searchable p50 / p95 s", f"{st['ingest_to_searchable_p50_s']:.3f} / "
                                             f"{st['ingest_to_searchable_p95_s']:.3f}")])
    ro = report["rollout"]
    lines += [f"## Rollout DAG ({ro['dag_id']}, {ro['items']} items, {ro['model']}, "
              f"{ro['executor']}): {ro['wall_seconds']:.0f} s; load average "
              f"{ro.get('loadavg', 'not recorded')}", ""]
    lines += _table(["stage", "tasks", "sum s", "max s (parallel wall)"],
                    [(k, v["tasks"], v["sum_s"], v["max_s"]) for k, v in ro["stages"].items()])
    re = report["reembed"]
    lines += ["## Re-embed", "",
              f"{re['images_per_s']} images/s through the re-embed stage ({re['what']}); "
              f"embedder alone {re['embedder_only_images_per_s']} images/s; the large "
              f"catalog would take {re['projected_large_world_hours']} h on this CPU.", "",
              "## GPU variant", "",
              report["gpu"]["reason"] if report["gpu"].get("skipped") else
              "```json\n" + json.dumps(report["gpu"], indent=1) + "\n```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loupe-bench"))
    ap.add_argument("--reuse", action="append", default=[], choices=list(STEPS),
                    help="keep this step's JSON from an earlier run when present (repeatable)")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    outputs = {"index": REPORTS / "bench_index.json", "serve": REPORTS / "bench_serve.json",
               "shard_protocol": REPORTS / "bench_shard_protocol.json",
               "rollout": work / "rollout.json", "reembed": REPORTS / "bench_reembed.json",
               "gpu": work / "gpu.json"}
    for name, script in STEPS.items():
        if name in args.reuse and outputs[name].is_file():
            print(f"== {name}: reusing {outputs[name]}", flush=True)
            continue
        # the shard call reuses the index step's index; the rest share models
        step_work = work / ("index" if name in ("index", "shard_protocol") else "serve")
        step(script, "--work", str(step_work), "--out", str(outputs[name]))
    data = {name: json.loads(path.read_text()) for name, path in outputs.items()}
    report = aggregate(data["index"], data["serve"], data["rollout"], data["reembed"],
                       data["gpu"])
    (REPORTS / "bench.json").write_text(json.dumps(report, indent=1))
    (REPORTS / "bench.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {REPORTS / 'bench.json'} and {REPORTS / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
