"""Named presets and config composition: preset -> model defaults -> file -> ``--set``.

:data:`PRESETS` names the (model, training) pairs of ``lidcseg train --preset``;
:func:`compose` builds a run's configs from its sources in order (a later one wins).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lidcseg.config import MODEL_SUMMARIES, ModelConfig, TrainConfig
from lidcseg.config_io import from_dict, read_json
from lidcseg.errors import LidcsegError

T = TypeVar("T")

#: Named (model, training) presets of ``lidcseg train --preset``.
#:
#: - ``paper``: the paper's LIDC setting exactly (Appendix H.1): 5 scales,
#:   base 32, 3 convs per block, N = 6, beta = 1, 128 x 128 tiles, batch 32,
#:   Adam lr 1e-4 -> 1e-6 in 5 step-downs over 240k iterations, weight decay 1e-5.
#: - ``cpu-quick``: 300 steps that visibly learn on 2 CPU cores in about 5
#:   minutes: 64 x 64 tiles (max shift 16 px), base 16, 4 scales, batch 16,
#:   lr 1e-3 -> 1e-4, one torch thread. Such a small, fast run suffers posterior
#:   collapse (KL -> 0 within 50-100 steps and stays there for 100+ steps, samples
#:   alike). Measured on a 10-patient phantom (KL < 0.5 nats in 5-step windows,
#:   steps 30-300, seed 1): plain ELBO 33/55 windows, free bits alone 39/55,
#:   weight decay 0 alone collapsed steps 45-165, both together 7/55. So it uses
#:   0.5 nats/dim of free bits AND no weight decay: with Adam, coupled L2 decay
#:   dominates the tiny gradients of an unused latent path and, normalised by Adam,
#:   shrinks the prior and posterior heads to the same output. beta stays 1.
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "paper": (ModelConfig(), TrainConfig()),
    "cpu-quick": (
        ModelConfig(base_channels=16, num_scales=4, fcomb_channels=16),
        TrainConfig(
            steps=300, batch_size=16, lr=1e-3, lr_final=1e-4, lr_decay_steps=2, weight_decay=0.0,
            input_size=64, aug_max_shift=16, kl_free_bits=0.5, num_workers=0, log_every=5,
            val_every=50, val_samples=16, val_max_crops=32, checkpoint_every=50, threads=1,
        ),
    ),
    # The flip task (Section 4.2): RGB in, 19 Cityscapes classes + 5 flipped ones out.
    # - cityscapes: the paper's setting at 256 x 512, one more scale than LIDC (6), base 32,
    #   N = 6, batch 16, 240k steps, lr 1e-4 lowered to 1e-5 in 3 steps at 60k, 120k, 180k
    #   (Appendix H.2; LIDC: 1e-6 in 5). 110 M parameters, since channels double at every
    #   scale; the authors' release uses 7 scales capped at 192 channels
    #   (32, 64, 128, 192, 192, 192, 192), which ModelConfig cannot express.
    # - scenes-quick: the synthetic 32 x 64 scenes of `lidcseg scenes make` on one CPU thread
    #   (6000 steps of 16 scenes, then 300 steps of prior refit), on the stored scenes (no
    #   mirroring: the paper lists none) and without weight decay (as cpu-quick). Measured on
    #   seeds 0-2 (issue #13): flips are learned one at a time after seed-dependent waits that
    #   are neither posterior collapse nor segmentation; a batch of 16 instead of 8 left fewer
    #   flips unlearned. The waits are the posterior sample's noise: while the posterior's means
    #   for the two sides of a flip differ by a fraction of sigma_q, the noise hides them from
    #   the decoder, so neither learns the flip; the noise warm-up (posterior_noise_warmup_steps,
    #   a_t from 0 to 1 over the first 2000 steps; not in the paper) shows the decoder the means
    #   first (seed 0: every flip encoded by step 3000, where Eq. 4's full sample left person
    #   half learned at 6000). With all five encoded, each flip's sampled frequency was still
    #   off by up to 0.16: Eq. 4 never fits the prior's mass on each side of the decoder's
    #   boundaries. The prior refit after training (lidcseg.training.prior_refit; not in the
    #   paper) fits exactly that, by Pearson's chi^2 between sampled and label frequencies (a
    #   plain sum of squares left rare modes, e.g. seed 1's road flip, at half their frequency),
    #   and keeps its start when validation does not improve.
    #   beta 0.1-4, f_comb 64, N = 5 or 12, weight decay 1e-5 and 8000 steps did not help
    #   (benchmarks/flip_calibration_history.md). Per-seed results differ between machines:
    #   compare means over seeds. Paper-like otherwise: beta 1, no free bits.
    "cityscapes": (
        ModelConfig(in_channels=3, num_classes=24, num_scales=6),
        TrainConfig(steps=240_000, batch_size=16, lr_final=1e-5, lr_decay_steps=3, val_every=2000,
                    val_samples=16, val_max_crops=100, checkpoint_every=2000),
    ),
    "scenes-quick": (
        ModelConfig(in_channels=3, num_classes=24, base_channels=8, num_scales=4, convs_per_block=2,
                    latent_dim=6, fcomb_channels=32),
        TrainConfig(
            steps=6000, batch_size=16, lr=1e-3, lr_final=1e-4, lr_decay_steps=2, weight_decay=0.0,
            augment=False, num_workers=0, log_every=20, val_every=500, val_samples=16,
            val_max_crops=32, val_batch_size=8, checkpoint_every=500, threads=1,
            posterior_noise_warmup_steps=2000, prior_refit_steps=300,
        ),
    ),
}

#: The tasks a run can train on: LIDC crops of ``lidcseg prepare`` and flip-task scenes
#: (Section 4.2; ``lidcseg.data.scenes.TASK``, what ``manifest.json`` says).
TASKS: tuple[str, ...] = ("lidc", "flip-scenes")

#: What the LIDC preset names mean on other tasks' data: ``lidcseg train`` reads the
#: task from DATA/manifest.json, so ``--preset cpu-quick`` on flip scenes is ``scenes-quick``.
TASK_PRESET_NAMES: dict[str, dict[str, str]] = {
    "flip-scenes": {"paper": "cityscapes", "cpu-quick": "scenes-quick"},
}

#: One line per preset, for ``lidcseg train --help``.
PRESET_SUMMARIES: dict[str, str] = {
    "paper": "the paper's LIDC protocol (Appendix H.1), 240k steps",
    "cpu-quick": "about 5 minutes on 2 CPU cores: 300 steps, 64 x 64 tiles",
    "cityscapes": "the paper's flip task (Section 4.2) at 256 x 512",
    "scenes-quick": "32 x 64 synthetic flip-task scenes on one CPU thread",
}


def preset(name: str, task: str = "lidc") -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configs of a named preset (see :data:`PRESETS`).

    Args:
        name: a key of :data:`PRESETS`; ``paper`` and ``cpu-quick`` are read per task
            (:data:`TASK_PRESET_NAMES`).
        task: ``lidc`` (crops of ``lidcseg prepare``) or ``flip-scenes`` (Section 4.2).
    """
    if task not in TASKS:
        raise LidcsegError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    name = task_preset_name(name, task)
    try:
        return PRESETS[name]
    except KeyError:
        raise LidcsegError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None


