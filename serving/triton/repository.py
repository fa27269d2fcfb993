"""Triton model repository for Loupe: `detector`, `embedder` and `detect_embed` (both in one
call, the camera path's default), one numbered version each per rollout.

The Triton version number is the registry version number of the embedder ("loupe-embedder/7"
-> version 7 of both Triton models), so the index manifest's model version names exactly the
Triton version the API must call. The config lists the served versions explicitly
(`version_policy: specific`): the live one and the one a rollback returns to, so a rollback
is a pointer flip with no model load on the request path, and a rollout loads its new
version before the index cutover (see `serving/api/app.py`, admin cutover).

    <repo>/embedder/config.pbtxt    python backend, dynamic batching, CPU instance group
    <repo>/embedder/<N>/            embedder.onnx, embedder.json, model.py, loupe.json
    <repo>/detector/config.pbtxt
    <repo>/detector/<N>/            detector.onnx, detector.json, model.py, loupe.json
    <repo>/detect_embed/<N>/        model.py, loupe.json (it runs detector/N and embedder/N)
"""

from __future__ import annotations

import json
import py_compile
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PYTHON_MODELS = Path(__file__).parent / "python_models"
MODELS = ("detector", "embedder", "detect_embed")
META_FILE = "loupe.json"

@dataclass(frozen=True)
class TritonModelConfig:
    """Serving knobs of both models. Queue delay 0: on CPU a batch-1 call costs ~1 ms and a
    queue delay is added to every lone request; under load requests queue up behind the
    running batch anyway, so batches still form (measured: see /work/shared notes)."""

    instances: int = 1
    # the search path's one call does all of a query's model work: one instance per core
    # (one instance held a 2-core host to 87 QPS at 71% CPU, bench/serve.py)
    detect_embed_instances: int = 2
    ort_threads: int = 1
    max_batch: int = 16
    queue_delay_us: int = 0
    embedding_dim: int = 256


def triton_version(model_version: str) -> int:
    """'loupe-embedder/7' -> 7; anything else is a clear error."""
    name, sep, number = model_version.rpartition("/")
    if not sep or not name or not number.isdigit() or int(number) < 1:
        raise ValueError(f"model version must look like 'name/N' with N >= 1 to be served "
                         f"by Triton: {model_version!r}")
    return int(number)


def _install(model_dir: Path, number: int, files_from: Path | None, python_model: str,
             meta: dict) -> Path:
    if files_from is not None and not files_from.is_dir():
        raise FileNotFoundError(f"exported model directory not found: {files_from}")
    final = model_dir / str(number)
    if final.exists():  # versions are immutable: a rollout never rewrites a served version
        existing = json.loads((final / META_FILE).read_text())
        if existing != meta:
            raise ValueError(f"{final} already holds {existing}, refusing to overwrite "
                             f"with {meta}")
        return final
    tmp = model_dir / f".{number}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if files_from is None:
        tmp.mkdir()
    else:
        shutil.copytree(files_from, tmp)
    shutil.copy(PYTHON_MODELS / python_model, tmp / "model.py")
    # compiled here, so the stub's import writes no __pycache__ into a loaded version: Triton
    # reloads a version whose directory changed, and every cutover reloaded the live one
    py_compile.compile(str(tmp / "model.py"), dfile=str(final / "model.py"), doraise=True)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.rename(final)
    return final


def add_version(repo: Path, model_version: str, embedder_dir: Path, detector_dir: Path,
                detector_version: str, cfg: TritonModelConfig | None = None) -> int:
    """Install one rollout's exported models as Triton version N of both models; the
    served-versions list (config.pbtxt) is changed separately by `serve_versions`."""
    number = triton_version(model_version)
    repo = Path(repo)
    meta = {"model_version": model_version, "detector_version": detector_version}
    for name, src in (("embedder", Path(embedder_dir)), ("detector", Path(detector_dir)),
                      ("detect_embed", None)):
        model_dir = repo / name
        model_dir.mkdir(parents=True, exist_ok=True)
        _install(model_dir, number, src, f"{name}.py", meta)
    if not (repo / "embedder" / "config.pbtxt").exists():
        serve_versions(repo, [number], cfg)
    return number


def serve_versions(repo: Path, numbers: Iterable[int], cfg: TritonModelConfig | None = None
                   ) -> list[int]:
    """Write both configs to serve exactly `numbers` (atomic replace); Triton picks them up
    on the next `load_model`."""
    cfg = cfg or TritonModelConfig()
    wanted = sorted(set(numbers))
    missing = [n for n in wanted for m in MODELS if not (Path(repo) / m / str(n)).is_dir()]
    if not wanted or missing:
        raise ValueError(f"cannot serve versions {wanted}: not installed {sorted(set(missing))}")
    from google.protobuf import text_format

    for name in MODELS:
        tmp = Path(repo) / name / "config.pbtxt.tmp"
        tmp.write_text(text_format.MessageToString(model_config(name, wanted, cfg)))
        tmp.replace(tmp.with_suffix(""))
    return wanted


# the tensors each python model reads and writes: (name, data type, dims)
_TENSORS = {
    "embedder": ([("IMAGE", "TYPE_STRING", [1]), ("BOX", "TYPE_FP32", [4])],
                 [("EMBEDDING", "TYPE_FP32", None), ("MODEL_VERSION", "TYPE_STRING", [1])]),
    "detector": ([("IMAGE", "TYPE_STRING", [1])],
                 [("BOXES", "TYPE_FP32", [-1, 4]), ("SCORES", "TYPE_FP32", [-1]),
                  ("LABELS", "TYPE_INT32", [-1]), ("MODEL_VERSION", "TYPE_STRING", [1])]),
    "detect_embed": ([("IMAGE", "TYPE_STRING", [1])],
                     [("BOXES", "TYPE_FP32", [-1, 4]), ("SCORES", "TYPE_FP32", [-1]),
                      ("LABELS", "TYPE_INT32", [-1]), ("BOX", "TYPE_FP32", [4]),
                      ("EMBEDDING", "TYPE_FP32", None), ("MODEL_VERSION", "TYPE_STRING", [1])]),
}


def model_config(name: str, versions: Iterable[int], cfg: TritonModelConfig):
    """Triton's `ModelConfig` protobuf of one python model serving exactly `versions`: the
    schema Triton parses, so a misspelt field fails here rather than at model load."""
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=name, backend="python", max_batch_size=cfg.max_batch)
    inputs, outputs = _TENSORS[name]
    for field, tensors in ((config.input, inputs), (config.output, outputs)):
        for tensor, dtype, dims in tensors:
            field.add(name=tensor, data_type=mc.DataType.Value(dtype),
                      dims=[cfg.embedding_dim] if dims is None else dims)
    config.dynamic_batching.max_queue_delay_microseconds = cfg.queue_delay_us
    count = cfg.detect_embed_instances if name == "detect_embed" else cfg.instances
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)
    config.version_policy.specific.versions.extend(sorted(set(versions)))
    config.parameters["ORT_THREADS"].string_value = str(cfg.ort_threads)
    return config


def installed_versions(repo: Path, model: str = "embedder") -> list[int]:
    d = Path(repo) / model
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def version_meta(repo: Path, number: int) -> dict:
    """What Triton version N serves: {"model_version", "detector_version"}."""
    path = Path(repo) / "embedder" / str(number) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Triton version {number} is not installed in {repo}")
    return json.loads(path.read_text())


def detector_categories(repo: Path, number: int) -> list[str]:
    spec = json.loads((Path(repo) / "detector" / str(number) / "detector.json").read_text())
    return list(spec["categories"])
