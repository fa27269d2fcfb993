"""Import stage: a folder of photos and a catalog file (CSV or parquet) -> a Loupe world.

Only `item_id, image_path, category, price, available, region` are required; `image_path`
is relative to `--images`. What the generated world has and a real catalog may lack is
filled and said: `product_id` defaults to `item_id` (one listing per product), `seller_id`
to "unknown", `created_at` to the import time, the style attributes (`shape_family`,
`palette`, `pattern`, `material`) to "". Types are coerced where that is safe (integer
prices, 0/1 or yes/no availability, naive timestamps read as UTC) and each coercion is
reported. Every photo must exist inside `--images` and decode; a bad row is named with its
row number, id and reason. Bad rows refuse the import, or with `drop_bad_rows` are left out
and counted by reason.

Optional `--impressions`, `--rater-queries` and `--rater-judgments` tables come in the same
way (query photos relative to `--images` too); the tables a catalog lacks (boards, scenes,
scene objects, raters) are written empty. The world is assembled in a temporary sibling and
renamed into place only when every table passes its contract, so a failed import lands
nothing and an import repeated on the same inputs writes the same world. The user's files
are only read.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import schemas
from data_contracts.durable import atomic_dir
from models.preprocessing import BadImage, decode_image

log = logging.getLogger("loupe.import")

REQUIRED = ("item_id", "image_path", "category", "price", "available", "region")
STYLE_COLUMNS = ("shape_family", "palette", "pattern", "material")
CATALOG_PHOTOS = Path("images") / "catalog"
QUERY_PHOTOS = Path("images") / "queries"
TRUE_WORDS = {"true", "1", "yes", "y", "t"}
FALSE_WORDS = {"false", "0", "no", "n", "f"}


@dataclass(frozen=True)
class ImportConfig:
    images: Path  # the folder the tables' photo paths are relative to
    catalog: Path
    out: Path
    impressions: Path | None = None
    rater_queries: Path | None = None
    rater_judgments: Path | None = None
    drop_bad_rows: bool = False  # import the good rows and count the rest, instead of refusing


@dataclass
class ImportReport:
    out: str
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows written
    refused: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> reason -> rows
    bad_rows: list[dict] = field(default_factory=list)  # the first 50: row, id, reason
    coerced: list[str] = field(default_factory=list)  # what was converted, said once per column
    defaults: list[str] = field(default_factory=list)  # optional columns filled in


class ImportRefused(ValueError):
    """The input has bad rows (and `drop_bad_rows` is off); nothing was written."""


# --------------------------------------------------------------------------- readers
def _read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",",
                           dtype=str, keep_default_na=False, na_values=[""])
    raise ValueError(f"{path}: a catalog is a .csv, .tsv or .parquet file")


class _Rows:
    """Collects bad rows of one table: (row, id, reason)."""

    def __init__(self, table: str, key: str, report: ImportReport) -> None:
        self.table, self.key, self.report = table, key, report
        self.bad: dict[int, str] = {}

    def flag(self, frame: pd.DataFrame, mask: pd.Series, reason: str) -> None:
        for row in frame.index[mask.fillna(True).to_numpy(bool)]:
            if row not in self.bad:
                self.bad[row] = reason
                if len(self.report.bad_rows) < 50:
                    value = frame.at[row, self.key]
                    self.report.bad_rows.append({
                        "table": self.table, "row": int(row), "id_column": self.key,
                        "id": None if pd.isna(value) else str(value), "reason": reason})

    def finish(self, frame: pd.DataFrame) -> pd.DataFrame:
        counts: dict[str, int] = {}
        for reason in self.bad.values():
            counts[reason] = counts.get(reason, 0) + 1
        if counts:
            self.report.refused[self.table] = dict(sorted(counts.items()))
        return frame.drop(index=list(self.bad))


# --------------------------------------------------------------------------- coercion
def _as_bool(values: pd.Series, column: str, report: ImportReport) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        return values
    words = values.astype(str).str.strip().str.lower()
    out = pd.Series(pd.NA, index=values.index, dtype="boolean")
    out[words.isin(TRUE_WORDS)] = True
    out[words.isin(FALSE_WORDS)] = False
    report.coerced.append(f"{column}: {sorted(TRUE_WORDS)} read as true, "
                          f"{sorted(FALSE_WORDS)} as false")
    return out


def _as_float(values: pd.Series, column: str, report: ImportReport) -> pd.Series:
    if pd.api.types.is_float_dtype(values):
        return values
    report.coerced.append(f"{column}: {values.dtype} read as float")
    return pd.to_numeric(values, errors="coerce").astype("float64")


def _as_utc(values: pd.Series, column: str, report: ImportReport) -> pd.Series:
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert(UTC)
    parsed = pd.to_datetime(values, errors="coerce", utc=False, format="mixed")
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        return parsed.dt.tz_convert(UTC)
    report.coerced.append(f"{column}: timestamps without a time zone read as UTC")
    return parsed.dt.tz_localize(UTC)


def _default(frame: pd.DataFrame, column: str, value, why: str, report: ImportReport) -> None:
    if column not in frame.columns:
        frame[column] = value
        report.defaults.append(f"{column}: {why}")


# --------------------------------------------------------------------------- photos
def _photo_checker(images: Path) -> Callable[[str], str | None]:
    """path -> None if it names a decodable photo inside `images`, else the reason."""
    root = Path(images).resolve()
    seen: dict[str, str | None] = {}

    def check(rel: str) -> str | None:
        if rel in seen:
            return seen[rel]
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            reason: str | None = "photo path leaves the images folder"
        elif not path.is_file():
            reason = "photo file missing"
        else:
            try:
                decode_image(path.read_bytes())
                reason = None
            except BadImage as err:
                reason = f"photo not usable: {err}"
        seen[rel] = reason
        return reason
    return check


def _check_photos(frame: pd.DataFrame, column: str, rows: _Rows,
                  check: Callable[[str], str | None]) -> None:
    reasons = frame[column].map(lambda p: check(str(p)) if pd.notna(p) else "no photo path")
    for reason in sorted(set(reasons.dropna())):
        rows.flag(frame, reasons.eq(reason), reason)


def _copy_photos(paths: pd.Series, images: Path, dest: Path) -> None:
    for rel in sorted(set(paths)):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(images) / rel, target)


# --------------------------------------------------------------------------- tables
def _catalog(cfg: ImportConfig, report: ImportReport, now: datetime) -> pd.DataFrame:
    frame = _read_table(cfg.catalog).reset_index(drop=True)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"{cfg.catalog}: missing required columns {missing}; a catalog needs "
                         f"{list(REQUIRED)} (see docs/bring_your_own_data.md)")
    rows = _Rows("catalog", "item_id", report)
    for column in REQUIRED:
        rows.flag(frame, frame[column].isna() | frame[column].astype(str).str.strip().eq(""),
                  f"{column} is empty")
    frame["item_id"] = frame["item_id"].astype(str)
    rows.flag(frame, frame["item_id"].duplicated(keep="first"), "item_id repeated")
    frame["price"] = _as_float(frame["price"], "price", report)
    rows.flag(frame, ~(frame["price"] > 0), "price is not a positive number")
    frame["available"] = _as_bool(frame["available"], "available", report)
    rows.flag(frame, frame["available"].isna(), "available is not true/false")
    _default(frame, "product_id", frame["item_id"], "= item_id (one listing per product)",
             report)
    _default(frame, "seller_id", "unknown", "'unknown'", report)
    _default(frame, "created_at", now, f"the import time {now.isoformat()}", report)
    for column in STYLE_COLUMNS:
        _default(frame, column, "", "'' (no style attributes)", report)
    frame["created_at"] = _as_utc(frame["created_at"], "created_at", report)
    rows.flag(frame, frame["created_at"].isna(), "created_at is not a timestamp")
    _check_photos(frame, "image_path", rows, _photo_checker(cfg.images))
    frame = rows.finish(frame)
    for column in ("product_id", "seller_id", "category", "region", *STYLE_COLUMNS):
        frame[column] = frame[column].astype(str)
    return frame


def _log_table(path: Path, table: str, key: str, photo_column: str | None,
               cfg: ImportConfig, report: ImportReport, items: set[str]) -> pd.DataFrame:
    """An optional table in its schema's types: every column coerced, bad rows flagged."""
    schema = schemas.TABLES[table]
    frame = _read_table(path).reset_index(drop=True)
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (the {table} schema: "
                         "data_contracts/schemas.py, docs/bring_your_own_data.md)")
    rows = _Rows(table, key, report)
    for f in schema:
        column, where = f.name, f"{table}.{f.name}"
        if pa.types.is_timestamp(f.type):
            frame[column] = _as_utc(frame[column], where, report)
        elif pa.types.is_boolean(f.type):
            frame[column] = _as_bool(frame[column], where, report)
        elif pa.types.is_floating(f.type):
            frame[column] = _as_float(frame[column], where, report)
        elif pa.types.is_integer(f.type):
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        rows.flag(frame, frame[column].isna(), f"{column} is empty or not a {f.type}")
    if "item_id" in schema.names:
        rows.flag(frame, ~frame["item_id"].astype(str).isin(items),
                  "item_id is not an imported catalog item")
    if photo_column:
        _check_photos(frame, photo_column, rows, _photo_checker(cfg.images))
    frame = rows.finish(frame)
    for f in schema:
        if pa.types.is_integer(f.type):
            frame[f.name] = frame[f.name].astype("int64")
        elif pa.types.is_string(f.type):
            frame[f.name] = frame[f.name].astype(str)
    return frame


