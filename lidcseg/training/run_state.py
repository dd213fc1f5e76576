"""The run directory: checks, ``config.json``/``env.json``, ``metrics.jsonl``, checkpoints, resume.

``last/`` and ``best/`` are replaced atomically (:func:`lidcseg.io.atomic.atomic_dir`:
written to ``.last.tmp``, then swapped in by two renames; a crash between them
leaves ``.last.old``, which :func:`lidcseg.io.atomic.recover_dir` moves back on
resume). ``last/`` holds the model checkpoint (:mod:`lidcseg.models.checkpoint`)
and the training state: ``state.safetensors`` (optimizer moments, torch RNG
states of every rank) and ``state.json`` (step, optimizer scalars, NumPy/Python
RNG, data-order position, best GED). No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import (
    atomic_path,
    check_free_space,
    is_no_space,
    no_space,
    write_bytes_atomic,
    write_json_atomic,
)
from lidcseg.io.outputs import OutputKind, OutputState, check_output_folder, has_format
from lidcseg.training.distributed import Dist
from lidcseg.training.run_checks import NEW_RUN, metric_rows, read_run_configs, read_state
from lidcseg.training.schedule import lr_schedule

#: Fields that may differ between a run and its resumption (they do not change the
#: optimisation on the same device): the step budget, devices, bookkeeping, and the prior
#: refit after training (a finished run resumed with other settings is refitted anew).
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"steps", "device", "num_workers", "log_every", "val_every", "val_max_crops",
     "val_batch_size", "checkpoint_every", "compile", "channels_last", "bf16", "threads",
     "prior_refit_steps", "prior_refit_samples", "prior_refit_batch_size", "prior_refit_lr",
     "prior_refit_val_every"}
)
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STATE_FORMAT = "lidcseg-train-state"
STATE_VERSION = 1


# -- the run directory ---------------------------------------------------------------------


def check_data(data_dir: Path) -> tuple[Path, Path]:
    """``(DATA/train.h5, DATA/val.h5)``, both present.

    Raises:
        LidcsegError: no such folder, or a split file is missing.
    """
    if not data_dir.is_dir():
        raise LidcsegError("data directory not found", data_dir)
    paths = data_dir / "train.h5", data_dir / "val.h5"
    for p in paths:
        if not p.is_file():
            raise LidcsegError(f"missing split file {p.name} (run `lidcseg prepare` first)", p)
    return paths


def _is_run(folder: Path) -> bool:
    """A run of any lidcseg version: ``metrics.jsonl``, or a ``config.json`` with both configs."""
    return (folder / "metrics.jsonl").is_file() or has_format("config.json", model=..., train=...)(folder)


#: ``lidcseg train``'s run directory (:mod:`lidcseg.io.outputs`).
RUN_OUTPUT = OutputKind("train", legacy=_is_run, noun="run directory",
                        foreign="is not a lidcseg run (not written by `lidcseg train`)")


def check_fresh(out_dir: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse to start a run in a non-empty folder unless ``overwrite`` and it is a lidcseg run.

    ``inputs`` (the data folder, a config file) may be neither ``out_dir`` nor inside or
    around it (:func:`lidcseg.io.outputs.check_output_folder`).

    Raises:
        LidcsegError: ``out_dir`` is a file or under one, a run without ``overwrite``, a
            folder that is not a run, or one that holds or is inside an input.
    """
    state = check_output_folder(out_dir, RUN_OUTPUT, inputs=inputs)
    if state is OutputState.OURS and not overwrite:
        raise LidcsegError("run directory exists; pass --resume to continue it or --overwrite", out_dir)


