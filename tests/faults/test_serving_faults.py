"""Process faults under live search traffic: kill -9 a shard replica, a whole shard, and
Triton, against the real stack (tritonserver, shard replica processes, search API).

A "failed query" is anything but a complete answer: a non-200 status, no response, a
non-JSON body, or a 200 flagged partial.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from serving.shards import layout

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]


def _failed(answers) -> list:
    return [a for a in answers if a.status != 200 or a.error or a.body.get("partial")]


def test_kill9_one_replica_under_load_fails_no_query(fault_stack, load_factory, counts):
    """SIGKILL one replica of each shard in turn while 3 clients search; the fan-out fails
    over to the other replica at once, then the killed one restarts on its port."""
    stack = fault_stack.stack
    counts.tried("3 clients searching; kill -9 shard0-r0, run 1.5 s, restart it; "
                 "kill -9 shard1-r1, run 1.5 s, restart it; run 1 s more")
    with load_factory() as load:
        t_start = time.monotonic()
        load.wait_for(20, t_start)
        kills = []
        for shard_id, replica in ((0, 0), (1, 1)):
            proc = stack.shards[shard_id][replica]
            t_kill = time.monotonic()
            proc.kill()
            assert not proc.alive()
            time.sleep(1.5)
            stack.restart_replica(shard_id, replica, fault_stack.model_version)
            kills.append((t_kill, time.monotonic()))
        t_back = time.monotonic()
        load.wait_for(20, t_back)
    during = [a for t0, t1 in kills for a in load.between(t0, t1)]
    failed = _failed(load.answers)
    counts.add(replica_kill_kills=len(kills), replica_kill_queries=len(load.answers),
               replica_kill_queries_while_down=len(during),
               replica_kill_failed_queries=len(failed))
    assert len(during) >= 20, "too little traffic while a replica was down"
    assert failed == [], failed[:5]
    assert max(a.seconds for a in during) < 1.0  # refused connections fail over fast
    for procs in stack.shards.values():
        assert all(p.alive() for p in procs)


def test_whole_shard_killed_gives_flagged_partials_never_5xx(fault_stack, load_factory,
                                                            counts):
    """Both replicas of shard 1 die: every answer is a 200 flagged partial that names shard
    1, holds only shard 0's items, and comes fast, and `/readyz` says the shard is missing
    (503) then degraded (one replica back); after both restart answers are whole."""
    stack = fault_stack.stack
    n_shards = len(stack.shards)
    counts.tried("3 clients searching; kill -9 both replicas of shard 1 for 2 s, restart; "
                 "/readyz asked while none, then one, then both are up")
    with load_factory() as load:
        load.wait_for(10, time.monotonic())
        t_kill = time.monotonic()
        for proc in stack.shards[1]:
            proc.kill()
        time.sleep(2.0)
        ready_none = httpx.get(f"{fault_stack.url}/readyz", timeout=10)
        ready_lb = httpx.get(f"{fault_stack.url}/readyz?partial_ok=true", timeout=10)
        t_restart = time.monotonic()
        stack.restart_replica(1, 0, fault_stack.model_version)
        ready_one = httpx.get(f"{fault_stack.url}/readyz", timeout=10)
        stack.restart_replica(1, 1, fault_stack.model_version)
        t_back = time.monotonic()
        load.wait_for(20, t_back)
    ready_all = httpx.get(f"{fault_stack.url}/readyz", timeout=10)
    down = load.between(t_kill + 0.2, t_restart)  # requests sent after the kill took effect
    after = load.between(t_back)
    server_errors = [a for a in load.answers if a.status >= 500 or a.status == 0]
    flagged = [a for a in down if a.status == 200 and a.body["partial"]
               and a.body["missing_shards"] == [1]]
    foreign = [i for a in flagged for i in a.body["items"]
               if layout.shard_of(i["item_id"], n_shards) != 0]
    counts.add(shard_kill_queries=len(load.answers), shard_kill_queries_while_down=len(down),
               shard_kill_flagged_partial=len(flagged), shard_kill_5xx=len(server_errors),
               shard_kill_whole_after_restart=sum(
                   1 for a in after if a.status == 200 and not a.body["partial"]),
               readyz_reports_missing_shard=ready_none.status_code == 503
               and ready_none.json()["missing_shards"] == [1])
    assert (ready_none.status_code, ready_none.json()["status"]) == (503, "missing_shards")
    assert ready_none.json()["replicas_up"] == {"0": "2/2", "1": "0/2"}
    assert (ready_lb.status_code, ready_lb.json()["missing_shards"]) == (200, [1])
    assert (ready_one.status_code, ready_one.json()["status"]) == (200, "degraded")
    assert ready_one.json()["degraded_shards"] == [1]
    assert (ready_all.status_code, ready_all.json()["status"]) == (200, "ready")
    gauges = httpx.get(f"{fault_stack.url}/metrics").text
    assert 'loupe_shard_replicas_up{shard="1"} 2.0' in gauges
    assert "loupe_shards_missing 0.0" in gauges
    assert server_errors == [], server_errors[:5]
    assert len(down) >= 20 and len(flagged) == len(down), [a.body for a in down][:3]
    assert all(a.body["items"] for a in flagged) and foreign == []
    assert max(a.seconds for a in down) < 1.0
    assert after and _failed(after) == []


def test_triton_killed_under_load_gives_clear_503s_then_recovers(fault_stack, load_factory,
                                                                 counts):
    """kill -9 tritonserver (its process group: the server and its python-backend stubs, as
    a crashed host) while 3 clients search, start it again on the same ports: while
    it is down every answer is a prompt 503 with a JSON reason (no hang, no 500), /readyz
    says 503, and searches succeed again soon after Triton is ready."""
    stack = fault_stack.stack
    triton = stack.triton
    counts.tried("3 clients searching; kill -9 tritonserver, 3 s down, restart it on the "
                 "same ports, wait for the API to answer 200 again")
    with load_factory() as load:
        load.wait_for(10, time.monotonic())
        t_kill = time.monotonic()
        os.killpg(triton.process.pid, signal.SIGKILL)  # the server and its model stubs
        triton.process.wait()
        time.sleep(3.0)
        ready_while_down = httpx.get(f"{fault_stack.url}/readyz", timeout=10)
        t_restart = time.monotonic()
        triton.start_process()
        triton.wait_ready(120)
        t_ready = time.monotonic()
        recovered_at = None
        while time.monotonic() - t_ready < 60:
            ok = [a for a in load.between(t_ready) if a.status == 200]
            if ok:
                recovered_at = min(a.at + a.seconds for a in ok)
                break
            time.sleep(0.05)
        t_end = time.monotonic()
        load.wait_for(10, t_end)
    down = load.between(t_kill + 0.5, t_restart)
    window = load.between(t_kill, t_ready)
    bad = [a for a in window if a.status not in (200, 503) or a.error]
    unclear = [a for a in window if a.status == 503 and "unavailable" not in a.body["detail"]]
    counts.add(triton_restart_queries=len(load.answers),
               triton_restart_queries_while_down=len(down),
               triton_restart_503=sum(1 for a in load.answers if a.status == 503),
               triton_restart_500=sum(1 for a in load.answers if a.status == 500),
               triton_restart_no_response=sum(1 for a in load.answers if a.status == 0),
               triton_restart_max_s_while_down=round(max(a.seconds for a in down), 3),
               triton_restart_down_s=round(t_ready - t_kill, 2),
               triton_restart_recovery_s=round((recovered_at or float("nan")) - t_ready, 2))
    assert ready_while_down.status_code == 503
    assert "not ready" in ready_while_down.json()["detail"]
    assert len(down) >= 10 and all(a.status == 503 for a in down), [
        (a.status, a.body) for a in down if a.status != 503][:5]
    assert bad == [] and unclear == [], (bad + unclear)[:5]
    assert max(a.seconds for a in down) < 2.5  # refused at once, not held to the timeout
    # the API's gRPC channel retries Triton at most 1 s apart (serving/api/triton_client.py)
    assert recovered_at is not None and recovered_at - t_ready < 3.0
    after = load.between(t_end)
    assert after and _failed(after) == []
    assert httpx.get(f"{fault_stack.url}/readyz", timeout=10).status_code == 200


def test_supervisor_restarts_a_killed_replica_and_tritonserver(fault_stack, load_factory,
                                                               counts):
    """With the stack's supervisor on (as `loupe serve` and `make demo` run it), kill -9 of a
    shard replica and of tritonserver needs no hand: each is back on its ports and serving
    within seconds, `/readyz` is whole again, and searches never fail for the replica."""
    from serving.stack import Supervisor

    stack = fault_stack.stack
    counts.tried("supervisor on; 3 clients searching; kill -9 shard0-r1, wait for it to "
                 "serve again; kill -9 tritonserver's process group, wait for 200s again")
    supervisor = Supervisor(stack).start()
    try:
        with load_factory() as load:
            load.wait_for(10, time.monotonic())
            victim = stack.shards[0][1]
            t_kill = time.monotonic()
            victim.kill()
            while not (stack.shards[0][1] is not victim and stack.shards[0][1].alive()
                       and supervisor.restarts):
                assert time.monotonic() - t_kill < 60, "replica not restarted in 60 s"
                time.sleep(0.05)
            replica_restart_s = supervisor.restarts[0].serving_at - t_kill
            t_replica_back = time.monotonic()
            load.wait_for(10, t_replica_back)
            os.killpg(stack.triton.process.pid, signal.SIGKILL)
            t_triton = time.monotonic()
            while len(supervisor.restarts) < 2:
                assert time.monotonic() - t_triton < 180, "tritonserver not restarted"
                time.sleep(0.1)
            recovered = None
            while recovered is None and time.monotonic() - t_triton < 240:
                ok = [a for a in load.between(t_triton) if a.status == 200]
                recovered = min((a.at + a.seconds for a in ok), default=None)
                time.sleep(0.05)
            load.wait_for(10, time.monotonic())
        ready = httpx.get(f"{fault_stack.url}/readyz", timeout=10)
    finally:
        supervisor.stop()
        fault_stack.heal()
    [replica, triton] = supervisor.restarts
    during_replica = load.between(t_kill, t_replica_back)
    counts.add(replica_restart_s=round(replica_restart_s, 2),
               triton_supervised_restart_s=round(triton.serving_at - t_triton, 2),
               replica_restart_failed_queries=len(_failed(during_replica)))
    assert (replica.name, triton.name) == ("shard0-r1", "tritonserver")
    assert replica_restart_s < 30 and triton.serving_at is not None
    assert _failed(during_replica) == [], during_replica[:3]
    assert recovered is not None, "no 200 after tritonserver came back"
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text


async def _post_search(client, url: str, image: bytes) -> tuple[int, float, str | None]:
    """One full search (detector, crop, embed, fan-out): (status, seconds, Retry-After)."""
    t0 = time.monotonic()
    try:
        r = await client.post(f"{url}/v1/search", data={"k": "5"},
                              files={"image": ("q.jpg", image, "image/jpeg")})
        return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")
    except httpx.HTTPError:
        return 0, time.monotonic() - t0, None


async def _closed_loop(url: str, image: bytes, clients: int, seconds: float) -> list:
    """`clients` searching back to back for `seconds`: what the stack can serve."""
    import asyncio

    async with httpx.AsyncClient(timeout=20) as client:
        stop = time.monotonic() + seconds

        async def worker():
            out = []
            while time.monotonic() < stop:
                out.append(await _post_search(client, url, image))
            return out

        return [a for w in await asyncio.gather(*(worker() for _ in range(clients)))
                for a in w]


def _search_request(host: str, image: bytes) -> bytes:
    """One full-search request, encoded once: the open-loop sender only writes bytes."""
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + image +
            b'\r\n--b\r\nContent-Disposition: form-data; name="k"\r\n\r\n5\r\n--b--\r\n')
    return (f"POST /v1/search HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(part)}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode() + part


async def _open_loop(url: str, image: bytes, rate: float, seconds: float
                     ) -> tuple[list, float]:
    """Requests sent at a fixed rate whatever the answers (offered load, not closed-loop),
    over raw keep-alive connections so the sender stays far cheaper than the server; also
    how far the sender fell behind its schedule (s), so a slow client would show."""
    import asyncio
    from urllib.parse import urlparse

    where = urlparse(url)
    request = _search_request(where.netloc, image)
    idle: list = []
    errors: list[str] = []

    async def exchange(reader, writer) -> tuple[int, str | None]:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(h.lower().split(": ", 1) for h in head[1:] if ": " in h)
        await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            writer.close()
        else:
            idle.append((reader, writer))
        return int(head[0].split()[1]), headers.get("retry-after")

    async def one() -> tuple[int, float, str | None]:
        t0 = time.monotonic()
        answer = None
        try:
            if idle:
                try:
                    answer = await exchange(*idle.pop())
                except (OSError, asyncio.IncompleteReadError):
                    pass  # closed by the server while idle: retry once, on a new connection
            if answer is None:
                answer = await exchange(*await asyncio.open_connection(where.hostname,
                                                                       where.port))
        except (OSError, asyncio.IncompleteReadError) as err:
            errors.append(repr(err))
            return 0, time.monotonic() - t0, None
        return answer[0], time.monotonic() - t0, answer[1]

    start, tasks, lag = time.monotonic(), [], 0.0
    for i in range(int(rate * seconds)):
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        lag = max(lag, time.monotonic() - due)
        tasks.append(asyncio.create_task(one()))
    answers = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for _, writer in idle:
        writer.close()
    assert not errors, f"{len(errors)} requests got no answer: {errors[:3]}"
    return answers, lag



def _p99(values) -> float:
    import numpy as np

    return float(np.percentile(values, 99))


def test_overload_at_four_times_capacity_sheds_fast_and_recovers(fault_stack, counts):
    """Capacity of full searches (detector included) is measured first with 8 clients (the
    API's `max_in_flight`); then 4x that rate arrives open-loop for 10 s. The excess gets
    fast 503s with Retry-After, never a timeout or another status; the admitted searches
    keep a bounded latency (without admission every request queues and latency grows with
    the backlog); afterwards single searches answer at their usual speed."""
    import asyncio

    image = (fault_stack.world / "images/scenes/scenes000002.jpg").read_bytes()
    url = fault_stack.url
    measured = asyncio.run(_closed_loop(url, image, clients=8, seconds=5.0))
    assert {status for status, _, _ in measured} == {200}
    capacity_qps = len(measured) / 5.0
    capacity_p99 = _p99([s for _, s, _ in measured])
    rate = 4 * capacity_qps
    counts.tried(f"capacity {capacity_qps:.0f} full searches/s with 8 clients; then "
                 f"{rate:.0f}/s open-loop for 10 s; then 1 client for 3 s")
    answers, lag = asyncio.run(_open_loop(url, image, rate, 10.0))
    admitted = [s for status, s, _ in answers if status == 200]
    shed = [(s, retry) for status, s, retry in answers if status == 503]
    others = [status for status, _, _ in answers if status not in (200, 503)]
    after = asyncio.run(_closed_loop(url, image, clients=1, seconds=3.0))
    counts.add(overload_capacity_qps=round(capacity_qps, 1),
               overload_offered_qps=round(rate, 1), overload_requests=len(answers),
               overload_sender_lag_s=round(lag, 2),
               overload_shed_fraction=round(len(shed) / len(answers), 3),
               overload_p99_admitted_ms=round(_p99(admitted) * 1000, 1),
               overload_p99_shed_ms=round(_p99([s for s, _ in shed]) * 1000, 1),
               overload_capacity_p99_ms=round(capacity_p99 * 1000, 1))
    assert lag < 1.0, f"the sender fell {lag:.1f} s behind: the offered load is not 4x"
    assert others == [], f"{len(others)} answers neither 200 nor 503: {others[:5]}"
    assert len(shed) / len(answers) > 0.4, "4x capacity was not shed"
    assert all(retry == "1" for _, retry in shed)
    assert _p99([s for s, _ in shed]) < 1.0  # a refusal is fast: at most the 100 ms queue wait
    assert _p99(admitted) < max(3 * capacity_p99, 0.5), (_p99(admitted), capacity_p99)
    assert {status for status, _, _ in after} == {200}
    assert _p99([s for _, s, _ in after]) < max(2 * capacity_p99, 0.5)


def test_a_shard_file_that_rotted_on_disk_is_refused_and_serving_continues(
        fault_stack, load_factory, counts):
    """Bytes of the live shard 0 index flipped on disk (bit rot, a bad copy), then its
    replica r1 restarted: the replica checks every file against the manifest's sha256,
    refuses to start and says which file, while r0 (loaded before the rot) serves every
    search whole. Restored, the replica starts again."""
    import shutil

    from serving.shards import pointer

    stack = fault_stack.stack
    vdir = layout.version_dir(stack.index_root, pointer.read(stack.index_root))
    index_file = layout.shard_dir(vdir, 0) / layout.INDEX_FILE
    counts.tried("3 clients searching; invert 64 bytes in the middle of the live shard 0 "
                 "index file; restart shard0-r1 on it; restore the file; restart again")
    backup = index_file.with_name(index_file.name + ".bak")
    shutil.copy2(index_file, backup)
    served = 0
    try:
        with load_factory() as load:
            load.wait_for(10, time.monotonic())
            with index_file.open("r+b") as f:
                f.seek(index_file.stat().st_size // 2)
                rotted = bytes(b ^ 0xFF for b in f.read(64))
                f.seek(-len(rotted), os.SEEK_CUR)
                f.write(rotted)
            t_rot = time.monotonic()
            with pytest.raises(RuntimeError) as refused:
                stack.restart_replica(0, 1, fault_stack.model_version, timeout_s=60)
                served = 1  # the corrupted replica came up and would have answered
            load.wait_for(20, t_rot)
            shutil.copy2(backup, index_file)
            stack.restart_replica(0, 1, fault_stack.model_version)
            t_back = time.monotonic()
            load.wait_for(10, t_back)
    finally:
        if backup.exists():
            shutil.copy2(backup, index_file)
            backup.unlink()
        fault_stack.heal()
    during = load.between(t_rot, t_back)
    counts.add(corrupt_shard_served=served, corrupt_shard_queries_meanwhile=len(during),
               corrupt_shard_failed_queries=len(_failed(during)))
    message = str(refused.value)
    assert "does not match the manifest" in message and "corrupted shard" in message
    assert str(index_file) in message
    assert len(during) >= 20 and _failed(during) == [], _failed(during)[:3]
    assert all(p.alive() for p in stack.shards[0])


def test_a_multi_gb_chunked_upload_is_refused_while_it_streams(fault_stack, counts):
    """A client streams a 2 GiB chunked body at the real uvicorn API: the server answers 413
    once the limit passes and closes the connection, having read a few MiB, so its RSS
    stays put; the next search is served."""
    import socket
    from urllib.parse import urlparse

    import psutil

    api = psutil.Process(fault_stack.stack.api.process.pid)

    def rss() -> int:  # the API process and any workers it forked
        return sum(p.memory_info().rss for p in (api, *api.children(recursive=True)))

    url = urlparse(fault_stack.url)
    rss_before = rss()
    chunk = b"\0" * (1 << 20)
    sent, offered = 0, 2 << 30
    counts.tried("2 GiB chunked multipart upload to /v1/search over a raw socket, 1 MiB "
                 "chunks until the server stops reading")
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")  # a well-formed start, then 2 GiB
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < offered:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server answered and closed: the rest is never read
            pass
        sock.settimeout(10)
        try:
            head = sock.recv(4096)
        except OSError:
            head = b""
    growth_mb = (rss() - rss_before) / 2**20
    counts.add(big_upload_offered_mb=offered >> 20, big_upload_sent_mb=sent >> 20,
               big_upload_rss_growth_mb=round(growth_mb, 1))
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent < 256 << 20, f"the server read {sent >> 20} MiB before refusing"
    assert growth_mb < 64, f"API RSS grew {growth_mb:.0f} MiB"
    image, box = fault_stack.box_query()
    r = httpx.post(f"{fault_stack.url}/v1/search", data={"box": box, "k": "5"},
                   files={"image": ("q.jpg", image, "image/jpeg")}, timeout=30)
    assert r.status_code == 200