def _conform(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def run_import(cfg: ImportConfig, now: datetime | None = None) -> ImportReport:
    """Import a catalog (and optional logs and rater set) as a world at `cfg.out`."""
    from pipelines.validate import validate_world

    now = now or datetime.now(UTC).replace(microsecond=0)
    report = ImportReport(out=str(cfg.out))
    catalog = _catalog(cfg, report, now)
    items = set(catalog["item_id"])
    impressions = (_log_table(cfg.impressions, "impressions", "impression_id",
                              "query_image_path", cfg, report, items)
                   if cfg.impressions else None)
    tables: dict[str, pd.DataFrame] = {}
    if cfg.rater_queries or cfg.rater_judgments:
        if not (cfg.rater_queries and cfg.rater_judgments):
            raise ValueError("a rater set is two tables: pass --rater-queries and "
                             "--rater-judgments together")
        tables["rater_queries"] = _log_table(cfg.rater_queries, "rater_queries",
                                             "rater_query_id", "image_path", cfg, report,
                                             items)
        tables["rater_judgments"] = _log_table(cfg.rater_judgments, "rater_judgments",
                                               "rater_query_id", None, cfg, report, items)
    if report.refused and not cfg.drop_bad_rows:
        lines = [f"  {r['table']} row {r['row']} ({r['id_column']}={r['id']}): {r['reason']}"
                 for r in report.bad_rows[:20]]
        raise ImportRefused(
            f"import refused, nothing written: bad rows {report.refused}\n" + "\n".join(lines)
            + "\nfix them, or pass --drop-bad-rows to import the rest")
    if catalog.empty:
        first = report.bad_rows[0]["reason"] if report.bad_rows else "the table has no rows"
        raise ImportRefused(f"import refused, nothing written: no catalog row is left to "
                            f"import (refused {report.refused or 'none'}; e.g. {first})")
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        (tmp / "tables").mkdir()
        # photos are copied under the world root; the tables' paths follow them there
        _copy_photos(catalog["image_path"], cfg.images, tmp / CATALOG_PHOTOS)
        catalog["image_path"] = [str(CATALOG_PHOTOS / p) for p in catalog["image_path"]]
        written = {"catalog": _conform(catalog, schemas.CATALOG)}
        if impressions is not None:
            _copy_photos(impressions["query_image_path"], cfg.images, tmp / QUERY_PHOTOS)
            impressions["query_image_path"] = [str(QUERY_PHOTOS / p)
                                               for p in impressions["query_image_path"]]
            written["impressions"] = _conform(impressions, schemas.IMPRESSIONS)
        if "rater_queries" in tables:
            queries = tables["rater_queries"]
            _copy_photos(queries["image_path"], cfg.images, tmp / QUERY_PHOTOS)
            queries["image_path"] = [str(QUERY_PHOTOS / p) for p in queries["image_path"]]
            written["rater_queries"] = _conform(queries, schemas.RATER_QUERIES)
            written["rater_judgments"] = _conform(tables["rater_judgments"],
                                                  schemas.RATER_JUDGMENTS)
        for name in ("impressions", "boards", "rater_queries", "rater_judgments", "scenes",
                     "scene_objects"):
            written.setdefault(name, schemas.TABLES[name].empty_table())
        for name, table in written.items():
            pq.write_table(table, tmp / "tables" / f"{name}.parquet")
            report.rows[name] = table.num_rows
        validate_world(tmp, now=now)  # a contract failure raises: nothing lands
        (tmp / "import.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    log.info("imported %d listings into %s", report.rows["catalog"], out)
    return report


# --------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    p = sub.add_parser("import-catalog", help="a folder of photos + a catalog table -> "
                                                     "a world (the real-data entry point)")
    p.add_argument("--images", type=Path, required=True,
                   help="folder the tables' photo paths are relative to")
    p.add_argument("--catalog", type=Path, required=True, help=".csv, .tsv or .parquet")
    p.add_argument("--out", type=Path, required=True, help="the world folder to write")
    p.add_argument("--impressions", type=Path, default=None)
    p.add_argument("--rater-queries", type=Path, default=None)
    p.add_argument("--rater-judgments", type=Path, default=None)
    p.add_argument("--drop-bad-rows", action="store_true",
                   help="import the good rows and count the rest, instead of refusing")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import sys

    cfg = ImportConfig(args.images, args.catalog, args.out, args.impressions,
                       args.rater_queries, args.rater_judgments, args.drop_bad_rows)
    try:
        report = run_import(cfg)
    except ImportRefused as err:
        print(f"loupe import-catalog: {err}", file=sys.stderr)
        return 2
    for line in report.coerced + [f"default {d}" for d in report.defaults]:
        print(f"  {line}")
    print(json.dumps({"out": report.out, "rows": report.rows, "refused": report.refused},
                     indent=1))
    return 0
