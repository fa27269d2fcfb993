"""The resolved versions of the packages a trained model's numbers depend on.

Training and evaluation record them (train.json, the MLflow run's params) so two runs that
disagree can be told apart by their installs; `constraints.txt` pins them for `make`.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

KEY_PACKAGES = ("torch", "numpy", "pillow", "onnxruntime", "faiss-cpu", "pytorch-lightning",
                "mlflow", "pandas", "pyarrow", "scipy")


def resolved_versions(packages: Sequence[str] = KEY_PACKAGES) -> dict[str, str]:
    """package -> installed version ("absent" when not installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
