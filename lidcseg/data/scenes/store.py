"""The on-disk format of flip-task scenes: split files, ``manifest.json``, and their checks.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lidcseg.data.h5check import Layout
from lidcseg.data.store import AppendH5, LazyH5
from lidcseg.errors import LidcsegError
from lidcseg.flips import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, SWITCHES
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.jsonfile import check_fields, load_json_object
from lidcseg.io.outputs import OutputKind, check_output_folder, claim_output, has_format

FORMAT_NAME = "lidcseg-scenes"
FORMAT_VERSION = 1
#: ``manifest.json``'s ``task``: what ``lidcseg train`` looks for to pick these datasets.
TASK = "flip-scenes"
MANIFEST = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")



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

    size_attrs = ("height", "width")

    def __init__(self, path: str | Path) -> None:
        self._open_checked(path, "scene", FORMAT_NAME, FORMAT_VERSION)
        self.height, self.width = int(self.attrs["height"]), int(self.attrs["width"])

    def layout(self, sizes: Mapping[str, int]) -> Layout:
        _, datasets = SceneWriter(self.path, sizes["height"], sizes["width"]).layout()
        return {name: (row, dtype) for name, (row, dtype, _) in datasets.items()}

    def recover(self, attrs: Mapping[str, Any]) -> str:
        command = SCENE_COMMANDS.get(str(attrs.get("source")))
        if command is not None:
            return f"re-run `lidcseg {command}` with --overwrite"
        return "re-run `lidcseg scenes make` (or `lidcseg cityscapes prepare`) with --overwrite"

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (3, H, W) uint8, label (H, W) uint8)`` of scene ``i``."""
        if not -self._len <= i < self._len:
            raise IndexError(i)
        with self._reading(f"scene {i}"):
            f = self._h5()
            return f["image"][i], f["label"][i]

    @property
    def names(self) -> list[str]:
        """The scene names, in row order."""
        with self._reading("the scene names"):
            return [x.decode() if isinstance(x, bytes) else str(x) for x in self._h5()["name"][...]]

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All scenes in memory: ``(images (N, 3, H, W), labels (N, H, W))`` uint8."""
        with self._reading("the scenes"):
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


#: How to re-create a data folder whose manifest is damaged, when its writer is unknown.
_RECREATE = "re-create the data folder with the command that wrote it and --overwrite"


def _manifest_object(data_dir: str | Path) -> dict[str, Any] | None:
    """``DATA/manifest.json`` as a JSON object; None when there is none.

    Raises:
        LidcsegError: a manifest that is not UTF-8, not JSON or not an object.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    return load_json_object(path, what="manifest", recover=_RECREATE)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``DATA/manifest.json`` of a scene data folder, with the fields training reads checked.

    Raises:
        LidcsegError: no manifest, not UTF-8, JSON or an object, not of the flip task, or
            lacking ``num_classes``, ``ignore_index``, ``height`` or ``width`` as integers.
    """
    data = _manifest_object(data_dir)
    if data is None:
        raise LidcsegError("no manifest.json: not a scene data folder", Path(data_dir))
    path = Path(data_dir) / MANIFEST
    if data.get("task") != TASK:
        raise LidcsegError(f"manifest is not of the {TASK!r} task", path)
    command = SCENE_COMMANDS.get(str(data.get("source")))
    recover = f"re-run `lidcseg {command}` with --overwrite" if command else _RECREATE
    check_fields(data, {"num_classes": int, "ignore_index": int, "height": int, "width": int}, path,
                 what="manifest", recover=recover)
    for name in ("num_classes", "height", "width"):
        if data[name] < 1:
            raise LidcsegError(f"manifest field {name!r} is {data[name]}, expected >= 1; {recover}", path)
    return data


def is_scene_data(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds flip-task scenes (its manifest says ``task: flip-scenes``).

    Raises:
        LidcsegError: a manifest that is not UTF-8, JSON or an object (whichever task).
    """
    data = _manifest_object(data_dir)
    return data is not None and data.get("task") == TASK


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


#: The command that writes a scene data folder of each ``source``.
SCENE_COMMANDS = {"synthetic": "scenes make", "cityscapes": "cityscapes prepare"}


def check_out_dir(
    out: Path, overwrite: bool, *, source: str = "synthetic", inputs: Iterable[str | Path | None] = (),
    staged: bool = False,
) -> None:
    """Claim ``out`` for the scenes of ``source``: refuse a folder that holds data unless
    ``overwrite``, and any folder this command may not write (a file or under one, a folder
    it did not write, one that is, holds or is inside one of the ``inputs``:
    :func:`lidcseg.io.outputs.check_output_folder`); then create and mark it.

    ``staged``: the caller writes elsewhere and swaps the new files in at the end, so an old
    data set stays whole (and its manifest valid) until then; otherwise the old manifest goes
    now, as the split files are about to be rewritten in place.
    """
    kind = OutputKind(SCENE_COMMANDS[source], noun="data folder",
                      legacy=has_format(MANIFEST, format=FORMAT_NAME, source=source))
    check_output_folder(out, kind, inputs=inputs)
    existing = [p.name for p in (out / MANIFEST, *(out / f"{s}.h5" for s in SPLITS)) if p.exists()]
    if existing and not overwrite:
        raise LidcsegError(f"output folder already holds {', '.join(existing)}; pass --overwrite", out)
    if existing and not staged:
        (out / MANIFEST).unlink(missing_ok=True)  # the folder is invalid until the new manifest
    claim_output(out, kind)


def finish_manifest(out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/manifest.json`` (protocol, layout, version, ``extra``) last, and return it."""
    from lidcseg import __version__

    extra = {**extra, "lidcseg": __version__, "layout": {
        "image": "(N, 3, H, W) uint8 RGB", "label": "(N, H, W) uint8 un-flipped trainIds, 255 ignore",
        "name": "(N,) str"}}
    write_manifest(out, extra)
    return read_manifest(out)
