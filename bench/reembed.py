"""Re-embed throughput on real images: the rollout's re-embed stage (`pipelines.embed.reembed`:
decode, shared preprocessing, onnxruntime, contract-checked parquet parts + checkpoints)
over the tiny world's catalog photos through the exported frozen-baseline embedder, the way
a registered model re-embeds the catalog (`pipelines.embed.embed_fn_from_export`).

    .venv/bin/python bench/reembed.py [--work /tmp/loupe-bench-serve] [--reps 3]

The large world has no images, so photos come from the tiny world (128 px catalog photos,
the embedder's input size). Its 217 listings would leave 27 per partition, where a real
catalog has thousands, and per-partition costs (the GE contract check of a part file, the
checkpoint) would be most of the time; so the catalog here lists every tiny photo `REPEAT`
times under distinct item ids (4,340 listings, ~540 per partition): each row is still
decoded, preprocessed and embedded. Best of `reps` passes: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


REPEAT = 20


def repeated_world(tiny: Path, out: Path, repeat: int = REPEAT) -> Path:
    """A world whose catalog lists each of `tiny`'s listings `repeat` times (same photos)."""
    import pandas as pd

    catalog = pd.read_parquet(tiny / "tables" / "catalog.parquet")
    big = pd.concat([catalog.assign(item_id=catalog["item_id"] + f"-r{r:02d}")
                     for r in range(repeat)], ignore_index=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    big.to_parquet(out / "tables" / "catalog.parquet", index=False)
    if not (out / "images").exists():
        (out / "images").symlink_to((tiny / "images").resolve())
    return out


def run(work: Path, reps: int = 3, threads: int = 2) -> dict:
    from models.export import ExportedEmbedder
    from pipelines.embed import EmbedParams, embed_fn_from_model, reembed
    from pipelines.train import export_baseline
    from pipelines.world import generate_world

    tiny = work / "tiny"
    if not (tiny / "world.json").is_file():
        generate_world("tiny", 0, tiny)
    export = work / "embedder" / "export"
    if not (export / "embedder.json").is_file():
        export_baseline(work / "embedder")
    world = repeated_world(tiny, work / f"tiny-x{REPEAT}")
    params = EmbedParams.load()
    embed_fn = embed_fn_from_model(ExportedEmbedder(export, threads=threads), world,
                                   params.batch_size)
    import pandas as pd

    paths = list(pd.read_parquet(world / "tables" / "catalog.parquet")["image_path"])
    alone = []
    for _ in range(reps):  # decode + preprocessing + onnxruntime only, no stage around it
        t0 = time.perf_counter()
        embed_fn(paths, None)
        alone.append(len(paths) / (time.perf_counter() - t0))
    out = work / "reembed"
    load_start = os.getloadavg()

    def passes(part_rows: int) -> tuple[list[float], int]:
        rates, n = [], 0
        for _ in range(reps):
            shutil.rmtree(out, ignore_errors=True)  # a finished run would be resumed
            t0 = time.perf_counter()
            summary = reembed(world, "loupe-embedder/1", embed_fn, out, None, part_rows,
                              n_partitions=params.n_partitions, validate=params.validate,
                              show_progress=False)
            n = sum(summary["embedded"].values())
            rates.append(n / (time.perf_counter() - t0))
        return rates, n

    rates, n = passes(params.part_rows)
    # the earlier layout, a part file + GE check + checkpoint per model batch, same run
    per_batch, _ = passes(params.batch_size)
    return {"images": n, "images_per_s": round(max(rates), 1),
            "passes_images_per_s": [round(r, 1) for r in rates],
            "embedder_only_images_per_s": round(max(alone), 1),
            "reembed_over_embedder": round(max(rates) / max(alone), 3),
            "images_per_s_part_per_batch": round(max(per_batch), 1),
            "reembed_over_embedder_part_per_batch": round(max(per_batch) / max(alone), 3),
            "ort_threads": threads,
            "batch_size": params.batch_size, "part_rows": params.part_rows,
            "n_partitions": params.n_partitions, "validate": params.validate,
            "loadavg": {"start": [round(x, 2) for x in load_start],
                        "end": [round(x, 2) for x in os.getloadavg()]},
            "what": f"tiny-world catalog photos, each listed {REPEAT} times, through "
                    "reembed() with the exported frozen-baseline embedder (onnxruntime, CPU)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loupe-bench-serve"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args.work, args.reps)
    print(f"re-embed: {result['images']} images, {result['images_per_s']:.0f} images/s "
          f"(passes {result['passes_images_per_s']}); embedder alone "
          f"{result['embedder_only_images_per_s']:.0f} images/s; a part per model batch "
          f"(the earlier layout) {result['images_per_s_part_per_batch']:.0f} images/s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
