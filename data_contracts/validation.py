"""The contract runner: check one parquet table against its Great Expectations suite.

Every stage calls `validate_table` (or pipelines/validate.py's `validate_world`) on its
inputs before reading them, and the serving side on the impression log it exports. A failing
file is copied into quarantine (a timestamped folder with the report JSON next to it; the
user's file stays where it is), an HTML Data Docs page shows every failed expectation, and
`ContractViolation` carries a readable summary, so nothing downstream is written from it.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow.parquet as pq

from data_contracts import schemas
from data_contracts.durable import write_json_atomic

DOCS_SITE = "loupe"
MAX_EXAMPLES = 5
# GE bookkeeping kwargs that say nothing about the constraint itself
_QUIET_KWARGS = {"column", "column_list", "column_A", "column_B", "batch_id", "result_format",
                 "catch_exceptions", "include_config", "meta", "notes", "rendered_content",
                 "description", "row_condition", "condition_parser", "severity"}


class UnreadableTable(ValueError):
    """The file is not readable parquet (truncated, another format)."""


class ContractViolation(ValueError):
    """A table broke its data contract; `reports` holds the failing validation reports."""

    def __init__(self, reports: list[ValidationReport]):
        self.reports = reports
        super().__init__("\n\n".join(r.summary() for r in reports))


@dataclass
class ExpectationFailure:
    expectation: str  # GE expectation type, e.g. expect_column_values_to_not_be_null
    column: str | None  # column, or "a, b" for compound / pair expectations
    constraint: str  # the expectation's own arguments, e.g. "min_value=1, max_value=20"
    unexpected_count: int | None  # rows that broke it (None for table-level expectations)
    unexpected_percent: float | None
    examples: list[Any] = field(default_factory=list)  # values, with row keys where known
    observed: Any = None  # aggregate expectations: the value GE observed
    error: str | None = None  # the expectation could not run (e.g. a column is missing)

    def hint(self) -> str:
        """How to fix what real exports most often get wrong (pandas' defaults)."""
        if self.expectation == "expect_column_values_to_be_of_type":
            want = self.constraint.removeprefix("type_=")
            if want == "Timestamp":
                want = "a timestamp with a time zone (Series.dt.tz_localize('UTC'))"
            return (f"; write the column as {want}, or let `loupe import-catalog` convert "
                    "integer prices, 0/1 flags and timestamps without a zone")
        if self.expectation == "expect_column_to_exist":
            return ("; the schemas are in data_contracts/schemas.py, and `loupe "
                    "import-catalog` fills the catalog columns a shop may not have")
        return ""

    def line(self) -> str:
        target = f"({self.column})" if self.column else ""
        head = f"{self.expectation}{target}" + (f" [{self.constraint}]" if self.constraint else "")
        if self.error:
            return f"{head}: error: {self.error}"
        if self.unexpected_count is None:
            return f"{head}: observed {self.observed!r}{self.hint()}"
        rows = "row" if self.unexpected_count == 1 else "rows"
        text = f"{head}: {self.unexpected_count} {rows} ({self.unexpected_percent:.3g}%)"
        return text + (f", e.g. {', '.join(map(_example, self.examples))}" if self.examples else "")


@dataclass
class ValidationReport:
    table: str
    path: Path
    success: bool
    rows: int
    expectations: int
    failures: list[ExpectationFailure]
    docs_path: Path | None = None  # the Data Docs page of this validation
    quarantined_to: Path | None = None  # the copy kept in quarantine, when it failed
    checked_at: str = ""
    now: str = ""  # the reference time timestamps were checked against
    seconds: float = 0.0

    def summary(self) -> str:
        verdict = "passed" if self.success else f"FAILED {len(self.failures)} of"
        lines = [f"{self.table} contract {verdict} {self.expectations} expectations "
                 f"on {self.path} ({self.rows} rows)"]
        lines += [f"  - {f.line()}" for f in self.failures]
        if self.docs_path is not None:
            lines.append(f"  Data Docs: {self.docs_path}")
        if self.quarantined_to is not None:
            lines.append(f"  quarantined to: {self.quarantined_to}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def _example(value: Any) -> str:
    if isinstance(value, dict):  # GE's {column: value, key: value} row
        return "{" + ", ".join(f"{k}={_example(v)}" for k, v in value.items()) + "}"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- GE plumbing
@functools.cache
def _context(docs_dir: Path | None):
    """One ephemeral GE context per docs site and process, so a site indexes all its runs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(ctx.list_data_docs_sites()):  # the default site is a throwaway tmp dir
        ctx.delete_data_docs_site(site)
    if docs_dir is not None:
        ctx.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    ctx.data_sources.add_pandas("loupe")
    return ctx


@functools.cache
def _checkpoint(docs_dir: Path | None, table: str, keys: tuple[str, ...]):
    """The table's checkpoint (suite + whole-DataFrame batch), made once per context.

    The result format names the key columns shown with each unexpected value, so a file
    that lacks some key column gets its own checkpoint.
    """
    import great_expectations as gx

    from data_contracts.contracts import KEY_COLUMNS, build_suite

    ctx = _context(docs_dir)
    name = table if keys[1:] == KEY_COLUMNS[table] else f"{table}[{','.join(keys)}]"
    batch = ctx.data_sources.get("loupe").add_dataframe_asset(name) \
        .add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add_or_update(build_suite(table))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])]
    return ctx.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=actions if docs_dir is not None else [],
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES,
                       "unexpected_index_column_names": list(keys)}))


def _failure(result) -> ExpectationFailure:
    config = result.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column") or ", ".join(
        kwargs.get("column_list") or [c for c in (kwargs.get("column_A"), kwargs.get("column_B"))
                                      if c])
    constraint = ", ".join(f"{k}={v}" for k, v in kwargs.items()
                           if k not in _QUIET_KWARGS and v is not None and v is not False)
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return ExpectationFailure(config.type, column or None, constraint, None, None,
                                  error=info.get("exception_message"))
    res = result.result or {}
    examples = res.get("partial_unexpected_index_list") or res.get("partial_unexpected_list")
    return ExpectationFailure(
        config.type, column or None, constraint, res.get("unexpected_count"),
        res.get("unexpected_percent"), list(examples or [])[:MAX_EXAMPLES],
        observed=res.get("observed_value"))


def _docs_page(docs_dir: Path | None, result_id) -> Path | None:
    if docs_dir is None:
        return None
    urls = _context(docs_dir).get_docs_sites_urls(resource_identifier=result_id,
                                                  site_name=DOCS_SITE)
    return Path(unquote(urlparse(urls[0]["site_url"]).path)) if urls else None


# --------------------------------------------------------------------------- runner
def _read(table: str, path: Path, catalog_path: Path | None) -> pd.DataFrame:
    """The table as GE checks it: read, plus the derived columns. A table in a world's
    `tables/` folder has its photo paths checked under the world root and its judgments
    against the `rater_queries` table beside it."""
    from data_contracts.contracts import NEEDS_CATALOG, add_derived_columns

    if not path.is_file():
        raise FileNotFoundError(f"{table} table not found: {path}")
    try:
        arrow = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UnreadableTable(f"cannot read {table} table {path} as parquet: {err}") from err
    catalog_ids = None
    if table in NEEDS_CATALOG:
        catalog_path = catalog_path or path.with_name("catalog.parquet")
        if not catalog_path.is_file():
            raise FileNotFoundError(f"{table} item ids are checked against the catalog, "
                                    f"but {catalog_path} does not exist (pass catalog_path)")
        catalog_ids = pq.read_table(catalog_path, columns=["item_id"])["item_id"].to_pandas()
    in_world = path.parent.name == "tables"
    queries = path.with_name("rater_queries.parquet")
    query_ids = (pq.read_table(queries, columns=["rater_query_id"])["rater_query_id"]
                 .to_pandas() if table == "rater_judgments" and queries.is_file() else None)
    return add_derived_columns(table, arrow.to_pandas(), arrow, catalog_ids,
                               photo_root=path.parent.parent if in_world else None,
                               rater_query_ids=query_ids)


def _quarantine(path: Path, table: str, quarantine_dir: Path) -> Path:
    """Copy `path` into a fresh timestamped folder under `quarantine_dir`; return the folder.
    A copy, never a move: the input is the user's own file and stays where they put it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = Path(quarantine_dir) / f"{stamp}_{table}"
    folder.mkdir(parents=True, exist_ok=False)
    shutil.copy2(path, folder / path.name)
    return folder


def validate_table(table: str, path: Path, *, quarantine_dir: Path | None,
                   docs_dir: Path | None, catalog_path: Path | None = None,
                   now: datetime | None = None) -> ValidationReport:
    """Check one parquet file against `table`'s contract; raise `ContractViolation` if broken.

    On failure the file is copied into `quarantine_dir` (when given) with `report.json` next
    to it, and a Data Docs page is written under `docs_dir` (when given). On success the file
    stays where it is. Timestamps may not be later than `now` (default: the current time).
    """
    if table not in schemas.TABLES:
        raise ValueError(f"unknown table {table!r}; known tables: {', '.join(schemas.TABLES)}")
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError(f"now must be timezone-aware, got {now.isoformat()}")
    t0 = time.perf_counter()
    path = Path(path)
    try:
        frame = _read(table, path, None if catalog_path is None else Path(catalog_path))
    except UnreadableTable as err:  # a truncated or non-parquet export breaks the contract too
        report = ValidationReport(
            table=table, path=path, success=False, rows=0, expectations=1,
            failures=[ExpectationFailure("readable_parquet", None, "", None, None,
                                         error=str(err))],
            checked_at=datetime.now(UTC).isoformat(), now=now.isoformat(),
            seconds=round(time.perf_counter() - t0, 3))
        _refuse(report, path, table, quarantine_dir)

    from data_contracts.contracts import KEY_COLUMNS, NOW, ROW

    docs_dir = None if docs_dir is None else Path(docs_dir).resolve()
    keys = (ROW, *(c for c in KEY_COLUMNS[table] if c in frame.columns))
    checkpoint = _checkpoint(docs_dir, table, keys)
    run = checkpoint.run(batch_parameters={"dataframe": frame},
                         expectation_parameters={NOW: now})
    (result_id, result), = run.run_results.items()
    report = ValidationReport(
        table=table, path=path, success=bool(result.success), rows=len(frame),
        expectations=len(result.results),
        failures=[_failure(r) for r in result.results if not r.success],
        docs_path=_docs_page(docs_dir, result_id),
        checked_at=datetime.now(UTC).isoformat(), now=now.isoformat(),
        seconds=round(time.perf_counter() - t0, 3))
    if report.success:
        return report
    _refuse(report, path, table, quarantine_dir)


def _refuse(report: ValidationReport, path: Path, table: str,
            quarantine_dir: Path | None) -> NoReturn:
    """Quarantine the failing file (when a quarantine dir is given) and stop the stage."""
    if quarantine_dir is not None:
        folder = _quarantine(path, table, Path(quarantine_dir))
        report.quarantined_to = folder / path.name
        write_json_atomic(folder / "report.json", report.to_json(), sort_keys=False)
    raise ContractViolation([report])