def task_preset_name(name: str, task: str = "lidc") -> str:
    """The preset ``name`` means on ``task``'s data (``cpu-quick`` on flip scenes: ``scenes-quick``)."""
    return TASK_PRESET_NAMES.get(task, {}).get(name, name)


def base_preset(
    preset_name: str | None, task: str = "lidc", *, resuming: bool = False, config_file: object = None
) -> str | None:
    """The preset a run's configs start from (:func:`compose`'s step 1), as ``task`` reads it.

    None when a resumed run's own saved configs are the base (no preset, no config file).
    """
    if resuming and preset_name is None and config_file is None:
        return None
    return task_preset_name(preset_name or "paper", task)


def override(cfg: T, values: dict[str, Any], *, source: str | Path | None = None) -> T:
    """A copy of the dataclass ``cfg`` with ``values`` replacing fields (unknown keys refused)."""
    merged = {**dataclasses.asdict(cfg), **values}  # type: ignore[call-overload]
    return from_dict(type(cfg), json.loads(json.dumps(merged)), source=source)


def apply_overrides(model: ModelConfig, train: TrainConfig,
                    pairs: list[str] | tuple[str, ...]) -> tuple[ModelConfig, TrainConfig]:
    """Apply ``key=value`` overrides (the CLI's ``--set``) to a model and a training config.

    ``key`` is a field name of either config (``lr``, ``base_channels``) or a
    qualified one (``train.lr``, ``model.beta``). ``value`` is parsed by the
    field's type: numbers, ``true``/``false``, strings, JSON lists for tuples.

    Raises:
        LidcsegError: a malformed pair, an unknown key or a value of the wrong type.
    """
    targets = {"model": model, "train": train}
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LidcsegError(f"--set expects key=value, got {pair!r}")
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in targets:
                raise LidcsegError(f"--set {key}: prefix must be 'model.' or 'train.'")
            scopes = [scope]
        else:
            scopes = [s for s, c in targets.items() if name in {f.name for f in dataclasses.fields(c)}]
        if not scopes or name not in {f.name for f in dataclasses.fields(targets[scopes[0]])}:
            valid = sorted({f.name for c in targets.values() for f in dataclasses.fields(c)})
            raise LidcsegError(f"--set {key}: unknown field; valid: {', '.join(valid)}")
        if len(scopes) > 1:
            raise LidcsegError(f"--set {key}: ambiguous, write model.{name} or train.{name}")
        current = getattr(targets[scopes[0]], name)
        changes[scopes[0]][name] = _parse_value(raw.strip(), current, key)
    return override(model, changes["model"]), override(train, changes["train"])


