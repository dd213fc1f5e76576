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
import platform
import random
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lidcseg.config import ModelConfig, TrainConfig, from_dict, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
from lidcseg.training.distributed import Dist
from lidcseg.training.schedule import lr_schedule

#: Fields that may differ between a run and its resumption (they do not change the
#: optimisation on the same device): the step budget, devices and bookkeeping.
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"steps", "device", "num_workers", "log_every", "val_every", "val_max_crops",
     "val_batch_size", "checkpoint_every", "compile", "channels_last", "bf16", "threads"}
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


def check_fresh(out_dir: Path, overwrite: bool) -> None:
    """Refuse to start a run in a non-empty folder unless ``overwrite`` and it is a lidcseg run.

    Raises:
        LidcsegError: ``out_dir`` is a file, a run without ``overwrite``, or a folder that is
            not a run.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LidcsegError("run directory path exists and is not a folder", out_dir)
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise LidcsegError("run directory exists; pass --resume to continue it or --overwrite", out_dir)
    if not ((out_dir / "config.json").is_file() or (out_dir / "metrics.jsonl").is_file()):
        raise LidcsegError("refusing to overwrite a folder that is not a lidcseg run", out_dir)


def check_resume(out_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse to resume without ``last/`` training state or with other configs than the run's
    (fields of :data:`RESUMABLE_CHANGES` excepted).

    Raises:
        LidcsegError: nothing to resume, an unreadable ``config.json``, or the fields that differ.
    """
    last = out_dir / "last"
    if not (last / STATE_JSON).is_file():
        raise LidcsegError("nothing to resume: no last/ checkpoint with training state", out_dir)
    try:
        saved = json.loads((out_dir / "config.json").read_text())
        saved_model = from_dict(ModelConfig, saved["model"])
        saved_train = from_dict(TrainConfig, saved["train"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise LidcsegError("cannot read the run's config.json", out_dir / "config.json") from None
    diffs = [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)
             if getattr(saved_model, f.name) != getattr(model_cfg, f.name)]
    diffs += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)
              if f.name not in RESUMABLE_CHANGES
              and getattr(saved_train, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise LidcsegError(f"cannot resume with a different {', '.join(diffs)} than the run", out_dir)


def load_run_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs saved in a run directory's ``config.json``."""
    path = Path(out_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
        return from_dict(ModelConfig, saved["model"]), from_dict(TrainConfig, saved["train"])
    except FileNotFoundError:
        raise LidcsegError("not a run directory (no config.json)", Path(out_dir)) from None
    except (KeyError, TypeError, json.JSONDecodeError):
        raise LidcsegError("cannot read the run's config", path) from None


def run_config(
    data_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, train_ds: Any, dist: Dist
) -> dict[str, Any]:
    """What ``config.json`` holds: both configs, the data, the world size and the lr schedule."""
    return {
        "model": to_dict(model_cfg),
        "train": to_dict(cfg),
        "data": {"dir": str(data_dir.resolve()), **(
            train_ds.describe() if hasattr(train_ds, "describe") else
            {"train_crops": len(train_ds), "crop_size": train_ds.store.crop_size,
             "n_graders": train_ds.n_graders})},
        "world_size": dist.world,
        "lr_schedule": dict(zip(("boundaries", "values"), lr_schedule(cfg), strict=True)),
    }


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
    """Append one JSON line to ``path`` and flush it."""
    with path.open("a") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint being resumed (and a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line)
    write_bytes_atomic(path, "".join(line + "\n" for line in keep).encode())


def iter_metrics(run_dir: str | Path, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl``, optionally only one ``split`` (``train``/``val``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LidcsegError("no metrics.jsonl", Path(run_dir))
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if split is None or row.get("split") == split:
                yield row


# -- checkpoints and training state --------------------------------------------------------


def save_model(
    folder: Path, model: nn.Module, step: int, val: Mapping[str, float] | None, cfg: TrainConfig
) -> None:
    """The model checkpoint in ``folder``, with the step, train config and validation numbers."""
    from lidcseg.models.checkpoint import save_checkpoint

    meta: dict[str, Any] = {"step": step, "train": to_dict(cfg)}
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
    """``state.safetensors`` (optimizer tensors, torch RNG) + ``state.json`` (the rest)."""
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
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": STATE_FORMAT})
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

    Raises:
        LidcsegError: unreadable files, an unknown format, or an optimizer state that does
            not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise LidcsegError(f"cannot read the training state ({e.__class__.__name__})", folder) from None
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise LidcsegError("not a lidcseg training state of a known version", folder / STATE_JSON)

    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["optimizer"]["state_scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise LidcsegError(f"optimizer state does not fit the model ({e})", folder) from None

    r = dist.rank if f"rank{dist.rank}/rng/torch_cpu" in tensors else 0
    torch.set_rng_state(tensors[f"rank{r}/rng/torch_cpu"])
    cuda_states = sorted(k for k in tensors if k.startswith(f"rank{r}/rng/cuda/"))
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_states][: torch.cuda.device_count()])
    rng_json = meta["rng"][r] if r < len(meta["rng"]) else meta["rng"][0]
    npst = rng_json["numpy"]
    np.random.set_state((npst["kind"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = rng_json["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    best = meta.get("best_val_ged")
    return int(meta["step"]), math.inf if best is None else float(best)
