"""Benchmark training data loading: MONAI augmentation per tile in the workers vs batched on the device.

The paper preset's data (batch 32, 128 x 128 tiles from 180 x 180 crops, augmentation on:
elastic + rotation + shear + scale + shifted crop), through the training DataLoader
(:class:`lidcseg.data.dataset.CropTrainDataset` with :class:`~lidcseg.data.dataset.StreamSampler`)
with 0, 1 and 2 worker processes, one torch thread per process. Two paths
(``TrainConfig.augment_on``):

* ``loader``: each worker augments its tiles with MONAI (``Rand2DElasticd`` + ``RandSpatialCropd``);
* ``device``: the workers only read, normalise and draw (``crop``, ``crop_mask``, ``aug_seed``);
  :class:`lidcseg.data.device_augment.DeviceAugment` augments the whole batch on the device
  (here the CPU, and CUDA when present, timed with ``torch.cuda.synchronize``).

Rows: images/s of the loader alone (``loader`` / ``device-loader``), of ``DeviceAugment`` alone
on a collated batch (``device-augment``), and end to end (``device``: DataLoader + DeviceAugment
in the main process, as the training loop runs it). "per worker" divides by the worker count
(0 workers: the main process). The first batch of every DataLoader (worker start-up) is not
timed. Absolute numbers depend on the machine's load; compare the ratios of one run.

    OMP_NUM_THREADS=1 python benchmarks/data_loading.py [--data DIR] [--crops 64] [--batches 6]
        [--workers 0,1,2] [--batch 32] [--input-size 128] [--out benchmarks/results/data_loading.json]

``--data DIR`` uses ``DIR/train.h5`` (``lidcseg prepare`` output); otherwise synthetic disc crops
are written to a temporary folder (the cost does not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lidcseg.data.dataset import CropTrainDataset, StreamSampler  # noqa: E402
from lidcseg.data.device_augment import DeviceAugment  # noqa: E402
from lidcseg.data.store import CropBatch, write_crops  # noqa: E402
from lidcseg.io.atomic import write_json_atomic  # noqa: E402


def synthetic_crops(n: int, size: int = 180, seed: int = 0) -> CropBatch:
    """``n`` crops (S = ``size``): a bright disc in lung-like noise, 4 graders with radii r -3..+3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((n, size, size), np.int16)
    masks = np.empty((n, 4, size, size), np.uint8)
    for i in range(n):
        r = 4.0 + 10.0 * rng.random()
        d = np.hypot(yy - size / 2 - rng.uniform(-3, 3), xx - size / 2 - rng.uniform(-3, 3))
        noise = rng.standard_normal((size, size))
        image[i] = np.where(d <= r + 1, 40.0 + 30.0 * noise, -850.0 + 60.0 * noise).astype(np.int16)
        masks[i] = np.stack([d <= max(r + dr, 1.0) for dr in (-3, -1, 1, 3)])
    meta = {
        "patient_id": np.asarray([f"SYN-{i // 3:05d}" for i in range(n)], dtype=object),
        "scan_id": np.arange(n, dtype=np.int32), "lesion_id": np.zeros(n, np.int32),
        "slice_index": np.arange(n, dtype=np.int32), "z_mm": np.arange(n, dtype=np.float64),
        "n_graders": np.full(n, 4, np.int8), "centre_mm": np.zeros((n, 3), np.float64),
    }
    return CropBatch(image, masks, meta)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(
    train: Path, augment_on: str, workers: int, args: argparse.Namespace,
    device: torch.device | None = None,
) -> float:
    """Images/s of ``args.batches`` timed batches (after one untimed) of the training DataLoader.

    With ``device``, each batch is also augmented there by :class:`DeviceAugment` (end to end).
    """
    ds = CropTrainDataset(train, input_size=args.input_size, seed=0, augment_on=augment_on)
    aug = DeviceAugment(ds.augment_params, ds.input_size) if device is not None else None
    loader = DataLoader(
        ds, batch_size=args.batch, sampler=StreamSampler(args.batch, 0, args.batches + 1),
        num_workers=workers, pin_memory=device is not None and device.type == "cuda",
    )
    it = iter(loader)
    t0 = 0.0
    for i in range(args.batches + 1):
        batch = next(it)
        if aug is not None:
            assert device is not None
            out = aug.augment_batch(batch, device)
            _sync(device)
            assert out["image"].shape[-1] == args.input_size
        if i == 0:
            t0 = time.perf_counter()  # worker start-up and the first batch are not timed
    seconds = time.perf_counter() - t0
    del it
    return args.batch * args.batches / seconds


