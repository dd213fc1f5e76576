"""Torch datasets of flip-task scenes: a seeded training stream with fresh flips, and evaluation.

:class:`SceneTrainDataset` is an endless seeded stream like the LIDC
:class:`~lidcseg.data.dataset.CropTrainDataset` (sample k is a pure function of
``(seed, k)``; it plugs into the same ``StreamSampler``): each sample shows its scene
with FRESH flips (:func:`lidcseg.flips.step_flips`), so over training a scene is seen
under all 32 modes with their probabilities. :class:`SceneEvalDataset` gives the
un-flipped label; the metrics compare samples with all 32 modes exactly
(:mod:`lidcseg.calibration`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lidcseg.config import SCENE_AUGMENTS
from lidcseg.data.scenes.augment import (
    AUGMENT_STREAM,
    SceneAugmentation,
    SceneAugmentParams,
    augment_scene,
    draw_augmentation,
)
from lidcseg.data.scenes.store import TASK, SceneStore
from lidcseg.errors import LidcsegError
from lidcseg.flips import (
    FLIP_PROBS,
    IGNORE_INDEX,
    NUM_CLASSES,
    apply_flips,
    flips_to_mode,
    step_flips,
)


def normalize_rgb(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> float32 in [-1, 1]: ``x / 127.5 - 1``."""
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    return x.to(torch.float32) / 127.5 - 1.0


def _target(label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 label (H, W) -> (labels int64 with ignored pixels set to 0, ignore bool)."""
    lab = torch.from_numpy(np.ascontiguousarray(label)).to(torch.int64)
    ignore = lab == IGNORE_INDEX
    return lab.masked_fill(ignore, 0), ignore


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


class SceneTrainDataset(Dataset):
    """The endless, seeded stream of training scenes with fresh flips.

    ``dataset[k]`` (k >= 0, unbounded) is a pure function of ``(seed, k)``:
    epoch ``k // N`` visits the N scenes in the permutation of
    ``SeedSequence([seed, 0, epoch])``; the flips come from
    :func:`lidcseg.flips.step_flips`, the mirror decision from
    ``SeedSequence([seed, 1, k])`` and the paper's augmentation (Appendix H.2,
    :mod:`lidcseg.data.scenes.augment`) from ``SeedSequence([seed, 3, k])``. The
    label is flipped before the warp, so the flipped classes cover exactly the
    warped regions of their originals. ``len(dataset)`` is N.

    Each sample is a dict:

    - ``image``: (3, H, W) float32 in [-1, 1] (:func:`normalize_rgb`);
    - ``mask``: (H, W) int64 FLIPPED labels in [0, 24) (0 at ignored pixels);
    - ``ignore``: (H, W) bool, True where the pixel is left out of the loss;
    - ``index``: the scene's row; ``mode``: the mode drawn (0..31).

    Args:
        path: a split file.
        seed: seed of the order, flips and augmentation.
        augment: augment the training scenes (False: the stored scene, only flipped).
        scheme: what ``augment`` does (:data:`lidcseg.config.SCENE_AUGMENTS`): ``paper``
            (Appendix H.2: elastic, rotation, shear, scale, translation, colour),
            ``paper+mirror`` (also mirrored left-right with probability 1/2, as the
            authors' code does) or ``mirror`` (that mirroring only, the stream before #13).
        params: the augmentation's magnitudes; default :class:`SceneAugmentParams`.
        flip_probs: (5,) flip probabilities; default the paper's 8/17 ... 4/17.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        augment: bool = True,
        scheme: str = "paper",
        params: SceneAugmentParams | None = None,
        flip_probs: np.ndarray | None = None,
    ) -> None:
        if scheme not in SCENE_AUGMENTS:
            raise LidcsegError(f"unknown scene augmentation {scheme!r}; valid: {', '.join(SCENE_AUGMENTS)}")
        self.store = SceneStore(path)
        if len(self.store) == 0:
            raise LidcsegError("split has no scenes", path)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.scheme = scheme
        self.params = params or SceneAugmentParams()
        self.flip_probs = FLIP_PROBS if flip_probs is None else np.asarray(flip_probs, dtype=float)
        self.num_classes = NUM_CLASSES
        self.height, self.width = self.store.height, self.store.width

    def __len__(self) -> int:
        return len(self.store)

    def describe(self) -> dict[str, Any]:
        """What a run's ``config.json`` records about its training data."""
        return {"task": TASK, "source": self.store.attrs.get("source"), "train_scenes": len(self),
                "height": self.height, "width": self.width, "num_classes": self.num_classes,
                "flip_probs": [float(p) for p in self.flip_probs]}

    def draw(self, k: int) -> tuple[int, np.ndarray, SceneAugmentation | None]:
        """``(scene index, flips (5,) bool, augmentation or None)`` of stream position ``k``."""
        if k < 0:
            raise IndexError(k)
        n = len(self.store)
        epoch, pos = divmod(int(k), n)
        index = int(_permutation(self.seed, epoch, n)[pos])
        flips = step_flips(self.seed, int(k), self.flip_probs)
        if not self.augment:
            return index, flips, None
        mirror = self.scheme != "paper" and bool(np.random.default_rng([self.seed, 1, int(k)]).random() < 0.5)
        if self.scheme == "mirror":
            return index, flips, SceneAugmentation(mirror=mirror)
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(k)])
        return index, flips, draw_augmentation(rng, self.height, self.width, self.params, mirror=mirror)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index, flips, aug = self.draw(k)
        image, label = self.store[index]
        label = apply_flips(label, flips)  # before the warp: both commute (nearest neighbour)
        if aug is None:
            x = normalize_rgb(image)
        else:
            x, label = augment_scene(image, label, aug)
        y, ignore = _target(label)
        return {"image": x, "mask": y, "ignore": ignore, "index": index, "mode": int(flips_to_mode(flips))}


class SceneEvalDataset(Dataset):
    """Validation/test scenes with their UN-flipped labels (the metrics build the 32 modes).

    Each sample is a dict: ``image`` (3, H, W) float32, ``label`` (H, W) int64
    un-flipped trainIds (0 at ignored pixels), ``ignore`` (H, W) bool, ``index``.

    Args:
        path: a split file.
        limit: at most this many scenes, evenly spaced over the file.
    """

    def __init__(self, path: str | Path, *, limit: int | None = None) -> None:
        self.store = SceneStore(path)
        n = len(self.store)
        if limit is not None and 0 < limit < n:
            self.indices = np.unique(np.linspace(0, n - 1, int(limit)).round().astype(np.int64))
        else:
            self.indices = np.arange(n, dtype=np.int64)
        self.height, self.width = self.store.height, self.store.width

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        image, label = self.store[index]
        y, ignore = _target(label)
        return {"image": normalize_rgb(image), "label": y, "ignore": ignore, "index": index}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw scenes of the (limited) split: ``(images (N, 3, H, W), labels (N, H, W))`` uint8."""
        rows = [self.store[int(i)] for i in self.indices]
        h, w = self.height, self.width
        images = np.stack([r[0] for r in rows]) if rows else np.zeros((0, 3, h, w), np.uint8)
        labels = np.stack([r[1] for r in rows]) if rows else np.zeros((0, h, w), np.uint8)
        return images, labels

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The whole (limited) split in memory as ``(images, labels, ignore)`` batches."""
        out = []
        for s in range(0, len(self), batch_size):
            items = [self[i] for i in range(s, min(s + batch_size, len(self)))]
            out.append(tuple(torch.stack([it[k] for it in items]) for k in ("image", "label", "ignore")))
        return out  # type: ignore[return-value]
