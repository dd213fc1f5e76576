"""Cityscapes in the official layout -> flip-task scene files (Section 4.2 of Kohl et al. 2018).

``prepare_cityscapes(root, out)`` is what ``lidcseg cityscapes prepare`` runs:

1. **Find** every frame of the official layout under ``root``::

       leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
       gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

   (the official ``test`` split has no public labels and is not used). An
   image without its label file is an error.
2. **Split** as the paper does: the official ``val`` set becomes the TEST
   split; the training cities darmstadt, monchengladbach and ulm become the
   VALIDATION split; the other 15 training cities are the TRAIN split.
3. **Map** labelIds to trainIds with the official table
   (cityscapesScripts ``labels.py``, :data:`LABELS`): 19 classes 0..18; every
   void class, the license plate and unknown values become 255 (ignore).
4. **Down-sample** to ``height x width`` (paper: 256 x 512, a quarter of
   1024 x 2048): the image by area averaging (PIL ``BOX``; bilinear when
   up-sampling), the label by nearest neighbour (labels are never blended).
5. **Write** ``train.h5 / val.h5 / test.h5`` and ``manifest.json`` in the
   format of :mod:`lidcseg.data.scenes` (the labels stay UN-flipped: the flips
   are drawn during training).

Rows are ordered by city, then file name, so the output does not depend on
``workers``. Nothing here prints; progress goes to ``progress(stage, done, total)``.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.data.scenes import (
    SPLITS,
    SceneWriter,
    check_out_dir,
    finish_manifest,
)
from lidcseg.errors import LidcsegError
from lidcseg.flips import IGNORE_INDEX
from lidcseg.progress import Progress

#: The official Cityscapes labels (cityscapesScripts ``helpers/labels.py``): (name, id, trainId).
#: trainId 255 (and -1, the license plate) are void: ignored.
LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, -1),
)
#: Training cities held out as the validation split (the paper's Section 4.2).
VAL_CITIES: frozenset[str] = frozenset({"darmstadt", "monchengladbach", "ulm"})
#: Output split of each official split: official val is the test set.
OFFICIAL_TO_SPLIT: dict[str, str] = {"train": "train", "val": "test"}
#: Output size of the paper (a quarter of 1024 x 2048).
PAPER_SIZE: tuple[int, int] = (256, 512)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"



def label_lut() -> np.ndarray:
    """labelId -> trainId look-up table, (256,) uint8; unknown ids and void classes -> 255."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for _, label_id, train_id in LABELS:
        if label_id >= 0 and 0 <= train_id < 255:
            lut[label_id] = train_id
    return lut


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelIds image (H, W) of any unsigned int dtype to trainIds (H, W) uint8."""
    ids = np.asarray(label_ids)
    out = np.full(ids.shape, IGNORE_INDEX, np.uint8)
    inside = (ids >= 0) & (ids < 256)
    out[inside] = label_lut()[ids[inside].astype(np.int64)]
    return out


@dataclass(frozen=True)
class Frame:
    """One Cityscapes frame.

    Attributes:
        split: the output split (``train``, ``val`` or ``test``).
        city: city folder name.
        stem: ``<city>_<seq>_<frame>``.
        image: the ``leftImg8bit`` PNG.
        label: the ``gtFine_labelIds`` PNG.
    """

    split: str
    city: str
    stem: str
    image: Path
    label: Path

    @property
    def name(self) -> str:
        return f"{self.city}/{self.stem}"


def output_split(official: str, city: str) -> str:
    """The paper's split of a frame: official val -> test; darmstadt/monchengladbach/ulm -> val."""
    if official == "train" and city in VAL_CITIES:
        return "val"
    return OFFICIAL_TO_SPLIT[official]


