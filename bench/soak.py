"""Soak: the real stack under mixed traffic for a long run, with the faults and operations of
a production day overlapping, and what it did to latency, memory, fds and the delta log.

    .venv/bin/python bench/soak.py --minutes 20 [--work /tmp/loupe-soak]   (or `make soak`)

What runs: `serving.stack.ServingStack` with its supervisor, as `loupe serve` starts it
(tritonserver, 2 shards x 2 replicas, the search API) on the tiny world, and at once:
- searches at a steady rate (box queries from a room photo), every answer kept;
- the streaming indexer consuming a change feed that grows each minute (new listings, new
  photos of listed items, sold-out items), embedding with the live detector + embedder;
- kill -9 of a random shard replica at random times (one replica of a shard at a time, so a
  search never meets a whole shard down; the supervisor restarts it);
- a model rollout at 30% of the run (loupe-embedder/2 through `/admin/cutover`: Triton,
  replicas, pointer and API switch together), its rollback at 50%, and at 70% the weekly
  compaction DAG's steps (fold the delta into a new version, canary it, cut over); a switch
  that meets a replica being restarted gets a 503 and is retried, as the DAG tasks retry.
  (The delta is not pruned afterwards: its rows are the record the invariants read.)
Sampled every 10 s: RSS and open fds of every process (a restarted replica is a new
process), the delta log's bytes, the live index's age. Per minute: p50/p95/p99, requests,
errors, partial answers, and the samples' last values.

Invariants checked at the end (`invariants` in the report, exit 1 when one fails):
- every search answered 200, none partial (no whole shard was ever down);
- every feed event applied exactly once: the indexer's checkpoint reached the last offset
  (lost 0), no feed offset appears twice in the delta log (duplicated 0), and each item's
  last delta row is its last feed event's operation;
- RSS growth of the API and tritonserver (with its python stubs) to the end under
  `RSS_GROWTH_BOUND_MB`, and their open fds at most `FD_GROWTH_BOUND` more: the API's from
  minute 2 (a fifth of a short run), Triton's from the last sample before the rollout, when
  it served only the live version, as it does again after the compaction's cutover (each
  switch reloads every served version: new stub processes, so only equal states compare).
The operations run on their own thread, one after another; sampling goes on meanwhile, and
a last sample is taken once they are done.
Writes `reports/soak.json` and `reports/soak.png` (per-minute plot).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RSS_GROWTH_BOUND_MB = 64.0  # per long-lived process, from its baseline to the end
FD_GROWTH_BOUND = 16
PLAN = ((0.3, "rollout"), (0.5, "rollback"), (0.7, "compaction"))  # share of the run
OPERATIONS_GRACE_S = 180.0  # traffic goes on while a late operation finishes
MODEL_V1, MODEL_V2, DETECTOR = "loupe-embedder/1", "loupe-embedder/2", "loupe-detector/1"
ADMIN_TOKEN = "soak-admin-token"


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 20.0
    search_qps: float = 15.0
    feed_events_first_minute: int = 60
    feed_growth_per_minute: int = 20  # the feed grows: minute m brings first + m * growth
    kill_every_s: tuple[float, float] = (45.0, 120.0)  # uniform gap between replica kills
    seed: int = 0
    deadline_s: float = 1.0  # the fault suite's budget: kills are the fault, not CPU contention


@dataclass
class Answer:
    at: float
    status: int
    ms: float
    partial: bool = False


@dataclass
class Timeline:
    answers: list[Answer] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # kills, rollout, rollback, compaction
    feed_offsets: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, t0: float, kind: str, at: float | None = None, **info) -> None:
        """An event at `at` (monotonic; default now), as seconds into the run."""
        at = time.monotonic() if at is None else at
        with self.lock:
            self.events.append({"t_s": round(at - t0, 1), "kind": kind, **info})


# --------------------------------------------------------------------------- set-up
@dataclass
class SoakWorld:
    world: Path
    harvest: Path
    detector_dir: Path


def build_world(work: Path) -> SoakWorld:
    """The tiny world, its harvest and a briefly trained detector (the e2e recipe)."""
    from pipelines.harvest import HarvestConfig, harvest
    from pipelines.train_detector import DetectorTrainConfig, train_detector
    from pipelines.world import generate_world

    world = work / "world"
    if not (world / "tables" / "catalog.parquet").exists():
        generate_world("tiny", 0, world)
    harvested = harvest(world, work / "harvest", HarvestConfig(bootstrap=20),
                        quarantine_dir=work / "quarantine").out_dir
    det_cfg = DetectorTrainConfig(input_size=128, epochs=12, batch_size=8, lr=4e-3,
                                  latency_runs=3, grid_scenes=2, num_threads=1,
                                  log_mlflow=False, val_every_n_epochs=12)
    detector = train_detector(det_cfg, world, work / "detector").export_dir
    return SoakWorld(world, harvested, detector)


def _stage_second_model(sw: SoakWorld, paths, base: Path) -> str:
    """loupe-embedder/2 in Triton's repository and its index built beside the live one."""
    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder
    from pipelines.index import IndexParams
    from pipelines.serve import ServePaths, index_for_model
    from serving.triton.repository import add_version

    export_embedder(frozen_baseline(EmbedderSpec(seed=1)).eval(), base / "embedder_v2")
    add_version(paths.triton_repo, MODEL_V2, base / "embedder_v2", sw.detector_dir, DETECTOR)
    staging = ServePaths(base / "staging")
    v2 = index_for_model(sw.world, staging, MODEL_V2, base / "embedder_v2", sw.detector_dir,
                         DETECTOR, IndexParams.load())
    for sub, name in (("versions", v2), ("verdicts", f"{v2}.json")):
        (paths.index_root / sub / name).symlink_to(staging.index_root / sub / name)
    return v2


