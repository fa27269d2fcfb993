"""Shard-call benchmark: what one fan-out call to a shard replica costs, by where the CPU
goes, for the JSON route and the float32 route side by side in one run.

    .venv/bin/python bench/shard_protocol.py [--work /tmp/loupe-bench-index] [--calls 2000]

One real shard replica process (`python -m serving.shards.server`, as `ServingStack` starts
it) serves shard 0 of the large world's index (bench/index.py's vectors and build, reused
from `--work` when it holds them). Calls are sequential, k = 150 (the serving path's
`shard_k`), and alternate between the routes in blocks, so all see the same machine:
- `json`: `POST /search`, the vector as a JSON list, one object per hit back (httpx);
- `f32_httpx`: `POST /search/f32`, the vector as raw float32 bytes, two columns back, posted
  by httpx (the search API's client before it moved to aiohttp);
- `f32`: the same route through the search API's own client code
  (`serving.api.fanout.Fanout` over `ShardClient`, aiohttp; one replica, no hedging).
Measured per call: the replica's CPU (utime + stime from /proc), the client's CPU, and the
store's search alone in this process (ANN + tombstones + delta merge), so the replica's
"machinery" (HTTP, parsing, encoding) is its CPU minus the store's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import faiss
import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.index import MODEL, SEED, large_catalog, query_vectors  # noqa: E402
from pipelines.embed import (  # noqa: E402
    EmbedParams,
    attribute_embed_fn,
    load_embeddings,
    reembed,
)
from pipelines.index import IndexParams, publish  # noqa: E402
from serving.api.fanout import (  # noqa: E402
    F32_HEADERS,
    Fanout,
    LatencyTracker,
    ShardClient,
    ShardHit,
    ShardQuery,
    ShardTopology,
)
from serving.shards import ShardStore, layout, pointer  # noqa: E402
from serving.shards.server import F32_ROUTE  # noqa: E402
from serving.stack import ServiceProcess  # noqa: E402
from serving.triton.server import free_port  # noqa: E402

VERSION = "hnsw"  # bench/index.py's version id
K = 150  # serving.api.search's candidates per shard at the default grid: must match shard_k
BLOCK = 100  # calls per route before switching to the other


def index_root(work: Path) -> Path:
    """bench/index.py's index under `work`, built here the same way when it is missing."""
    root = work / "indexes"
    if (layout.version_dir(root, VERSION) / layout.MANIFEST).is_file():
        if pointer.read(root) == VERSION:
            return root
    world = large_catalog(work)
    embeddings = work / "embeddings"
    try:
        load_embeddings(embeddings)
    except (FileNotFoundError, ValueError):  # none yet, or unfinished: (re)run it
        reembed(world, MODEL, attribute_embed_fn(world, SEED), embeddings, None, 8192,
                n_partitions=EmbedParams.load().n_partitions, validate=True,
                show_progress=False)
    publish(embeddings, root, world, IndexParams.load(), VERSION, expected_model_version=MODEL)
    return root


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def json_call(client: httpx.AsyncClient, url: str, vector: np.ndarray) -> list:
    r = await client.post(f"{url}/search", json={"vector": vector.tolist(), "k": K,
                                                 "model_version": MODEL})
    r.raise_for_status()
    return [ShardHit(h["item_id"], float(h["score"]), 0) for h in r.json()["hits"]]


async def f32_httpx_call(client: httpx.AsyncClient, url: str, vector: np.ndarray) -> list:
    query = ShardQuery.of(vector, K, MODEL, None)
    r = await client.post(f"{url}{F32_ROUTE}", content=query.vector, params=query.params,
                          headers=F32_HEADERS)
    r.raise_for_status()
    body = r.json()
    return [ShardHit(i, s, 0) for i, s in zip(body["item_ids"], body["scores"], strict=True)]


