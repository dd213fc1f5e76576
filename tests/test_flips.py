"""The flip protocol: class table, the 32 modes and their probabilities, the seeded flip sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lidcseg.flips import (
    CLASS_NAMES,
    EVAL_CLASSES,
    FLIP_PROBS,
    IGNORE_INDEX,
    NUM_CLASSES,
    NUM_MODES,
    SWITCHES,
    apply_flips,
    check_unflipped,
    draw_flips,
    flip_lut,
    flips_to_mode,
    mode_flips,
    mode_labels,
    mode_name,
    mode_probabilities,
    step_flips,
)
from lidcseg.presets import PRESETS, preset


def _within_binomial(freq: np.ndarray, p: np.ndarray, n: int, sigmas: float = 4.0) -> bool:
    return bool(np.all(np.abs(freq - p) <= sigmas * np.sqrt(p * (1 - p) / n)))


def test_class_table() -> None:
    assert NUM_CLASSES == 24 and len(CLASS_NAMES) == 24
    table = {s.name: (s.original, s.flipped, s.probability) for s in SWITCHES}
    assert table == {
        "sidewalk": (1, 19, 8 / 17), "person": (11, 20, 7 / 17), "car": (13, 21, 6 / 17),
        "vegetation": (8, 22, 5 / 17), "road": (0, 23, 4 / 17),
    }
    for s in SWITCHES:
        assert CLASS_NAMES[s.original] == s.name and CLASS_NAMES[s.flipped] == f"{s.name} 2"
    assert sorted(EVAL_CLASSES) == [0, 1, 8, 11, 13, 19, 20, 21, 22, 23]


def test_mode_probabilities() -> None:
    p = mode_probabilities()
    assert p.shape == (32,) and NUM_MODES == 32
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert p[0] == pytest.approx(9 * 10 * 11 * 12 * 13 / 17**5)  # nothing flipped
    assert p[31] == pytest.approx(8 * 7 * 6 * 5 * 4 / 17**5)  # everything flipped
    assert round(100 * p[0], 1) == 10.9 and round(100 * p[31], 1) == 0.5
    assert p.argmax() == 0 and p.argmin() == 31
    assert mode_name(0) == "none" and mode_name(31) == "sidewalk+person+car+vegetation+road"
    assert mode_name(1) == "sidewalk" and mode_name(16) == "road"


def test_modes_enumerate_every_flip_combination_once() -> None:
    bits = mode_flips()
    assert bits.shape == (32, 5)
    assert len({tuple(r) for r in bits}) == 32
    assert np.array_equal(flips_to_mode(bits), np.arange(32))
    # Each switch flips in modes of total probability p_i.
    p = mode_probabilities()
    assert np.allclose((bits * p[:, None]).sum(0), FLIP_PROBS)


def test_draw_flips_frequencies_match_protocol() -> None:
    n = 20_000
    flips = draw_flips(np.random.default_rng(0), n)
    assert flips.shape == (n, 5) and flips.dtype == bool
    assert _within_binomial(flips.mean(0), FLIP_PROBS, n)
    modes = np.bincount(flips_to_mode(flips), minlength=32) / n
    assert _within_binomial(modes, mode_probabilities(), n)
    # Independence: the joint frequency of two switches is the product.
    joint = (flips[:, 0] & flips[:, 4]).mean()
    assert _within_binomial(np.array([joint]), np.array([FLIP_PROBS[0] * FLIP_PROBS[4]]), n)


def test_step_flips_seeded_per_step() -> None:
    assert np.array_equal(step_flips(3, 17), step_flips(3, 17))
    draws = np.stack([step_flips(3, k) for k in range(6000)])
    assert _within_binomial(draws.mean(0), FLIP_PROBS, 6000)
    other = np.stack([step_flips(4, k) for k in range(200)])
    assert not np.array_equal(draws[:200], other)
    with pytest.raises(ValueError):
        step_flips(0, -1)


def test_apply_flips_numpy_and_torch() -> None:
    label = np.array([[0, 1, 2, 8], [11, 13, 10, IGNORE_INDEX]], np.uint8)
    flips = np.array([True, False, True, False, True])  # sidewalk, car, road
    expect = np.array([[23, 19, 2, 8], [11, 21, 10, IGNORE_INDEX]], np.uint8)
    out = apply_flips(label, flips)
    assert out.dtype == np.uint8 and np.array_equal(out, expect)
    assert np.array_equal(label[0], [0, 1, 2, 8])  # input untouched
    t = apply_flips(torch.from_numpy(label).long(), flips)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(expect).long())
    assert np.array_equal(flip_lut(flips)[label], expect)
    assert np.array_equal(apply_flips(label, np.zeros(5, bool)), label)


def test_mode_labels() -> None:
    label = torch.tensor([[0, 1, 8, 11, 13, 10]])
    modes = mode_labels(label)
    assert modes.shape == (32, 1, 6)
    assert torch.equal(modes[0], label)
    assert torch.equal(modes[31], torch.tensor([[23, 19, 22, 20, 21, 10]]))
    assert torch.equal(modes[2], torch.tensor([[0, 1, 8, 20, 13, 10]]))  # person only


def test_check_unflipped() -> None:
    check_unflipped(np.array([0, 18, 255]))
    with pytest.raises(ValueError, match="19"):
        check_unflipped(np.array([0, 19]))
    with pytest.raises(ValueError):
        check_unflipped(torch.tensor([-1, 3]))


@pytest.mark.parametrize("name", ["cityscapes", "scenes-quick"])
def test_task_presets_fit_the_task(name: str) -> None:
    model, train = PRESETS[name]
    assert model.num_classes == NUM_CLASSES and model.in_channels == 3
    assert train.steps >= 1


def test_lidc_preset_names_resolve_per_task() -> None:
    # The paper's names mean the paper's setting of the task the data is for.
    assert preset("paper", task="flip-scenes") == PRESETS["cityscapes"]
    assert preset("cpu-quick", task="flip-scenes") == PRESETS["scenes-quick"]
    assert preset("cpu-quick") == PRESETS["cpu-quick"]
    assert preset("scenes-quick", task="flip-scenes") == PRESETS["scenes-quick"]
    assert PRESETS["cityscapes"][0].num_scales == PRESETS["paper"][0].num_scales + 1


