"""Data contracts: the tiny world passes, and each kind of corruption is stopped and quarantined."""

from __future__ import annotations

import html
import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import schemas
from data_contracts.constants import MAX_LOGGED_POSITION, UNIT_NORM_TOL
from data_contracts.contracts import build_suite
from data_contracts.validation import ContractViolation, validate_table
from pipelines.cli import main
from pipelines.validate import validate_world
from pipelines.world import WORLD_END

NOW = WORLD_END + timedelta(days=30)  # after the rater set (logs end + up to 14 days)


@pytest.fixture
def tables(tiny_world, tmp_path) -> Path:
    """A private copy of the tiny world's tables (photos linked): these tests corrupt files."""
    out = tmp_path / "world" / "tables"
    shutil.copytree(tiny_world / "tables", out)
    (out.parent / "images").symlink_to(tiny_world / "images")
    return out


def _read(tables: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(tables / f"{table}.parquet")


def _write(frame: pd.DataFrame, path: Path, schema: pa.Schema) -> Path:
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path)
    return path


def _embeddings(catalog: pd.DataFrame, n: int = 40, dim: int = schemas.EMBEDDING_DIM,
                versions: tuple[str, ...] = ("embedder-v1",)) -> tuple[pd.DataFrame, pa.Schema]:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    frame = pd.DataFrame({"item_id": catalog["item_id"].to_numpy()[:n],
                          "model_version": [versions[i % len(versions)] for i in range(n)],
                          "vector": list(vectors)})
    schema = schemas.EMBEDDINGS if dim == schemas.EMBEDDING_DIM else pa.schema(
        [("item_id", pa.string()), ("model_version", pa.string()),
         ("vector", pa.list_(pa.float32(), dim))])
    return frame, schema


def _docs_text(page: Path) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.read_text())))


def test_every_table_of_the_tiny_world_passes(tiny_world, tmp_path):
    before = sorted(p.name for p in (tiny_world / "tables").iterdir())
    reports = validate_world(tiny_world, quarantine_dir=tmp_path / "q",
                             docs_dir=tmp_path / "docs", now=NOW)
    assert [r.table for r in reports] == [t for t in schemas.TABLES if t != "embeddings"]
    for report in reports:
        assert report.success and report.failures == [], report.summary()
        assert report.rows == pq.read_metadata(report.path).num_rows > 0
        assert report.docs_path.is_file() and report.quarantined_to is None
        # every schema column is covered by existence, type and not-null expectations
        assert report.expectations == len(build_suite(report.table).expectations)
        assert report.expectations > 3 * len(schemas.TABLES[report.table])
    assert sorted(p.name for p in (tiny_world / "tables").iterdir()) == before
    assert not (tmp_path / "q").exists()
    assert (tmp_path / "docs" / "index.html").is_file()


def test_good_embeddings_pass_and_stay(tables, tmp_path):
    frame, schema = _embeddings(_read(tables, "catalog"))
    path = _write(frame, tmp_path / "embeddings.parquet", schema)
    report = validate_table("embeddings", path, quarantine_dir=tmp_path / "q", docs_dir=None)
    assert report.success and report.rows == len(frame) and report.docs_path is None
    assert path.is_file() and not (tmp_path / "q").exists()


def _nulls(t):
    f = _read(t, "impressions")
    f.loc[[3, 11], "item_id"] = None
    return "impressions", f, schemas.IMPRESSIONS


def _negative_position(t):
    f = _read(t, "impressions")
    f.loc[[5], "position"] = -3
    return "impressions", f, schemas.IMPRESSIONS


def _position_past_grid(t):
    """Grids of any length pass (issue 16); a position past any plausible grid does not."""
    f = _read(t, "impressions")
    f.loc[[5], "position"] = MAX_LOGGED_POSITION + 1
    return "impressions", f, schemas.IMPRESSIONS


