"""The training stream, the evaluation dataset and the DDP-aware sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lidcseg.data.dataset import CropEvalDataset, CropTrainDataset, StreamSampler
from lidcseg.data.device_augment import DeviceAugment
from lidcseg.data.store import CropStore
from lidcseg.data.transforms import AugmentParams, normalize_hu
from lidcseg.errors import LidcsegError


def test_train_sample_is_one_random_grader(disc_data: Path) -> None:
    ds = CropTrainDataset(disc_data / "train.h5", input_size=64, seed=0)
    store = CropStore(disc_data / "train.h5")
    s = ds[5]
    assert s["image"].shape == (1, 64, 64) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (64, 64) and s["mask"].dtype == torch.int64
    assert set(torch.unique(s["mask"]).tolist()) <= {0, 1}
    # Over many draws, every grader is drawn, the padded empty masks included (paper).
    draws = [ds.draw(k) for k in range(600)]
    assert set(Counter(g for _, g, _ in draws)) == {0, 1, 2, 3}
    empty = [(i, g) for i, g, _ in draws if store[i][1][g].sum() == 0]
    assert any(g == 3 for _, g in empty) and any(g == 0 for _, g in empty)
    # Each epoch visits every crop once.
    assert sorted(i for i, _, _ in draws[:12]) == list(range(12))
    assert sorted(i for i, _, _ in draws[12:24]) == list(range(12))


def test_real_grader_draw_skips_padding(disc_data: Path) -> None:
    ds = CropTrainDataset(disc_data / "train.h5", input_size=64, grader_draw="real")
    n_real = CropStore(disc_data / "train.h5").meta["n_graders"]
    draws = [ds.draw(k) for k in range(600)]
    assert all(g < n_real[i] for i, g, _ in draws)
    assert any(g == 3 for _, g, _ in draws)


def test_empty_drawn_mask_gives_empty_label(disc_data: Path) -> None:
    ds = CropTrainDataset(disc_data / "train.h5", input_size=64)
    store = CropStore(disc_data / "train.h5")
    k = next(k for k in range(600) if store[ds.draw(k)[0]][1][ds.draw(k)[1]].sum() == 0)
    assert ds[k]["mask"].sum() == 0


def test_train_stream_is_reproducible(disc_data: Path) -> None:
    a = CropTrainDataset(disc_data / "train.h5", input_size=64, seed=3)
    b = CropTrainDataset(disc_data / "train.h5", input_size=64, seed=3)
    c = CropTrainDataset(disc_data / "train.h5", input_size=64, seed=4)
    for k in (0, 17):
        assert torch.equal(a[k]["image"], b[k]["image"]) and torch.equal(a[k]["mask"], b[k]["mask"])
    assert [a.draw(k) for k in range(12)] != [c.draw(k) for k in range(12)]


def test_workers_do_not_change_batches(disc_data: Path) -> None:
    ds = CropTrainDataset(disc_data / "train.h5", input_size=32)
    sampler = StreamSampler(4, 0, 2)
    b0 = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=0))
    b2 = list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2))
    assert len(b0) == len(b2) == 2
    for x, y in zip(b0, b2, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


def test_stream_sampler_shards_and_resumes() -> None:
    full = list(StreamSampler(8, 0, 3))
    assert full == list(range(24))
    r0, r1 = list(StreamSampler(8, 0, 3, 0, 2)), list(StreamSampler(8, 0, 3, 1, 2))
    assert sorted(r0 + r1) == full and len(r0) == len(r1) == 12
    assert r0[:4] == [0, 2, 4, 6]  # one step of rank 0 = one batch of 4
    assert list(StreamSampler(8, 2, 3)) == full[16:]  # resume mid-stream
    with pytest.raises(LidcsegError):
        StreamSampler(7, 0, 1, 0, 2)


def test_eval_dataset_centre_crop_all_graders(disc_data: Path) -> None:
    ds = CropEvalDataset(disc_data / "val.h5", input_size=128)
    image, masks = CropStore(disc_data / "val.h5")[1]
    s, s2 = ds[1], ds[1]
    assert s["image"].shape == (1, 128, 128) and s["masks"].shape == (4, 128, 128)
    assert torch.equal(s["image"], s2["image"])
    assert torch.equal(s["masks"], torch.from_numpy(masks[:, 26:154, 26:154]))
    lim = CropEvalDataset(disc_data / "train.h5", input_size=64, limit=4)
    assert lim.indices.tolist() == [0, 4, 7, 11]


def test_bad_inputs(disc_data: Path, tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="grader_draw"):
        CropTrainDataset(disc_data / "train.h5", grader_draw="nonempty")
    with pytest.raises(LidcsegError, match="no such crop file"):
        CropTrainDataset(tmp_path / "train.h5")
    with pytest.raises(LidcsegError, match="input_size"):
        CropEvalDataset(disc_data / "val.h5", input_size=256)
    with pytest.raises(LidcsegError, match="augment_on"):
        CropTrainDataset(disc_data / "train.h5", augment_on="gpu")


#: The loader path's samples 0..2 (seed 5, paper sizes) as the code before ``augment_on``
#: gave them: (image sum, mask sum, image[0, 20::40, 30]). ``augment_on="loader"`` must not
#: change a bit of it (checked exactly against that code when it was added).
LOADER_FINGERPRINTS = {
    0: (-11999.8457, 0, [-0.73658, -0.75127, -0.61881]),
    1: (-11779.1316, 594, [-0.83688, -0.79092, -0.78472]),
    2: (-11797.467, 352, [-0.73696, -0.84997, -0.74144]),
}


def test_loader_path_is_unchanged(disc_data: Path) -> None:
    ds = CropTrainDataset(disc_data / "train.h5", input_size=128, seed=5, augment_on="loader")
    assert not ds.augments_on_device
    for k, (img_sum, mask_sum, values) in LOADER_FINGERPRINTS.items():
        s = ds[k]
        assert float(s["image"].double().sum()) == pytest.approx(img_sum, abs=2e-3)
        assert int(s["mask"].sum()) == mask_sum
        assert s["image"][0, 20::40, 30].tolist() == pytest.approx(values, abs=1e-5)


def test_device_mode_ships_whole_crops_and_seeds(disc_data: Path) -> None:
    loader = CropTrainDataset(disc_data / "train.h5", input_size=64, seed=2)
    dev = CropTrainDataset(disc_data / "train.h5", input_size=64, seed=2, augment_on="device")
    store = CropStore(disc_data / "train.h5")
    assert dev.augments_on_device
    for k in (0, 13):
        s = dev[k]
        index, grader, seed = loader.draw(k)
        assert set(s) == {"crop", "crop_mask", "aug_seed", "index", "grader"}
        assert (s["index"], s["grader"], s["aug_seed"]) == (index, grader, seed)
        assert (s["index"], s["grader"]) == (loader[k]["index"], loader[k]["grader"])
        image, masks = store[index]
        assert torch.equal(s["crop"], normalize_hu(image)[None])  # (1, S, S), not augmented
        assert s["crop_mask"].dtype == torch.uint8
        assert torch.equal(s["crop_mask"], torch.from_numpy(masks[grader]))
    # Without augmentation "device" is the centre tile, like the loader path.
    plain = CropTrainDataset(disc_data / "train.h5", input_size=64, augment=False,
                             augment_on="device")
    assert not plain.augments_on_device
    ref = CropTrainDataset(disc_data / "train.h5", input_size=64, augment=False)
    for key in ("image", "mask"):
        assert torch.equal(plain[3][key], ref[3][key])


def test_device_mode_batches_become_loader_batches(disc_data: Path) -> None:
    params = AugmentParams(rotate_deg=20)
    dev = CropTrainDataset(disc_data / "train.h5", input_size=64, augment_on="device",
                           augment_params=params)
    ref = CropTrainDataset(disc_data / "train.h5", input_size=64, augment_params=params)
    sampler = StreamSampler(4, 0, 1)
    (batch,) = list(DataLoader(dev, batch_size=4, sampler=sampler, num_workers=0))
    (want,) = list(DataLoader(ref, batch_size=4, sampler=sampler, num_workers=0))
    aug = DeviceAugment(dev.augment_params, dev.input_size)
    got = aug.augment_batch(batch, "cpu")
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
    assert torch.equal(got["index"], want["index"]) and torch.equal(got["grader"], want["grader"])
    assert set(torch.unique(got["mask"]).tolist()) <= {0, 1}
    again = aug.augment_batch(batch, "cpu")  # reproducible from the batch's seeds
    assert torch.equal(got["image"], again["image"]) and torch.equal(got["mask"], again["mask"])
