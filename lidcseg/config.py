"""Frozen configuration dataclasses and named presets.

No environment variables and no globals: every run is described by these
objects, dumped as JSON into its output folder, and can be loaded back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lidcseg.config_io import from_dict, read_json
from lidcseg.errors import LidcsegError

T = TypeVar("T")
#: ``TrainConfig.scene_augment`` values (:class:`lidcseg.data.scenes.SceneTrainDataset`).
SCENE_AUGMENTS: tuple[str, ...] = ("paper", "paper+mirror", "mirror")


@dataclass(frozen=True)
class DataConfig:
    """The crop protocol of ``lidcseg prepare`` (the paper's Section 4.1 / Appendix H.1).

    Attributes:
        spacing_mm: in-plane pixel spacing after resampling (paper: 0.5 mm).
        crop_size: side of the square lesion-centred crop in pixels (paper: 180).
        n_graders: masks per crop; fewer graders are padded with empty masks.
        pad_hu: value outside the scan (air), never wrapped.
        image_interpolation: SimpleITK interpolator for the CT (``linear``).
        mask_interpolation: for grader masks (``nearest``; label maps are never blended).
        split_patients: patients in (train, val, test) for the full 1010-patient LIDC-IDRI;
            applied proportionally when fewer patients are prepared.
        seed: seed of the patient split.
    """

    spacing_mm: float = 0.5
    crop_size: int = 180
    n_graders: int = 4
    pad_hu: int = -1024
    image_interpolation: str = "linear"
    mask_interpolation: str = "nearest"
    split_patients: tuple[int, int, int] = (722, 144, 144)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0:
            raise LidcsegError(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if self.crop_size < 8:
            raise LidcsegError(f"crop_size must be >= 8, got {self.crop_size}")
        if self.n_graders < 1:
            raise LidcsegError(f"n_graders must be >= 1, got {self.n_graders}")
        if self.image_interpolation not in ("linear", "bspline", "nearest"):
            raise LidcsegError(f"unknown image_interpolation {self.image_interpolation!r}")
        if self.mask_interpolation != "nearest":
            raise LidcsegError("mask_interpolation must be 'nearest'")
        if len(self.split_patients) != 3 or min(self.split_patients) < 0:
            raise LidcsegError(f"split_patients must be three counts >= 0, got {self.split_patients}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_json(cls: type[T], path: str | Path) -> T:
    """Load a config dataclass from a JSON file."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise LidcsegError("config must be a JSON object", path)
    return from_dict(cls, data, source=path)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of every model in the harness (owned by ``lidcseg.models``).

    Attributes:
        name: model name (:data:`MODEL_SUMMARIES`: ``probunet``, the ablations, the baselines).
        in_channels: image channels (1 for CT).
        num_classes: C output classes (2 for LIDC).
        base_channels: channels of the first U-Net block, doubled at each down-sampling (paper: 32).
        num_scales: resolution levels; 5 scales = 4 down- and 4 up-sampling operations (paper LIDC: 5).
        convs_per_block: 3x3 convolutions per block, each followed by ReLU (paper: 3).
        latent_dim: N, the dimension of the latent space (paper: 6).
        fcomb_channels: channels of f_comb's 1x1 convolutions.
        fcomb_layers: 1x1 convolutions with ReLU in f_comb before the final logits layer (paper: 3).
        beta: weight of KL(Q||P) in the loss (Eq. 4; paper: 1).
        prior: ``learned`` (the prior net P(z|X), Eq. 1) or ``fixed`` (N(0, I), no
            parameters; Appendix D's ablation and the Image2Image VAE).
        posterior_context: whether the posterior net sees the image, Q(z|X,Y); False:
            Q(z|Y), the mask only (Appendix D; the Image2Image VAE, Fig. 2d).
        injection: where z enters the network: ``late`` (tiled and concatenated before
            f_comb; U-Net once per image) or ``early`` (concatenated to the input image;
            the U-Net runs once per sample; Appendix D, Fig. 2d).
        dropout: ``dropout-unet`` (Fig. 2a): probability of zeroing an incoming
            activation of the three innermost encoder and decoder blocks (paper: 0.5).
        ensemble_size: ``unet-ensemble`` (Fig. 2b): M independently initialised
            U-Nets, one hypothesis each (paper: up to 16).
        num_heads: ``m-heads`` (Fig. 2c): M output heads on one U-Net (paper: 4, 8, 16).
        head_epsilon: ``m-heads``: the best head's loss weight is 1 - epsilon, every
            other head's epsilon / (M - 1) (paper: 0.05).

    The registry (:func:`lidcseg.models.registry.model_config`) sets the options a
    model name implies (``fixed-prior`` sets ``prior="fixed"``) and the name's own
    defaults on the task (``i2i-vae``: N = 3, beta 10 on LIDC and 1 on flip scenes).
    """

    name: str = "probunet"
    in_channels: int = 1
    num_classes: int = 2
    base_channels: int = 32
    num_scales: int = 5
    convs_per_block: int = 3
    latent_dim: int = 6
    fcomb_channels: int = 32
    fcomb_layers: int = 3
    beta: float = 1.0
    prior: str = "learned"
    posterior_context: bool = True
    injection: str = "late"
    dropout: float = 0.5
    ensemble_size: int = 16
    num_heads: int = 16
    head_epsilon: float = 0.05

    def __post_init__(self) -> None:
        from lidcseg.resources import check_model_size

        check_model_size(self)  # integer fields within resources.MODEL_LIMITS, floats finite, size
        if self.beta < 0:
            raise LidcsegError(f"ModelConfig.beta must be >= 0, got {self.beta}")
        if self.prior not in ("learned", "fixed"):
            raise LidcsegError(f"ModelConfig.prior must be 'learned' or 'fixed', got {self.prior!r}")
        if self.injection not in ("late", "early"):
            raise LidcsegError(f"ModelConfig.injection must be 'late' or 'early', got {self.injection!r}")
        if not 0 <= self.dropout < 1:
            raise LidcsegError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.head_epsilon <= 1:
            raise LidcsegError(f"ModelConfig.head_epsilon must be in [0, 1], got {self.head_epsilon}")


#: Every model name (``ModelConfig.name``, ``lidcseg train --model``) with its one-line
#: summary; torch-free, so that ``--help`` lists them. :data:`lidcseg.models.registry.MODEL_SPECS`
#: gives each its class, the options it implies and its own defaults.
MODEL_SUMMARIES: dict[str, str] = {
    "probunet": "Probabilistic U-Net (Fig. 1, Eq. 1-4)",
    "fixed-prior": "Prob. U-Net with a fixed N(0, I) prior (Appendix D)",
    "fixed-prior-no-context": "fixed N(0, I) prior and a posterior Q(z|Y) that sees the mask only (Appendix D)",
    "early-injection": "Prob. U-Net with z concatenated to the input image (Appendix D)",
    "dropout-unet": "U-Net with dropout (p = 0.5) in its 3 innermost encoder/decoder blocks (Fig. 2a)",
    "unet": "deterministic U-Net: a 1-member unet-ensemble",
    "unet-ensemble": "M independently initialised U-Nets (Fig. 2b)",
    "m-heads": "one U-Net with M output heads (Fig. 2c)",
    "i2i-vae": "Image2Image VAE: fixed prior, posterior Q(z|Y), z at the input (Fig. 2d); "
               "N = 3, beta 10 on LIDC, 1 on flip scenes (Appendix H)",
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings of ``lidcseg train`` (owned by ``lidcseg.training``).

    The defaults are the paper's LIDC protocol (Appendix H.1). The learning rate
    is piecewise constant: ``lr_decay_steps`` = n step-downs at the boundaries
    ``round(steps * i / (n + 1))``, i = 1..n, by the constant factor
    ``(lr_final / lr) ** (1 / n)``. For the paper (240k steps, n = 5): boundaries
    40k, 80k, 120k, 160k, 200k; values 1e-4, 3.98e-5, 1.58e-5, 6.31e-6, 2.51e-6, 1e-6.

    Attributes:
        steps: training iterations (paper: 240k).
        batch_size: images per step over all DDP processes (paper: 32).
        lr: initial learning rate (paper: 1e-4).
        lr_final: learning rate after the last step-down (paper: 1e-6, reached in 5 steps).
        lr_decay_steps: number of step-downs between ``lr`` and ``lr_final``.
        weight_decay: Adam weight decay (paper: 1e-5); Adam's default betas and eps.
        input_size: side of the model's input crop cut from the 180x180 crop (paper: 128).
        seed: seed of everything (weights, data order, augmentation, sampling).
        augment: random augmentation of training tiles (paper: yes).
        grader_draw: ``all`` draws the target among all 4 stored masks, padded empty
            ones included (paper); ``real`` only among the crop's real graders.
        aug_rotate_deg, aug_shear, aug_scale: affine magnitudes (rotation in degrees,
            shear factor, relative zoom); the paper gives none.
        aug_elastic_spacing, aug_elastic_magnitude: elastic field control-point
            spacing (px) and MONAI offset magnitude.
        aug_max_shift: largest random translation of the tile (px; 26 = (180 - 128) / 2).
        scene_augment: the flip task's augmentation when ``augment`` is on: ``paper`` (H.2's
            list, :mod:`lidcseg.data.scenes.augment`), ``paper+mirror`` or ``mirror`` (only).
        kl_free_bits: "free bits" (Kingma et al. 2016) in nats per latent dimension,
            applied to the whole latent: the KL term becomes max(KL, N * kl_free_bits)
            with KL the batch-mean KL summed over the N dimensions, so no gradient
            pushes the posterior towards the prior while it carries less than that
            (models report the per-dimension KL only as a detached diagnostic).
            Paper: 0 (plain Eq. 4).
        beta_warmup_steps: beta rises linearly from 0 to ``ModelConfig.beta`` over
            these steps (paper: 0, constant beta).
        num_workers: DataLoader worker processes.
        log_every: write a ``metrics.jsonl`` training line every this many steps.
        val_every: validate (GED and sample diversity) every this many steps; 0 never
            (the last step always validates).
        val_samples: samples per image for the validation GED (paper: 16).
        val_max_crops: validation crops used at most (evenly spaced over the split).
        val_batch_size: images per validation forward pass.
        checkpoint_every: write ``last/`` every this many steps (and at the end).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        bf16: bfloat16 autocast of the forward pass on CUDA (ignored on CPU).
        channels_last: channels-last memory format for model and input.
        compile: ``torch.compile`` the training loss.
        deterministic: ``torch.use_deterministic_algorithms(True)`` (slower on CUDA).
        threads: torch intra-op CPU threads during training (0: torch's default, all
            cores). On a 2-core machine shared with other jobs, 2 threads ran a
            cpu-quick step 10x slower than 1 thread (7.5 s vs 0.75 s, measured):
            OpenMP threads spin-wait for a descheduled partner.
    """

    steps: int = 240_000
    batch_size: int = 32
    lr: float = 1e-4
    lr_final: float = 1e-6
    lr_decay_steps: int = 5
    weight_decay: float = 1e-5
    input_size: int = 128
    seed: int = 0
    augment: bool = True
    grader_draw: str = "all"
    aug_rotate_deg: float = 15.0
    aug_shear: float = 0.1
    aug_scale: float = 0.1
    aug_elastic_spacing: int = 24
    aug_elastic_magnitude: float = 2.0
    aug_max_shift: int = 26
    scene_augment: str = "paper"
    kl_free_bits: float = 0.0
    beta_warmup_steps: int = 0
    num_workers: int = 4
    log_every: int = 10
    val_every: int = 2000
    val_samples: int = 16
    val_max_crops: int = 256
    val_batch_size: int = 16
    checkpoint_every: int = 2000
    device: str = "auto"
    bf16: bool = True
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    threads: int = 0

    def __post_init__(self) -> None:
        from lidcseg.resources import TRAIN_LIMITS, check_ranges

        check_ranges(self, TRAIN_LIMITS)  # integer fields within their limits, floats finite
        for name in ("weight_decay", "aug_rotate_deg", "aug_shear", "aug_scale", "aug_elastic_magnitude",
                     "kl_free_bits"):
            if getattr(self, name) < 0:
                raise LidcsegError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_final <= self.lr:
            raise LidcsegError(f"need 0 < lr_final <= lr, got lr={self.lr}, lr_final={self.lr_final}")
        if self.grader_draw not in ("all", "real"):
            raise LidcsegError(f"TrainConfig.grader_draw must be 'all' or 'real', got {self.grader_draw!r}")
        if self.scene_augment not in SCENE_AUGMENTS:
            raise LidcsegError(f"TrainConfig.scene_augment must be one of {', '.join(SCENE_AUGMENTS)}, "
                               f"got {self.scene_augment!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise LidcsegError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")


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
    #   (6000 steps of 8 scenes, 7-10 minutes with two runs on 2 cores), on the stored scenes
    #   (no mirroring: the paper lists none) and without weight decay (as cpu-quick). Measured
    #   on seeds 0-2 (issue #13): flips are learned one at a time after seed-dependent waits
    #   that are neither posterior collapse (the KL stays at 5-14 nats, so free bits of 0.5
    #   nats/dim never engage) nor segmentation (each class >= 98.5% right while its flip
    #   waits); beta 0.1, f_comb 64, N = 12 and 8000 steps did not help. With all five encoded
    #   mode r still varies (0.69-0.94): each flip's sampled frequency is off by up to 0.16, the
    #   axis-aligned prior spanning tight posterior clusters whose boundary the decoder never
    #   sees in training. Paper-like otherwise: beta 1, no free bits.
    "cityscapes": (
        ModelConfig(in_channels=3, num_classes=24, num_scales=6),
        TrainConfig(steps=240_000, batch_size=16, lr_final=1e-5, lr_decay_steps=3, val_every=2000,
                    val_samples=16, val_max_crops=100, checkpoint_every=2000),
    ),
    "scenes-quick": (
        ModelConfig(in_channels=3, num_classes=24, base_channels=8, num_scales=4, convs_per_block=2,
                    latent_dim=6, fcomb_channels=32),
        TrainConfig(
            steps=6000, batch_size=8, lr=1e-3, lr_final=1e-4, lr_decay_steps=2, weight_decay=0.0,
            augment=False, num_workers=0, log_every=20, val_every=500, val_samples=16,
            val_max_crops=32, val_batch_size=8, checkpoint_every=500, threads=1,
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
    name = TASK_PRESET_NAMES.get(task, {}).get(name, name)
    try:
        return PRESETS[name]
    except KeyError:
        raise LidcsegError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None


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
    if saved is not None and preset_name is None and config_file is None:
        model_cfg, train_cfg = saved()
    else:
        model_cfg, train_cfg = preset(preset_name or "paper", task=task)
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
