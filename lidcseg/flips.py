"""The label-flip protocol of the Cityscapes task (Kohl et al. 2018, Section 4.2, Appendix C).

On LIDC nobody knows the true distribution of segmentations. This task builds
one that is known exactly: five Cityscapes classes flip *independently* to five
new classes with fixed probabilities, every time a label is shown.

=============  ==========  ===============  =============
class          trainId     flips to (id)    probability
=============  ==========  ===============  =============
sidewalk       1           sidewalk 2 (19)  8/17
person         11          person 2 (20)    7/17
car            13          car 2 (21)       6/17
vegetation     8           vegetation 2     5/17
                           (22)
road           0           road 2 (23)      4/17
=============  ==========  ===============  =============

The new classes take the trainIds 19..23 in this order (as the authors' release
does), so the task has C = 24 output classes; 255 is the ignore label.

**Modes.** The 2^5 = 32 combinations of flips are the modes of the label
distribution of an image. Mode ``k`` flips switch ``i`` (the i-th row above)
iff bit ``i`` of ``k`` is set: mode 0 flips nothing (probability
9·10·11·12·13 / 17^5 = 10.9%), mode 31 flips everything
(8·7·6·5·4 / 17^5 = 0.47%). A mode's probability is
prod_i p_i^{b_i} (1 - p_i)^{1 - b_i}.

**Draws.** A training stream draws fresh flips for every sample: the flips of
stream position ``k`` are a pure function of ``(seed, k)``
(:func:`step_flips`), so a run is reproducible and resumable without state.

The presets for training on the task (``cityscapes``, ``scenes-quick``) are
in :data:`lidcseg.presets.PRESETS` with the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: The 19 Cityscapes training classes, by trainId (cityscapesScripts ``labels.py``).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
#: Label of pixels left out of loss and metrics (cityscapesScripts' trainId for void classes).
IGNORE_INDEX = 255


@dataclass(frozen=True)
class Switch:
    """One switchable class.

    Attributes:
        name: Cityscapes class name.
        original: its trainId.
        flipped: trainId of its flipped twin (19..23).
        probability: probability that a label shows the flipped twin.
    """

    name: str
    original: int
    flipped: int
    probability: float


#: The five switches of the paper's Section 4.2, in the authors' order (flipped ids 19..23).
SWITCHES: tuple[Switch, ...] = (
    Switch("sidewalk", 1, 19, 8 / 17),
    Switch("person", 11, 20, 7 / 17),
    Switch("car", 13, 21, 6 / 17),
    Switch("vegetation", 8, 22, 5 / 17),
    Switch("road", 0, 23, 4 / 17),
)
#: Names of all C = 24 output classes, by trainId.
CLASS_NAMES: tuple[str, ...] = CITYSCAPES_CLASSES + tuple(f"{s.name} 2" for s in SWITCHES)
NUM_CLASSES = len(CLASS_NAMES)
NUM_SWITCHES = len(SWITCHES)
NUM_MODES = 2**NUM_SWITCHES
#: Flip probabilities p_i, shape (5,).
FLIP_PROBS: np.ndarray = np.array([s.probability for s in SWITCHES])
FLIP_PROBS.setflags(write=False)
#: The 10 classes the task's distance looks at: the 5 originals, then their 5 twins.
EVAL_CLASSES: tuple[int, ...] = tuple(s.original for s in SWITCHES) + tuple(
    s.flipped for s in SWITCHES
)
#: Sub-stream of ``SeedSequence([seed, FLIP_STREAM, k])`` that draws the flips of sample k.
FLIP_STREAM = 2

#: Colours (RGB 0..255) of the 24 classes for figures: the Cityscapes palette, and for the
#: twins the colours of the authors' release.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
    (46, 247, 180), (167, 242, 242), (30, 193, 252), (242, 160, 19), (84, 86, 22),
)


def mode_flips() -> np.ndarray:
    """The flips of every mode: (32, 5) bool, row k = the bits of k (bit i = switch i)."""
    k = np.arange(NUM_MODES)[:, None]
    return ((k >> np.arange(NUM_SWITCHES)[None]) & 1).astype(bool)


def mode_probabilities(probs: np.ndarray | None = None) -> np.ndarray:
    """Probability of each of the 32 modes: prod_i p_i^b_i (1 - p_i)^(1 - b_i), (32,) float64.

    Args:
        probs: (5,) flip probabilities; default :data:`FLIP_PROBS`.
    """
    p = FLIP_PROBS if probs is None else np.asarray(probs, dtype=np.float64)
    bits = mode_flips()
    return np.where(bits, p[None], 1.0 - p[None]).prod(axis=1)


def flips_to_mode(flips: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mode index of flip vectors: (..., 5) bool -> (...) int64."""
    f = np.asarray(flips, dtype=np.int64)
    return (f << np.arange(NUM_SWITCHES)).sum(axis=-1)


