"""Model checkpoints: ``model.safetensors`` + ``config.json`` in one folder.

``config.json`` holds the format name (``lidcseg-checkpoint``), its version,
the model's :class:`~lidcseg.config.ModelConfig`, the SHA-256 of the weights
file and free JSON metadata; the model is rebuilt from it with
:func:`lidcseg.models.create_model` and the weights are loaded strictly.
Nothing is ever unpickled.

Writes are atomic per file (weights first, then the config), so a crash never
leaves a half-written file; a weights file that does not belong to its
config.json is detected by the checksum. Every problem while loading is a
:class:`~lidcseg.errors.LidcsegError` with a one-line message naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lidcseg.config import ModelConfig, from_dict, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_path, check_free_space, write_json_atomic

FORMAT_NAME = "lidcseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Key prefix of extra tensors in the weights file (not a valid module path).
EXTRA_PREFIX = "__extra__/"


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the rebuilt model with its weights, in eval mode.
        config: its ModelConfig.
        extra_tensors: tensors saved with ``extra_tensors=`` (e.g. running statistics).
        meta: the ``meta`` JSON object saved with it.
        path: the checkpoint folder.
    """

    model: nn.Module
    config: ModelConfig
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path = Path(".")


def checkpoint_dir(dir_or_path: str | Path) -> Path:
    """The checkpoint folder named by a folder, its ``model.safetensors`` or its ``config.json``."""
    path = Path(dir_or_path)
    if path.name in (WEIGHTS_FILE, CONFIG_FILE) or path.suffix in (".safetensors", ".json"):
        return path.parent
    return path


def first_checkpoint(run: Path, names: Sequence[str]) -> Path | None:
    """``run/<name>`` of the first of ``names`` that holds a checkpoint ``config.json``, or None."""
    return next((run / n for n in names if (run / n / CONFIG_FILE).is_file()), None)


