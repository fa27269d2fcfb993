"""The lazy `loupe` command line: one module per call, and a table that matches the modules."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest

from pipelines.cli import COMMANDS, main

# what a `loupe ...` call imported, from a fresh interpreter
_IMPORTED = """
import json, sys
from pipelines.cli import main
try:
    main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _imported(*argv: str) -> tuple[int, set[str], str]:
    run = subprocess.run([sys.executable, "-c", _IMPORTED, *argv], capture_output=True,
                         text=True, timeout=300, check=True,
                         env={**os.environ, "COLUMNS": "400"})  # help lines unwrapped
    report = json.loads(run.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"]), run.stdout


def test_world_help_imports_neither_torch_nor_other_stages():
    code, modules, out = _imported("world", "--help")
    assert code == 0 and "--size" in out and "--samples" in out
    assert "torch" not in modules and "pytorch_lightning" not in modules
    assert "pipelines.world.cli" in modules
    stages = {m for _, (m, _) in COMMANDS.items()} - {"pipelines.world.cli"}
    assert not stages & modules


def test_top_level_help_lists_every_command_without_importing_any_stage():
    code, modules, out = _imported("--help")
    assert code == 0
    for name, (module, help_line) in COMMANDS.items():
        assert name in out.split() and help_line in out
        assert module not in modules
    assert "torch" not in modules


def _registered(module: str) -> dict[str, str]:
    """{command: help} that a module's add_cli registers."""
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).add_cli(sub)
    return {action.dest: action.help for action in sub._choices_actions}


def test_the_table_is_what_the_modules_register():
    modules = sorted({module for module, _ in COMMANDS.values()})
    registered = {name: (module, help_line) for module in modules
                  for name, help_line in _registered(module).items()}
    assert registered == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_parses_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: loupe {command}")


def test_unknown_command_is_a_usage_error_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["wrold"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'wrold'" in err and "world" in err
