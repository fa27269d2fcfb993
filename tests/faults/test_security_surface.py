"""The claims of docs/security.md, each checked against the real running stack (tritonserver,
shard replicas, search API as `loupe serve` starts them)."""

from __future__ import annotations

import ipaddress

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def _stack_processes(stack) -> list[psutil.Process]:
    roots = [stack.api.process, stack.triton.process,
             *(p.process for procs in stack.shards.values() for p in procs)]
    out = []
    for root in roots:
        proc = psutil.Process(root.pid)
        out += [proc, *proc.children(recursive=True)]
    return out


def test_every_listening_socket_of_the_stack_is_on_loopback(fault_stack):
    listening = [(p.name(), c.laddr.ip, c.laddr.port)
                 for p in _stack_processes(fault_stack.stack)
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    # the API, 4 shard replicas, Triton's HTTP, gRPC and metrics ports at least
    assert len(listening) >= 8, listening
    def loopback(ip: str) -> bool:  # tritonserver's gRPC reports ::ffff:127.0.0.1
        addr = ipaddress.ip_address(ip)
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback

    assert all(loopback(ip) for _, ip, _ in listening), listening


@pytest.mark.parametrize("token", [None, b"", b"wrong-token", b"fault-admin-tokeN",
                                   b"fault-admin-token-and-more", "ünïcode".encode()])
def test_admin_endpoints_refuse_a_missing_or_wrong_token(fault_stack, token):
    headers = {} if token is None else {"X-Admin-Token": token}
    api = httpx.post(f"{fault_stack.url}/admin/rollback", headers=headers, timeout=10)
    shard = fault_stack.stack.shards[0][0]
    replica = httpx.post(f"{shard.url}/admin/expect-model", headers=headers, timeout=10,
                         json={"model_version": "loupe-embedder/99"})
    assert api.status_code == 401 and "X-Admin-Token" in api.json()["detail"]
    assert replica.status_code == 401 and "X-Admin-Token" in replica.json()["detail"]
    health = httpx.get(f"{shard.url}/healthz", timeout=10).json()
    assert "loupe-embedder/99" not in str(health)  # nothing changed


def test_the_admin_token_never_reaches_a_log(fault_stack):
    ok = httpx.post(f"{fault_stack.url}/admin/reload", timeout=30,
                    headers={"X-Admin-Token": fault_stack.admin_token})
    assert ok.status_code == 200
    logs = [fault_stack.stack.api.log_path,
            *(p.log_path for procs in fault_stack.stack.shards.values() for p in procs)]
    text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
    assert text and fault_stack.admin_token not in text


@pytest.mark.parametrize("path", [
    "/world/%2e%2e/%2e%2e/%2e%2e/etc/passwd",  # .. escaped past URL normalisation
    "/world/..%2f..%2f..%2fetc%2fpasswd",
    "/world//etc/passwd",  # absolute
    "/world/tables/catalog.parquet",  # inside the world, but not an image
    "/world/images/%00.jpg",
])
def test_the_demo_image_route_serves_only_images_under_the_world(fault_stack, path):
    r = httpx.get(fault_stack.url + path, timeout=10)
    assert r.status_code == 404 and b"root:" not in r.content and b"PAR1" not in r.content


def test_the_demo_image_route_serves_a_world_photo(fault_stack):
    r = httpx.get(f"{fault_stack.url}/world/images/scenes/scenes000002.jpg", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("version", ["../../../etc", "/etc/passwd", ".hidden", "a\u0000b"])
def test_a_cutover_cannot_name_a_path_outside_the_index(fault_stack, version):
    before = httpx.get(f"{fault_stack.url}/readyz", timeout=10).json()
    r = httpx.post(f"{fault_stack.url}/admin/cutover", json={"index_version": version},
                   headers={"X-Admin-Token": fault_stack.admin_token}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    after = httpx.get(f"{fault_stack.url}/readyz", timeout=10).json()
    assert after["index_version"] == before["index_version"]
