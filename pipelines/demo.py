"""`loupe demo`: the whole offline loop on the demo world, then where to look.

Reuses a world that already exists with the same size and seed, so a second `make demo`
does not regenerate 20k images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.params import load_section


def _world(size: str, seed: int, root: Path) -> Path:
    from pipelines.world import generate_world, save_samples

    out = root / "data" / size
    meta = out / "world.json"
    if meta.exists() and json.loads(meta.read_text()).get("seed") == seed:
        print(f"[world] reusing {out}")
        return out
    t0 = time.perf_counter()
    summary = generate_world(size, seed, out)
    save_samples(out, root / "reports" / "world_samples.png")
    print(f"[world] {summary['counts']} in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def run_demo(root: Path, params: Path | None = None) -> dict:
    from pipelines.harvest import HarvestConfig, harvest, write_report
    from pipelines.validate import validate_world

    world_cfg = load_section(params, "world")
    size, seed = world_cfg.get("size", "demo"), int(world_cfg.get("seed", 0))
    world = _world(size, seed, root)
    reports = validate_world(world, quarantine_dir=root / "quarantine",
                             docs_dir=root / "reports" / "data_docs")
    print(f"[validate] {len(reports)} tables passed their contracts")
    result = harvest(world, root / "runs" / size / "harvest",
                     HarvestConfig(**load_section(params, "harvest")),
                     quarantine_dir=root / "quarantine")
    metrics = write_report(result, world, root / "reports")
    print(f"[harvest] propensity MAE {metrics['propensity_mae']:.3f}, "
          f"pairs {metrics['pairs_by_source']} -> {result.out_dir}")
    print("\nWhere to look:\n"
          f"  world sample sheet   reports/world_samples.png\n"
          f"  propensity vs truth  reports/propensity.png\n"
          f"  harvest metrics      reports/harvest.json\n"
          f"  training pairs       {result.out_dir}/pairs_debiased.parquet")
    return {"world": str(world), "harvest": metrics}


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="run the offline loop on the demo world")
    p.add_argument("--root", type=Path, default=Path.cwd())
    p.add_argument("--params", type=Path, default=None)
    p.set_defaults(func=lambda a: run_demo(a.root, a.params) and 0)