def save_checkpoint(
    dir_or_path: str | Path,
    model: nn.Module,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into a folder (created if needed).

    Args:
        dir_or_path: the folder, or a path to its ``model.safetensors`` / ``config.json``.
        model: a harness model with a ``config`` attribute (ModelConfig).
        extra_tensors: more tensors to store beside the weights (names are free).
        meta: JSON-serialisable metadata (step, metrics, ...).

    Returns:
        The checkpoint folder.

    Raises:
        NoSpaceError: the disk cannot hold the weights (checked before writing) or filled
            up; nothing half-written is left.
    """
    from safetensors.torch import save_file

    from lidcseg import __version__

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__} has no ModelConfig `config` attribute")
    folder = checkpoint_dir(dir_or_path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + k] = v.detach().cpu().contiguous()
    weights = folder / WEIGHTS_FILE
    check_free_space(folder, sum(t.element_size() * t.nelement() for t in tensors.values()) + 2**16)
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "lidcseg": FORMAT_NAME})
    write_json_atomic(
        folder / CONFIG_FILE,
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": to_dict(cfg),
            "weights": WEIGHTS_FILE,
            "weights_sha256": _sha256(weights),
            "lidcseg_version": __version__,
            "torch_version": torch.__version__,
            "meta": meta or {},
        },
    )
    return folder


def load_checkpoint(
    dir_or_path: str | Path,
    device: str | torch.device = "cpu",
    expected_name: str | None = None,
) -> Checkpoint:
    """Rebuild a model from its checkpoint folder and load its weights strictly.

    Args:
        dir_or_path: the folder, or its ``model.safetensors`` / ``config.json``.
        device: where the model and extra tensors go.
        expected_name: refuse a checkpoint of another model (``ModelConfig.name``).

    Weights are loaded as they are, never converted: a tensor of another dtype than
    the model's (float64, float16, int8, ...) is refused rather than cast. lidcseg
    writes every tensor in the model's own dtype, so another dtype means weights
    from elsewhere, and a cast would either lose precision without a word or
    (from int8) make numbers that were never trained. NaN or infinite values in
    any floating tensor (a run that diverged, a damaged file) are refused too.

    Raises:
        LidcsegError: missing or unreadable files, a config of another kind or
            version, a corrupt or non-safetensors weights file, a weights file
            changed since its config was written, weights that do not fit
            the architecture, a tensor of another dtype than the model's, or
            NaN/infinite weights; each naming the file (and the tensor).
    """
    folder = checkpoint_dir(dir_or_path)
    if not folder.is_dir():
        raise LidcsegError("checkpoint folder not found", folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    data = _read_config(cfg_path)
    cfg = _model_config(data, cfg_path)
    if expected_name is not None and cfg.name != expected_name:
        raise LidcsegError(
            f"checkpoint of model {cfg.name!r}, expected {expected_name!r}", cfg_path
        )
    tensors = _read_weights(weights_path)
    expected_sha = data.get("weights_sha256")
    if expected_sha is not None and _sha256(weights_path) != expected_sha:
        raise LidcsegError(f"weights do not match the checksum in {CONFIG_FILE}", weights_path)

    extra = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    model = _build_uninitialised(cfg)
    _check_state(model, state, cfg.name, weights_path)
    _check_values(model, tensors, weights_path)
    model.load_state_dict(state, strict=True)  # copies: keeps the model's memory format
    model.to(device).eval()
    meta = data.get("meta") or {}
    extra = {k: v.to(device) for k, v in extra.items()}
    return Checkpoint(model=model, config=cfg, extra_tensors=extra, meta=meta, path=folder)


def load_model(
    dir_or_path: str | Path,
    device: str | torch.device = "cpu",
    expected_name: str | None = None,
) -> nn.Module:
    """The model of a checkpoint, in eval mode (see :func:`load_checkpoint`)."""
    return load_checkpoint(dir_or_path, device, expected_name).model


def _build_uninitialised(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` with allocated but uninitialised tensors (no wasted init).

    Built on the meta device and moved to CPU with ``to_empty`` (which keeps
    each tensor's memory format). A model with tensors outside its state dict
    (non-persistent buffers) would lose them that way, so it is built normally.
    """
    from lidcseg.models.registry import create_model

    with torch.device("meta"):
        model = create_model(cfg)
    persistent = set(model.state_dict())
    if any(n not in persistent for n, _ in model.named_buffers()):
        return create_model(cfg)
    return model.to_empty(device="cpu")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LidcsegError(f"missing {CONFIG_FILE}: not a lidcseg checkpoint", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LidcsegError(f"unreadable checkpoint config ({type(e).__name__})", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        kind = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise LidcsegError(f"not a {FORMAT_NAME} config (format: {kind!r})", path)
    version = data.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LidcsegError(
            f"checkpoint format version {version!r} is not supported (this lidcseg reads "
            f"up to {FORMAT_VERSION})",
            path,
        )
    return data


def _model_config(data: dict[str, Any], path: Path) -> ModelConfig:
    model = data.get("model")
    if not isinstance(model, dict):
        raise LidcsegError("no model configuration in checkpoint config", path)
    try:
        return from_dict(ModelConfig, model, source=path)
    except LidcsegError as e:
        raise LidcsegError(e.message, path) from None
    except (TypeError, ValueError) as e:
        raise LidcsegError(f"invalid model configuration ({e})", path) from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LidcsegError("missing weights file", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LidcsegError(f"not a valid safetensors file ({reason})", path) from None


def _check_values(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a tensor of another dtype than the model's, and NaN/inf in any floating tensor."""
    expected = model.state_dict()
    for k in sorted(tensors):
        v = tensors[k]
        if k in expected and v.dtype != expected[k].dtype:
            raise LidcsegError(
                f"tensor {k!r} is {str(v.dtype).removeprefix('torch.')}, the model's is "
                f"{str(expected[k].dtype).removeprefix('torch.')}: lidcseg loads weights in the model's own "
                "dtype and does not convert them; save them as the model's dtype", path,
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise LidcsegError(
                f"tensor {k!r} has {bad} NaN or infinite value(s) (a diverged run or a damaged file); "
                "use another checkpoint or start a new run", path,
            )


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Refuse weights whose names or shapes differ from the model's, in one line."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise LidcsegError(
            f"weights do not fit the {name!r} architecture; {'; '.join(problems)}", path
        )
