"""Torch datasets over the crop files ``DATA/<split>.h5`` (see :mod:`lidcseg.data.store`).

Training (the paper's Section 4.1: "image-grader pairs are drawn randomly")
uses :class:`CropTrainDataset`, an endless, seeded *stream* of samples: the
k-th sample of a run is a pure function of ``(seed, k)``:

- epoch ``e = k // N`` visits the N crops in a random permutation drawn from
  ``SeedSequence([seed, 0, e])``;
- the grader and the augmentation seed come from ``SeedSequence([seed, 1, k])``.

So the data order needs no state besides the number of samples already
consumed (``step * batch_size``): a resumed run continues exactly where the
killed one stopped, any number of DataLoader workers gives the same batches,
and :class:`StreamSampler` shards the same stream over DDP ranks the way
``DistributedSampler`` does (rank r takes positions r, r + W, ...), but can
start mid-epoch.

With ``augment_on="device"`` the workers only read, normalise and draw: a sample
carries the whole crop, the drawn grader's whole mask and the augmentation seed,
and :class:`lidcseg.data.device_augment.DeviceAugment` augments the batch on the
training device (the same distribution of transforms, batched).

Validation and test use :class:`CropEvalDataset`: the centre tile, no
augmentation, all G grader masks (for the GED, Eq. 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lidcseg.config import AUGMENT_ON
from lidcseg.data.device_augment import CROP_KEYS
from lidcseg.data.store import CropStore
from lidcseg.data.transforms import (
    AugmentParams,
    apply_transform,
    eval_transform,
    normalize_hu,
    train_transform,
)
from lidcseg.errors import LidcsegError

#: Values of ``grader_draw``: ``all`` draws among all G stored masks, padded
#: empty ones included (the paper); ``real`` only among the crop's real graders.
GRADER_DRAWS: tuple[str, ...] = ("all", "real")



class CropTrainDataset(Dataset):
    """The endless, seeded stream of augmented training samples.

    ``dataset[k]`` is the k-th sample of the stream (k >= 0, unbounded; see the
    module docstring). ``len(dataset)`` is the number of crops N.

    Each sample is a dict:

    - ``image``: (1, T, T) float32, HU normalised by :func:`normalize_hu`;
    - ``mask``: (T, T) int64 labels {0, 1} of ONE randomly drawn grader (empty masks included);
    - ``index``: the crop's row in the file; ``grader``: the drawn grader.

    With ``augment`` and ``augment_on="device"``, ``image`` and ``mask`` are replaced by
    (:data:`~lidcseg.data.device_augment.CROP_KEYS`):

    - ``crop``: (1, S, S) float32, the whole normalised crop;
    - ``crop_mask``: (S, S) uint8 {0, 1}, the drawn grader's whole mask;
    - ``aug_seed``: the augmentation seed (int, < 2**32), as in :meth:`draw`;

    and :meth:`lidcseg.data.device_augment.DeviceAugment.augment_batch` turns a collated
    batch into ``image``/``mask`` on the device. ``index`` and ``grader`` are the same.

    Args:
        path: a split file written by :func:`lidcseg.data.store.write_crops`.
        input_size: T, side of the training tile (paper: 128).
        seed: seed of the data order, grader draws and augmentation.
        augment: random augmentation; if False, the centre tile is used.
        grader_draw: ``"all"`` (paper) or ``"real"`` (see :data:`GRADER_DRAWS`).
        augment_params: magnitudes; defaults to :class:`AugmentParams`.
        augment_on: ``"loader"`` (augment here) or ``"device"`` (see above); without
            ``augment`` both give the centre tile.

    Attributes:
        augments_on_device: True when samples carry :data:`CROP_KEYS` (``augment`` and
            ``augment_on="device"``): the training loop must apply ``DeviceAugment``.
        augment_params: the magnitudes in use.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        input_size: int = 128,
        seed: int = 0,
        augment: bool = True,
        grader_draw: str = "all",
        augment_params: AugmentParams | None = None,
        augment_on: str = "loader",
    ) -> None:
        if augment_on not in AUGMENT_ON:
            raise LidcsegError(f"unknown augment_on {augment_on!r}; valid: {', '.join(AUGMENT_ON)}")
        if grader_draw not in GRADER_DRAWS:
            raise LidcsegError(
                f"unknown grader_draw {grader_draw!r}; valid: {', '.join(GRADER_DRAWS)}"
            )
        self.store = CropStore(path)
        if len(self.store) == 0:
            raise LidcsegError("split has no crops", path)
        if input_size > self.store.crop_size:
            raise LidcsegError(
                f"input_size {input_size} exceeds the crop size {self.store.crop_size}", path
            )
        self.input_size = int(input_size)
        self.seed = int(seed)
        self.grader_draw = grader_draw
        self.n_graders = self.store.n_graders
        self.augment_params = augment_params or AugmentParams()
        self.augments_on_device = bool(augment) and augment_on == "device"
        self.transform = (
            train_transform(input_size, self.store.crop_size, self.augment_params)
            if augment
            else eval_transform(input_size)
        )
        if grader_draw == "real":
            real = np.asarray(self.store.meta["n_graders"], dtype=np.int64)
            # A crop always has >= 1 real grader; guard against hand-made files.
            self._choices = np.where(real >= 1, np.minimum(real, self.n_graders), self.n_graders)
        else:
            self._choices = np.full(len(self.store), self.n_graders, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.store)

    def draw(self, k: int) -> tuple[int, int, int]:
        """``(crop index, grader, augmentation seed)`` of stream position ``k``."""
        if k < 0:
            raise IndexError(k)
        n = len(self.store)
        epoch, pos = divmod(int(k), n)
        index = int(_permutation(self.seed, epoch, n)[pos])
        rng = np.random.default_rng([self.seed, 1, int(k)])
        grader = int(rng.integers(self._choices[index]))
        aug_seed = int(rng.integers(2**32))
        return index, grader, aug_seed

    def __getitem__(self, k: int) -> dict[str, torch.Tensor | int]:
        index, grader, aug_seed = self.draw(k)
        image, masks = self.store[index]
        img = normalize_hu(image)[None]  # (1, S, S)
        msk = torch.from_numpy(np.ascontiguousarray(masks[grader : grader + 1]))  # (1, S, S)
        if self.augments_on_device:
            crop, crop_mask, seed_key = CROP_KEYS
            return {crop: img, crop_mask: msk[0].to(torch.uint8), seed_key: aug_seed,
                    "index": index, "grader": grader}
        img, msk = apply_transform(self.transform, img, msk, aug_seed)
        return {"image": img, "mask": msk[0].to(torch.int64), "index": index, "grader": grader}


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The crop order of one epoch: a permutation of ``range(n)``."""
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


class CropEvalDataset(Dataset):
    """Deterministic validation/test samples: centre tile and all grader masks.

    Each sample is a dict: ``image`` (1, T, T) float32, ``masks`` (G, T, T)
    uint8 0/1 (padded graders are empty), ``index`` (row in the file).

    Args:
        path: a split file.
        input_size: T (paper: 128).
        limit: use at most this many crops, evenly spaced over the file (the
            file is ordered by patient, so a prefix would cover few patients).
    """

    def __init__(self, path: str | Path, *, input_size: int = 128, limit: int | None = None) -> None:
        self.store = CropStore(path)
        if input_size > self.store.crop_size:
            raise LidcsegError(
                f"input_size {input_size} exceeds the crop size {self.store.crop_size}", path
            )
        n = len(self.store)
        if limit is not None and 0 < limit < n:
            self.indices = np.unique(np.linspace(0, n - 1, int(limit)).round().astype(np.int64))
        else:
            self.indices = np.arange(n, dtype=np.int64)
        self.transform = eval_transform(input_size)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        index = int(self.indices[i])
        image, masks = self.store[index]
        img, msk = apply_transform(
            self.transform, normalize_hu(image)[None], torch.from_numpy(np.ascontiguousarray(masks))
        )
        return {"image": img, "masks": msk, "index": index}


class StreamSampler(Sampler[int]):
    """Stream positions of steps ``[start_step, stop_step)`` for one DDP rank.

    Global step s covers positions ``s * B .. s * B + B - 1`` (B = global
    batch size); rank r of W takes ``s * B + r, s * B + r + W, ...`` (B / W
    positions), as ``DistributedSampler`` interleaves. Use it with a
    DataLoader of ``batch_size = B // W``: each batch is one step.

    Args:
        batch_size: B, the global batch size; must be divisible by ``world_size``.
        start_step: first step to yield (a resumed run's step).
        stop_step: one past the last step.
        rank, world_size: this process's DDP rank and the number of ranks.
    """

    def __init__(
        self, batch_size: int, start_step: int, stop_step: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise LidcsegError(
                f"batch_size {batch_size} is not divisible by the {world_size} DDP processes"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.batch_size = batch_size
        self.start_step = start_step
        self.stop_step = max(start_step, stop_step)
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * (self.batch_size // self.world_size)

    def __iter__(self) -> Iterator[int]:
        b, w = self.batch_size, self.world_size
        for s in range(self.start_step, self.stop_step):
            yield from range(s * b + self.rank, (s + 1) * b, w)
