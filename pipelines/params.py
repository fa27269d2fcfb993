"""params.yaml access: one file configures every stage (and DVC tracks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def load_section(path: Path | None, section: str) -> dict[str, Any]:
    """The `section:` mapping of a params file ({} when the file has none)."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.exists():
        raise FileNotFoundError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    block = data.get(section) or {}
    if not isinstance(block, dict):
        raise ValueError(f"{path}: '{section}' must be a mapping, got {type(block).__name__}")
    return block
