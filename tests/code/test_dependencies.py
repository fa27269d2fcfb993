"""Every package the code imports is one pyproject.toml declares (a dependency or an
extra), not one that happens to arrive with another: a direct import of a transitive
dependency breaks the day that dependency drops it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"pipelines", "models", "serving", "data_contracts", "dags", "bench", "tests",
               "conftest"}
# provided by the process that runs the file, not by pip
PROVIDED = {"triton_python_backend_utils": "Triton's python backend stub"}


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values()
                                       for s in extra]
    return {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower().replace("_", "-")
            for s in specs}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared():
    declared = _declared()
    dists = packages_distributions()
    undeclared = {}
    for path in sorted(REPO.glob("[a-z]*/**/*.py")):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        for name in _imports(path) - FIRST_PARTY - set(sys.stdlib_module_names) - set(PROVIDED):
            providers = {d.lower().replace("_", "-") for d in dists.get(name, [])}
            if not providers & declared:
                undeclared.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_triton_client_is_the_grpc_one():
    """Serving speaks gRPC to Triton; `tritonclient[all]` would pull CUDA packages."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (client,) = [d for d in deps if d.startswith("tritonclient")]
    assert client.startswith("tritonclient[grpc]")


def test_one_faiss_build_per_install():
    """faiss-cpu and faiss-gpu both ship the `faiss` module: they are alternative extras,
    never a dependency and an extra installed side by side."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["cpu"] if d.startswith("faiss")] == ["faiss-cpu>=1.8"]
    assert [d for d in extras["gpu"] if d.startswith("faiss")][0].startswith("faiss-gpu")
    assert "'.[cpu,dev,coco]'" in (REPO / "Makefile").read_text()


def test_pip_check_is_clean():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
