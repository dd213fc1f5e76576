"""Which images a qualitative figure shows: one selector for every report.

The experiments decide what makes an image worth showing (evaluation: the
graders disagree; calibration: every switchable class is present) and rank the
candidates; :func:`choose_examples` picks from those ranked lists.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def choose_examples(
    k: int,
    candidates: Sequence[np.ndarray],
    quotas: Sequence[int] | None = None,
    keys: Sequence[Hashable] | np.ndarray | None = None,
    spread: bool = False,
) -> list[int]:
    """Up to ``k`` positions for a figure, from ranked lists of candidate positions.

    Args:
        k: examples wanted.
        candidates: lists of positions, most wanted first; list ``i`` adds positions
            until ``quotas[i]`` are chosen in all (default ``k``), then the next list fills.
        quotas: running totals per list (e.g. ``[(k + 1) // 2, k]``: half from the first).
        keys: a key per position (e.g. the lesion of a crop): one example per key as long
            as the lists allow, then repeats are allowed. None: every position its own key.
        spread: take evenly spaced positions of each list instead of its head.

    Returns:
        Distinct positions, in the order chosen, at most ``k``.
    """
    if k <= 0:
        return []
    quotas = list(quotas) if quotas is not None else [k] * len(candidates)
    chosen: list[int] = []

    def take(pool: np.ndarray, want: int, unique: bool) -> None:
        pool = np.asarray(pool, dtype=np.int64)
        if spread and pool.size:
            pool = pool[np.unique(np.linspace(0, pool.size - 1, min(want, pool.size)).round().astype(int))]
        used = {_key(keys, i) for i in chosen}
        for i in pool:
            if len(chosen) >= want:
                return
            if int(i) in chosen or (unique and _key(keys, i) in used):
                continue
            chosen.append(int(i))
            used.add(_key(keys, i))

    for unique in (True, False):
        for pool, want in zip(candidates, quotas, strict=True):
            take(pool, min(want, k), unique)
    return chosen


def _key(keys: Sequence[Hashable] | np.ndarray | None, i: int) -> Hashable:
    return int(i) if keys is None else keys[int(i)]
