"""Fuzz the live search API: schemathesis cases from its own OpenAPI spec (valid and
schema-violating), and a corpus of malformed images, boxes and request encodings. The
contract: never a 5xx, and every refusal is a 4xx JSON body with a `detail` reason.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter

import httpx
import pytest
import requests
from PIL import Image

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]
EXAMPLES = 30  # per operation and generation mode


def _refusal_problems(status: int, content_type: str, text: str) -> str | None:
    """Why a response breaks the contract (None when it keeps it)."""
    if status >= 500:
        return f"{status}: {text[:200]}"
    if status >= 400:
        if not content_type.startswith("application/json"):
            return f"{status} without JSON: {content_type!r}"
        try:
            body = json.loads(text)
        except ValueError:
            return f"{status} with a body that is not JSON"
        if not body.get("detail"):
            return f"{status} without a detail: {text[:200]}"
    return None


def test_schemathesis_cases_from_the_openapi_spec_never_get_a_5xx(fault_stack, counts):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    url = fault_stack.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    seen: Counter = Counter()
    broken: list[tuple[str, str]] = []
    session = requests.Session()
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    def fuzz(op, mode, token: str | None) -> None:
        headers = {"X-Admin-Token": token} if token else None

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def hit(case):
            response = case.call(base_url=url, session=session, timeout=15, headers=headers)
            seen[response.status_code] += 1
            ctype = response.headers.get("content-type", [""])  # header -> list of values
            problem = _refusal_problems(response.status_code, ctype[0], response.text)
            if problem:
                broken.append((f"{op.label} {mode.value}", problem))

        try:
            hit()
        except Unsatisfiable:  # nothing to break: the operation takes no input
            assert mode == schemathesis.GenerationMode.NEGATIVE, op.label

    for op in operations:
        for mode in modes:
            fuzz(op, mode, None)
            if op.path.startswith("/admin"):  # with the real token the handlers run too
                fuzz(op, mode, fault_stack.admin_token)
    requests_sent = sum(seen.values())
    server_errors = sum(n for status, n in seen.items() if status >= 500)
    counts.tried(f"schemathesis {schemathesis.__version__}: up to {EXAMPLES} positive and "
                 f"{EXAMPLES} negative cases for each of {len(operations)} operations "
                 f"({', '.join(op.label for op in operations)}); admin ones with and "
                 "without the token")
    counts.add(fuzz_schema_requests=requests_sent, fuzz_schema_5xx=server_errors,
               fuzz_schema_contract_breaks=len(broken))
    print("statuses:", dict(sorted(seen.items())))
    assert broken == [], broken[:10]
    assert requests_sent >= 200 and seen[200] > 0 and seen[422] > 0
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


# --------------------------------------------------------------------------- image corpus
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def _malformed_images(scene: bytes, bomb: bytes) -> dict[str, bytes]:
    png = _encode(Image.new("RGB", (96, 64), (10, 200, 30)), "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[40:60] = b"\xff" * 20  # inside IDAT: bad CRC and a broken stream
    return {
        "empty": b"",
        "one byte": b"\xff",
        "jpeg magic only": b"\xff\xd8\xff\xe0",
        "jpeg truncated at 100 bytes": scene[:100],
        "jpeg truncated at half": scene[: len(scene) // 2],
        "jpeg without its last 200 bytes": scene[:-200],
        "jpeg header + garbage": scene[:600] + bytes(range(256)) * 40,
        "png truncated in IDAT": png[: len(png) - 30],
        "png magic only": png[:8],
        "png corrupted IDAT": bytes(corrupt_png),
        "png claims 65535x65535": _png_header_only(65535, 65535),
        "png claims 4097x4096": _png_header_only(4097, 4096),
        "decompression bomb 20000^2": bomb,
        "pdf": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n" * 20,
        "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
        "json": b'{"image": "aGVsbG8="}',
        "zip": b"PK\x03\x04" + b"\0" * 200,
        "elf": b"\x7fELF\x02\x01\x01" + b"\0" * 500,
        "zeros 4 KiB": b"\0" * 4096,
        "random bytes": bytes((i * 7919 + 13) % 256 for i in range(5000)),
        "gif truncated": _encode(Image.new("P", (40, 40)), "GIF")[:30],
        "bmp truncated": _encode(Image.new("RGB", (40, 40)), "BMP")[:80],
        "tiff header only": _encode(Image.new("RGB", (40, 40)), "TIFF")[:16],
        "over 8 MiB": scene + b"\0" * (8 * 1024 * 1024),
    }


def _odd_but_valid_images() -> dict[str, bytes]:
    """Decodable images with unusual modes, formats and shapes: served, not refused."""
    rgb = Image.new("RGB", (80, 60), (120, 30, 200))
    frames = [Image.new("P", (32, 32), i) for i in (1, 50, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return {
        "cmyk jpeg": _encode(rgb.convert("CMYK"), "JPEG"),
        "grey jpeg": _encode(rgb.convert("L"), "JPEG"),
        "progressive jpeg": _encode(rgb, "JPEG", progressive=True),
        "rgba png": _encode(rgb.convert("RGBA"), "PNG"),
        "palette png with transparency": _encode(rgb.convert("P"), "PNG", transparency=0),
        "16-bit grey png": _encode(Image.new("I;16", (50, 50), 40000), "PNG"),
        "1-bit png": _encode(rgb.convert("1"), "PNG"),
        "1x1 png": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "1x4000 png": _encode(Image.new("RGB", (1, 4000), (9, 9, 9)), "PNG"),
        "4000x1 png": _encode(Image.new("RGB", (4000, 1), (9, 9, 9)), "PNG"),
        "animated gif": buf.getvalue(),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "webp": _encode(rgb, "WEBP"),
    }


BAD_BOXES = ["0.5,0.5,1.4,0.9", "-0.1,0,1,1", "0,0,1.0000001,1", "0.6,0.1,0.2,0.9",
             "0.5,0.5,0.5,0.9", "0,0,1", "0,0,1,1,1", "left,top,right,bottom", "nan,0,1,1",
             "inf,0,1,1", "1e309,0,1,1", "0x1,0,1,1", ",,,", "0;0;1;1", "0," * 5000,
             "\x00,0,1,1", "0.1 0.1 0.9 0.9"]
BAD_FORMS = [{"k": "0"}, {"k": "-5"}, {"k": "101"}, {"k": "1e3"}, {"k": "ten"},
             {"k": str(10**30)}, {"box_index": "-1"}, {"box_index": "999"},
             {"box_index": str(10**30)}, {"box_index": "x"}, {"box": "0,0,1,1", "box_index": "0"}]


WORLD_PATHS = ["%00", "a%00.jpg", "images/scenes/x%00.jpg", "a" * 5000 + ".jpg",
               "images/" + "b" * 300 + "/c.jpg", "..%2f..%2fetc%2fpasswd",
               "%2e%2e/%2e%2e/etc/hostname.jpg", "images/scenes/", "tables/catalog.parquet"]

ADMIN_VERSIONS = ["..", "a/b", "\x00", "v" * 5000, "current", "versions", " ", "é" * 200]


def test_malformed_images_boxes_and_encodings_get_clear_4xx(fault_stack, counts, bomb_png):
    url = fault_stack.url
    scene, _ = fault_stack.box_query()
    results: list[tuple[str, int, str | None]] = []

    def send(name: str, path: str, **kw) -> httpx.Response:
        r = httpx.post(f"{url}{path}", timeout=30, **kw)
        results.append((f"{path} {name}", r.status_code,
                        _refusal_problems(r.status_code, r.headers.get("content-type", ""),
                                          r.text)))
        return r

    def image(data: bytes, ctype: str = "image/jpeg") -> dict:
        return {"image": ("upload", data, ctype)}

    refused_ok = []
    for name, data in _malformed_images(scene, bomb_png).items():
        for path in ("/v1/search", "/v1/detect"):
            r = send(name, path, files=image(data))
            refused_ok.append((name, path, r.status_code) if r.status_code not in (413, 422)
                              else None)
        send(f"{name} + box", "/v1/search", files=image(data), data={"box": "0.1,0.1,0.9,0.9"})
    served = []
    for name, data in _odd_but_valid_images().items():
        for path in ("/v1/search", "/v1/detect"):
            served.append((name, path, send(name, path, files=image(data)).status_code))
        for box in ("0.1,0.1,0.9,0.9", "0,0,0.001,0.001", "0.999,0.999,1,1"):
            served.append((f"{name} box {box}", "/v1/search", send(
                f"{name} box {box}", "/v1/search", files=image(data),
                data={"box": box}).status_code))
    for box in BAD_BOXES:
        r = send(f"box {box[:20]!r}", "/v1/search", files=image(scene), data={"box": box})
        refused_ok.append(None if r.status_code == 422 else ("box", box[:20], r.status_code))
    for form in BAD_FORMS:
        r = send(f"form {form}", "/v1/search", files=image(scene), data=form)
        refused_ok.append(None if r.status_code == 422 else ("form", form, r.status_code))
    # wrong content types and encodings
    for ctype in ("text/plain", "application/octet-stream", "image/png", ""):
        send(f"jpeg sent as {ctype!r}", "/v1/search", files=image(scene, ctype))
    send("json body", "/v1/search", json={"image": "aGVsbG8=", "k": 3})
    send("urlencoded body", "/v1/search", data={"image": "not a file", "k": "3"})
    send("file under another name", "/v1/search", files={"photo": ("q.jpg", scene)})
    send("no body", "/v1/search")
    send("plain bytes body", "/v1/search", content=scene,
         headers={"content-type": "image/jpeg"})
    for ctype, body in (("multipart/form-data", scene[:500]),
                        ("multipart/form-data; boundary=xyz", b"--xyz\r\ngarbage"),
                        ("multipart/form-data; boundary=xyz", scene[:2000]),
                        ("multipart/form-data; boundary=", b"--\r\n\r\n"),
                        ("application/x-www-form-urlencoded", b"%%%&&&==\xff\xfe")):
        send(f"raw {ctype!r}", "/v1/search", content=body, headers={"content-type": ctype})
        send(f"raw {ctype!r}", "/v1/detect", content=body, headers={"content-type": ctype})

    for path in WORLD_PATHS:  # the photo route must answer 404, never fail on the path
        r = httpx.get(f"{url}/world/{path}", timeout=30)
        results.append((f"GET /world/{path[:30]}", r.status_code,
                        _refusal_problems(r.status_code, r.headers.get("content-type", ""),
                                          r.text)))
        refused_ok.append(None if r.status_code == 404 else ("world", path[:30], r.status_code))

    for version in ADMIN_VERSIONS:  # a hostile index version id: refused with 409
        r = send(f"cutover to {version[:20]!r}", "/admin/cutover", json={
            "index_version": version}, headers={"X-Admin-Token": fault_stack.admin_token})
        refused_ok.append(None if r.status_code == 409 else ("cutover", version[:20],
                                                              r.status_code))

    statuses = Counter(status for _, status, _ in results)
    server_errors = [(n, s) for n, s, _ in results if s >= 500]
    broken = [(n, p) for n, _, p in results if p]
    counts.tried(f"{len(_malformed_images(scene, bomb_png))} malformed images, "
                 f"{len(_odd_but_valid_images())} odd-but-valid images x 4 boxes, "
                 f"{len(BAD_BOXES)} bad boxes, {len(BAD_FORMS)} bad form fields, wrong "
                 "content types and broken multipart bodies, on /v1/search and /v1/detect; "
                 f"{len(WORLD_PATHS)} hostile photo paths, {len(ADMIN_VERSIONS)} hostile "
                 "index version ids to /admin/cutover")
    counts.add(fuzz_corpus_requests=len(results), fuzz_corpus_5xx=len(server_errors),
               fuzz_corpus_contract_breaks=len(broken))
    print("statuses:", dict(sorted(statuses.items())))
    assert server_errors == [] and broken == [], (server_errors + broken)[:10]
    assert [x for x in refused_ok if x] == []  # malformed -> 413/422, never served
    assert [x for x in served if x[2] != 200] == []  # decodable -> served
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
