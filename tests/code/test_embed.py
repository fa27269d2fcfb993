"""Re-embedding: partitioned, checkpointed, resumable with exact counts after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import embed
from pipelines.embed import (
    attribute_embed_fn,
    embedding_progress,
    embeddings_table,
    load_embeddings,
    partition_of,
    reembed,
)

MODEL = "attributes/0"
N_PARTS = 3
BATCH = 16


class Killed(RuntimeError):
    pass


def _counting(fn, die_after: int | None = None):
    """Wrap an embed_fn: count calls and items, raise on call `die_after` + 1."""
    state = {"calls": 0, "items": 0}

    def wrapped(paths, boxes):
        if die_after is not None and state["calls"] == die_after:
            raise Killed(f"killed after {die_after} batches")
        state["calls"] += 1
        state["items"] += len(paths)
        return fn(paths, boxes)

    return wrapped, state


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory) -> embed.Embeddings:
    """An uninterrupted run, checked against the GE embeddings contract on every part."""
    out = tmp_path_factory.mktemp("emb") / "ref"
    reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, None, BATCH,
            n_partitions=N_PARTS, validate=True, show_progress=False)
    return load_embeddings(out)


def _part_files(out: Path) -> list[Path]:
    return sorted(out.glob("part-*/rows-*.parquet"))


def test_reference_run_covers_catalog_once_with_model_version(tiny_world, reference):
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    assert sorted(reference.item_ids.tolist()) == sorted(catalog["item_id"])
    assert reference.model_version == MODEL
    assert reference.vectors.shape == (len(catalog), 256)
    np.testing.assert_allclose(np.linalg.norm(reference.vectors, axis=1), 1.0, atol=1e-5)


def test_a_part_file_and_checkpoint_hold_part_rows_rows(tiny_world, tmp_path):
    out = tmp_path / "emb"
    reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, None, 10, n_partitions=2,
            validate=False, show_progress=False)
    progress = embed.embedding_progress(out)["partitions"]
    for p, state in progress.items():
        rows = [pq.read_metadata(f).num_rows for f in
                sorted(embed.part_dir(out, p).glob("rows-*.parquet"))]
        assert len(rows) == -(-state["items_total"] // 10)  # ceil: one part per 10 rows
        assert sum(rows) == state["items_total"] and max(rows) == 10


def test_killed_run_resumes_with_exact_counts_and_identical_vectors(tiny_world, reference,
                                                                    tmp_path):
    out = tmp_path / "emb"
    fn, first = _counting(attribute_embed_fn(tiny_world), die_after=5)
    with pytest.raises(Killed):
        reembed(tiny_world, MODEL, fn, out, None, BATCH, n_partitions=N_PARTS,
                validate=False, show_progress=False)
    progress = embedding_progress(out)
    done_before = sum(p["items_done"] for p in progress["partitions"].values() if p)
    assert first["calls"] == 5 and done_before == first["items"]  # five batches landed
    assert 0 < done_before < len(reference.item_ids)
    assert not progress["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(out)

    fn, second = _counting(attribute_embed_fn(tiny_world))
    reembed(tiny_world, MODEL, fn, out, None, BATCH, n_partitions=N_PARTS, validate=False,
            show_progress=False)
    resumed = load_embeddings(out)
    assert second["items"] == len(reference.item_ids) - done_before  # nothing embedded twice
    np.testing.assert_array_equal(resumed.item_ids, reference.item_ids)
    np.testing.assert_array_equal(resumed.vectors, reference.vectors)
    rows = sum(pq.read_metadata(f).num_rows for f in _part_files(out))
    assert rows == len(reference.item_ids)


def test_part_file_written_but_not_checkpointed_is_replaced(tiny_world, reference, tmp_path,
                                                            monkeypatch):
    """The crash window between a part file's rename and its checkpoint."""
    out = tmp_path / "emb"
    real = embed.write_json_atomic
    calls = {"n": 0}

    def crash_on_third_checkpoint(path, payload):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed("died before the checkpoint")
        real(path, payload)

    monkeypatch.setattr(embed, "write_json_atomic", crash_on_third_checkpoint)
    with pytest.raises(Killed):
        reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, None, BATCH,
                n_partitions=N_PARTS, validate=False, show_progress=False)
    monkeypatch.setattr(embed, "write_json_atomic", real)
    orphan_rows = sum(pq.read_metadata(f).num_rows for f in _part_files(out))
    checkpointed = sum(p["items_done"] for p in embedding_progress(out)["partitions"].values()
                       if p)
    assert 0 < orphan_rows - checkpointed <= BATCH  # a batch the checkpoint never saw

    reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, None, BATCH,
            n_partitions=N_PARTS, validate=False, show_progress=False)
    resumed = load_embeddings(out)
    np.testing.assert_array_equal(resumed.vectors, reference.vectors)
    assert sum(pq.read_metadata(f).num_rows for f in _part_files(out)) == len(reference.item_ids)


