"""Where tensors live: the one rule that turns a device name into a ``torch.device``.

Light on purpose (torch only): ``lidcseg calibration`` and ``lidcseg train`` use it
without importing :mod:`lidcseg.sampling`, which pulls in MONAI.
"""

from __future__ import annotations

import torch

from lidcseg.errors import LidcsegError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        LidcsegError: an unknown name, or CUDA asked for where there is none.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not (name == "cuda" or name.startswith("cuda:")):
        raise LidcsegError(f"unknown device {name!r}; use auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise LidcsegError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)
