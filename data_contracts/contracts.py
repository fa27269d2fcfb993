"""Great Expectations suites: what every Loupe table must satisfy before a stage reads it.

One suite per table in `schemas.TABLES`. The schema half (columns present, pandas dtype,
no nulls) is derived from `schemas.py`, so the contract cannot drift from the writer. The
table half states the invariants downstream stages rely on: unique keys, 1-based grid
positions, grades in {0, 1, 2}, boxes inside the image, timestamps not in the future.

Checks that need more than one row or another table (item ids known to the catalog, vector
dimension, finiteness and norm) are first computed as derived columns with
`add_derived_columns`, then checked by plain GE expectations: every failure lands in the same
GE validation result and Data Docs page. The reference time is the suite parameter
`{"$PARAMETER": NOW}`, supplied at validation time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import great_expectations as gx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from great_expectations.expectations import (
    ExpectColumnPairValuesAToBeGreaterThanB,
    ExpectColumnToExist,
    ExpectColumnUniqueValueCountToBeBetween,
    ExpectColumnValueLengthsToBeBetween,
    ExpectColumnValuesToBeBetween,
    ExpectColumnValuesToBeInSet,
    ExpectColumnValuesToBeNull,
    ExpectColumnValuesToBeOfType,
    ExpectColumnValuesToBeUnique,
    ExpectColumnValuesToNotBeNull,
    ExpectCompoundColumnsToBeUnique,
)
from great_expectations.expectations.expectation import Expectation

from data_contracts import schemas
from data_contracts.constants import LOGGING_POLICIES, MAX_LOGGED_POSITION, UNIT_NORM_TOL

NOW = "now"  # suite parameter: timestamps may not be later than this reference time
GRADES = (0, 1, 2)  # docs/rater_guidelines.md: not similar, similar style, same product
SPLITS = ("train", "val", "test")

# tables whose item_id must exist in the catalog (validated against a catalog file)
NEEDS_CATALOG = frozenset({"impressions", "boards", "rater_judgments", "scene_objects"})
# columns that identify a row: shown next to every unexpected value in failure summaries
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "catalog": ("item_id",),
    "impressions": ("impression_id",),
    "boards": ("board_id", "item_id"),
    "rater_queries": ("rater_query_id",),
    "rater_judgments": ("rater_query_id", "item_id"),
    "scenes": ("scene_id",),
    "scene_objects": ("scene_id", "object_idx"),
    "embeddings": ("item_id",),
}

# the photo column of each table that names photos (paths relative to the world root)
PHOTO_COLUMNS = {"catalog": "image_path", "impressions": "query_image_path",
                 "rater_queries": "image_path", "scenes": "image_path"}

# columns a table may omit, and what they read as then: the generated world's style
# attributes mean nothing to a real catalog (only model-free attribute vectors use them)
OPTIONAL_COLUMNS: dict[str, dict[str, str]] = {
    "catalog": {"shape_family": "", "palette": "", "pattern": "", "material": ""}}

# derived columns (added by `add_derived_columns`)
ROW = "row"  # position of the row in the file (0-based, as pandas reads it): named in examples
UNKNOWN_ITEM = "item_id_not_in_catalog"  # the item_id where the catalog lacks it, else null
MISSING_PHOTO = "photo_file_missing"  # the photo path where no such file exists, else null
UNKNOWN_RATER_QUERY = "rater_query_id_not_in_rater_queries"
VECTOR_DIM = "vector_dim"
VECTOR_NONFINITE = "vector_nonfinite_values"
VECTOR_NORM = "vector_l2_norm"


def pandas_type_names(schema: pa.Schema) -> dict[str, str]:
    """The dtype name GE's pandas type check sees for each column of a schema-true table.

    Taken from an empty table converted exactly like a read parquet file, so string, bool,
    tz-aware timestamp and list columns get whatever names this pandas/pyarrow pair uses.
    """
    frame = schema.empty_table().to_pandas()
    return {name: frame[name].dtype.type.__name__ for name in schema.names}


def _schema_expectations(schema: pa.Schema) -> list[Expectation]:
    types = pandas_type_names(schema)
    out: list[Expectation] = []
    for name in schema.names:
        out += [
            ExpectColumnToExist(column=name),
            ExpectColumnValuesToBeOfType(column=name, type_=types[name]),
            ExpectColumnValuesToNotBeNull(column=name),
        ]
    return out


def _unique(*columns: str) -> Expectation:
    if len(columns) == 1:
        return ExpectColumnValuesToBeUnique(column=columns[0])
    return ExpectCompoundColumnsToBeUnique(column_list=list(columns))


def _not_future(column: str) -> Expectation:
    return ExpectColumnValuesToBeBetween(column=column, max_value={"$PARAMETER": NOW})


def _non_empty(column: str) -> Expectation:
    return ExpectColumnValueLengthsToBeBetween(column=column, min_value=1)


def _box(x0: str, y0: str, x1: str, y1: str) -> list[Expectation]:
    """Normalised box: every corner in [0, 1] and a positive width and height."""
    return [ExpectColumnValuesToBeBetween(column=c, min_value=0.0, max_value=1.0)
            for c in (x0, y0, x1, y1)] + [
        ExpectColumnPairValuesAToBeGreaterThanB(column_A=x1, column_B=x0, or_equal=False),
        ExpectColumnPairValuesAToBeGreaterThanB(column_A=y1, column_B=y0, or_equal=False),
    ]


def _known_items() -> list[Expectation]:
    return [ExpectColumnValuesToBeNull(column=UNKNOWN_ITEM)]


def _table_expectations(table: str) -> list[Expectation]:
    photos = [ExpectColumnValuesToBeNull(column=MISSING_PHOTO)] if table in PHOTO_COLUMNS else []
    return _row_expectations(table) + photos


def _row_expectations(table: str) -> list[Expectation]:
    if table == "catalog":
        return [_unique("item_id"), _not_future("created_at"), _non_empty("image_path"),
                ExpectColumnValuesToBeBetween(column="price", min_value=0, strict_min=True)]
    if table == "impressions":
        return [
            _unique("impression_id"), _unique("session_id", "position"),
            _unique("session_id", "item_id"),
            ExpectColumnValuesToBeBetween(column="position", min_value=1,
                                          max_value=MAX_LOGGED_POSITION),
            ExpectColumnValuesToBeInSet(column="logging_policy", value_set=list(LOGGING_POLICIES)),
            _not_future("ts"), _non_empty("query_image_path"),
            *_box("query_x0", "query_y0", "query_x1", "query_y1"), *_known_items(),
        ]
    if table == "boards":
        return [_unique("board_id", "item_id"), _not_future("saved_at"), *_known_items()]
    if table == "rater_queries":
        return [_unique("rater_query_id"), _not_future("created_at"), _non_empty("image_path"),
                *_box("query_x0", "query_y0", "query_x1", "query_y1")]
    if table == "rater_judgments":
        return [_unique("rater_query_id", "item_id"),
                ExpectColumnValuesToBeInSet(column="grade", value_set=list(GRADES)),
                *_known_items(), ExpectColumnValuesToBeNull(column=UNKNOWN_RATER_QUERY)]
    if table == "scenes":
        return [_unique("scene_id"), _non_empty("image_path"),
                ExpectColumnValuesToBeBetween(column="width", min_value=1),
                ExpectColumnValuesToBeBetween(column="height", min_value=1),
                ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))]
    if table == "scene_objects":
        return [_unique("scene_id", "object_idx"),
                ExpectColumnValuesToBeBetween(column="object_idx", min_value=0),
                *_box("x0", "y0", "x1", "y1"), *_known_items()]
    if table == "embeddings":
        return [
            _unique("item_id"), _non_empty("model_version"),
            ExpectColumnUniqueValueCountToBeBetween(column="model_version",
                                                    min_value=1, max_value=1),
            ExpectColumnValuesToBeInSet(column=VECTOR_DIM, value_set=[schemas.EMBEDDING_DIM]),
            ExpectColumnValuesToBeBetween(column=VECTOR_NONFINITE, max_value=0),
            ExpectColumnValuesToBeBetween(column=VECTOR_NORM, min_value=1 - UNIT_NORM_TOL,
                                          max_value=1 + UNIT_NORM_TOL),
        ]
    raise ValueError(f"unknown table {table!r}; known tables: {', '.join(schemas.TABLES)}")


def build_suite(table: str) -> gx.ExpectationSuite:
    """The expectation suite named after `table`: schema checks first, then invariants."""
    expectations = _table_expectations(table)  # raises on an unknown table before the schema
    return gx.ExpectationSuite(
        name=table, expectations=_schema_expectations(schemas.TABLES[table]) + expectations,
        meta={"contract": "loupe", "schema": "data_contracts/schemas.py"},
    )


def add_derived_columns(table: str, frame: pd.DataFrame, arrow: pa.Table,
                        catalog_item_ids: Iterable[str] | None,
                        photo_root: Path | None = None,
                        rater_query_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Append the derived columns `table`'s suite checks (computed from the arrow table).

    Source columns that are missing are skipped: the schema expectations already report
    them, and GE then reports the derived column as missing too. Photo paths are checked
    under `photo_root` and judgments against `rater_query_ids`; where either is unknown (a
    table outside a world's tables/ folder) that check has nothing to report.
    """
    names = set(arrow.column_names)
    for column, default in OPTIONAL_COLUMNS.get(table, {}).items():
        if column not in names:
            frame[column] = pd.Series(default, index=frame.index, dtype=frame["item_id"].dtype
                                      if "item_id" in frame else object)
    frame[ROW] = np.arange(len(frame))
    column = PHOTO_COLUMNS.get(table)
    if column in names:
        paths = frame[column]
        if photo_root is None:
            frame[MISSING_PHOTO] = pd.Series(None, index=frame.index, dtype=object)
        else:
            exists = {p: (Path(photo_root) / p).is_file() for p in paths.dropna().unique()}
            frame[MISSING_PHOTO] = paths.where(~paths.map(exists).fillna(True).astype(bool))
    if table == "rater_judgments" and "rater_query_id" in names:
        ids = frame["rater_query_id"]
        known = (ids.isin(pd.Index(rater_query_ids)) | ids.isna() if rater_query_ids is not None
                 else pd.Series(True, index=frame.index))
        frame[UNKNOWN_RATER_QUERY] = ids.where(~known)
    if table in NEEDS_CATALOG and "item_id" in names:
        if catalog_item_ids is None:
            raise ValueError(f"{table} checks item ids against the catalog: pass its item ids")
        item_id = frame["item_id"]
        known = item_id.isin(pd.Index(catalog_item_ids)) | item_id.isna()
        frame[UNKNOWN_ITEM] = item_id.where(~known)
    if table == "embeddings" and "vector" in names:
        frame[VECTOR_DIM], frame[VECTOR_NONFINITE], frame[VECTOR_NORM] = _vector_stats(
            arrow.column("vector"))
    return frame