_SLOW_RUN = """
import sys, time
from pathlib import Path
from pipelines.embed import attribute_embed_fn, reembed
world, out = Path(sys.argv[1]), Path(sys.argv[2])
fast = attribute_embed_fn(world)
def slow(paths, boxes):
    time.sleep(0.15)
    return fast(paths, boxes)
reembed(world, "attributes/0", slow, out, None, 8, n_partitions=3, validate=False,
        show_progress=False)
"""


def test_sigkilled_process_resumes_exactly(tiny_world, reference, tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(tiny_world), str(out)],
                            cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and done < 40:
        time.sleep(0.05)
        done = sum(json.loads(p.read_text())["items_done"]
                   for p in out.glob("part-*/progress.json") if p.stat().st_size)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = sum(p["items_done"] for p in embedding_progress(out)["partitions"].values() if p)
    assert 40 <= killed_at < len(reference.item_ids)

    fn, state = _counting(attribute_embed_fn(tiny_world))
    reembed(tiny_world, MODEL, fn, out, None, 8, n_partitions=N_PARTS, validate=False,
            show_progress=False)
    resumed = load_embeddings(out)
    assert state["items"] == len(reference.item_ids) - killed_at
    np.testing.assert_array_equal(resumed.item_ids, reference.item_ids)
    np.testing.assert_array_equal(resumed.vectors, reference.vectors)


def test_partitions_run_as_separate_tasks_match_one_run(tiny_world, reference, tmp_path):
    out = tmp_path / "emb"
    summaries = [reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, [p], BATCH,
                         n_partitions=N_PARTS, validate=False, show_progress=False)
                 for p in (2, 0, 1)]
    sizes = [s["embedded"] for s in summaries]
    ids = reference.item_ids.tolist()
    for size in sizes:
        (p, n), = size.items()
        assert n == sum(partition_of(i, N_PARTS) == p for i in ids)
    np.testing.assert_array_equal(load_embeddings(out).vectors, reference.vectors)
    again = reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, None, BATCH,
                    n_partitions=N_PARTS, validate=False, show_progress=False)
    assert again["embedded"] == {0: 0, 1: 0, 2: 0}  # a finished run is a no-op


def test_one_directory_holds_one_model_version(tiny_world, tmp_path):
    out = tmp_path / "emb"
    reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, [0], BATCH,
            n_partitions=N_PARTS, validate=False, show_progress=False)
    with pytest.raises(ValueError, match="model_version"):
        reembed(tiny_world, "attributes/1", attribute_embed_fn(tiny_world, 1), out, [1], BATCH,
                n_partitions=N_PARTS, validate=False, show_progress=False)
    with pytest.raises(ValueError, match="n_partitions"):
        reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, [1], BATCH,
                n_partitions=N_PARTS + 1, validate=False, show_progress=False)


def test_load_refuses_a_part_file_of_another_model(tiny_world, reference, tmp_path):
    out = tmp_path / "emb"
    reembed(tiny_world, MODEL, attribute_embed_fn(tiny_world), out, None, BATCH,
            n_partitions=N_PARTS, validate=False, show_progress=False)
    victim = _part_files(out)[0]
    table = pq.read_table(victim)
    vectors = np.stack(table.column("vector").to_pylist()).astype(np.float32)
    pq.write_table(embeddings_table(table.column("item_id").to_pylist(), "attributes/9",
                                    vectors), victim)
    with pytest.raises(ValueError, match="mixed model versions"):
        load_embeddings(out)


def test_bad_vectors_stop_the_run_before_anything_lands(tiny_world, tmp_path):
    out = tmp_path / "emb"
    good = attribute_embed_fn(tiny_world)
    with pytest.raises(ValueError, match="not finite unit vectors"):
        reembed(tiny_world, MODEL, lambda p, b: 2 * good(p, b), out, None, BATCH,
                n_partitions=N_PARTS, validate=False, show_progress=False)
    with pytest.raises(ValueError, match=r"shape \(16, 128\)"):
        reembed(tiny_world, MODEL, lambda p, b: good(p, b)[:, :128], out, None, BATCH,
                n_partitions=N_PARTS, validate=False, show_progress=False)
    assert _part_files(out) == []
    with pytest.raises(ValueError, match="outside"):
        reembed(tiny_world, MODEL, good, out, [N_PARTS], BATCH, n_partitions=N_PARTS)
    with pytest.raises(FileNotFoundError, match="catalog"):
        reembed(tmp_path / "nowhere", MODEL, good, out, None, BATCH, n_partitions=N_PARTS)


