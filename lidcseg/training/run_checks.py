"""Reading a run's own files back, checked: ``config.json``, ``last/state.*``, ``metrics.jsonl``.

A run directory may be damaged (a crash, a full disk, a hand edit, another program). What
``--resume`` reads is checked here completely **before** anything is restored, so a damaged
state is refused in one line that names the file and what is wrong, and says that the run
cannot be resumed (:data:`NEW_RUN`), instead of failing in the middle of the optimizer or
RNG restore, or at the first step.

``metrics.jsonl`` is read one way everywhere (:func:`metric_rows`): a line that is not a
JSON object with an integer ``step`` (the torn last line of a killed run, or damage) is
skipped, both when listing the rows and when a resumed run cuts the file back.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.config import ModelConfig, TrainConfig, from_dict
from lidcseg.errors import LidcsegError
from lidcseg.io.jsonfile import check_fields, is_of, json_type, load_json_object

#: What to do when a run's saved state cannot be resumed.
NEW_RUN = "cannot resume: start a new run (another --out, or --overwrite)"

__all__ = ["NEW_RUN", "SavedState", "metric_rows", "read_run_configs", "read_state"]


def read_run_configs(out_dir: Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of the run's ``config.json``.

    Raises:
        LidcsegError: no ``config.json``, or one that is not a JSON object holding valid
            ``model`` and ``train`` objects.
    """
    path = out_dir / "config.json"
    if not path.is_file():
        raise LidcsegError("not a run directory (no config.json)", out_dir)
    data = load_json_object(path, what="run config", recover=NEW_RUN)
    check_fields(data, {"model": dict, "train": dict}, path, what="run config", recover=NEW_RUN)
    try:
        return from_dict(ModelConfig, data["model"]), from_dict(TrainConfig, data["train"])
    except LidcsegError as e:
        raise LidcsegError(f"run config: {e.message}; {NEW_RUN}", path) from None


