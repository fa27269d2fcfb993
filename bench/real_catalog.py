"""Real photos on day one (issue 17): the pretrained detector and a real catalog, measured.

    .venv/bin/python bench/real_catalog.py [--work /tmp/loupe-real-catalog]
        -> reports/real_catalog.json

1. Detector: the pretrained COCO detector's AP@0.5 per category on tests/data/
   real_photo_boxes.csv (boxes drawn by hand on 22 real photos that packages ship), in COCO's
   own classes and in the shop categories it serves (data_contracts/coco_categories.yaml).
2. Retrieval: every real photo of bench/real_photos.py is a listing (near-duplicate twins
   included as distractors); each listing gets a user's query made from its photo (a 70-90 %
   crop, maybe mirrored, a colour cast, JPEG re-encoded, pasted on a larger real background)
   and must find that listing: recall@1 and @10 by exact search, for the frozen pretrained
   embedder and one fine-tuned on this shop's simulated engagement (bench/real_data.py's
   export over these photos), with the catalog embedded whole or by the catalog treatment
   (detect -> salient box -> crop), and the query with the user's box or the serving default
   (the detector's salient box, else the whole photo).
3. Import: seconds per 1,000 catalog rows through `loupe import-catalog` (every photo
   decoded and checked).
The headline keys use the default path: detect-crop catalog, query without a box.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_photos import real_photos  # noqa: E402

BOXES = REPO / "tests" / "data" / "real_photo_boxes.csv"
BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "china.jpg")  # the query's surroundings
DETECTOR_VERSION = "loupe-detector/1"  # the bench's own registry-free export


def boxed_photos(path: Path = BOXES) -> pd.DataFrame:
    """The hand-drawn boxes: photo, coco_class, x0..y1 normalised; a photo with no object
    has one row with an empty class."""
    table = pd.read_csv(path, keep_default_na=False)
    objects = table[table["coco_class"] != ""]
    coords = objects[["x0", "y0", "x1", "y1"]].astype(float)
    if ((coords["x1"] <= coords["x0"]) | (coords["y1"] <= coords["y0"])).any() or \
            ((coords < 0) | (coords > 1)).any().any():
        raise ValueError(f"{path}: every box needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return table


def detector_map(export_dir: Path, boxes: pd.DataFrame, photos: dict[str, tuple[Path, str]]
                 ) -> dict:
    """AP@0.5 per category of an exported COCO detector on the boxed photos; boxes of classes
    its category map drops are left out of the ground truth too."""
    from models.coco_detector import COCO_LABELS, CocoDetector
    from pipelines.train_detector import evaluate_detections

    detector = CocoDetector(Path(export_dir))
    to_label = {COCO_LABELS[int(k)]: v for k, v in detector.spec["coco_to_label"].items()}
    names = list(dict.fromkeys(boxes["photo"]))
    detections, gt_boxes, gt_labels = [], [], []
    for name in names:
        with Image.open(photos[name][0]) as im:
            detections.append(detector.detect([im.convert("RGB")], 0.05)[0])
        rows = boxes[(boxes["photo"] == name) & boxes["coco_class"].isin(list(to_label))]
        gt_boxes.append(rows[["x0", "y0", "x1", "y1"]].to_numpy(float).reshape(-1, 4))
        gt_labels.append(np.array([to_label[c] for c in rows["coco_class"]], int))
    scores = evaluate_detections(detections, gt_boxes, gt_labels, detector.categories)
    present = {c for c, n in scores["n_objects"].items() if n}
    return {"map50": round(scores["map50"], 4), "photos": len(names),
            "objects": sum(scores["n_objects"].values()),
            "ap50": {c: scores["ap50"][c] for c in sorted(present)},
            "n_objects": {c: scores["n_objects"][c] for c in sorted(present)}}


def user_query(photo: Path, background: Path, rng: np.random.Generator
               ) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A user's photo of a listing and the box around it (normalised): crop 70-90 %, maybe
    mirrored, a colour cast, JPEG re-encoded, pasted on a larger real background."""
    with Image.open(photo) as img:
        image = img.convert("RGB")
    w, h = image.size
    side = rng.uniform(0.7, 0.9)
    cw, ch = int(w * side), int(h * side)
    left, top = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    gain = rng.uniform(0.8, 1.2, 3)
    image = Image.fromarray(np.clip(np.asarray(image, np.float32) * gain, 0, 255)
                            .astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=int(rng.integers(60, 86)))
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    scale = rng.uniform(1.4, 1.8)
    bw, bh = int(cw * scale), int(ch * scale)
    with Image.open(background) as bg:
        canvas = bg.convert("RGB").resize((bw, bh))
    x, y = int(rng.uniform(0, bw - cw)), int(rng.uniform(0, bh - ch))
    canvas.paste(image, (x, y))
    return canvas, (x / bw, y / bh, (x + cw) / bw, (y + ch) / bh)


