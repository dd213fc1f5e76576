"""LIDCv2: the HPU-Net's 180 x 180 PNG crops, imported with the release's own split.

One archive per split unpacks to ``[lidc_crops_<split>/]<split>/images/<patient>/
z-<z>_c<crop>.png`` and ``.../gt/<patient>/z-<z>_c<crop>_l<grader>.png`` (see
:mod:`lidcseg.data.releases`). Pixels are 0.5 mm; images are 8-bit windowed CT.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lidcseg.data.releases import common
from lidcseg.data.split import SPLITS
from lidcseg.data.store import N_GRADERS, CropBatch
from lidcseg.errors import LidcsegError

__all__ = ["import_hpunet_png"]

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
_MASK_NAME = re.compile(r"^(?P<base>.+)_l(?P<grader>\d+)$")
#: Largest PNG side admitted: the release's crops are 180 x 180; a larger header is refused
#: before decoding (an image bomb declares a huge size in a few bytes).
MAX_SIDE = 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _split_of(name: str) -> str | None:
    n = name.lower()
    for prefix in ("lidc_crops_", "lidc-crops-", "lidc_crops-"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return _SPLIT_ALIASES.get(n)


def _find_png_splits(root: Path) -> dict[str, Path]:
    """Folders holding ``images/`` and ``gt/``, by split (searched 3 levels deep)."""
    if not root.exists():
        raise LidcsegError("no such folder", root)
    if not root.is_dir():
        raise LidcsegError("not a folder", root)
    found: list[Path] = []
    level = [root]
    for _ in range(4):
        nxt = []
        for d in level:
            if (d / "images").is_dir() and (d / "gt").is_dir():
                found.append(d)
                continue
            with contextlib.suppress(OSError):
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        level = nxt
    if not found:
        raise LidcsegError(
            "no images/ and gt/ folders found: expected <split>/images/<patient>/*.png "
            "and <split>/gt/<patient>/*_l<grader>.png (the HPU-Net LIDC crops)", root
        )
    splits: dict[str, Path] = {}
    for d in found:
        chain = [d, *d.relative_to(root).parents]
        names = [p.name if p != Path(".") else root.resolve().name for p in chain]
        split = next((s for s in map(_split_of, names) if s), None)
        if split is None:
            raise LidcsegError("cannot tell the split of this folder: name it train, val or test", d)
        if split in splits:
            raise LidcsegError(f"two folders for split {split}: {splits[split]} and {d}", root)
        splits[split] = d
    return splits


def _pngs_by_patient(folder: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() == ".png":
            raise LidcsegError(f"PNG directly in {folder.name}/: expected {folder.name}/<patient>/<name>.png", p)
        if p.is_dir() and not p.name.startswith("."):
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".png")
            if files:
                out[p.name] = files
    return out


def _png_size(path: Path, kind: str) -> tuple[int, int]:
    """``(width, height)`` from the PNG's IHDR chunk (its first 24 bytes), nothing decoded."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise LidcsegError(f"cannot read the {kind} PNG ({e.strerror or e.__class__.__name__})", path) from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise LidcsegError(f"not a readable PNG (no PNG signature and header: {kind} damaged or of "
                           "another format)", path)
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def _read_png(path: Path, kind: str, size: int | None = None) -> np.ndarray:
    """The PNG's 8-bit grey pixels ``(H, W)``, its size checked from the header before decoding.

    Its width and height must be ``size`` (when given) and at most :data:`MAX_SIDE`, so an
    image bomb (a huge size declared in a few bytes) is refused before a pixel is decoded.
    Whatever PIL raises on a damaged file becomes one line naming it.
    """
    import warnings

    from PIL import Image

    w, h = _png_size(path, kind)
    if size is not None and (w, h) != (size, size):
        other = "its image" if kind == "mask" else "others"
        raise LidcsegError(f"{kind} is {w}x{h}, {other} {size}x{size}", path)
    if not 1 <= max(w, h) <= MAX_SIDE or min(w, h) < 1:
        raise LidcsegError(f"{kind} PNG declares {w}x{h} pixels: at most {MAX_SIDE}x{MAX_SIDE} are "
                           "admitted (an image bomb?)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as im:
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    raise LidcsegError(f"{kind} PNG has mode {im.mode}, expected 8-bit grey", path)
                if im.mode != "L":
                    im = im.convert("L")
                pixels = np.asarray(im)
    except LidcsegError:
        raise
    except MemoryError:
        raise LidcsegError(f"out of memory while decoding the {kind} PNG", path) from None
    except Exception as e:  # PIL on a damaged file: OSError (truncated), SyntaxError, zlib.error...
        text = " ".join(str(e).split())[:120]
        raise LidcsegError(f"not a readable PNG ({e.__class__.__name__}: {text})", path) from None
    if pixels.shape != (h, w):
        raise LidcsegError(f"not a readable PNG (decoded {pixels.shape[1]}x{pixels.shape[0]}, header {w}x{h})",
                           path)
    return pixels


@dataclass
class _Crop:
    patient: str
    image: Path
    masks: list[Path]
    z: float
    lesion: int | None


def _pair_split(folder: Path) -> list[_Crop]:
    images = _pngs_by_patient(folder / "images")
    gts = _pngs_by_patient(folder / "gt")
    if not images:
        raise LidcsegError("no PNG images found in images/<patient>/", folder / "images")
    masks: dict[tuple[str, str], dict[int, Path]] = {}
    for patient, files in gts.items():
        for f in files:
            m = _MASK_NAME.match(f.stem)
            if m is None:
                raise LidcsegError("grader mask name lacks the _l<grader> suffix", f)
            masks.setdefault((patient, m.group("base")), {})[int(m.group("grader"))] = f
    crops: list[_Crop] = []
    for patient in sorted(images, key=common.natural_key):
        for f in images[patient]:
            graders = masks.pop((patient, f.stem), None)
            if not graders:
                raise LidcsegError(f"no grader masks gt/{patient}/{f.stem}_l<grader>.png for this image", f)
            if len(graders) > N_GRADERS:
                raise LidcsegError(f"{len(graders)} grader masks for this image, at most {N_GRADERS}", f)
            z, lesion, _ = common.parse_name(f.stem)
            crops.append(_Crop(patient, f, [graders[k] for k in sorted(graders)], z, lesion))
    if masks:
        (patient, base), graders = sorted(masks.items())[0]
        raise LidcsegError(f"grader mask without an image images/{patient}/{base}.png", next(iter(graders.values())))
    crops.sort(key=lambda c: (common.natural_key(c.patient), math.isnan(c.z), 0.0 if math.isnan(c.z) else c.z,
                              c.lesion if c.lesion is not None else -1, common.natural_key(c.image.name)))
    return crops


def import_hpunet_png(
    root: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: common.Progress | None = None,
) -> common.ImportSummary:
    """Convert the HPU-Net LIDC crops (LIDCv2, 180 x 180 PNGs) into ``out``, keeping their split.

    ``root`` is the folder the archives were unpacked into; every folder up to three levels
    below it that holds ``images/`` and ``gt/`` is one split, named by itself or a parent
    (``train``/``val``/``test``, also ``lidc_crops_<split>``, ``training``, ``validation``,
    ``testing``). Splits not present are not written (e.g. only the test archive).

    Writes ``out/<split>.h5`` (``image`` is the PNG's grey value 0..255 as int16, attribute
    ``intensity="png-uint8"``) and ``out/manifest.json``.

    Raises:
        LidcsegError: missing or empty folder, unpaired images or masks, more than 4
            graders, unreadable or 16-bit PNGs, size mismatches, or ``out`` already in use.
    """
    root, out = Path(root), Path(out)
    common.check_out(out, overwrite, [root])
    split_dirs = _find_png_splits(root)
    paired = {s: _pair_split(split_dirs[s]) for s in SPLITS if s in split_dirs}  # names first
    first = next(iter(paired.values()))[0].image
    h, w = _read_png(first, "image").shape
    if h != w:
        raise LidcsegError(f"image is {w}x{h}, expected square", first)
    size = int(h)

    def batches() -> Iterator[tuple[str, CropBatch]]:
        for split, crops in paired.items():
            batch = common.new_batch(len(crops), size)
            running: dict[str, int] = {}
            for r, c in enumerate(crops):
                img = _read_png(c.image, "image", size)
                masks = [_read_png(mp, "mask", size) for mp in c.masks]
                i = running.get(c.patient, 0)
                running[c.patient] = i + 1
                common.put_crop(batch, r, img, masks, patient=c.patient,
                                lesion=i if c.lesion is None else c.lesion, slice_index=i, z_mm=c.z)
                if progress is not None:
                    progress(f"converting {split}", r + 1, len(crops))
            yield split, batch

    manifest = {
        "crop_size": size,
        "spacing_mm": 0.5,
        "seed": None,
        "split_rule": "the release's own split (one folder per split)",
        "split_folders": {s: str(d.resolve()) for s, d in split_dirs.items()},
    }
    return common.write_dataset(out, overwrite, batches(), source="hpunet-png", release="LIDCv2",
                                input_path=root, intensity="png-uint8", attrs={"spacing_mm": 0.5},
                                manifest=manifest)