def mode_name(k: int) -> str:
    """A readable name of mode ``k``: the flipped classes joined by ``+``, or ``none``."""
    names = [s.name for s, b in zip(SWITCHES, mode_flips()[k], strict=True) if b]
    return "+".join(names) if names else "none"


def draw_flips(
    rng: np.random.Generator, size: int | tuple[int, ...] = (), probs: np.ndarray | None = None
) -> np.ndarray:
    """Independent flips, switch i with probability p_i: (*size, 5) bool."""
    p = FLIP_PROBS if probs is None else np.asarray(probs, dtype=np.float64)
    shape = (size,) if isinstance(size, int) else tuple(size)
    return rng.random((*shape, NUM_SWITCHES)) < p


def step_flips(seed: int, k: int, probs: np.ndarray | None = None) -> np.ndarray:
    """The flips of stream position ``k`` of a run seeded ``seed``: (5,) bool.

    Drawn from ``SeedSequence([seed, FLIP_STREAM, k])``: independent of every
    other draw of the run, of DataLoader workers and of resumption.
    """
    if k < 0 or seed < 0:
        raise ValueError(f"seed and k must be >= 0, got seed={seed}, k={k}")
    return draw_flips(np.random.default_rng([int(seed), FLIP_STREAM, int(k)]), probs=probs)


def flip_lut(flips: np.ndarray) -> np.ndarray:
    """A look-up table (256,) uint8 mapping trainIds through ``flips`` (5,) bool.

    Classes not flipped and the ignore label 255 map to themselves.
    """
    lut = np.arange(256, dtype=np.uint8)
    for s, b in zip(SWITCHES, np.asarray(flips, dtype=bool), strict=True):
        if b:
            lut[s.original] = s.flipped
    return lut


def apply_flips(label: np.ndarray | torch.Tensor, flips: np.ndarray) -> np.ndarray | torch.Tensor:
    """Relabel switch i's original class to its twin wherever ``flips[i]``.

    Args:
        label: (..., H, W) un-flipped trainIds (0..18, 255 ignore), NumPy or torch, any int dtype.
        flips: (5,) bool.

    Returns:
        The flipped label, same type, dtype and shape.
    """
    if isinstance(label, torch.Tensor):
        out = label.clone()
        for s, b in zip(SWITCHES, np.asarray(flips, dtype=bool), strict=True):
            if b:
                out[label == s.original] = s.flipped
        return out
    out = np.array(label, copy=True)
    for s, b in zip(SWITCHES, np.asarray(flips, dtype=bool), strict=True):
        if b:
            out[label == s.original] = s.flipped
    return out


def mode_labels(label: torch.Tensor) -> torch.Tensor:
    """Every mode of an un-flipped label: (..., H, W) -> (..., 32, H, W), mode k in slot k."""
    bits = mode_flips()
    return torch.stack([apply_flips(label, bits[k]) for k in range(NUM_MODES)], dim=-3)


def check_unflipped(label: np.ndarray | torch.Tensor, what: str = "label") -> None:
    """Refuse labels that are not un-flipped trainIds (0..18 or 255).

    Raises:
        ValueError: naming the offending values.
    """
    values = np.unique(np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label))
    bad = values[(values >= len(CITYSCAPES_CLASSES)) & (values != IGNORE_INDEX)]
    if bad.size or (values < 0).any():
        shown = ", ".join(str(int(v)) for v in np.concatenate([values[values < 0], bad])[:5])
        raise ValueError(f"{what} must hold un-flipped trainIds 0..18 or 255, found {shown}")