def retrieval(world: Path, embedders: dict[str, Path], detector_dir: Path, queries: Path,
              query_boxes: np.ndarray, targets: list[str]) -> dict:
    """recall@1/@10 of each query's own listing: embedder x catalog treatment x query box."""
    from models.detector import PickPolicy
    from pipelines.embed import catalog_treatment, read_catalog
    from pipelines.evaluate import exact_search

    catalog = read_catalog(world)
    query_paths = sorted(p.name for p in queries.glob("*.jpg"))
    truth = np.array([list(catalog["item_id"]).index(t) for t in targets])
    out: dict[str, dict] = {}
    for label, export in embedders.items():
        for treatment, policy in (("whole", PickPolicy(("whole",))), ("detect", PickPolicy())):
            embed = catalog_treatment(export, detector_dir, world, DETECTOR_VERSION, policy)
            vectors = embed(list(catalog["image_path"]))
            ask = catalog_treatment(export, detector_dir, queries, DETECTOR_VERSION)
            for query, boxes in (("user_box", query_boxes), ("no_box", ask.boxes(query_paths))):
                _, ids = exact_search(vectors, ask(query_paths, boxes), 10)
                hits = ids == truth[:, None]
                out[f"{label}/{treatment}/{query}"] = {
                    "recall_at_1": round(float(hits[:, 0].mean()), 4),
                    "recall_at_10": round(float(hits.any(axis=1).mean()), 4)}
    return out


def import_seconds_per_1k(photos: dict[str, tuple[Path, str]], work: Path, rows: int = 1000
                          ) -> float:
    """`loupe import-catalog` of `rows` listings (the photos reused) per 1,000 rows."""
    from pipelines.import_catalog import ImportConfig, run_import

    folder = work / "import_photos"
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    for name in names:
        shutil.copyfile(photos[name][0], folder / name)
    pd.DataFrame([{"item_id": f"sku-{i:05d}", "image_path": names[i % len(names)],
                   "category": photos[names[i % len(names)]][1], "price": 10.0,
                   "available": True, "region": "eu"} for i in range(rows)]
                 ).to_csv(work / "import.csv", index=False)
    t0 = time.perf_counter()
    run_import(ImportConfig(folder, work / "import.csv", work / "import_world"))
    return round((time.perf_counter() - t0) * 1000 / rows, 2)


def run(work: Path, max_epochs: int = 4, seed: int = 0) -> dict:
    from bench.real_data import build_export
    from models.coco_detector import ALL_CLASSES, export_coco_detector
    from pipelines.harvest import HarvestConfig, harvest
    from pipelines.import_catalog import ImportConfig, run_import
    from pipelines.train import TrainConfig, export_baseline, train

    work = Path(work)
    photos = real_photos()
    boxes = boxed_photos()
    served = export_coco_detector(work / "detector")
    every_class = export_coco_detector(work / "detector_all", category_map=ALL_CLASSES)
    det_served = detector_map(served, boxes, photos)
    det_coco = detector_map(every_class, boxes, photos)

    export = build_export(photos, work / "export", seed)
    world = work / "world"
    run_import(ImportConfig(export["images"], export["catalog"], world, export["impressions"],
                            export["rater_queries"], export["rater_judgments"],
                            drop_bad_rows=True))
    harvest(world, work / "harvest", HarvestConfig(heldout_shown_share=0.5, max_val_share=0.3,
                                                   bootstrap=100))
    tcfg = TrainConfig(views=2, batch_size=64, max_epochs=max_epochs, patience=100,
                       hard_negative_pool=5, progress_bar=False)
    finetuned = train(world, work / "harvest" / "pairs_debiased.parquet", work / "finetuned",
                      tcfg, work / "feature_cache").export_dir
    frozen = export_baseline(work / "frozen", tcfg)

    rng = np.random.default_rng(seed + 1)
    catalog = pd.read_parquet(world / "tables" / "catalog.parquet").sort_values("item_id")
    queries = work / "queries"
    queries.mkdir(parents=True, exist_ok=True)
    backgrounds = [photos[b][0] for b in BACKGROUNDS]
    query_boxes, targets = [], []
    for i, row in enumerate(catalog.itertuples()):
        image, box = user_query(world / row.image_path, backgrounds[i % len(backgrounds)], rng)
        image.save(queries / f"q{i:03d}.jpg", quality=92)
        query_boxes.append(box)
        targets.append(row.item_id)
    table = retrieval(world, {"frozen": frozen, "finetuned": finetuned}, served, queries,
                      np.array(query_boxes), targets)
    per_1k = import_seconds_per_1k(photos, work)
    return {
        "n_real_photos": len(photos),
        "n_boxed_photos": det_coco["photos"], "n_boxed_objects": det_coco["objects"],
        "detector_map50_real": det_served["map50"],
        "detector_map50_real_coco_classes": det_coco["map50"],
        "real_recall_at_1_frozen": table["frozen/detect/no_box"]["recall_at_1"],
        "real_recall_at_10_frozen": table["frozen/detect/no_box"]["recall_at_10"],
        "real_recall_at_1_finetuned": table["finetuned/detect/no_box"]["recall_at_1"],
        "real_recall_at_10_finetuned": table["finetuned/detect/no_box"]["recall_at_10"],
        "import_seconds_per_1k": per_1k,
        "catalog_listings": len(catalog), "queries": len(targets),
        "headline_path": "catalog: detect -> salient box -> crop; query: no user box "
                         "(the detector's salient box, else the whole photo)",
        "retrieval": table,
        "detector": {"served_categories": det_served, "coco_classes": det_coco},
        "finetuned_on": "this shop's simulated engagement over the same photos "
                        f"(bench/real_data.build_export, {max_epochs} epochs, debiased pairs)",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/loupe-real-catalog"))
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "real_catalog.json")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    report = run(args.work)
    from data_contracts.durable import write_json_atomic

    write_json_atomic(args.out, report, sort_keys=False)
    print(f"{'path (embedder/catalog/query)':34s} {'R@1':>6s} {'R@10':>6s}")
    for key, row in report["retrieval"].items():
        print(f"{key:34s} {row['recall_at_1']:6.3f} {row['recall_at_10']:6.3f}")
    print({k: v for k, v in report.items() if not isinstance(v, dict)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
