"""Validate stage: every table of a world against its contract; a failing batch stops the
pipeline. The runner (quarantine, Data Docs, reports) is data_contracts/validation.py.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from data_contracts import schemas
from data_contracts.durable import write_json_atomic
from data_contracts.validation import ContractViolation, ValidationReport, validate_table

# tables a world may lack: boards (no co-save pairs), scenes and their objects (no detector
# training), embeddings (none computed yet)
OPTIONAL_TABLES = frozenset({"boards", "scenes", "scene_objects", "embeddings"})


def validate_world(root: Path, *, quarantine_dir: Path | None = None,
                   docs_dir: Path | None = None, now: datetime | None = None
                   ) -> list[ValidationReport]:
    """Validate every table of a world (`root/tables/*.parquet`), catalog first.

    The catalog is the reference for item ids, so a broken catalog stops at once; the other
    tables are all checked, and every failing one is quarantined before one
    `ContractViolation` names them all. OPTIONAL_TABLES are checked when the world has them.
    """
    tables = Path(root) / "tables"
    catalog = tables / "catalog.parquet"
    kw = dict(quarantine_dir=quarantine_dir, docs_dir=docs_dir, now=now)
    reports = [validate_table("catalog", catalog, **kw)]
    failed: list[ValidationReport] = []
    for table in schemas.TABLES:
        path = tables / f"{table}.parquet"
        if table == "catalog" or (table in OPTIONAL_TABLES and not path.exists()):
            continue
        try:
            reports.append(validate_table(table, path, catalog_path=catalog, **kw))
        except ContractViolation as err:
            failed += err.reports
    if failed:
        raise ContractViolation(failed)
    return reports


# --------------------------------------------------------------------------- CLI
def add_cli(sub) -> None:
    p = sub.add_parser("validate", help="check a table (or a whole world) against its contract")
    p.add_argument("table", choices=[*schemas.TABLES, "world"],
                   help="table name, or 'world' to validate every table under PATH/tables")
    p.add_argument("path", type=Path, help="parquet file (or world root for 'world')")
    p.add_argument("--quarantine", type=Path, default=None,
                   help="keep a copy of each failing file (and its report) here")
    p.add_argument("--docs", type=Path, default=None, help="Data Docs site directory")
    p.add_argument("--catalog", type=Path, default=None,
                   help="catalog for item-id checks (default: catalog.parquet next to PATH)")
    p.add_argument("--now", type=datetime.fromisoformat, default=None,
                   help="reference time for 'not in the future' (ISO, with offset)")
    p.add_argument("--summary", type=Path, default=None, help="also write the reports as JSON")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    kw = dict(quarantine_dir=args.quarantine, docs_dir=args.docs, now=args.now)
    try:
        if args.table == "world":
            reports = validate_world(args.path, **kw)
        else:
            reports = [validate_table(args.table, args.path, catalog_path=args.catalog, **kw)]
    except ContractViolation as err:
        _write_summary(args.summary, err.reports)
        print(err, file=sys.stderr)
        return 2
    _write_summary(args.summary, reports)
    print("\n".join(r.summary() for r in reports))
    return 0


def _write_summary(path: Path | None, reports: list[ValidationReport]) -> None:
    if path is None:
        return
    write_json_atomic(path, [r.to_json() for r in reports], sort_keys=False)
