"""params.yaml loading: one way for every stage, and bad input is one clear error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipelines.config import DEFAULT_PARAMS, from_mapping, load, load_section


@dataclass(frozen=True)
class Stage:
    batch_size: int = 32
    lr: float = 0.1
    name: str = "stage"


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_load_reads_the_section_with_overrides_on_top(tmp_path):
    path = _params(tmp_path, "stage:\n  batch_size: 8\n  lr: 0.5\nother:\n  x: 1\n")
    assert load(Stage, path, "stage") == Stage(batch_size=8, lr=0.5)
    assert load(Stage, path, "stage", lr=0.01, name="b") == Stage(8, 0.01, "b")


def test_a_missing_or_empty_section_gives_the_defaults(tmp_path):
    path = _params(tmp_path, "other:\n  x: 1\nstage:\n")
    assert load_section(path, "absent") == {} and load_section(path, "stage") == {}
    assert load(Stage, path, "absent") == Stage()
    assert load(Stage, _params(tmp_path, ""), "stage") == Stage()  # an empty file


def test_unknown_key_is_a_value_error_naming_it_and_the_known_ones(tmp_path):
    path = _params(tmp_path, "stage:\n  batch_size: 8\n  btach_size: 16\n  zeta: 1\n")
    with pytest.raises(ValueError) as err:
        load(Stage, path, "stage")
    assert str(err.value) == ("unknown stage params ['btach_size', 'zeta']; known: "
                              "['batch_size', 'lr', 'name']")
    with pytest.raises(ValueError, match=r"unknown stage params \['epochs'\]"):
        load(Stage, _params(tmp_path, "stage: {}\n"), "stage", epochs=3)  # an override too
    with pytest.raises(ValueError, match=r"unknown cli params \['x'\]"):
        from_mapping(Stage, {"x": 1}, "cli")


def test_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "nope" / "params.yaml"
    with pytest.raises(FileNotFoundError, match=f"params file not found: {missing}"):
        load(Stage, missing, "stage")


def test_non_mapping_file_or_section_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"'stage' must be a mapping, got list"):
        load(Stage, _params(tmp_path, "stage:\n  - 1\n  - 2\n"), "stage")
    with pytest.raises(ValueError, match=r"'stage' must be a mapping, got int"):
        load_section(_params(tmp_path, "stage: 3\n"), "stage")
    with pytest.raises(ValueError, match="expected a mapping of sections, got list"):
        load_section(_params(tmp_path, "- stage\n"), "stage")


def test_no_path_reads_the_repository_params():
    assert DEFAULT_PARAMS == Path(__file__).resolve().parents[2] / "params.yaml"
    assert load_section(None, "index") == yaml.safe_load(DEFAULT_PARAMS.read_text())["index"]
