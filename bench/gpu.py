"""GPU variant of the benchmarks; runs only where a GPU is visible, skipped with a reason
otherwise (`torch.cuda.is_available()`, `faiss.get_num_gpus()`).

    .venv/bin/python bench/gpu.py [--work /tmp/loupe-bench-serve]

- faiss-gpu (when the installed faiss has GPUs): exact inner-product search over the large
  world's attribute vectors on the GPU, batch QPS and recall@10 against the CPU exact answer.
- torch CUDA (when torch sees a GPU): the frozen-baseline embedder's throughput at batch 64
  on the tiny world's catalog photos, next to the CPU export's number in bench/reembed.py.
Triton GPU instance groups (`KIND_GPU`) need a GPU execution provider inside the python
backend (onnxruntime-gpu) or the NGC container's onnxruntime/TensorRT backends, which this
CPU venv does not install; infra/ documents that production variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

K = 10


def gpus() -> dict:
    """What this machine offers: CUDA devices seen by torch and by faiss."""
    import faiss
    import torch

    return {"torch_cuda": bool(torch.cuda.is_available()),
            "faiss_gpus": int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0}


def skip_reason(found: dict) -> str | None:
    if found["torch_cuda"] or found["faiss_gpus"] > 0:
        return None
    return ("GPU variant skipped: no GPU on this machine (torch.cuda.is_available() is False "
            "and faiss.get_num_gpus() == 0 with this faiss build); run `make bench` on a GPU "
            "host with faiss-gpu and CUDA torch to fill it in")


def faiss_gpu(work: Path, n_queries: int = 2000) -> dict:
    import faiss
    import pandas as pd

    from bench.index import SEED, large_catalog, query_vectors
    from pipelines.embed import attribute_vectors

    world = large_catalog(work)
    vectors = attribute_vectors(pd.read_parquet(world / "tables" / "catalog.parquet"), SEED)
    queries = query_vectors(world, n_queries)
    cpu = faiss.IndexFlatIP(vectors.shape[1])
    cpu.add(vectors)
    _, exact = cpu.search(queries, K)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    gpu.search(queries[:10], K)  # warm
    t0 = time.perf_counter()
    _, found = gpu.search(queries, K)
    qps = n_queries / (time.perf_counter() - t0)
    recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact,
                                                                         strict=True)]))
    return {"index": "GpuIndexFlatIP (exact)", "vectors": int(len(vectors)),
            "queries": n_queries, "batch_qps": round(qps, 1), "recall_at_10": recall}


def torch_embedder(work: Path, batch: int = 64, reps: int = 3) -> dict:
    import pandas as pd
    import torch

    from models.embedder import EmbedderSpec, frozen_baseline
    from models.preprocessing import decode_image, embed_input
    from pipelines.world import generate_world

    tiny = work / "tiny"
    if not (tiny / "world.json").is_file():
        generate_world("tiny", 0, tiny)
    paths = list(pd.read_parquet(tiny / "tables" / "catalog.parquet")["image_path"])
    x = torch.from_numpy(np.stack([embed_input(decode_image((tiny / p).read_bytes()))
                                   for p in paths])).cuda()
    model = frozen_baseline(EmbedderSpec(seed=0)).eval().cuda()
    best = 0.0
    with torch.inference_mode():
        model(x[:batch])
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
            torch.cuda.synchronize()
            best = max(best, len(x) / (time.perf_counter() - t0))
    return {"device": torch.cuda.get_device_name(0), "batch": batch,
            "images_per_s": round(best, 1), "note": "model only, inputs already on the GPU"}


def run(work: Path) -> dict:
    found = gpus()
    reason = skip_reason(found)
    if reason is not None:
        print(reason, flush=True)
        return {"skipped": True, "reason": reason, **found}
    out: dict = {"skipped": False, **found,
                 "triton_kind_gpu": "not run: needs onnxruntime-gpu or the NGC container "
                                    "(see module docstring)"}
    if found["faiss_gpus"] > 0:
        out["faiss_gpu"] = faiss_gpu(work)
    if found["torch_cuda"]:
        out["torch_embedder"] = torch_embedder(work)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loupe-bench-serve"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args.work)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