def _absent_position(t):
    f = _read(t, "impressions")
    f["position"] = f["position"].astype("Int64")
    f.loc[[7], "position"] = pd.NA
    return "impressions", f, schemas.IMPRESSIONS


def _duplicate_impression(t):
    f = _read(t, "impressions")
    return "impressions", pd.concat([f, f.iloc[[9]]], ignore_index=True), schemas.IMPRESSIONS


def _future_timestamp(t):
    f = _read(t, "impressions")
    f.loc[[2], "ts"] = NOW + timedelta(hours=1)
    return "impressions", f, schemas.IMPRESSIONS


def _unknown_item(t):
    f = _read(t, "boards")
    f.loc[[4], "item_id"] = "it-not-in-catalog"
    return "boards", f, schemas.BOARDS


def _grade_out_of_set(t):
    f = _read(t, "rater_judgments")
    f.loc[[1], "grade"] = 3
    return "rater_judgments", f, schemas.RATER_JUDGMENTS


def _box_out_of_range(t):
    f = _read(t, "scene_objects")
    f.loc[[6], "x1"] = 1.25
    return "scene_objects", f, schemas.SCENE_OBJECTS


def _inverted_box(t):
    f = _read(t, "rater_queries")
    f.loc[[0], ["query_y0", "query_y1"]] = [0.8, 0.2]
    return "rater_queries", f, schemas.RATER_QUERIES


def _nan_vector(t):
    f, s = _embeddings(_read(t, "catalog"))
    f.at[8, "vector"] = np.where(np.arange(schemas.EMBEDDING_DIM) == 17, np.nan, f.at[8, "vector"])
    return "embeddings", f, s


def _null_vector(t):
    """A variable-length list column (parquet cannot round-trip a null fixed-size list)."""
    f, _ = _embeddings(_read(t, "catalog"))
    f.at[4, "vector"] = None  # the other rows still get exact norms (per-row sums)
    return "embeddings", f, pa.schema([*schemas.EMBEDDINGS][:2] + [
        pa.field("vector", pa.list_(pa.float32()))])


def _wrong_dimension(t):
    return "embeddings", *_embeddings(_read(t, "catalog"), dim=128)


def _non_unit_norm(t):
    f, s = _embeddings(_read(t, "catalog"))
    f.loc[[0, 1, 2], "vector"] = pd.Series([v * (1 + 10 * UNIT_NORM_TOL)
                                            for v in f.vector[:3]], index=[0, 1, 2])
    return "embeddings", f, s


def _two_model_versions(t):
    return "embeddings", *_embeddings(_read(t, "catalog"), versions=("embedder-v1", "v2"))