async def measure(url: str, pid: int, queries: np.ndarray, calls: int) -> dict:
    """Per route: replica CPU, client CPU and wall time per call, blocks interleaved."""
    client, shards = httpx.AsyncClient(timeout=10), ShardClient(timeout_s=10)
    fanout = Fanout(ShardTopology({0: [url]}), shards, LatencyTracker(), hedge=False)
    routes = {"json": lambda q: json_call(client, url, q),
              "f32_httpx": lambda q: f32_httpx_call(client, url, q),
              "f32": lambda q: fanout.search(q, K, deadline_s=10.0,
                                             expect_model_version=MODEL)}
    totals = {name: {"server_s": 0.0, "client_s": 0.0, "wall_s": 0.0, "calls": 0}
              for name in routes}
    for call in routes.values():  # warm both (connections, first-call costs)
        for q in queries[:20]:
            await call(q)
    i = 0
    while i < calls:
        for name, call in routes.items():
            block = queries[(np.arange(BLOCK) + i) % len(queries)]
            s0, c0, w0 = cpu_s(pid), time.process_time(), time.perf_counter()
            for q in block:
                await call(q)
            t = totals[name]
            t["server_s"] += cpu_s(pid) - s0
            t["client_s"] += time.process_time() - c0
            t["wall_s"] += time.perf_counter() - w0
            t["calls"] += len(block)
        i += BLOCK
    await client.aclose()
    await shards.close()
    return {name: {"server_cpu_ms": 1000 * t["server_s"] / t["calls"],
                   "client_cpu_ms": 1000 * t["client_s"] / t["calls"],
                   "wall_ms": 1000 * t["wall_s"] / t["calls"], "calls": t["calls"]}
            for name, t in totals.items()}


def store_alone_ms(root: Path, queries: np.ndarray) -> float:
    """The replica's search work without HTTP: ShardStore.search in this process."""
    store = ShardStore(root, 0, MODEL, verify_checksums=False)
    store.load()
    for q in queries[:20]:
        store.search(q, K)
    c0 = time.process_time()
    for q in queries:
        store.search(q, K)
    return 1000 * (time.process_time() - c0) / len(queries)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loupe-bench-index"))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_shard_protocol.json")
    args = ap.parse_args(argv)
    root = index_root(args.work)
    queries = query_vectors(large_catalog(args.work), 1000)
    faiss.omp_set_num_threads(1)  # a replica answers one query per call on one thread
    alone = store_alone_ms(root, queries)
    features = args.work / "features.parquet"
    pd.read_parquet(large_catalog(args.work) / "tables" / "catalog.parquet")[
        ["item_id", "available", "region"]].to_parquet(features)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    replica = ServiceProcess("shard0-bench", [
        "-m", "serving.shards.server", "--index-root", str(root), "--shard", "0",
        "--model-version", MODEL, "--features", str(features)], free_port(),
        args.work / "shard0-bench.log", env).start()
    try:
        replica.wait_ready()
        load0 = os.getloadavg()
        routes = asyncio.run(measure(replica.url, replica.process.pid, queries, args.calls))
    finally:
        replica.stop()
    for r in routes.values():
        r["machinery_cpu_ms"] = r["server_cpu_ms"] - alone
    report = {
        "what": "one fan-out call to a real shard replica, k=150, sequential; the JSON and "
                "float32 routes interleaved in blocks of 100 (bench/shard_protocol.py)",
        "shard_items": layout.read_manifest(layout.version_dir(root, VERSION))["shards"][0][
            "count"],
        "store_search_cpu_ms": alone, "routes": routes,
        "server_cpu_f32_over_json": routes["f32"]["server_cpu_ms"]
        / routes["json"]["server_cpu_ms"],
        "client_cpu_f32_over_json": routes["f32"]["client_cpu_ms"]
        / routes["json"]["client_cpu_ms"],
        "machinery_f32_over_json": routes["f32"]["machinery_cpu_ms"]
        / routes["json"]["machinery_cpu_ms"],
        # the same route and replica, the API's aiohttp client against httpx
        "client_cpu_aiohttp_over_httpx": routes["f32"]["client_cpu_ms"]
        / routes["f32_httpx"]["client_cpu_ms"],
        "loadavg": {"start": load0, "end": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'route':9} {'replica CPU ms':>15} {'of it machinery':>16} {'client CPU ms':>14} "
          f"{'wall ms':>8}")
    for name, r in routes.items():
        print(f"{name:9} {r['server_cpu_ms']:15.3f} {r['machinery_cpu_ms']:16.3f} "
              f"{r['client_cpu_ms']:14.3f} {r['wall_ms']:8.3f}")
    print(f"store search alone: {alone:.3f} ms/call; f32/json replica CPU "
          f"{report['server_cpu_f32_over_json']:.2f}, client CPU "
          f"{report['client_cpu_f32_over_json']:.2f}, aiohttp/httpx client CPU "
          f"{report['client_cpu_aiohttp_over_httpx']:.2f}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