def time_device_augment(train: Path, device: torch.device, args: argparse.Namespace) -> float:
    """Images/s of :class:`DeviceAugment` alone on one collated device-mode batch (on ``device``)."""
    ds = CropTrainDataset(train, input_size=args.input_size, seed=0, augment_on="device")
    (batch,) = list(DataLoader(ds, batch_size=args.batch, sampler=StreamSampler(args.batch, 0, 1)))
    crop, mask = batch["crop"].to(device), batch["crop_mask"].to(device)
    aug = DeviceAugment(ds.augment_params, ds.input_size)
    reps = args.batches * (20 if device.type == "cuda" else 2)
    for _ in range(3):
        aug(crop, mask, batch["aug_seed"])  # warm-up (caches, CUDA kernels)
    _sync(device)
    t0 = time.perf_counter()
    for r in range(reps):
        aug(crop, mask, batch["aug_seed"] + r)
    _sync(device)
    return args.batch * reps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="a prepared data folder (uses train.h5)")
    ap.add_argument("--crops", type=int, default=64, help="synthetic crops when no --data")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per DataLoader")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/data_loading.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    with tempfile.TemporaryDirectory() as tmp:
        if args.data is not None:
            train, source = args.data / "train.h5", str(args.data)
        else:
            train, source = Path(tmp) / "train.h5", f"{args.crops} synthetic disc crops"
            write_crops(train, synthetic_crops(args.crops), {"split": "train"})
        rows: list[dict[str, Any]] = []

        def add(path: str, w: int | None, device: str, img_s: float) -> None:
            per = img_s / max(1, w) if w is not None else img_s
            rows.append({"path": path, "workers": w, "device": device, "img_per_s": img_s,
                         "img_per_s_per_worker": per})
            print(_fmt(rows[-1]), flush=True)

        print(_header())
        for dev in devices:
            add("device-augment", None, dev.type, time_device_augment(train, dev, args))
        for w in workers:
            add("loader", w, "-", time_loader(train, "loader", w, args))
            add("device-loader", w, "-", time_loader(train, "device", w, args))
            for dev in devices:
                add("device", w, dev.type, time_loader(train, "device", w, args, dev))

    ratios = {}
    for w in workers:
        base = next(r["img_per_s"] for r in rows if r["path"] == "loader" and r["workers"] == w)
        for r in rows:
            if r["path"] == "device" and r["workers"] == w:
                ratios[f"device({r['device']})/loader, {w} workers"] = r["img_per_s"] / base
    print()
    print(_header())
    for r in rows:
        print(_fmt(r))
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.1f}x")
    result = {
        "benchmark": "data_loading", "data": source, "batch": args.batch,
        "input_size": args.input_size, "timed_batches": args.batches, "threads_per_process": 1,
        "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows, "ratios": ratios,
    }
    write_json_atomic(args.out, result)
    print(f"\nwrote {args.out}")


def _header() -> str:
    return f"{'path':16} {'workers':>7} {'device':>6} {'img/s':>9} {'img/s/worker':>13}"


def _fmt(r: dict[str, Any]) -> str:
    w = "-" if r["workers"] is None else str(r["workers"])
    return (f"{r['path']:16} {w:>7} {r['device']:>6} {r['img_per_s']:9.1f} "
            f"{r['img_per_s_per_worker']:13.1f}")


if __name__ == "__main__":
    main()