def _parse_value(raw: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            value = json.loads(raw)
            if not isinstance(value, list):
                raise ValueError(raw)
            return tuple(value)
        return raw
    except ValueError:
        raise LidcsegError(f"--set {key}: cannot read {raw!r} as {type(current).__name__}") from None


def apply_config_file(model: ModelConfig, train: TrainConfig,
                      path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """Apply a JSON file ``{"model": {...}, "train": {...}}`` (either part optional) on top.

    A run's own ``config.json`` is accepted too (its other keys are ignored).
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not ({"model", "train"} & set(data)):
        raise LidcsegError('expected a JSON object with "model" and/or "train"', path)
    for part in ("model", "train"):
        if part in data and not isinstance(data[part], dict):
            raise LidcsegError(f'"{part}" must be a JSON object', path)
    return (override(model, data.get("model", {}), source=path),
            override(train, data.get("train", {}), source=path))


def compose(
    preset_name: str | None = None,
    *,
    model_defaults: Callable[[str, ModelConfig, str], ModelConfig],
    task: str = "lidc",
    model: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    steps: int | None = None,
    device: str | None = None,
    saved: Callable[[], tuple[ModelConfig, TrainConfig]] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configs of a run, from its sources in order; a later one wins.

    1. The base: the preset ``preset_name`` (default ``paper``) read for ``task``
       (:func:`preset`); but when resuming (``saved`` given) with neither ``preset_name``
       nor ``config_file``, the run's own saved configs ``saved()``.
    2. ``model``: ``model_defaults(model, base, task)``, the name with the options it implies
       and its own defaults on ``task`` (:func:`lidcseg.models.registry.model_config`;
       ``i2i-vae``: beta 10 on ``lidc``, 1 on ``flip-scenes``, N = 3).
    3. ``config_file``: JSON ``{"model": {...}, "train": {...}}`` (:func:`apply_config_file`).
    4. ``overrides``, then ``steps`` and ``device``: ``key=value`` pairs (:func:`apply_overrides`).

    Raises:
        LidcsegError: an unknown preset, task or model (listing the valid names), a bad file or override.
    """
    base = base_preset(preset_name, task, resuming=saved is not None, config_file=config_file)
    if base is None:
        assert saved is not None
        model_cfg, train_cfg = saved()
    else:
        model_cfg, train_cfg = preset(base, task=task)
    if model is not None:
        model_cfg = model_defaults(model, model_cfg, task)
    if config_file is not None:
        model_cfg, train_cfg = apply_config_file(model_cfg, train_cfg, config_file)
    extra = list(overrides)
    if steps is not None:
        extra.append(f"train.steps={steps}")
    if device is not None:
        extra.append(f"train.device={device}")
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, extra)
    if model_cfg.name not in MODEL_SUMMARIES:
        raise LidcsegError(f"unknown model {model_cfg.name!r}; valid names: {', '.join(MODEL_SUMMARIES)}")
    factor = 2 ** (model_cfg.num_scales - 1)
    if task == "lidc" and train_cfg.input_size % factor:  # scenes are checked against their size
        raise LidcsegError(f"train.input_size {train_cfg.input_size} must be a multiple of {factor} "
                           f"(2^(num_scales - 1) for model.num_scales {model_cfg.num_scales})")
    return model_cfg, train_cfg
