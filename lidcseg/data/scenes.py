"""Street scenes for the flip task (Section 4.2): on-disk format, torch datasets, synthetic scenes.

One format serves Cityscapes (``lidcseg cityscapes prepare``,
:mod:`lidcseg.data.cityscapes`) and the synthetic scenes of ``lidcseg scenes
make`` (:func:`make_scenes`), so one dataset trains and evaluates both.

**Layout** of ``DATA/``::

    train.h5, val.h5, test.h5     one file per split
    manifest.json                 {"task": "flip-scenes", "format": ..., "source":
                                   "cityscapes" | "synthetic", "num_classes": 24,
                                   "ignore_index": 255, "height", "width", "counts",
                                   "switches", "split", ...}

Each split file (N scenes of H x W pixels):

============  ============  =======  =================================================
dataset       shape         dtype    meaning
============  ============  =======  =================================================
``image``     (N, 3, H, W)  uint8    RGB
``label``     (N, H, W)     uint8    UN-flipped Cityscapes trainIds 0..18, 255 = ignore
``name``      (N,)          str      e.g. ``ulm/ulm_000000_000019`` or ``synthetic/000017``
============  ============  =======  =================================================

Attributes: ``format`` (``lidcseg-scenes``), ``format_version``, ``height``,
``width``, ``split``, ``source``. One HDF5 chunk per scene (LZF), so a random
scene is one small read.

**Datasets.** :class:`SceneTrainDataset` is an endless seeded stream like the
LIDC :class:`~lidcseg.data.dataset.CropTrainDataset` (sample k is a pure
function of ``(seed, k)``; it plugs into the same ``StreamSampler``): each
sample shows its scene with FRESH flips (:func:`lidcseg.flips.step_flips`), so
over training a scene is seen under all 32 modes with their probabilities.
:class:`SceneEvalDataset` gives the un-flipped label; the metrics compare
samples with all 32 modes exactly (:mod:`lidcseg.calibration`).

**Synthetic scenes** (:func:`make_scene`): a road narrowing to a vanishing
point at the bottom, sidewalks beside it, terrain beyond, buildings and sky
above the horizon, trees (vegetation), cars on the road, persons on the
sidewalks, poles with signs, and an ignored ego-vehicle bonnet at the bottom
edge. Each class has its own colour plus per-pixel noise, so the image
determines the un-flipped class; the five flips then make the labels
ambiguous exactly as on Cityscapes.

Unlike Cityscapes, the five switchable classes cover comparable areas (means
over the default 400 training scenes at 32 x 64: road 18%, sidewalk 10%,
person 7%, car 6%, vegetation 5%; on Cityscapes a person is about 1%). A
Prob. U-Net learns to encode the flips one at a time, after waiting times that
grow as the flipped region shrinks (the posterior net sees a flip only through
the global average of its last feature map) and that vary with the seed. With
persons at 1% of the image (the first version of these scenes) no CPU run
learned the person's flip in 2000 steps. The default size, 32 x 64, makes a
step 4x cheaper than 64 x 128 at the same share of each class; in our runs the
flips were learned after similar numbers of steps at either size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from lidcseg.data.store import AppendH5, LazyH5
from lidcseg.errors import LidcsegError
from lidcseg.flips import (
    CLASS_NAMES,
    FLIP_PROBS,
    IGNORE_INDEX,
    NUM_CLASSES,
    SWITCHES,
    apply_flips,
    flips_to_mode,
    step_flips,
)
from lidcseg.io.atomic import write_json_atomic

FORMAT_NAME = "lidcseg-scenes"
FORMAT_VERSION = 1
#: ``manifest.json``'s ``task``: what ``lidcseg train`` looks for to pick these datasets.
TASK = "flip-scenes"
MANIFEST = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")

Progress = Callable[[str, int, int], None]


# -- on-disk format ------------------------------------------------------------------------------


class SceneWriter(AppendH5):
    """Stream scenes into one split file; the file appears atomically on a clean close.

    Example:
        >>> with SceneWriter("data/train.h5", 64, 128, {"split": "train"}) as w:  # doctest: +SKIP
        ...     w.append(images, labels, names)
    """

    def __init__(
        self, path: str | Path, height: int, width: int, attrs: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(path, attrs)
        self.height, self.width = int(height), int(width)

    def layout(self) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Any, bool]]]:
        h, w = self.height, self.width
        fixed = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "height": h, "width": w}
        return fixed, {"image": ((3, h, w), np.uint8, True), "label": ((h, w), np.uint8, True),
                       "name": ((), h5py.string_dtype(), False)}

    def append(self, images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> None:
        """Append scenes: images (n, 3, H, W) uint8, labels (n, H, W) uint8, n names."""
        n = len(names)
        h, w = self.height, self.width
        if images.shape != (n, 3, h, w) or labels.shape != (n, h, w):
            raise ValueError(f"bad scene shapes: image {images.shape}, label {labels.shape}, {n} names")
        self._extend({"image": images.astype(np.uint8, copy=False),
                      "label": labels.astype(np.uint8, copy=False),
                      "name": np.asarray([str(x) for x in names], dtype=object)})


class SceneStore(LazyH5):
    """Random access to one split file (see the module docstring).

    The HDF5 handle opens lazily and is reopened after ``fork``, so DataLoader
    workers can share a store.
    """

    def __init__(self, path: str | Path) -> None:
        self._open_checked(path, "scene", FORMAT_NAME, FORMAT_VERSION)
        self.height, self.width = int(self.attrs["height"]), int(self.attrs["width"])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (3, H, W) uint8, label (H, W) uint8)`` of scene ``i``."""
        if not -self._len <= i < self._len:
            raise IndexError(i)
        f = self._h5()
        return f["image"][i], f["label"][i]

    @property
    def names(self) -> list[str]:
        """The scene names, in row order."""
        return [x.decode() if isinstance(x, bytes) else str(x) for x in self._h5()["name"][...]]

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All scenes in memory: ``(images (N, 3, H, W), labels (N, H, W))`` uint8."""
        f = self._h5()
        return f["image"][...], f["label"][...]



def protocol_manifest() -> dict[str, Any]:
    """The flip protocol as JSON: classes, ignore label, and the five switches."""
    return {
        "task": TASK,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "num_classes": NUM_CLASSES,
        "ignore_index": IGNORE_INDEX,
        "class_names": list(CLASS_NAMES),
        "switches": [{"name": s.name, "original": s.original, "flipped": s.flipped,
                      "probability": s.probability} for s in SWITCHES],
    }


def write_manifest(data_dir: str | Path, extra: Mapping[str, Any]) -> Path:
    """Write ``DATA/manifest.json``: :func:`protocol_manifest` plus ``extra``."""
    path = Path(data_dir) / MANIFEST
    write_json_atomic(path, {**protocol_manifest(), **extra})
    return path


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``DATA/manifest.json`` of a scene data folder.

    Raises:
        LidcsegError: no manifest, unreadable, or not of the flip task.
    """
    path = Path(data_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LidcsegError("no manifest.json: not a scene data folder", Path(data_dir)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LidcsegError(f"unreadable manifest ({type(e).__name__})", path) from None
    if not isinstance(data, dict) or data.get("task") != TASK:
        raise LidcsegError(f"manifest is not of the {TASK!r} task", path)
    return data


def is_scene_data(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds flip-task scenes (its manifest says ``task: flip-scenes``)."""
    try:
        read_manifest(data_dir)
    except LidcsegError:
        return False
    return True


def check_model_for_scenes(data_dir: str | Path, model_cfg: Any) -> dict[str, Any]:
    """Refuse a model that cannot train on this scene folder; return its manifest.

    The model needs 3 input channels, the task's 24 classes, and a scene size
    divisible by 2^(num_scales - 1).

    Raises:
        LidcsegError: one line naming the mismatch and the fix (``--set ...``).
    """
    manifest = read_manifest(data_dir)
    if model_cfg.in_channels != 3 or model_cfg.num_classes != manifest["num_classes"]:
        raise LidcsegError(
            f"the flip task needs in_channels=3 and num_classes={manifest['num_classes']}, the model has "
            f"{model_cfg.in_channels} and {model_cfg.num_classes} (use a scenes preset or --set)", data_dir)
    factor = 2 ** (model_cfg.num_scales - 1)
    h, w = int(manifest["height"]), int(manifest["width"])
    if h % factor or w % factor:
        raise LidcsegError(f"scenes of {h}x{w} are not divisible by {factor} "
                           f"(num_scales={model_cfg.num_scales})", data_dir)
    return manifest


def split_path(data_dir: str | Path, split: str) -> Path:
    """``DATA/<split>.h5``, which must exist.

    Raises:
        LidcsegError: unknown split or missing file.
    """
    if split not in SPLITS:
        raise LidcsegError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    path = Path(data_dir) / f"{split}.h5"
    if not path.is_file():
        raise LidcsegError(f"missing split file {path.name}", path)
    return path


# -- torch datasets ------------------------------------------------------------------------------


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
    :func:`lidcseg.flips.step_flips` and the mirror decision from
    ``SeedSequence([seed, 1, k])``. ``len(dataset)`` is N.

    Each sample is a dict:

    - ``image``: (3, H, W) float32 in [-1, 1] (:func:`normalize_rgb`);
    - ``mask``: (H, W) int64 FLIPPED labels in [0, 24) (0 at ignored pixels);
    - ``ignore``: (H, W) bool, True where the pixel is left out of the loss;
    - ``index``: the scene's row; ``mode``: the mode drawn (0..31).

    Args:
        path: a split file.
        seed: seed of the order, flips and mirroring.
        augment: mirror left-right with probability 1/2 (a street scene stays one).
        flip_probs: (5,) flip probabilities; default the paper's 8/17 ... 4/17.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        augment: bool = True,
        flip_probs: np.ndarray | None = None,
    ) -> None:
        self.store = SceneStore(path)
        if len(self.store) == 0:
            raise LidcsegError("split has no scenes", path)
        self.seed = int(seed)
        self.augment = bool(augment)
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

    def draw(self, k: int) -> tuple[int, np.ndarray, bool]:
        """``(scene index, flips (5,) bool, mirror)`` of stream position ``k``."""
        if k < 0:
            raise IndexError(k)
        n = len(self.store)
        epoch, pos = divmod(int(k), n)
        index = int(_permutation(self.seed, epoch, n)[pos])
        mirror = self.augment and bool(np.random.default_rng([self.seed, 1, int(k)]).random() < 0.5)
        return index, step_flips(self.seed, int(k), self.flip_probs), mirror

    def __getitem__(self, k: int) -> dict[str, Any]:
        index, flips, mirror = self.draw(k)
        image, label = self.store[index]
        label = apply_flips(label, flips)
        if mirror:
            image, label = image[..., ::-1], label[..., ::-1]
        y, ignore = _target(label)
        return {"image": normalize_rgb(np.ascontiguousarray(image)), "mask": y, "ignore": ignore,
                "index": index, "mode": int(flips_to_mode(flips))}


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


# -- synthetic scenes ----------------------------------------------------------------------------

#: Colour (RGB) of each class in the synthetic images; every class has its own, so the
#: image determines the un-flipped label. The ignored ego-vehicle bonnet is near black.
SCENE_COLORS: dict[int, tuple[int, int, int]] = {
    0: (95, 92, 100),     # road: dark grey
    1: (190, 175, 160),   # sidewalk: light beige
    2: (140, 95, 70),     # building: brick
    5: (235, 235, 235),   # pole: white
    7: (245, 200, 20),    # traffic sign: yellow
    8: (40, 140, 40),     # vegetation: green
    9: (165, 190, 110),   # terrain: pale grass
    10: (135, 190, 240),  # sky: light blue
    11: (215, 40, 60),    # person: red
    13: (35, 55, 185),    # car: blue
    IGNORE_INDEX: (25, 25, 25),
}
#: Per-pixel Gaussian noise (RGB units) of the synthetic images.
SCENE_NOISE = 12.0
#: Fewest pixels each of the five switchable classes has in every synthetic scene.
MIN_SWITCH_PIXELS = 6
#: Split seeds of :func:`make_scenes` (scene i of split s from ``SeedSequence([seed, code, i])``).
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _layout(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One street layout: (H, W) uint8 un-flipped trainIds."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    label = np.full((h, w), 10, np.uint8)  # sky
    horizon = int(h * rng.uniform(0.36, 0.46))
    vx = w * rng.uniform(0.35, 0.65)

    # Buildings: blocks of random width and height standing on the horizon.
    x = 0
    while x < w:
        bw = int(rng.integers(max(2, w // 12), max(3, w // 5)))
        if rng.random() < 0.85:
            top = int(horizon - rng.uniform(0.3, 0.95) * horizon)
            label[top:horizon, x : x + bw] = 2
        x += bw

    # Ground: road narrowing to the vanishing point, sidewalks beside it, terrain beyond.
    t = np.clip((yy - horizon + 1) / (h - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom
    road_half = t * w * rng.uniform(0.3, 0.5) + 0.5
    side_half = road_half + t * w * rng.uniform(0.2, 0.3) + 1.0
    ground = yy >= horizon
    dist = np.abs(xx - vx)
    label[ground] = 9
    label[ground & (dist <= side_half)] = 1
    label[ground & (dist <= road_half)] = 0

    def row_t(y: int) -> float:
        return float(np.clip((y - horizon + 1) / (h - horizon), 0, 1))

    ego = int(h * rng.uniform(0.04, 0.09))  # rows of the ignored bonnet at the bottom
    y_lo, y_hi = horizon + max(2, (h - horizon) // 5), h - ego - 1

    # Trees on the outer edge of a sidewalk, crowns in front of the buildings.
    for _ in range(int(rng.integers(1, 4))):
        yb = int(rng.integers(horizon + 1, max(horizon + 2, (horizon + y_hi) // 2)))
        s = max(row_t(yb), 0.15)
        side = rng.choice([-1.0, 1.0])
        xb = vx + side * (s * w * 0.62)
        r = max(2.0, s * h * rng.uniform(0.35, 0.55))
        cy = yb - 1.6 * r
        crown = (yy - cy) ** 2 + ((xx - xb) / 1.2) ** 2 <= r**2
        trunk = (np.abs(xx - xb) <= max(0.6, 0.12 * r)) & (yy > cy) & (yy <= yb)
        label[crown | trunk] = 8

    # Poles with a sign, on the sidewalks.
    for _ in range(int(rng.integers(0, 3))):
        yb = int(rng.integers(y_lo, max(y_lo + 1, y_hi)))
        s = row_t(yb)
        side = rng.choice([-1.0, 1.0])
        xb = vx + side * (s * w * rng.uniform(0.36, 0.6))
        ph = s * h * 0.9 + 3
        pole = (np.abs(xx - xb) <= max(0.5, s * 1.2)) & (yy > yb - ph) & (yy <= yb)
        label[pole] = 5
        sz = max(1.0, s * 4)
        label[(np.abs(xx - xb) <= sz) & (np.abs(yy - (yb - ph)) <= sz)] = 7

    # Cars on the road (far ones first, so near ones cover them), at least one.
    rows = sorted(int(rng.integers(y_lo, max(y_lo + 1, y_hi))) for _ in range(int(rng.integers(1, 4))))
    for yb in rows:
        s = max(row_t(yb), 0.35)
        half = road_half[yb, 0]
        cw = max(3.0, s * w * rng.uniform(0.2, 0.3))
        ch = max(2.0, cw * rng.uniform(0.45, 0.6))
        xc = vx + rng.uniform(-1, 1) * max(0.0, half - cw / 2)
        body = (np.abs(xx - xc) <= cw / 2) & (yy <= yb) & (yy > yb - ch)
        roof = (np.abs(xx - xc) <= cw / 3) & (yy <= yb - ch) & (yy > yb - 1.5 * ch)
        label[body | roof] = 13

    # Persons on the sidewalks, at least two.
    for _ in range(int(rng.integers(2, 6))):
        yb = int(rng.integers(y_lo, max(y_lo + 1, y_hi)))
        s = max(row_t(yb), 0.35)
        side = rng.choice([-1.0, 1.0])
        mid = (road_half[yb, 0] + side_half[yb, 0]) / 2
        xc = vx + side * (mid + rng.uniform(-0.3, 0.3) * (side_half[yb, 0] - road_half[yb, 0]))
        ph = max(6.0, s * h * rng.uniform(0.4, 0.55))
        pw = max(2.0, ph / 3.5)
        body = (np.abs(xx - xc) <= pw) & (yy <= yb) & (yy > yb - 0.8 * ph)
        head = (yy - (yb - 0.88 * ph)) ** 2 + (xx - xc) ** 2 <= max(0.8, pw) ** 2
        label[body | head] = 11

    label[h - ego :] = IGNORE_INDEX
    return label


def _paint(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """The RGB image of a layout: class colours, a per-scene tint, per-pixel noise. (3, H, W) uint8."""
    palette = np.zeros((256, 3), np.float64)
    for c, rgb in SCENE_COLORS.items():
        palette[c] = rgb
    img = palette[label]  # (H, W, 3)
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 6, size=3)
    img = img + rng.normal(0.0, SCENE_NOISE, size=img.shape)
    return np.clip(img.round(), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def make_scene(rng: np.random.Generator, height: int = 32, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic street scene: ``(image (3, H, W) uint8, label (H, W) uint8 un-flipped trainIds)``.

    Every scene has at least :data:`MIN_SWITCH_PIXELS` non-ignored pixels of
    each of the five switchable classes (layouts are redrawn until it does).
    """
    if height < 16 or width < 16:
        raise LidcsegError(f"scene size must be at least 16x16, got {height}x{width}")
    for _ in range(100):
        label = _layout(rng, height, width)
        if all((label == s.original).sum() >= MIN_SWITCH_PIXELS for s in SWITCHES):
            return _paint(rng, label), label
    raise LidcsegError(f"cannot fit all five switchable classes into {height}x{width} scenes")


def make_scenes(
    out: str | Path,
    *,
    n_train: int = 400,
    n_val: int = 50,
    n_test: int = 100,
    height: int = 32,
    width: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a synthetic flip-task data folder: ``train/val/test.h5`` and ``manifest.json``.

    Scene i of split s is drawn from ``SeedSequence([seed, s, i])`` (s = 0, 1, 2
    for train, val, test), so the folder is a pure function of the arguments
    and a split's scenes do not depend on the other splits' sizes.

    Returns:
        The manifest written.

    Raises:
        LidcsegError: bad sizes, or ``out`` already holds a data folder and not ``overwrite``.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 1:
        raise LidcsegError(f"every split needs at least one scene, got {counts}")
    if height % 16 or width % 16:
        raise LidcsegError(f"scene size must be multiples of 16, got {height}x{width}")
    check_out_dir(out, overwrite)
    total, done = sum(counts.values()), 0
    for split, n in counts.items():
        with SceneWriter(out / f"{split}.h5", height, width,
                         {"split": split, "source": "synthetic"}) as writer:
            for i in range(n):
                rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
                image, label = make_scene(rng, height, width)
                writer.append(image[None], label[None], [f"synthetic/{split}/{i:06d}"])
                done += 1
                if progress is not None and (done % 25 == 0 or done == total):
                    progress(f"scenes {split}", done, total)
    return finish_manifest(out, {"source": "synthetic", "height": height, "width": width,
                                  "counts": counts, "seed": seed,
                                  "generator": {"noise_rgb": SCENE_NOISE,
                                                "min_switch_pixels": MIN_SWITCH_PIXELS}})


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds data, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise LidcsegError("output path exists and is not a folder", out)
    existing = [p.name for p in (out / MANIFEST, *(out / f"{s}.h5" for s in SPLITS)) if p.exists()]
    if existing and not overwrite:
        raise LidcsegError(f"output folder already holds {', '.join(existing)}; pass --overwrite", out)
    if existing:
        (out / MANIFEST).unlink(missing_ok=True)  # the folder is invalid until the new manifest


def finish_manifest(out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/manifest.json`` (protocol, layout, version, ``extra``) last, and return it."""
    from lidcseg import __version__

    extra = {**extra, "lidcseg": __version__, "layout": {
        "image": "(N, 3, H, W) uint8 RGB", "label": "(N, H, W) uint8 un-flipped trainIds, 255 ignore",
        "name": "(N,) str"}}
    write_manifest(out, extra)
    return read_manifest(out)