def test_attribute_vectors_put_same_product_listings_closest(tiny_world):
    catalog = pd.read_parquet(tiny_world / "tables/catalog.parquet")
    vectors = embed.attribute_vectors(catalog, seed=0)
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)
    same_product = (catalog["product_id"].to_numpy()[nearest] == catalog["product_id"])
    assert same_product.mean() > 0.95
    other = embed.attribute_vectors(catalog, seed=1)
    assert np.abs((vectors * other).sum(axis=1)).mean() < 0.2  # another "model": unrelated


class BoxedDetector:
    """Detector stand-in with the ExportedDetector interface: two fixed detections, the
    off-centre one larger, so the salience rule (not "the biggest box") decides."""

    categories = ["lamp", "sofa"]

    def __init__(self):
        self.seen = []
        self.calls = []  # images per detect() call

    def detect(self, images):
        from models.detector import Detections

        self.seen += [im.size for im in images]
        self.calls.append(len(images))
        boxes = torch.tensor([[0.0, 0.0, 0.3, 0.6], [0.35, 0.35, 0.65, 0.65]])
        return [Detections(boxes, torch.tensor([0.9, 0.9]), torch.tensor([0, 1]))
                for _ in images]


def colour_embedder(batch):
    """Embedder stand-in (what models.embedder.embed_images runs): mean colour of the crop."""
    v = np.zeros((len(batch), 256), np.float32)
    v[:, :3] = np.asarray(batch).mean(axis=(2, 3))
    v[:, 3] = 0.1
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_catalog_photos_get_the_query_treatment(tiny_world):
    """detect -> salient box -> crop -> embed; a caller's box (a rater query's) skips
    detection; the category rule picks the listing's object instead."""
    from models.detector import PickPolicy
    from models.embedder import embed_images

    detector = BoxedDetector()
    treat = embed.CatalogTreatment(colour_embedder, detector, tiny_world, "loupe-detector/7",
                                   PickPolicy())
    paths = pd.read_parquet(tiny_world / "tables/catalog.parquet")["image_path"][:3].tolist()
    salient = np.array([[0.35, 0.35, 0.65, 0.65]] * 3)
    boxes = treat.boxes(paths)
    np.testing.assert_allclose(boxes, salient)
    got = treat(paths, None)
    np.testing.assert_array_equal(got, embed_images(colour_embedder, tiny_world, paths, boxes))
    assert not np.allclose(got, embed_images(colour_embedder, tiny_world, paths, None))
    assert detector.seen == [(128, 128)] * 6
    given = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_array_equal(treat(paths[:1], given),
                                  embed_images(colour_embedder, tiny_world, paths[:1], given))
    assert len(detector.seen) == 6
    assert treat.metadata == {"detector_version": "loupe-detector/7",
                              "pick_policy": "salient>whole"}
    # a whole catalog at once (evaluation's call) is decoded and detected a batch at a time
    batched = embed.CatalogTreatment(colour_embedder, detector, tiny_world, "loupe-detector/7",
                                     PickPolicy(), batch_size=2)
    detector.calls.clear()
    np.testing.assert_allclose(batched.boxes(paths + paths[:2]), [salient[0]] * 5)
    assert detector.calls == [2, 2, 1]
    by_category = embed.CatalogTreatment(
        colour_embedder, detector, tiny_world, "loupe-detector/7",
        PickPolicy.parse("category>salient>whole"), {paths[0]: "lamp", paths[1]: "sofa"})
    np.testing.assert_allclose(by_category.boxes(paths), [[0.0, 0.0, 0.3, 0.6],
                                                          *salient[1:]])
    with pytest.raises(ValueError, match="detector_version is required"):
        embed.CatalogTreatment(colour_embedder, detector, tiny_world, "", PickPolicy())


def test_embedding_run_records_its_treatment_and_refuses_another(tiny_world, tmp_path):
    """run.json carries the detector and pick policy beside the model version: a resumed run
    with another detector would mix two vector sets, so it is refused."""
    from models.detector import PickPolicy

    def treatment(detector_version):
        return embed.CatalogTreatment(colour_embedder, BoxedDetector(), tiny_world,
                                      detector_version, PickPolicy())

    out = tmp_path / "emb"
    summary = reembed(tiny_world, "loupe-embedder/1", treatment("loupe-detector/1"), out, [0],
                      BATCH, n_partitions=N_PARTS, validate=False, show_progress=False)
    want = {"detector_version": "loupe-detector/1", "pick_policy": "salient>whole"}
    assert summary["treatment"] == want
    assert embedding_progress(out)["treatment"] == want
    with pytest.raises(ValueError, match="treatment="):
        reembed(tiny_world, "loupe-embedder/1", treatment("loupe-detector/2"), out, [1], BATCH,
                n_partitions=N_PARTS, validate=False, show_progress=False)
    reembed(tiny_world, "loupe-embedder/1", treatment("loupe-detector/1"), out, None, BATCH,
            n_partitions=N_PARTS, validate=False, show_progress=False)
    assert load_embeddings(out).treatment == want
