"""`loupe serve`: install a model version into the Triton repository, make sure the index
serves it, and start the serving stack (tritonserver + shard replicas + search API).

    loupe serve --world data/demo --embedder runs/demo/train/export \
        --model-version loupe-embedder/1 --detector runs/detector/export \
        --detector-version loupe-detector/1 --harvest runs/demo/harvest --out runs/serve

Everything under --out is reused when present (repository versions are immutable; an index
already cut over for this model version and catalog treatment is not rebuilt), so a restart
is quick. The catalog is embedded by `pipelines.embed.catalog_treatment` (detect -> pick ->
crop -> embed, the query path's treatment) with the exported models Triton serves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.features import write_item_features
from pipelines.index import IndexParams, publish
from serving.shards import layout, pointer

log = logging.getLogger("loupe.serve")


@dataclass(frozen=True)
class ServePaths:
    out: Path

    @property
    def triton_repo(self) -> Path:
        return self.out / "triton_repo"

    @property
    def index_root(self) -> Path:
        return self.out / "index"

    @property
    def features(self) -> Path:
        return self.out / "item_features.parquet"

    def embeddings(self, model_version: str, detector_version: str) -> Path:
        """One embedding run per model version and detector (the detector picks the boxes)."""
        return self.out / "embeddings" / re.sub(r"[^A-Za-z0-9._-]+", "-",
                                                f"{model_version}@{detector_version}")


def index_for_model(world: Path, paths: ServePaths, model_version: str, embedder_dir: Path,
                    detector_dir: Path, detector_version: str, params: IndexParams) -> str:
    """Embed the catalog with the exported models, build, canary and cut over; or reuse the
    live version when it already holds this model's vectors made by this treatment."""
    from pipelines.embed import catalog_treatment, reembed

    embed_fn = catalog_treatment(embedder_dir, detector_dir, world, detector_version)
    current = pointer.read(paths.index_root)
    if current is not None:
        manifest = layout.read_manifest(layout.version_dir(paths.index_root, current))
        if (manifest["model_version"] == model_version
                and manifest.get("treatment") == embed_fn.metadata):
            return current
    emb_dir = paths.embeddings(model_version, detector_version)
    reembed(world, model_version, embed_fn, emb_dir, validate=False, show_progress=False)
    return publish(emb_dir, paths.index_root, world, params,
                   expected_model_version=model_version).index_version


def prepare(world: Path, out: Path, embedder_dir: Path, model_version: str,
            detector_dir: Path, detector_version: str, harvest_dir: Path,
            params: IndexParams | None = None) -> ServePaths:
    """Repository version + feature table + a live index for `model_version`."""
    from serving.triton.repository import add_version

    paths = ServePaths(Path(out))
    add_version(paths.triton_repo, model_version, embedder_dir, detector_dir, detector_version)
    if not paths.features.exists():
        write_item_features(world, harvest_dir, paths.features)
    index_for_model(world, paths, model_version, embedder_dir, detector_dir, detector_version,
                    params or IndexParams.load())
    return paths


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="start Triton + shard replicas + search API")
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--embedder", type=Path, required=True, help="embedder export dir")
    p.add_argument("--model-version", required=True, help="e.g. loupe-embedder/3")
    p.add_argument("--detector", type=Path, required=True, help="detector export dir")
    p.add_argument("--detector-version", required=True, help="e.g. loupe-detector/2")
    p.add_argument("--harvest", type=Path, required=True, help="harvest output dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--params", type=Path, default=None)
    p.set_defaults(func=_cli)


def serve_until_stopped(triton_repo: Path, index_root: Path, world: Path, features: Path,
                        run_dir: Path, replicas: int, announce, say=None) -> None:
    """Start the stack, `say` (default: print) `announce(stack, token_shown)`, serve until
    SIGTERM or Ctrl-C. The admin token is $LOUPE_ADMIN_TOKEN, else generated and shown
    once."""
    from serving.stack import ServingStack

    token = os.environ.get("LOUPE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    shown = "$LOUPE_ADMIN_TOKEN" if os.environ.get("LOUPE_ADMIN_TOKEN") else token
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ServingStack(triton_repo, index_root, world, features, run_dir, token,
                      replicas=replicas) as stack:
        (say or (lambda text: print(text, flush=True)))(announce(stack, shown))
        try:
            stop.wait()
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)


def _cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = prepare(args.world, args.out, args.embedder, args.model_version, args.detector,
                    args.detector_version, args.harvest, IndexParams.load(args.params))
    serve_until_stopped(
        paths.triton_repo, paths.index_root, args.world, paths.features, args.out / "run",
        args.replicas, lambda stack, token: json.dumps({
            "api": stack.url, "triton_grpc": stack.triton.grpc_url,
            "shards": {s: [p.url for p in ps] for s, ps in stack.shards.items()},
            "admin_token": token}, indent=1))
    return 0
