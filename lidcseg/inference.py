"""Inference: open a trained run and draw hypotheses from it (the one place models are sampled).

Every application of lidcseg that asks a model for hypotheses — ``lidcseg
sample`` (scans), ``evaluate`` (Fig. 4), ``ambiguity`` (App. E), ``latent``
(App. A), ``calibration`` (Section 4.2) and training's validation — goes
through this module:

* :func:`open_run` turns a ``lidcseg train`` run folder (its ``best/``, else
  ``last/`` checkpoint) or a checkpoint folder into an :class:`OpenRun`: the
  model in eval mode on its device, its config, the training input size and
  crop protocol, a display label and a JSON description.
* :func:`draw_logits` asks ``model.sample(x, n, generator=..., eps=...)`` for
  ``n`` hypotheses per image, (B, C_in, H, W) -> (B, n, C, H, W), and checks the
  shape it returns. :func:`draw_labels` and :func:`draw_foreground` turn them
  into label maps with **the one foreground rule**:

      label(S) = argmax_c S_c (ties to the lowest class),
      foreground(S) = label(S) != 0 = max_{c >= 1} S_c > S_0

  (computed as the second form: the same pixels, ties going to background,
  and about 10x faster than ``argmax`` on channels-last logits).
* The noise: a model's ``sample`` takes ``eps`` (B, n, N) standard-normal noise
  when it is a harness model (:attr:`~lidcseg.models.registry.SegmentationModel.noise_dim`
  says N). :func:`image_noise` seeds it per image (evaluation: independent of
  batch size and of which images are evaluated), :func:`lesion_noise` per
  lesion and hypothesis (scan sampling: shared by a lesion's slices).
* :func:`torch_threads` scopes torch's intra-op CPU threads to a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.config import DataConfig, ModelConfig
from lidcseg.device import resolve_device
from lidcseg.errors import LidcsegError
from lidcseg.io.jsonfile import read_json_object

#: Image channels of LIDC inputs (CT): what evaluation, ambiguity, latent and scan sampling feed.
CT_CHANNELS = 1
#: The checkpoints of a run folder, in order of preference: ``refit/`` (``best/`` with its prior
#: refitted, when the run asked for it: :mod:`lidcseg.training.prior_refit`), ``best/``, ``last/``.
RUN_CHECKPOINTS: tuple[str, ...] = ("refit", "best", "last")


# -- opening runs ---------------------------------------------------------------------------


@dataclass
class OpenRun:
    """A trained model ready to draw hypotheses.

    Attributes:
        label: display name: the run folder's name (the parent's for a ``best``/``last``
            checkpoint folder); :func:`open_runs` makes labels unique.
        path: what the caller named (run folder or checkpoint folder).
        checkpoint: the checkpoint folder that was loaded.
        run_dir: the run folder, or None for a bare checkpoint.
        model: the harness model in eval mode on ``device``.
        config: its :class:`~lidcseg.config.ModelConfig`.
        input_size: T, the side of the training input tile (checkpoint metadata, else the
            run's ``config.json``; None when neither records it).
        data: the crop protocol of the training crops (the run's crop size).
        device: where the model runs.
        info: JSON-ready description (checkpoint, run, name, config, weights digest, step, val).
    """

    label: str
    path: Path
    checkpoint: Path
    run_dir: Path | None
    model: torch.nn.Module
    config: ModelConfig
    input_size: int | None
    data: DataConfig
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's registry name (``ModelConfig.name``)."""
        return self.config.name


def run_label(path: str | Path) -> str:
    """Display name of a run or checkpoint folder (``runs/a/best`` -> ``a``)."""
    path = Path(path)
    return (path.parent.name if path.name in RUN_CHECKPOINTS else path.name) or str(path)


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``["a", "a", "b"]`` -> ``["a", "a#2", "b"]``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _json(path: Path) -> dict[str, Any]:
    """``path`` as a JSON object; ``{}`` when it is missing or damaged (then it is not a run's)."""
    return read_json_object(path) or {}


def resolve_checkpoint(run: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint folder, run folder or None)`` of a run folder or a checkpoint folder.

    A run folder (no ``config.json``, or a run's ``config.json``) gives its ``refit/``
    checkpoint (the prior refitted after training), else ``best/`` (the lowest validation
    GED), else ``last/``; anything else is taken as a
    checkpoint folder, which :func:`lidcseg.models.checkpoint.load_checkpoint` checks.

    Raises:
        LidcsegError: the path does not exist, or a run folder has no checkpoint.
    """
    from lidcseg.models.checkpoint import CONFIG_FILE, checkpoint_dir, first_checkpoint

    run = Path(run)
    if not run.exists():
        raise LidcsegError("run directory or checkpoint not found", run)
    folder = checkpoint_dir(run)
    config = folder / CONFIG_FILE
    if folder.is_dir() and (not config.is_file() or _is_run_config(config)):
        found = first_checkpoint(folder, RUN_CHECKPOINTS)
        if found is not None:
            return found, folder
        raise LidcsegError("not a run directory (no best/ or last/ checkpoint) nor a checkpoint", run)
    return folder, None


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a run's ``config.json`` (not a checkpoint's)."""
    from lidcseg.models.checkpoint import FORMAT_NAME

    data = _json(path)
    return data.get("format") != FORMAT_NAME and "train" in data and "model" in data


def open_run(
    run: str | Path, device: str | torch.device = "auto", input_size: int | None = None,
    *, in_channels: int | None = None,
) -> OpenRun:
    """Load the model of a ``lidcseg train`` run folder or a checkpoint folder.

    Args:
        run: a run folder (``best/``, else ``last/``) or a checkpoint folder (or its files).
        device: ``auto``, ``cpu``, ``cuda`` or a ``torch.device``.
        input_size: overrides the training input size recorded with the checkpoint.
        in_channels: the image channels the caller feeds (:data:`CT_CHANNELS` for LIDC);
            a model of another task is refused before it is used. None: any.

    Raises:
        LidcsegError: not a run or checkpoint, any checkpoint that
            :func:`lidcseg.models.checkpoint.load_checkpoint` refuses, or a model that takes
            other than ``in_channels`` channels.
    """
    from lidcseg.models.checkpoint import CONFIG_FILE, load_checkpoint

    path = Path(run)
    folder, run_dir = resolve_checkpoint(path)
    run_cfg = _json(run_dir / CONFIG_FILE) if run_dir is not None else {}
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    ckpt = load_checkpoint(folder, device=dev)
    if in_channels is not None and ckpt.config.in_channels != in_channels:
        raise LidcsegError(
            f"model {ckpt.config.name!r} takes {ckpt.config.in_channels}-channel images, these inputs "
            f"have {in_channels} (a run of another task: the flip task's models take RGB scenes)", folder)
    train_meta = ckpt.meta.get("train") if isinstance(ckpt.meta.get("train"), dict) else {}
    size = input_size or train_meta.get("input_size") or (run_cfg.get("train") or {}).get("input_size")
    crop_size = (run_cfg.get("data") or {}).get("crop_size", DataConfig().crop_size)
    ckpt_json = _json(folder / CONFIG_FILE)
    info = {
        "checkpoint": str(folder),
        "run": None if run_dir is None else str(run_dir),
        "name": ckpt.config.name,
        "config": ckpt_json.get("model"),
        "weights_sha256": ckpt_json.get("weights_sha256"),
        "step": ckpt.meta.get("step"),
        "val": ckpt.meta.get("val"),
    }
    return OpenRun(
        label=run_label(path), path=path, checkpoint=folder, run_dir=run_dir, model=ckpt.model,
        config=ckpt.config, input_size=size if isinstance(size, int) and size >= 1 else None,
        data=DataConfig(crop_size=int(crop_size)), device=dev, info=info,
    )


def require_input_size(run: OpenRun) -> int:
    """The run's input tile size T, checked against its crop size.

    Raises:
        LidcsegError: the checkpoint records no input size, or it exceeds the crop size.
    """
    if run.input_size is None:
        raise LidcsegError("the checkpoint does not record its training input size; pass --input-size",
                           run.checkpoint)
    if run.input_size > run.data.crop_size:
        raise LidcsegError(f"input size {run.input_size} exceeds the crop size {run.data.crop_size}",
                           run.checkpoint)
    return run.input_size


def open_runs(
    runs: Sequence[str | Path], device: str = "auto", *, same_input_size: bool = True,
    in_channels: int | None = None,
) -> list[OpenRun]:
    """:func:`open_run` for every run, with unique labels (``a``, ``a#2``).

    Raises:
        LidcsegError: no runs, a run :func:`open_run` refuses, no recorded input size, or
            (``same_input_size``) runs of different input sizes.
    """
    if not runs:
        raise LidcsegError("no run given (--run RUN)")
    out = [open_run(r, device, in_channels=in_channels) for r in runs]
    for r, label in zip(out, unique_labels([r.label for r in out]), strict=True):
        r.label = label
    if same_input_size:
        for r in out:
            require_input_size(r)
        sizes = {r.input_size for r in out}
        if len(sizes) > 1:
            listing = ", ".join(f"{r.label}: {r.input_size}" for r in out)
            raise LidcsegError(f"runs have different input sizes ({listing}); evaluate them separately")
    return out


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op CPU threads for a block (0 keeps the current setting).

    On a shared 2-core machine 1 thread sampled 40x faster than 2 (OpenMP threads spin-wait).
    """
    if threads < 0:
        raise LidcsegError(f"threads must be >= 0, got {threads}")
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the noise -----------------------------------------------------------------------------


def noise_dim(model: Any) -> int | None:
    """N, the width of the ``eps`` a model's ``sample`` takes; None if it takes none.

    Harness models (:class:`~lidcseg.models.registry.SegmentationModel`) all take
    ``eps`` (those without a latent ignore it); anything else (a test double, the
    flip task's oracle) draws its own noise from the generator.
    """
    from lidcseg.models.registry import SegmentationModel

    return model.noise_dim if isinstance(model, SegmentationModel) else None


def image_noise(rows: np.ndarray, n: int, dim: int, seed: int) -> torch.Tensor:
    """Standard-normal noise (B, n, N): image ``rows[i]`` drawn from ``SeedSequence([seed, rows[i]])``.

    The noise of an image depends only on the seed and its row in the file, not on
    the batch size or on which other images are evaluated.
    """
    out = torch.empty((len(rows), n, dim))
    for i, row in enumerate(rows):
        state = np.random.SeedSequence([int(seed), int(row)]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out[i] = torch.randn((n, dim), generator=gen)
    return out


def lesion_noise(
    n_lesions: int, lesion_of_tile: np.ndarray, n: int, dim: int, generator: torch.Generator, shared: bool
) -> torch.Tensor:
    """Standard-normal eps (B, n, N): one draw per (lesion, hypothesis) if ``shared``, else per tile.

    Drawn on a CPU generator, so the noise is the same on every device.
    """
    if shared:
        per_lesion = torch.randn((n_lesions, n, dim), generator=generator)
        return per_lesion[torch.as_tensor(lesion_of_tile)]
    return torch.randn((len(lesion_of_tile), n, dim), generator=generator)


# -- drawing hypotheses --------------------------------------------------------------------


def draw_logits(
    model: Any,
    x: torch.Tensor,
    n: int,
    *,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` hypotheses per image as logits: (B, C_in, H, W) -> (B, n, C, H, W), without gradients.

    Args:
        model: anything with ``sample(x, n, generator=...)`` (and ``eps=...`` when given).
        x: model inputs on the model's device.
        generator: RNG of the model's own noise.
        eps: (B, n, N) latent noise (only for models that take it, :func:`noise_dim`).

    Raises:
        LidcsegError: the call would need more memory than the device has (checked before
            it is made, :func:`lidcseg.resources.check_model_call`), or the model returns
            another shape.
    """
    from lidcseg.models.registry import SegmentationModel
    from lidcseg.resources import check_model_call

    config = model.config if isinstance(model, SegmentationModel) else None
    check_model_call(x.shape[0], n, x.shape[-1], config, device=x.device)
    kwargs: dict[str, Any] = {"generator": generator}
    if eps is not None:
        kwargs["eps"] = eps.to(x.device, x.dtype)
    with torch.no_grad():
        logits = model.sample(x, n, **kwargs)
    if logits.ndim != 5 or logits.shape[:2] != (x.shape[0], n) or logits.shape[3:] != x.shape[2:]:
        raise LidcsegError(
            f"{type(model).__name__}.sample returned shape {tuple(logits.shape)}, "
            f"expected ({x.shape[0]}, {n}, C, {x.shape[2]}, {x.shape[3]})"
        )
    return logits


def labels_of(logits: torch.Tensor) -> torch.Tensor:
    """Label maps: (B, n, C, H, W) logits -> (B, n, H, W) int64, argmax over classes (ties: lowest)."""
    return logits.argmax(dim=2)


def foreground_of(logits: torch.Tensor) -> torch.Tensor:
    """Foreground masks, the one rule: (B, n, C, H, W) logits -> (B, n, H, W) bool.

    A pixel is foreground when some class other than 0 beats background:
    ``max_{c>=1} logits_c > logits_0``, i.e. ``argmax != 0`` with ties going to
    background (argmax takes the first maximum).
    """
    return logits[:, :, 1:].amax(dim=2) > logits[:, :, 0]


def draw_labels(
    model: Any, x: torch.Tensor, n: int, *, generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None, classes: int | None = None, task: str = "the task",
) -> torch.Tensor:
    """``n`` label maps per image: (B, C_in, H, W) -> (B, n, H, W) int64 (:func:`labels_of`).

    Args:
        classes: the number of classes C the model must predict (None: any).
        task: how the error names what expects ``classes`` (e.g. ``"the flip task"``).

    Raises:
        LidcsegError: the model returns another shape, or another number of classes.
    """
    logits = draw_logits(model, x, n, generator=generator, eps=eps)
    if classes is not None and logits.shape[2] != classes:
        raise LidcsegError(f"the model predicts {logits.shape[2]} classes; {task} has {classes}")
    return labels_of(logits)


def draw_foreground(
    model: Any, x: torch.Tensor, n: int, *, generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` foreground masks per image: (B, C_in, H, W) -> (B, n, H, W) bool (:func:`foreground_of`)."""
    return foreground_of(draw_logits(model, x, n, generator=generator, eps=eps))


def draw_image_foreground(
    model: Any, x: torch.Tensor, n: int, rows: np.ndarray, *, seed: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` foreground masks per image of a split: (B, C_in, H, W) -> (B, n, H, W) bool.

    A model that takes ``eps`` gets per-image noise (:func:`image_noise` of ``rows``
    and ``seed``); any other model draws from ``generator``.
    """
    dim = noise_dim(model)
    eps = image_noise(rows, n, dim, seed) if dim is not None else None
    return draw_foreground(model, x, n, generator=generator, eps=eps)