def _vector_stats(vectors: pa.ChunkedArray) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per-row length, count of non-finite entries and L2 norm, vectorised over all rows.

    A null vector gives nulls (the not-null expectation reports it); a vector with a
    non-finite entry gets a null norm, so only the finiteness expectation reports it.
    """
    vectors = vectors.combine_chunks()
    if isinstance(vectors.type, pa.FixedSizeListType):  # its flatten() ignores null rows
        vectors = vectors.cast(pa.list_(vectors.type.value_type))
    n = len(vectors)
    lengths = pc.list_value_length(vectors).fill_null(0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
    null = vectors.is_null().to_numpy(zero_copy_only=False)
    if n and (lengths == lengths[0]).all():  # the usual rectangular file: one (n, dim) view
        matrix = values.reshape(n, lengths[0])
        nonfinite = (~np.isfinite(matrix)).sum(axis=1)
        norm = np.linalg.norm(matrix, axis=1).astype(np.float64)
    else:  # ragged or with null rows: sum per row by row index
        row = np.repeat(np.arange(n), lengths)
        finite = np.isfinite(values)
        nonfinite = np.bincount(row, weights=~finite, minlength=n)
        squares = np.square(np.where(finite, values, 0.0), dtype=np.float64)
        norm = np.sqrt(np.bincount(row, weights=squares, minlength=n))
    return (pd.Series(lengths, dtype="Int64").mask(null),
            pd.Series(nonfinite, dtype="Int64").mask(null),
            pd.Series(norm).mask(null | (nonfinite > 0)))