def find_frames(root: str | Path) -> list[Frame]:
    """Every labelled frame of the official train and val sets under ``root``.

    Returns:
        Frames sorted by (output split, city, stem).

    Raises:
        LidcsegError: ``root`` lacks ``leftImg8bit/{train,val}``, an image has no
            label file, or no frame at all was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise LidcsegError("Cityscapes root not found", root)
    frames: list[Frame] = []
    for official in OFFICIAL_TO_SPLIT:
        img_dir = root / "leftImg8bit" / official
        if not img_dir.is_dir():
            raise LidcsegError(f"missing leftImg8bit/{official} (not the official Cityscapes layout)", root)
        for city_dir in sorted(p for p in img_dir.iterdir() if p.is_dir()):
            for image in sorted(city_dir.glob(f"*{IMAGE_SUFFIX}")):
                stem = image.name[: -len(IMAGE_SUFFIX)]
                label = root / "gtFine" / official / city_dir.name / f"{stem}{LABEL_SUFFIX}"
                if not label.is_file():
                    raise LidcsegError(f"no label file {label.relative_to(root)} for this image", image)
                frames.append(Frame(output_split(official, city_dir.name), city_dir.name, stem,
                                    image, label))
    if not frames:
        raise LidcsegError("no *_leftImg8bit.png images under leftImg8bit/{train,val}", root)
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(frames, key=lambda f: (order[f.split], f.city, f.stem))


def load_frame(frame: Frame, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and down-sample one frame: ``(image (3, H, W) uint8, label (H, W) uint8 trainIds)``.

    Raises:
        LidcsegError: an unreadable PNG, or image and label of different sizes.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(frame.image) as im:
            rgb = im.convert("RGB")
        with Image.open(frame.label) as lab:
            ids = np.asarray(lab)
    except (OSError, UnidentifiedImageError) as e:
        raise LidcsegError(f"cannot read PNG ({type(e).__name__})", frame.image) from None
    if ids.ndim != 2:
        raise LidcsegError(f"label must be one channel, got shape {ids.shape}", frame.label)
    if (ids.shape[1], ids.shape[0]) != rgb.size:
        raise LidcsegError(
            f"label {ids.shape[1]}x{ids.shape[0]} and image {rgb.size[0]}x{rgb.size[1]} differ",
            frame.label,
        )
    shrink = width <= rgb.size[0] and height <= rgb.size[1]
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    image = np.asarray(rgb.resize((width, height), resample)).transpose(2, 0, 1)
    train_ids = Image.fromarray(to_train_ids(ids)).resize((width, height), Image.Resampling.NEAREST)
    return np.ascontiguousarray(image), np.asarray(train_ids, dtype=np.uint8)


def _load(args: tuple[Frame, int, int]) -> tuple[np.ndarray, np.ndarray]:
    return load_frame(*args)


def prepare_cityscapes(
    root: str | Path,
    out: str | Path,
    *,
    height: int = PAPER_SIZE[0],
    width: int = PAPER_SIZE[1],
    workers: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Convert the official Cityscapes layout under ``root`` into flip-task scene files in ``out``.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        out: the data folder to write (``train/val/test.h5`` and ``manifest.json``).
        height, width: output size (paper: 256 x 512).
        workers: processes decoding PNGs (the output is the same for any number).
        overwrite: replace an existing data folder (only one this command wrote).
        progress: ``progress(stage, done, total)``.

    Returns:
        The manifest written.

    Raises:
        LidcsegError: see :func:`find_frames` and :func:`load_frame`; an empty split;
            an existing data folder without ``overwrite``; an ``out`` this command may
            not write (:func:`lidcseg.data.scenes.store.check_out_dir`).
    """
    out = Path(out)
    if height < 1 or width < 1:
        raise LidcsegError(f"size must be positive, got {height}x{width}")
    if workers < 1:
        raise LidcsegError(f"workers must be >= 1, got {workers}")
    frames = find_frames(root)
    by_split = {s: [f for f in frames if f.split == s] for s in SPLITS}
    for split, items in by_split.items():
        if not items:
            where = ("the training cities " + ", ".join(sorted(VAL_CITIES)) if split == "val"
                     else "leftImg8bit/val" if split == "test" else "the other training cities")
            raise LidcsegError(f"no frames for the {split} split (from {where})", root)
    check_out_dir(out, overwrite, source="cityscapes", inputs=[root])
    total, done = len(frames), 0
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for split, items in by_split.items():
            with SceneWriter(out / f"{split}.h5", height, width,
                             {"split": split, "source": "cityscapes"}) as writer:
                jobs = [(f, height, width) for f in items]
                loaded = pool.map(_load, jobs, chunksize=4) if pool is not None else map(_load, jobs)
                for frame, (image, label) in zip(items, loaded, strict=True):
                    writer.append(image[None], label[None], [frame.name])
                    done += 1
                    if progress is not None:
                        progress(f"cityscapes {split}", done, total)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return finish_manifest(out, {
        "source": "cityscapes",
        "root": str(Path(root).resolve()),
        "height": height,
        "width": width,
        "counts": {s: len(v) for s, v in by_split.items()},
        "cities": {s: sorted({f.city for f in v}) for s, v in by_split.items()},
        "split": {"test": "official val", "val": sorted(VAL_CITIES),
                  "train": "official train minus the val cities"},
        "resampling": {"image": "area (PIL BOX)", "label": "nearest"},
        "label_map": "cityscapesScripts labels.py labelId -> trainId, void -> 255",
    })