def check_resume(out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse to resume without ``last/`` training state or with other configs than the run's
    (fields of :data:`RESUMABLE_CHANGES` excepted).

    Raises:
        LidcsegError: nothing to resume, an unreadable ``config.json``, or the fields that differ.
    """
    last = out_dir / "last"
    if not (last / STATE_JSON).is_file():
        raise LidcsegError("nothing to resume: no last/ checkpoint with training state", out_dir)
    saved_model, saved_train = read_run_configs(out_dir)
    diffs = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
             if getattr(saved_model, f.name) != getattr(model_cfg, f.name)]
    diffs += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)
              if f.name not in RESUMABLE_CHANGES
              and getattr(saved_train, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise LidcsegError(f"cannot resume with a different {', '.join(diffs)} than the run", out_dir)


def load_run_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs saved in a run directory's ``config.json``.

    Raises:
        LidcsegError: no ``config.json``, or a damaged one (:func:`read_run_configs`).
    """
    return read_run_configs(Path(out_dir))


def run_config(
    data_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, train_ds: Any, dist: Dist,
    preset: str | None = None,
) -> dict[str, Any]:
    """What ``config.json`` holds: both configs, the data, the world size and the lr schedule,
    and ``preset``, the named preset the configs were composed from, when the caller knows it."""
    return {
        **({"preset": preset} if preset else {}),
        "model": to_dict(model_cfg),
        "train": to_dict(cfg),
        "data": {"dir": str(data_dir.resolve()), **(
            train_ds.describe() if hasattr(train_ds, "describe") else
            {"train_crops": len(train_ds), "crop_size": train_ds.store.crop_size,
             "n_graders": train_ds.n_graders})},
        "world_size": dist.world,
        "lr_schedule": dict(zip(("boundaries", "values"), lr_schedule(cfg), strict=True)),
    }


def recorded_preset(out_dir: Path) -> str | None:
    """The ``preset`` a run's ``config.json`` records (None: none, or no readable file)."""
    try:
        value = json.loads((out_dir / "config.json").read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def environment(device: torch.device, dist: Dist) -> dict[str, Any]:
    """What ``env.json`` holds: versions, platform, device, threads, world size."""
    import h5py
    import monai

    from lidcseg import __version__

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "lidcseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "world_size": dist.world,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# -- metrics.jsonl -------------------------------------------------------------------------


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path``, whole or not at all.

    A failed write (a full disk) cuts the file back to its previous length, so no torn
    line is left behind, and raises.

    Raises:
        NoSpaceError: the disk or quota is full (naming ``path``).
    """
    data = memoryview((json.dumps(row, allow_nan=True) + "\n").encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        if is_no_space(e):
            raise no_space(path) from None
        raise
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        if is_no_space(e):
            raise no_space(path) from None
        raise
    finally:
        os.close(fd)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint being resumed, and torn or damaged lines
    (those :func:`~lidcseg.training.run_checks.metric_rows` skips)."""
    if not path.is_file():
        return
    keep = [line for line, row in metric_rows(path) if row["step"] <= step]
    write_bytes_atomic(path, b"".join(line + b"\n" for line in keep))


def iter_metrics(run_dir: str | Path, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl``, optionally only one ``split`` (``train``/``val``).

    A torn or damaged line (not a JSON object with an integer ``step``) is skipped, as
    ``--resume`` drops it (:func:`~lidcseg.training.run_checks.metric_rows`).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LidcsegError("no metrics.jsonl", Path(run_dir))
    for _, row in metric_rows(path):
        if split is None or row.get("split") == split:
            yield row


# -- checkpoints and training state --------------------------------------------------------


def save_model(
    folder: Path, model: nn.Module, step: int, val: Mapping[str, float] | None, cfg: TrainConfig,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The model checkpoint in ``folder``, with the step, train config and validation numbers
    (and ``extra`` entries of its ``meta``)."""
    from lidcseg.models.checkpoint import save_checkpoint

    meta: dict[str, Any] = {"step": step, "train": to_dict(cfg), **(extra or {})}
    if val is not None:
        meta["val"] = dict(val)
    save_checkpoint(folder, model, meta=meta)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states: torch tensors and JSON-able NumPy/Python states."""
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "tensors": tensors,
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }


def gather_rng(dist: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG state, on rank 0 (other ranks get an empty list)."""
    state = _rng_state()
    if dist.world == 1:
        return [state]
    gathered: list[Any] = [None] * dist.world
    # In-memory exchange between processes; nothing pickled reaches the disk.
    torch.distributed.all_gather_object(gathered, state)
    return gathered if dist.main else []


def save_state(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    step: int,
    best: float,
    cfg: TrainConfig,
    rng: list[dict[str, Any]],
    dist: Dist,
) -> None:
    """``state.safetensors`` (optimizer tensors, torch RNG) + ``state.json`` (the rest).

    Raises:
        NoSpaceError: the disk cannot hold them (checked before writing) or filled up.
    """
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    for r, state in enumerate(rng):
        for k, v in state["tensors"].items():
            tensors[f"rank{r}/{k}"] = v.cpu().contiguous()
    check_free_space(folder, sum(t.element_size() * t.nelement() for t in tensors.values()) + 2**16)
    with atomic_path(folder / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT})
    write_json_atomic(folder / STATE_JSON, {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "best_val_ged": None if math.isinf(best) else best,
        "data_order": {"seed": cfg.seed, "batch_size": cfg.batch_size,
                       "samples_consumed": step * cfg.batch_size},
        "world_size": dist.world,
        "optimizer": {"param_groups": sd["param_groups"], "state_scalars": scalars},
        "rng": [{"numpy": s["numpy"], "python": s["python"]} for s in rng],
    })


def load_state(folder: Path, optimizer: torch.optim.Optimizer, dist: Dist) -> tuple[int, float]:
    """Restore optimizer and RNG states from ``folder``; returns ``(step, best val GED)``.

    Everything is read and checked first (:func:`~lidcseg.training.run_checks.read_state`):
    a damaged state restores nothing.

    Raises:
        LidcsegError: unreadable or damaged files, an unknown format, or an optimizer state
            that does not fit the model; saying that the run cannot be resumed.
    """
    saved = read_state(folder, optimizer, dist.rank, names=(STATE_TENSORS, STATE_JSON),
                       fmt=(STATE_FORMAT, STATE_VERSION))
    try:
        optimizer.load_state_dict(saved.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LidcsegError(f"optimizer state does not fit the model ({e}); {NEW_RUN}", folder) from None
    torch.set_rng_state(saved.torch_rng)
    if saved.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved.cuda_rng[: torch.cuda.device_count()])
    np.random.set_state(saved.numpy_rng)
    random.setstate(saved.python_rng)
    return saved.step, saved.best
