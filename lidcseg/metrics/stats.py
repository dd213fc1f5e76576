"""Statistics over images: the summary of per-image values and the paired test between models.

Plain functions on arrays; reports print what they return.
"""

from __future__ import annotations

import math
import warnings
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


def wilcoxon_paired(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test on per-image pairs (``scipy.stats.wilcoxon``).

    Zero differences are dropped (``zero_method="wilcox"``); with no non-zero
    difference the test is not defined and ``p_value`` is 1.

    Args:
        reference, other: (N,) values of the same images.

    Returns:
        ``statistic``, ``p_value``, ``images``, ``nonzero`` (pairs that differ),
        ``mean_difference`` and ``median_difference`` (other - reference).

    Raises:
        ValueError: the arrays are not both (N,).
    """
    from scipy.stats import wilcoxon

    reference, other = np.asarray(reference, float), np.asarray(other, float)
    if reference.shape != other.shape or reference.ndim != 1:
        raise ValueError(f"paired arrays must be (N,) alike, got {reference.shape} and {other.shape}")
    diff = other - reference
    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:
        stat, p = 0.0, 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = wilcoxon(reference, other, zero_method="wilcox", alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    return {
        "statistic": stat,
        "p_value": p,
        "images": int(diff.size),
        "nonzero": nonzero,
        "mean_difference": float(diff.mean()) if diff.size else float("nan"),
        "median_difference": float(np.median(diff)) if diff.size else float("nan"),
    }