# --------------------------------------------------------------------------- workers
def _traffic(url: str, image: bytes, qps: float, stop: threading.Event, tl: Timeline) -> None:
    with httpx.Client(timeout=10) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            stop.wait(max(0.0, next_at - time.monotonic()))
            next_at += 1.0 / qps
            t0 = time.monotonic()
            try:
                r = client.post(f"{url}/v1/search", data={"box": "0.2,0.2,0.8,0.8", "k": "10"},
                                files={"image": ("q.jpg", image, "image/jpeg")})
                answer = Answer(t0, r.status_code, (time.monotonic() - t0) * 1000,
                                r.status_code == 200 and bool(r.json().get("partial")))
            except httpx.HTTPError:
                answer = Answer(t0, 0, (time.monotonic() - t0) * 1000)
            with tl.lock:
                tl.answers.append(answer)


def _feed_producer(feed, catalog, cfg: SoakConfig, stop: threading.Event, tl: Timeline,
                   rng: random.Random) -> None:
    from pipelines.ingest import FeedEvent

    items = catalog[["item_id", "image_path"]].to_records(index=False).tolist()
    minute, new = 0, 0
    while not stop.is_set():
        n = cfg.feed_events_first_minute + minute * cfg.feed_growth_per_minute
        for _ in range(n):
            if stop.wait(60.0 / n):
                return
            item, image = rng.choice(items)
            kind = rng.choices(("new", "updated", "sold_out"), (2, 5, 3))[0]
            if kind == "new":
                new += 1
                event = FeedEvent("new", f"soak-new-{new:06d}", image)
            else:
                event = FeedEvent(kind, item, image if kind == "updated" else None)
            offsets = feed.append([event])
            with tl.lock:
                tl.feed_offsets += offsets
        minute += 1


def _chaos(stack, cfg: SoakConfig, t0: float, stop: threading.Event, tl: Timeline,
           rng: random.Random) -> None:
    while not stop.wait(rng.uniform(*cfg.kill_every_s)):
        shard = rng.choice(sorted(stack.shards))
        procs = stack.shards[shard]
        if not all(p.alive() for procs_ in stack.shards.values() for p in procs_):
            continue  # a restart is still under way: never take a whole shard down
        replica = rng.randrange(len(procs))
        procs[replica].kill()
        tl.mark(t0, "kill -9", process=f"shard{shard}-r{replica}")


