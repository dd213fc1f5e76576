"""Statistics over images: the summary of per-image values and the paired test between models.

Plain functions on arrays; reports print what they return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def describe(values: np.ndarray | Sequence[float]) -> dict[str, float]:
    """Summary of per-image values: ``mean``, ``sd`` (ddof 1), ``sem``, ``median``, ``q25``, ``q75``, ``count``.

    NaN values are left out; with no value left every statistic is NaN.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        nan = float("nan")
        return {"mean": nan, "sd": nan, "sem": nan, "median": nan, "q25": nan, "q75": nan, "count": 0}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return {
        "mean": float(v.mean()),
        "sd": sd,
        "sem": sd / math.sqrt(v.size),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "count": int(v.size),
    }
