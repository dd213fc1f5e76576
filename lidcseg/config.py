"""Frozen configuration dataclasses (named presets and composition: :mod:`lidcseg.presets`).

No environment variables and no globals: every run is described by these
objects, dumped as JSON into its output folder, and can be loaded back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lidcseg.config_io import from_dict, read_json
from lidcseg.errors import LidcsegError

T = TypeVar("T")
#: ``TrainConfig.scene_augment`` values (:class:`lidcseg.data.scenes.SceneTrainDataset`).
SCENE_AUGMENTS: tuple[str, ...] = ("paper", "paper+mirror", "mirror")
#: ``TrainConfig.augment_on`` values (:class:`lidcseg.data.dataset.CropTrainDataset`).
AUGMENT_ON: tuple[str, ...] = ("loader", "device")


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
        augment_on: where LIDC tiles are augmented: ``loader`` (per tile in the DataLoader's
            CPU workers) or ``device`` (batched on the training device, the same
            distribution of transforms; keeps a GPU fed, see ``benchmarks/data_loading.py``).
        kl_free_bits: "free bits" (Kingma et al. 2016) in nats per latent dimension,
            applied to the whole latent: the KL term becomes max(KL, N * kl_free_bits)
            with KL the batch-mean KL summed over the N dimensions, so no gradient
            pushes the posterior towards the prior while it carries less than that
            (models report the per-dimension KL only as a detached diagnostic).
            Paper: 0 (plain Eq. 4).
        beta_warmup_steps: beta rises linearly from 0 to ``ModelConfig.beta`` over
            these steps (paper: 0, constant beta).
        posterior_noise_warmup_steps: K; the noise of the posterior sample of Eq. 4's
            estimate rises linearly from 0 over these steps, z = mu_q + a_t sigma_q eps with
            a_t = min(1, t / K) at step t (0-based), so the decoder first learns from the
            posterior's means, then from full samples (not in the paper; models without a
            posterior net train as without it). Paper: 0 (a full sample from the first step).
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
        prior_refit_steps: after training, refit the Prob. U-Net's prior net for this many
            batches, everything else frozen, so that it samples each mode of the training
            labels at its frequency, into ``refit/`` (:mod:`lidcseg.training.prior_refit`;
            not in the paper). Models without a learned prior net skip it. Paper: 0 (off).
        prior_refit_samples: K, prior draws per image of the refit's estimator.
        prior_refit_batch_size: training images per refit step (without augmentation).
        prior_refit_lr: Adam's learning rate in the refit.
        prior_refit_val_every: validate every this many refit steps and keep the prior of
            the lowest validation mode MAE on flip scenes, GED on LIDC crops (the refit's
            start included); 0: keep the last.
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
    augment_on: str = "loader"
    kl_free_bits: float = 0.0
    beta_warmup_steps: int = 0
    posterior_noise_warmup_steps: int = 0
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
    prior_refit_steps: int = 0
    prior_refit_samples: int = 256
    prior_refit_batch_size: int = 2
    prior_refit_lr: float = 3e-4
    prior_refit_val_every: int = 50

    def __post_init__(self) -> None:
        from lidcseg.resources import TRAIN_LIMITS, check_ranges

        check_ranges(self, TRAIN_LIMITS)  # integer fields within their limits, floats finite
        for name in ("weight_decay", "aug_rotate_deg", "aug_shear", "aug_scale", "aug_elastic_magnitude",
                     "kl_free_bits"):
            if getattr(self, name) < 0:
                raise LidcsegError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.prior_refit_lr <= 0:
            raise LidcsegError(f"TrainConfig.prior_refit_lr must be > 0, got {self.prior_refit_lr}")
        if not 0 < self.lr_final <= self.lr:
            raise LidcsegError(f"need 0 < lr_final <= lr, got lr={self.lr}, lr_final={self.lr_final}")
        if self.grader_draw not in ("all", "real"):
            raise LidcsegError(f"TrainConfig.grader_draw must be 'all' or 'real', got {self.grader_draw!r}")
        if self.scene_augment not in SCENE_AUGMENTS:
            raise LidcsegError(f"TrainConfig.scene_augment must be one of {', '.join(SCENE_AUGMENTS)}, "
                               f"got {self.scene_augment!r}")
        if self.augment_on not in AUGMENT_ON:
            raise LidcsegError(f"TrainConfig.augment_on must be one of {', '.join(AUGMENT_ON)}, "
                               f"got {self.augment_on!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise LidcsegError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