def _operations(steps: dict, cfg: SoakConfig, t0: float, stop: threading.Event,
                tl: Timeline, failed: list[BaseException], progress) -> None:
    """The day's operations at their share of the run, one after another (a rollback waits for
    its rollout), on their own thread so sampling and traffic go on while one runs."""
    try:
        for share, op in PLAN:
            if stop.wait(max(0.0, t0 + share * cfg.minutes * 60 - time.monotonic())):
                return
            started = time.monotonic()
            done = steps[op]()
            tl.mark(t0, op, at=started, to=done.get("to", done.get("index_version")),
                    model_version=done.get("model_version"), retries=done["retries"],
                    took_s=round(time.monotonic() - started, 1))
            progress(f"[soak] {op} at {started - t0:.0f} s took "
                     f"{time.monotonic() - started:.0f} s -> {done.get('model_version')}")
    except BaseException as err:  # re-raised by run_soak once the stack is stopped
        failed.append(err)


def _processes(stack) -> dict[str, psutil.Process]:
    named = {"api": stack.api.process, "tritonserver": stack.triton.process}
    named |= {f"shard{s}-r{r}": p.process for s, procs in stack.shards.items()
              for r, p in enumerate(procs)}
    out = {}
    for name, popen in named.items():
        try:
            out[name] = psutil.Process(popen.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def _sample(stack, index_root: Path, t0: float) -> dict:
    from serving.shards import layout, pointer

    procs = {}
    for name, proc in _processes(stack).items():
        try:
            family = [proc, *proc.children(recursive=True)]  # tritonserver's python stubs
            procs[name] = {"pid": proc.pid,
                           "rss_mb": round(sum(p.memory_info().rss for p in family) / 2**20, 1),
                           "fds": sum(p.num_fds() for p in family)}
        except psutil.NoSuchProcess:
            continue
    delta = sum(p.stat().st_size for p in index_root.glob(layout.DELTA_DB + "*"))
    manifest = pointer.live_manifest(index_root)
    built = datetime.fromisoformat(manifest["built_at"])
    return {"t_s": round(time.monotonic() - t0, 1), "processes": procs,
            "delta_log_bytes": delta, "index_version": manifest["index_version"],
            "index_age_s": round((datetime.now(UTC) - built).total_seconds(), 1)}


def _switch(url: str, path: str, body: dict | None = None, retry_for_s: float = 90.0
            ) -> dict:
    """An admin switch, retried on 503 as the rollout DAG's task retries ServingUnavailable
    (a replica being restarted after a kill refuses the switch); `retries` in the answer."""
    deadline, retries = time.monotonic() + retry_for_s, 0
    while True:
        r = httpx.post(f"{url}{path}", json=body, headers={"X-Admin-Token": ADMIN_TOKEN},
                       timeout=120)
        if r.status_code != 503 or time.monotonic() > deadline:
            if r.status_code != 200:
                raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
            return {**r.json(), "retries": retries}
        retries += 1
        time.sleep(2.0)


# --------------------------------------------------------------------------- the run
def run_soak(cfg: SoakConfig, work: Path, sw: SoakWorld | None = None,
             progress=print) -> dict:
    """Set up, soak for `cfg.minutes`, check the invariants; the report as a dict."""
    import pandas as pd

    from models.embedder import EmbedderSpec, frozen_baseline
    from models.export import export_embedder
    from pipelines.embed import catalog_treatment, embed_fn_from_export
    from pipelines.index import IndexParams, require_canary
    from pipelines.ingest import ChangeFeed, StreamingIndexer
    from pipelines.rollout import compact_once
    from pipelines.run_config import resolve_config
    from pipelines.serve import prepare
    from serving.shards import layout
    from serving.shards.delta import DeltaLog
    from serving.stack import ServingStack

    t_setup = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    sw = sw or build_world(work / "setup")
    base = work / "serving"
    shutil.rmtree(base, ignore_errors=True)  # this bench's own scratch: a rerun starts clean
    export_embedder(frozen_baseline(EmbedderSpec(seed=0)).eval(), base / "embedder_v1")
    paths = prepare(sw.world, base / "serve", base / "embedder_v1", MODEL_V1, sw.detector_dir,
                    DETECTOR, sw.harvest)
    v2 = _stage_second_model(sw, paths, base)
    index_cfg = resolve_config({"loupe_root": str(base), "world_root": str(sw.world),
                                "index_root": str(paths.index_root)}, {}, {})
    feed = ChangeFeed(base / "change_feed.sqlite")
    embed_v1 = catalog_treatment(base / "embedder_v1", sw.detector_dir, sw.world, DETECTOR)
    queries_v1 = embed_fn_from_export(base / "embedder_v1", sw.world)  # the canary's raters
    indexer = StreamingIndexer(feed, paths.index_root, embed_v1, MODEL_V1, batch_size=32)
    catalog = pd.read_parquet(sw.world / "tables" / "catalog.parquet")
    image = (sw.world / "images/scenes/scenes000002.jpg").read_bytes()
    tl = Timeline()
    stack = ServingStack(paths.triton_repo, paths.index_root, sw.world, paths.features,
                         base / "run", ADMIN_TOKEN, replicas=2, deadline_s=cfg.deadline_s,
                         supervise=True).start()
    setup_s = time.monotonic() - t_setup
    progress(f"[soak] stack up after {setup_s:.0f} s; soaking {cfg.minutes:g} min")
    stop, stop_indexer = threading.Event(), threading.Event()
    t0 = time.monotonic()
    workers = [threading.Thread(target=_traffic, args=(stack.url, image, cfg.search_qps, stop,
                                                        tl), daemon=True),
               threading.Thread(target=_feed_producer, args=(feed, catalog, cfg, stop, tl,
                                                             random.Random(cfg.seed + 1)),
                                daemon=True),
               threading.Thread(target=_chaos, args=(stack, cfg, t0, stop, tl,
                                                     random.Random(cfg.seed + 2)),
                                daemon=True)]
    indexing = threading.Thread(target=indexer.run, args=(stop_indexer, 0.1), daemon=True)

    def compaction() -> dict:
        built = compact_once(index_cfg, datetime.now(UTC))  # the weekly DAG's steps
        require_canary(paths.index_root, built["index_version"], sw.world,
                       IndexParams.load().canary, queries_v1,
                       expected_model_version=MODEL_V1)  # run_canary's check
        return _switch(stack.url, "/admin/cutover", {"index_version": built["index_version"]})

    steps = {"rollout": lambda: _switch(stack.url, "/admin/cutover", {"index_version": v2}),
             "rollback": lambda: _switch(stack.url, "/admin/rollback"),
             "compaction": compaction}
    failed: list[BaseException] = []
    operator = threading.Thread(target=_operations, args=(steps, cfg, t0, stop, tl, failed,
                                                          progress), daemon=True)
    try:
        for w in (*workers, indexing, operator):
            w.start()
        end = t0 + cfg.minutes * 60
        next_sample = t0
        while time.monotonic() < end or (operator.is_alive()
                                         and time.monotonic() < end + OPERATIONS_GRACE_S):
            now = time.monotonic()
            if now >= next_sample:
                tl.samples.append(_sample(stack, paths.index_root, t0))
                next_sample += 10.0
                minute = int((now - t0) // 60)
                if len(tl.samples) % 6 == 1:
                    with tl.lock:
                        n, bad = len(tl.answers), sum(a.status != 200 for a in tl.answers)
                    progress(f"[soak] minute {minute}: {n} searches, {bad} failed, "
                             f"{len(tl.feed_offsets)} feed events, "
                             f"{len(stack.supervisor.restarts)} restarts")
            time.sleep(0.2)
        tl.samples.append(_sample(stack, paths.index_root, t0))  # the end: every op done
        stop.set()
        for w in (*workers, operator):
            w.join(30)
        if failed:
            raise failed[0]
        if operator.is_alive():
            raise RuntimeError(f"the soak's operations were still running "
                               f"{OPERATIONS_GRACE_S:.0f} s after its end: {tl.events}")
        healed = time.monotonic() + 60  # a kill just before the end: let the supervisor act
        while not all(p.alive() for procs in stack.shards.values() for p in procs) \
                and time.monotonic() < healed:
            time.sleep(0.2)
        caught_up = time.monotonic() + 120
        while indexer.stats.checkpoint < feed.last_offset() and time.monotonic() < caught_up:
            time.sleep(0.2)
        stop_indexer.set()
        indexing.join(30)
        restarts = [{"name": r.name, "died_at_s": round(r.died_at - t0, 1),
                     "restart_s": None if r.serving_at is None else round(
                         r.serving_at - r.died_at, 2), "error": r.error}
                    for r in stack.supervisor.restarts]
    finally:
        stop.set()
        stop_indexer.set()
        stack.stop()
    delta = DeltaLog(paths.index_root / layout.DELTA_DB, create=False)
    try:
        rows = delta.rows_after(0)
        checkpoint = delta.checkpoint("indexer")
    finally:
        delta.close()
    last_offset = feed.last_offset()
    events = feed.read(0, last_offset + 1)
    feed.close()
    indexer.close()
    report = _report(cfg, setup_s, tl, restarts, rows, checkpoint, last_offset, events)
    report["versions"] = {"rollout_to": v2}
    return report


def _percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1),
            "p99_ms": round(float(p99), 1)}


