"""Patient-level train/val/test split, seeded and recorded.

The paper splits LIDC-IDRI's 1010 patients 722/144/144. With fewer patients the
same proportions apply (at least one patient in val and test once there are 3
or more patients). The split is a function of the sorted patient IDs and the
seed only, so the same ``--seed`` always gives the same split, whatever order
scans are processed in. A patient is in exactly one split, so no patient's
slices leak between them (the public PyTorch port's split was by slice).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val", "test")


def split_sizes(n_patients: int, proportions: tuple[int, int, int] = (722, 144, 144)) -> tuple[int, int, int]:
    """Patients per split for ``n_patients``; exact for the paper's 1010."""
    total = sum(proportions)
    if n_patients == total:
        return proportions
    n_val = round(n_patients * proportions[1] / total)
    n_test = round(n_patients * proportions[2] / total)
    if n_patients >= 3:
        n_val, n_test = max(n_val, 1 if proportions[1] else 0), max(n_test, 1 if proportions[2] else 0)
    n_val = min(n_val, n_patients)
    n_test = min(n_test, n_patients - n_val)
    return n_patients - n_val - n_test, n_val, n_test


def split_patients(
    patients: Iterable[str], seed: int = 0, proportions: tuple[int, int, int] = (722, 144, 144)
) -> dict[str, str]:
    """Assign every patient to ``train``, ``val`` or ``test``.

    Returns:
        patient ID -> split name, for every patient given.
    """
    ids = sorted(set(patients))
    n_train, n_val, _ = split_sizes(len(ids), proportions)
    digest = hashlib.sha256(f"lidcseg-split:{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    order = rng.permutation(len(ids))
    out = {}
    for rank, idx in enumerate(order):
        out[ids[idx]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out