# corruption -> (expectation that must fail, its column, rows it flags or the observed value)
CORRUPTIONS = {
    "nulls": (_nulls, "expect_column_values_to_not_be_null", "item_id", 2),
    "negative position": (_negative_position, "expect_column_values_to_be_between",
                          "position", 1),
    "position past any grid": (_position_past_grid, "expect_column_values_to_be_between",
                               "position", 1),
    "absent position": (_absent_position, "expect_column_values_to_not_be_null", "position", 1),
    "duplicate impression": (_duplicate_impression, "expect_column_values_to_be_unique",
                             "impression_id", 2),
    "future timestamp": (_future_timestamp, "expect_column_values_to_be_between", "ts", 1),
    "unknown item": (_unknown_item, "expect_column_values_to_be_null",
                     "item_id_not_in_catalog", 1),
    "grade out of set": (_grade_out_of_set, "expect_column_values_to_be_in_set", "grade", 1),
    "box out of range": (_box_out_of_range, "expect_column_values_to_be_between", "x1", 1),
    "inverted box": (_inverted_box, "expect_column_pair_values_a_to_be_greater_than_b",
                     "query_y1, query_y0", 1),
    "NaN vector": (_nan_vector, "expect_column_values_to_be_between",
                   "vector_nonfinite_values", 1),
    "null vector": (_null_vector, "expect_column_values_to_not_be_null", "vector", 1),
    "wrong dimension": (_wrong_dimension, "expect_column_values_to_be_in_set", "vector_dim", 40),
    "non-unit norm": (_non_unit_norm, "expect_column_values_to_be_between", "vector_l2_norm", 3),
    "two model versions": (_two_model_versions,
                           "expect_column_unique_value_count_to_be_between", "model_version", 2),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_stopped_and_quarantined(kind, tables, tmp_path):
    corrupt, expectation, column, count = CORRUPTIONS[kind]
    table, frame, schema = corrupt(tables)
    path = _write(frame, tables / f"{table}.parquet", schema)
    with pytest.raises(ContractViolation) as caught:
        validate_table(table, path, quarantine_dir=tmp_path / "q", docs_dir=tmp_path / "docs",
                       now=NOW)
    (report,) = caught.value.reports
    failed = {(f.expectation, f.column): f for f in report.failures}
    assert (expectation, column) in failed, report.summary()
    failure = failed[(expectation, column)]
    if failure.unexpected_count is None:  # table-level expectation: GE's observed value
        assert failure.observed == count
    else:
        assert failure.unexpected_count == count and failure.examples
    assert f"{expectation}({column})" in str(caught.value)
    # a copy of the bad file in a timestamped quarantine folder next to its report; the
    # user's own file stays where it was, unchanged
    assert path.is_file() and pq.read_table(path).num_rows == len(frame)
    moved = report.quarantined_to
    assert moved.read_bytes() == path.read_bytes()
    assert moved.parent.parent == tmp_path / "q" and moved.parent.name.endswith(f"_{table}")
    assert pq.read_table(moved).num_rows == len(frame)
    saved = json.loads((moved.parent / "report.json").read_text())
    assert saved["success"] is False and saved["path"] == str(path)
    assert expectation in {f["expectation"] for f in saved["failures"]}
    docs = _docs_text(report.docs_path)  # the Data Docs page of this very run
    assert "Status: Failed" in docs
    assert f"Unsuccessful Expectations {len(report.failures)} " in docs


def test_examples_name_the_bad_rows(tables, tmp_path):
    table, frame, schema = _negative_position(tables)
    path = _write(frame, tables / "impressions.parquet", schema)
    with pytest.raises(ContractViolation) as caught:
        validate_table(table, path, quarantine_dir=None, docs_dir=None, now=NOW)
    (failure,) = caught.value.reports[0].failures
    assert failure.examples == [{"position": -3, "row": 5,
                                 "impression_id": frame.impression_id[5]}]
    assert path.is_file()  # no quarantine dir: the file stays, the stage still stops


def test_catalog_is_required_for_item_checks(tables, tmp_path):
    lone = tmp_path / "lone" / "boards.parquet"
    lone.parent.mkdir()
    shutil.copy(tables / "boards.parquet", lone)
    with pytest.raises(FileNotFoundError, match="catalog"):
        validate_table("boards", lone, quarantine_dir=None, docs_dir=None, now=NOW)
    report = validate_table("boards", lone, quarantine_dir=None, docs_dir=None,
                            catalog_path=tables / "catalog.parquet", now=NOW)
    assert report.success
    with pytest.raises(ValueError, match="unknown table"):
        validate_table("clicks", lone, quarantine_dir=None, docs_dir=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_table("boards", lone, quarantine_dir=None, docs_dir=None,
                       catalog_path=tables / "catalog.parquet", now=NOW.replace(tzinfo=None))


def test_cli_passes_and_fails_with_exit_codes(tables, tmp_path, capsys):
    now = ["--now", NOW.isoformat()]
    assert main(["validate", "boards", str(tables / "boards.parquet"), *now]) == 0
    assert "boards contract passed" in capsys.readouterr().out

    table, frame, schema = _future_timestamp(tables)
    path = _write(frame, tables / "impressions.parquet", schema)
    code = main(["validate", "impressions", str(path), "--quarantine", str(tmp_path / "q"),
                 "--docs", str(tmp_path / "docs"), *now])
    err = capsys.readouterr().err
    assert code == 2 and "expect_column_values_to_be_between(ts)" in err
    assert "1 row (" in err and "quarantined to" in err and path.is_file()


def test_cli_world_reports_every_failing_table(tables, tmp_path, capsys):
    _write(_unknown_item(tables)[1], tables / "boards.parquet", schemas.BOARDS)
    summary = tmp_path / "validate.json"
    code = main(["validate", "world", str(tables.parent), "--quarantine", str(tmp_path / "q"),
                 "--summary", str(summary), "--now", NOW.isoformat()])
    assert code == 2 and "boards contract FAILED" in capsys.readouterr().err
    assert [r["table"] for r in json.loads(summary.read_text())] == ["boards"]
    # the failing table is copied to quarantine; every table stays in the user's folder
    assert [p.read_bytes() for p in (tmp_path / "q").rglob("boards.parquet")] == [
        (tables / "boards.parquet").read_bytes()]
    assert sorted(p.stem for p in tables.iterdir()) == sorted(
        t for t in schemas.TABLES if t != "embeddings")


def test_missing_photos_and_unknown_rater_queries_are_refused_by_row(tables):
    """Issue 16: a catalog photo or query photo with no file passed validate (and stopped
    training later); judgments for rater queries that do not exist passed too."""
    catalog = _read(tables, "catalog")
    catalog.loc[3, "image_path"] = "images/catalog/nowhere.jpg"
    path = _write(catalog, tables / "catalog.parquet", schemas.CATALOG)
    with pytest.raises(ContractViolation) as caught:
        validate_table("catalog", path, quarantine_dir=None, docs_dir=None, now=NOW)
    (failure,) = caught.value.reports[0].failures
    assert failure.column == "photo_file_missing" and failure.unexpected_count == 1
    assert failure.examples == [{"photo_file_missing": "images/catalog/nowhere.jpg", "row": 3,
                                 "item_id": catalog.item_id[3]}]

    judgments = _read(tables, "rater_judgments")
    judgments.loc[0, "rater_query_id"] = "rq-unknown"
    path = _write(judgments, tables / "rater_judgments.parquet", schemas.RATER_JUDGMENTS)
    with pytest.raises(ContractViolation, match="rater_query_id_not_in_rater_queries"):
        validate_table("rater_judgments", path, quarantine_dir=None, docs_dir=None, now=NOW)


def test_pandas_defaults_get_a_fix_in_the_message(tables, tiny_world):
    """Issue 16: integer prices, naive timestamps and a missing style column failed with
    messages that did not say the fix."""
    catalog = _read(tables, "catalog")
    catalog["price"] = catalog["price"].round().astype("int64")
    catalog["created_at"] = catalog["created_at"].dt.tz_localize(None)
    catalog.drop(columns=["region"]).to_parquet(tables / "catalog.parquet", index=False)
    with pytest.raises(ContractViolation) as caught:
        validate_table("catalog", tables / "catalog.parquet", quarantine_dir=None,
                       docs_dir=None, now=NOW)
    text = str(caught.value)
    assert "observed 'int64'; write the column as float64" in text
    assert "tz_localize('UTC')" in text and "import-catalog" in text
    assert "expect_column_to_exist(region)" in text and "data_contracts/schemas.py" in text
    # the generated world's style attributes are optional
    catalog = _read(tiny_world / "tables", "catalog").drop(
        columns=["shape_family", "palette", "pattern", "material"])
    catalog.to_parquet(tables / "catalog.parquet", index=False)
    assert validate_table("catalog", tables / "catalog.parquet", quarantine_dir=None,
                          docs_dir=None, now=NOW).success