def _growth(samples: list[dict], name: str, after_s: float) -> dict | None:
    """RSS and fd growth of one process from the first sample after `after_s` to the last,
    over samples of the same pid (a restarted process starts a new series)."""
    series = [s for s in samples if name in s["processes"]]
    if not series:
        return None
    pid = series[-1]["processes"][name]["pid"]
    same = [s for s in series if s["processes"][name]["pid"] == pid and s["t_s"] >= after_s]
    if len(same) < 2:
        return None
    first, last = same[0]["processes"][name], same[-1]["processes"][name]
    return {"from_s": same[0]["t_s"], "to_s": same[-1]["t_s"],
            "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
            "fd_growth": last["fds"] - first["fds"], "rss_mb_end": last["rss_mb"]}


def _report(cfg: SoakConfig, setup_s: float, tl: Timeline, restarts: list[dict], rows,
            checkpoint: int, last_offset: int, events) -> dict:
    answers = sorted(tl.answers, key=lambda a: a.at)
    t0 = answers[0].at if answers else 0.0
    minutes = []
    last_minute = int((answers[-1].at - t0) // 60) if answers else 0  # a late op runs on
    for m in range(max(int(np.ceil(cfg.minutes)), last_minute + 1)):
        inside = [a for a in answers if m * 60 <= a.at - t0 < (m + 1) * 60]
        ok = [a.ms for a in inside if a.status == 200]
        last = [s for s in tl.samples if s["t_s"] < (m + 1) * 60]
        minutes.append({"minute": m + 1, "requests": len(inside),
                        "errors": sum(a.status != 200 for a in inside),
                        "partial": sum(a.partial for a in inside), **_percentiles(ok),
                        **({"processes": last[-1]["processes"],
                            "delta_log_bytes": last[-1]["delta_log_bytes"],
                            "index_age_s": last[-1]["index_age_s"]} if last else {})})
    offsets = [r.feed_offset for r in rows]
    last_event = {e.item_id: e.op for e in events}
    last_row = {r.item_id: r.op for r in rows}
    from pipelines.ingest import FEED_OPS

    wrong_state = sorted(i for i, op in last_event.items() if last_row.get(i) != FEED_OPS[op])
    warm_s = min(120.0, 0.2 * cfg.minutes * 60)  # minute 2 of a long run
    operations = {op for _, op in PLAN}
    first_op_s = min((e["t_s"] for e in tl.events if e["kind"] in operations),
                     default=float("inf"))
    # Triton reloads every served version at each switch; the compaction's cutover leaves only
    # the live version loaded, as before the rollout: compare those two states
    before_ops = max((x["t_s"] for x in tl.samples if x["t_s"] < first_op_s), default=0.0)
    growth = {"api": _growth(tl.samples, "api", warm_s),
              "tritonserver": _growth(tl.samples, "tritonserver", before_ops)}
    feed = {"events": len(events), "checkpoint": checkpoint, "last_offset": last_offset,
            "lost": last_offset - checkpoint, "duplicated": len(offsets) - len(set(offsets)),
            "items_in_wrong_state": len(wrong_state), "delta_rows": len(rows)}
    totals = {"requests": len(answers), "errors": sum(a.status != 200 for a in answers),
              "partial": sum(a.partial for a in answers), **_percentiles(
                  [a.ms for a in answers if a.status == 200])}
    invariants = {
        "every_search_200_and_whole": totals["errors"] == 0 and totals["partial"] == 0,
        "feed_applied_exactly_once": feed["lost"] == 0 and feed["duplicated"] == 0
        and not wrong_state,
        "rss_growth_bounded": all(g is not None and g["rss_growth_mb"] < RSS_GROWTH_BOUND_MB
                                  for g in growth.values()),
        "no_fd_growth": all(g is not None and g["fd_growth"] <= FD_GROWTH_BOUND
                            for g in growth.values()),
        "every_kill_restarted": all(r["restart_s"] is not None for r in restarts)
        and len(restarts) >= sum(e["kind"] == "kill -9" for e in tl.events)}
    return {"config": asdict(cfg), "setup_s": round(setup_s, 1),
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "bounds": {"rss_growth_mb": RSS_GROWTH_BOUND_MB, "fd_growth": FD_GROWTH_BOUND},
            "totals": totals, "feed": feed, "growth": growth, "restarts": restarts,
            "events": tl.events, "per_minute": minutes, "invariants": invariants,
            "passed": all(invariants.values())}


def plot(report: dict, out: Path) -> Path:
    """Per-minute p50/p95/p99, requests and failures, RSS per process, delta log and index
    age, with the kills and the operations marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_minute"]
    x = [r["minute"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        axes[0, 0].plot(x, [r[key] for r in rows], marker="o", label=key.removesuffix("_ms"))
    axes[0, 0].set(title="search latency per minute (ms)", ylabel="ms")
    axes[0, 1].bar(x, [r["requests"] for r in rows], color="#9ab", label="requests")
    axes[0, 1].plot(x, [r["errors"] + r["partial"] for r in rows], "r-o",
                    label="errors + partial")
    axes[0, 1].set(title="searches per minute")
    names = sorted({n for r in rows for n in r.get("processes", {})})
    for name in names:
        axes[1, 0].plot(x, [r.get("processes", {}).get(name, {}).get("rss_mb") for r in rows],
                        label=name)
    axes[1, 0].set(title="RSS per process (MB; shard replicas restart after kills)",
                   xlabel="minute")
    axes[1, 1].plot(x, [r.get("delta_log_bytes", 0) / 1024 for r in rows], "g-o",
                    label="delta log (KiB)")
    ax2 = axes[1, 1].twinx()
    ax2.plot(x, [r.get("index_age_s", 0) / 60 for r in rows], "k--", label="index age (min)")
    axes[1, 1].set(title="delta log size and live index age", xlabel="minute")
    for ev in report["events"]:
        for ax in axes.flat:
            ax.axvline(ev["t_s"] / 60 + 0.5, color="red" if ev["kind"] == "kill -9" else "blue",
                       alpha=0.25 if ev["kind"] == "kill -9" else 0.6, lw=1)
    for ax in axes.flat:
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Loupe soak: {report['config']['minutes']:g} min, "
                 f"{report['totals']['requests']} searches, {len(report['restarts'])} "
                 f"restarts (red: kill -9; blue: rollout, rollback, compaction)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--qps", type=float, default=SoakConfig.search_qps)
    p.add_argument("--work", type=Path, default=Path("/tmp/loupe-soak"))
    p.add_argument("--out", type=Path, default=REPO / "reports" / "soak.json")
    args = p.parse_args(argv)
    import logging

    args.work.mkdir(parents=True, exist_ok=True)  # library logs there, Loupe's progress here
    logging.basicConfig(filename=args.work / "soak.log", level=logging.INFO, force=True)
    report = run_soak(SoakConfig(minutes=args.minutes, search_qps=args.qps), args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"{'minute':>6} {'requests':>8} {'errors':>6} {'partial':>7} {'p50':>7} {'p95':>7} "
          f"{'p99':>7} {'delta KiB':>9}")
    for r in report["per_minute"]:
        print(f"{r['minute']:>6} {r['requests']:>8} {r['errors']:>6} {r['partial']:>7} "
              f"{r['p50_ms']!s:>7} {r['p95_ms']!s:>7} {r['p99_ms']!s:>7} "
              f"{r.get('delta_log_bytes', 0) / 1024:>9.0f}")
    print(json.dumps({k: report[k] for k in ("totals", "feed", "growth", "invariants")},
                     indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
