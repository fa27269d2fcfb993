"""`loupe world`: generate a world (and optionally its contact sheet)."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.world.generate import generate_world
from pipelines.world.samples import save_samples
from pipelines.world.spec import SIZES


def add_cli(sub) -> None:
    p = sub.add_parser("world", help="generate the demo product world (known ground truth)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--samples", type=Path, default=None, help="also save a contact-sheet PNG")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    summary = generate_world(args.size, args.seed, args.out, args.workers)
    if args.samples is not None and SIZES[args.size].render_images:
        summary["samples"] = str(save_samples(args.out, args.samples))
    print(json.dumps(summary, indent=1))
    return 0
