"""One split's evaluation tiles in memory: what ``evaluate`` (Fig. 4) and ``ambiguity`` (App. E) score.

:func:`load_split` reads ``DATA/<split>.h5`` through the evaluation dataset of
training (:class:`~lidcseg.data.dataset.CropEvalDataset`): the centre
``input_size`` tile of each crop, HU normalised exactly as in training, and all
G = 4 grader masks cut to the same tile (padded graders are empty masks, as in
the paper). ``max_images`` takes that many crops evenly spaced over the file
(the file is ordered by patient). :meth:`EvalSplit.batches` walks the tiles in
model-sized batches; a caller that draws from one generator per run consumes it
batch by batch in this order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lidcseg.errors import LidcsegError
from lidcseg.progress import Progress


@dataclass
class EvalSplit:
    """Evaluation tiles of one split, in memory (about 130 MB per 1000 crops at 128 x 128).

    Attributes:
        path: the split file.
        input_size: T.
        images: (N, 1, T, T) float32, HU normalised as in training.
        masks: (N, G, T, T) bool grader masks (padded graders empty).
        rows: (N,) int64 row of each crop in the file (the ``image`` column of the CSVs).
        patient: (N,) str patient id.
        lesion: (N,) str ``patient/scan/lesion`` key (one per lesion, shared by its slices).
    """

    path: Path
    input_size: int
    images: torch.Tensor
    masks: torch.Tensor
    rows: np.ndarray
    patient: np.ndarray
    lesion: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, x)`` in file order, x = ``images[start:stop]`` (b, 1, T, T) on ``device``."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield start, stop, self.images[start:stop].to(device)


def split_file(data_dir: str | Path, split: str) -> Path:
    """``DATA/<split>.h5``, or a one-line error naming what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LidcsegError("data directory not found", data_dir)
    path = data_dir / f"{split}.h5"
    if not path.is_file():
        raise LidcsegError(f"missing split file {path.name} (run `lidcseg prepare` first)", path)
    return path


def load_split(
    data_dir: str | Path,
    split: str,
    input_size: int,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> EvalSplit:
    """Load the evaluation tiles of ``DATA/<split>.h5`` (see :class:`EvalSplit`).

    Args:
        data_dir: folder of ``lidcseg prepare``.
        split: ``train``, ``val`` or ``test``.
        input_size: T, the models' input tile size.
        max_images: at most this many crops, evenly spaced over the file.
        progress: ``progress("load <split>", done, total)``.

    Raises:
        LidcsegError: a missing data folder or split file, or a split without crops.
    """
    from lidcseg.data.dataset import CropEvalDataset

    path = split_file(data_dir, split)
    ds = CropEvalDataset(path, input_size=input_size, limit=max_images)
    if len(ds) == 0:
        raise LidcsegError("split has no crops", path)
    images, masks = [], []
    for i in range(len(ds)):
        item = ds[i]
        images.append(item["image"])
        masks.append(item["masks"].bool())
        if progress is not None and (i + 1 == len(ds) or (i + 1) % 64 == 0):
            progress(f"load {split}", i + 1, len(ds))
    meta = ds.store.meta
    rows = ds.indices.astype(np.int64)
    patient = np.asarray([str(p) for p in meta["patient_id"][rows]], dtype=object)
    lesion = np.asarray(
        [f"{p}/{s}/{k}" for p, s, k in zip(patient, meta["scan_id"][rows], meta["lesion_id"][rows], strict=True)],
        dtype=object,
    )
    return EvalSplit(path, int(input_size), torch.stack(images), torch.stack(masks), rows, patient, lesion)
