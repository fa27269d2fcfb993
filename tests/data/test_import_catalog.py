"""`loupe import-catalog` on real photographs: a user's folder + CSV becomes a valid world,
bad rows are named (row, id, reason), nothing half-written lands, a rerun writes the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipelines.cli import main
from pipelines.import_catalog import ImportConfig, ImportRefused, run_import
from pipelines.validate import validate_world


@pytest.fixture
def shop(real_photos, tmp_path) -> Path:
    """A user's export: photos in nested folders, a CSV with integer prices, yes/no
    availability, naive timestamps and none of the generated world's optional columns."""
    root = tmp_path / "export"
    rows = []
    for i, (name, (path, category)) in enumerate(sorted(real_photos.items())):
        rel = Path(category) / name
        (root / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "photos" / rel)
        rows.append({"item_id": f"sku-{i:03d}", "image_path": str(rel), "category": category,
                     "price": str(10 + i), "available": "yes" if i % 4 else "no",
                     "region": "eu" if i % 2 else "us",
                     "created_at": f"2026-10-{1 + i:02d} 12:00:00"})
    pd.DataFrame(rows).to_csv(root / "catalog.csv", index=False)
    return root


def _cfg(shop: Path, out: Path, **kw) -> ImportConfig:
    return ImportConfig(images=shop / "photos", catalog=shop / "catalog.csv", out=out, **kw)


def test_a_real_photo_catalog_imports_as_a_valid_world(shop, real_photos, tmp_path):
    report = run_import(_cfg(shop, tmp_path / "world"))
    world = tmp_path / "world"
    catalog = pd.read_parquet(world / "tables/catalog.parquet")
    assert report.rows["catalog"] == len(catalog) == len(real_photos)
    assert report.refused == {}
    assert (catalog["product_id"] == catalog["item_id"]).all()  # one listing per product
    assert catalog["price"].tolist() == [10.0 + i for i in range(len(catalog))]
    assert catalog["available"].sum() == sum(1 for i in range(len(catalog)) if i % 4)
    assert str(catalog["created_at"].dt.tz) == "UTC"
    assert any("read as UTC" in c for c in report.coerced)
    assert any(d.startswith("product_id") for d in report.defaults)
    for rel, (name, (src, _)) in zip(catalog["image_path"], sorted(real_photos.items()),
                                     strict=True):
        assert (world / rel).read_bytes() == src.read_bytes(), name  # copied, not touched
    assert validate_world(world)  # every table passes its contract, photos included
    assert json.loads((world / "import.json").read_text())["rows"]["catalog"] == len(catalog)
    # idempotent: the same inputs give the same tables
    before = {p.name: p.read_bytes() for p in (world / "tables").iterdir()}
    run_import(_cfg(shop, world))
    assert {p.name: p.read_bytes() for p in (world / "tables").iterdir()} == before


def test_bad_rows_are_named_and_nothing_lands(shop, tmp_path):
    frame = pd.read_csv(shop / "catalog.csv", dtype=str)
    frame.loc[1, "image_path"] = "animal/missing.jpg"
    frame.loc[2, "price"] = "-3"
    frame.loc[3, "item_id"] = frame.loc[0, "item_id"]
    broken = shop / "photos" / frame.loc[4, "image_path"]
    broken.write_bytes(broken.read_bytes()[:300])  # a truncated real photo
    frame.loc[5, "image_path"] = "../catalog.csv"
    frame.to_csv(shop / "catalog.csv", index=False)
    out = tmp_path / "world"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier import")
    with pytest.raises(ImportRefused) as caught:
        run_import(_cfg(shop, out))
    message = str(caught.value)
    for expected in ("catalog row 1 (item_id=sku-001): photo file missing",
                     "catalog row 2 (item_id=sku-002): price is not a positive number",
                     "catalog row 3 (item_id=sku-000): item_id repeated",
                     "catalog row 4 (item_id=sku-004): photo not usable",
                     "catalog row 5 (item_id=sku-005): photo path leaves the images folder",
                     "--drop-bad-rows"):
        assert expected in message, message
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # nothing written, nothing lost
    # the CLI says the same and exits 2; --drop-bad-rows imports the rest, counted by reason
    assert main(["import-catalog", "--images", str(shop / "photos"), "--catalog",
                 str(shop / "catalog.csv"), "--out", str(out)]) == 2
    report = run_import(_cfg(shop, out, drop_bad_rows=True))
    assert sum(report.refused["catalog"].values()) == 5
    assert report.refused["catalog"]["photo file missing"] == 1
    assert report.rows["catalog"] == len(frame) - 5
    assert validate_world(out)


def test_missing_required_columns_say_what_a_catalog_needs(shop, tmp_path):
    frame = pd.read_csv(shop / "catalog.csv", dtype=str).drop(columns=["region"])
    frame.to_csv(shop / "catalog.csv", index=False)
    with pytest.raises(ValueError, match=r"missing required columns \['region'\]"):
        run_import(_cfg(shop, tmp_path / "world"))
    assert not (tmp_path / "world").exists()


def test_dropping_every_row_is_a_refusal_not_an_empty_world(shop, tmp_path):
    table = pd.read_csv(shop / "catalog.csv")
    table["price"] = 0
    table.to_csv(shop / "catalog.csv", index=False)
    with pytest.raises(ImportRefused, match=r"no catalog row is left to import .*price is "
                                            r"not a positive number"):
        run_import(_cfg(shop, tmp_path / "world", drop_bad_rows=True))
    assert not (tmp_path / "world").exists()


def test_a_photo_folder_becomes_a_catalog_table(shop, tmp_path):
    from pipelines.demo import catalog_from_folder

    table = catalog_from_folder(shop / "photos")
    assert len(table) == len(pd.read_csv(shop / "catalog.csv"))
    assert set(table["category"]) == set(pd.read_csv(shop / "catalog.csv")["category"])
    assert table["item_id"].is_unique and (table["price"] > 0).all()
    report = run_import(ImportConfig(shop / "photos", _csv(table, tmp_path), tmp_path / "w"))
    assert report.rows["catalog"] == len(table) and report.refused == {}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no photos"):
        catalog_from_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        catalog_from_folder(tmp_path / "nowhere")


def _csv(table: pd.DataFrame, tmp_path: Path) -> Path:
    table.to_csv(tmp_path / "from_folder.csv", index=False)
    return tmp_path / "from_folder.csv"