def metric_rows(path: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(line, row)`` of every whole row of ``metrics.jsonl``, in file order.

    A line that is not UTF-8 JSON of an object with an integer ``step`` >= 0 is skipped.

    Raises:
        LidcsegError: the file cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LidcsegError(f"cannot read the metrics ({e.strerror or e.__class__.__name__})", path) from None
    for line in data.split(b"\n"):
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8 or not JSON: a torn or damaged line
            continue
        if isinstance(row, dict) and is_of(row.get("step"), int) and row["step"] >= 0:
            yield line, row


@dataclass
class SavedState:
    """A checked training state, ready to restore.

    Attributes:
        step: the step to continue from.
        best: best validation GED so far (inf: none yet).
        optimizer: a state dict that fits the optimizer (shapes checked).
        torch_rng: the CPU generator state; ``cuda_rng`` one per saved device.
        numpy_rng, python_rng: the states of :func:`numpy.random.set_state` and
            :func:`random.setstate`.
    """

    step: int
    best: float
    optimizer: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    numpy_rng: tuple[Any, ...]
    python_rng: tuple[Any, ...]


class _Damaged(Exception):
    """A problem of the state, named by the checks below; becomes one refusal line."""


def read_state(
    folder: Path, optimizer: torch.optim.Optimizer, rank: int, *, names: tuple[str, str], fmt: tuple[str, int]
) -> SavedState:
    """Read and check ``folder``'s training state against ``optimizer``; restore nothing.

    Args:
        folder: ``last/``.
        optimizer: the run's optimizer, already built for the model.
        rank: this process's rank (its own RNG state, else rank 0's).
        names: the file names ``(tensors, json)``.
        fmt: the ``(format, version)`` the JSON file must declare.

    Raises:
        LidcsegError: an unreadable or damaged file, a state of another format, or one that
            does not fit the optimizer (parameter groups, tensor shapes); ending in :data:`NEW_RUN`.
    """
    from safetensors.torch import load_file

    tensors_path, json_path = folder / names[0], folder / names[1]
    meta = load_json_object(json_path, what="training state", recover=NEW_RUN)
    if meta.get("format") != fmt[0] or meta.get("version") != fmt[1]:
        raise LidcsegError(f"not a lidcseg training state of a known version; {NEW_RUN}", json_path)
    try:
        tensors = load_file(str(tensors_path))
    except FileNotFoundError:
        raise LidcsegError(f"training state tensors missing; {NEW_RUN}", tensors_path) from None
    except Exception as e:  # SafetensorError, OSError, a header of absurd sizes...
        text = " ".join(str(e).split())[:100]
        raise LidcsegError(f"training state tensors unreadable ({e.__class__.__name__}: {text}); {NEW_RUN}",
                           tensors_path) from None
    try:
        check_fields(meta, {"step": int, "optimizer": dict, "rng": list}, json_path, what="training state",
                     recover=NEW_RUN)
        if meta["step"] < 0:
            raise _Damaged(f"step {meta['step']} is negative")
        best = meta.get("best_val_ged")
        if best is not None and not is_of(best, float):
            raise _Damaged(f"best_val_ged is a JSON {json_type(best)}")
        state = _optimizer_state(meta["optimizer"], tensors, optimizer)
        torch_rng, cuda_rng, numpy_rng, python_rng = _rng(meta["rng"], tensors, rank)
    except _Damaged as e:
        raise LidcsegError(f"training state is damaged: {e}; {NEW_RUN}", folder) from None
    return SavedState(meta["step"], math.inf if best is None else float(best), state, torch_rng, cuda_rng,
                      numpy_rng, python_rng)


def _same_kind(current: Any, saved: Any) -> bool:
    """Whether a saved hyperparameter can stand for the optimizer's current value."""
    if current is None or isinstance(current, bool):
        return saved is None or isinstance(saved, bool)
    if isinstance(current, int | float):
        return is_of(saved, float)
    if isinstance(current, tuple | list):
        return (isinstance(saved, list | tuple) and len(saved) == len(current)
                and all(_same_kind(c, s) for c, s in zip(current, saved, strict=True)))
    if isinstance(current, torch.Tensor):
        return is_of(saved, float)
    return isinstance(saved, type(current))


def _optimizer_state(saved: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict from ``state.json``'s ``optimizer`` and the ``optim/`` tensors."""
    groups, scalars = saved.get("param_groups"), saved.get("state_scalars")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _Damaged("optimizer.param_groups is not a list of objects")
    if not isinstance(scalars, dict) or not all(isinstance(s, dict) for s in scalars.values()):
        raise _Damaged("optimizer.state_scalars is not an object of objects")
    if len(groups) != len(optimizer.param_groups):
        raise _Damaged(f"{len(groups)} parameter groups saved, the optimizer has {len(optimizer.param_groups)}")
    params: dict[int, torch.Tensor] = {}
    for i, (g, current) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = g.get("params")
        if not isinstance(ids, list) or not all(is_of(p, int) for p in ids) or len(ids) != len(current["params"]):
            raise _Damaged(f"parameter group {i} lists {_count(ids)} parameters, the model has "
                           f"{len(current['params'])}")
        params.update(zip(ids, current["params"], strict=True))
        for key, value in current.items():  # a key not saved takes the optimizer's default
            if key != "params" and key in g and not _same_kind(value, g[key]):
                raise _Damaged(f"parameter group {i}: {key} is {str(g[key])[:40]}")
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim/"):
            continue
        parts = key.split("/")
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in params:
            raise _Damaged(f"tensor {key[:60]!r} names no parameter of the model")
        pid, name = int(parts[1]), parts[2]
        shape = () if name == "step" else tuple(params[pid].shape)
        if tuple(value.shape) != shape or not value.dtype.is_floating_point:
            raise _Damaged(f"tensor {key} is {value.dtype} {list(value.shape)}, its parameter needs "
                           f"a float {list(shape)}")
        state.setdefault(pid, {})[name] = value
    for pid_text, values in scalars.items():
        if not pid_text.isdigit() or int(pid_text) not in params:
            raise _Damaged(f"state_scalars names no parameter of the model ({pid_text[:20]!r})")
        if not all(v is None or is_of(v, float) for v in values.values()):
            raise _Damaged(f"state_scalars of parameter {pid_text} are not numbers")
        state.setdefault(int(pid_text), {}).update(values)
    if isinstance(optimizer, torch.optim.Adam):
        needed = {"step", "exp_avg", "exp_avg_sq"}
        for pid, st in state.items():
            if not needed <= set(st):
                raise _Damaged(f"parameter {pid} lacks its Adam {', '.join(sorted(needed - set(st)))}")
    return {"state": state, "param_groups": groups}


def _count(ids: Any) -> str:
    return str(len(ids)) if isinstance(ids, list) else "no"


def _rng(saved: list[Any], tensors: Mapping[str, torch.Tensor], rank: int) -> tuple[Any, Any, Any, Any]:
    """``(torch CPU, [CUDA], NumPy, Python)`` RNG states of ``rank`` (else rank 0), each tried
    on a fresh generator so that a damaged one is refused before anything is restored."""
    r = rank if f"rank{rank}/rng/torch_cpu" in tensors else 0
    torch_rng = tensors.get(f"rank{r}/rng/torch_cpu")
    if torch_rng is None:
        raise _Damaged("no torch RNG state (rank0/rng/torch_cpu)")
    try:
        torch.Generator().set_state(torch_rng)
    except (RuntimeError, TypeError, ValueError):
        raise _Damaged(f"the torch RNG state rank{r}/rng/torch_cpu is not one "
                       f"({torch_rng.dtype} {list(torch_rng.shape)})") from None
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith(f"rank{r}/rng/cuda/"))]
    if any(t.dtype != torch.uint8 or t.dim() != 1 for t in cuda):
        raise _Damaged(f"a CUDA RNG state of rank {r} is not a byte vector")
    if not saved:
        raise _Damaged("no NumPy/Python RNG states")
    entry = saved[r] if r < len(saved) else saved[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("numpy"), dict) \
            or not isinstance(entry.get("python"), dict):
        raise _Damaged("the NumPy/Python RNG state is not an object with 'numpy' and 'python'")
    npst, py = entry["numpy"], entry["python"]
    try:
        numpy_rng = (npst["kind"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"],
                     npst["has_gauss"], npst["cached_gaussian"])
        np.random.RandomState().set_state(numpy_rng)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError):
        raise _Damaged("the NumPy RNG state is not one") from None
    try:
        python_rng = (py["version"], tuple(py["state"]), py["gauss_next"])
        random.Random().setstate(python_rng)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError):
        raise _Damaged("the Python RNG state is not one") from None
    return torch_rng, cuda, numpy_rng, python_rng
