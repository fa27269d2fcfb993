"""params.yaml access: one file configures every stage (and DVC tracks each stage's section).

Every stage builds its config dataclass through `load`, so an unknown key is one clear error
naming the key and the known ones, in every stage alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

DEFAULT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

C = TypeVar("C")


def load_section(path: Path | None, section: str) -> dict[str, Any]:
    """The `section:` mapping of a params file ({} when the file has none)."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.exists():
        raise FileNotFoundError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    block = data.get(section) or {}
    if not isinstance(block, dict):
        raise ValueError(f"{path}: '{section}' must be a mapping, got {type(block).__name__}")
    return block


def from_mapping(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """`cls(**values)`; a key `cls` does not know is a ValueError naming it (not a TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} params {unknown}; known: {sorted(known)}")
    return cls(**values)


def load(cls: type[C], params_path: Path | None, section: str, **overrides: Any) -> C:
    """The dataclass `cls` from `section:` of the params file, `overrides` on top."""
    values = {**load_section(params_path, section), **overrides}
    return from_mapping(cls, values, section)
