"""Benchmark: GED + sample diversity + Hungarian-matched IoU over a test split's worth of masks.

The workload of ``lidcseg evaluate`` on LIDC's test split: 2000 images, 16
samples and 4 grader masks each, 128 x 128, scored at n = 1, 4, 8, 16. Masks are
synthetic discs (some empty), generated batch by batch outside the timed part.

Cases:

- ``iou``: :func:`lidcseg.metrics.pairwise_iou` of samples vs graders alone (the matmul).
- ``existing@16``: ``ged_terms`` + ``sample_diversity`` + ``hungarian_iou`` at n = 16.
- ``existing@1,4,8,16``: the same, once per n on the first n samples.
- ``joint@1,4,8,16``: :func:`lidcseg.metrics.extra.joint_iou` once (one matmul of
  the 20 masks) + :func:`~lidcseg.metrics.extra.prefix_metrics` for all n - what
  ``lidcseg evaluate`` runs; ``joint_iou_only`` and ``prefix_only`` split it.

    python benchmarks/metrics.py                 # 2000 x 16 x 4 at 128 x 128, CPU
    python benchmarks/metrics.py --device cuda
    python benchmarks/metrics.py --quick         # 200 images

Prints a table and writes JSON (default ``benchmarks/results/metrics.json``).
Never a timed assertion in CI.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lidcseg.io.atomic import write_json_atomic
from lidcseg.metrics import ged_terms, hungarian_iou, pairwise_iou, sample_diversity
from lidcseg.metrics.extra import joint_iou, prefix_metrics

COUNTS = (1, 4, 8, 16)


def synthetic_masks(b: int, k: int, size: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(b, k, size, size) bool discs near the centre, radius 3..20 px, about 10% empty."""
    c = size / 2 + 6 * (torch.rand(b, k, 2, generator=gen) - 0.5)
    r = 3 + 17 * torch.rand(b, k, generator=gen)
    r = torch.where(torch.rand(b, k, generator=gen) < 0.1, torch.zeros_like(r), r)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    d = (yy - c[..., 0, None, None]) ** 2 + (xx - c[..., 1, None, None]) ** 2
    return (d < r[..., None, None] ** 2).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case_functions(n: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    def iou(s: torch.Tensor, y: torch.Tensor) -> Any:
        return pairwise_iou(s, y)

    def existing(counts: tuple[int, ...]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
        def fn(s: torch.Tensor, y: torch.Tensor) -> Any:
            out = []
            for k in counts:
                sk = s[:, :k]
                out.append((ged_terms(sk, y).ged, sample_diversity(sk), hungarian_iou(sk, y)))
            return out

        return fn

    def joint(s: torch.Tensor, y: torch.Tensor) -> Any:
        return prefix_metrics(joint_iou(s, y), n, COUNTS)

    def joint_only(s: torch.Tensor, y: torch.Tensor) -> Any:
        return joint_iou(s, y)

    return {
        "iou": iou,
        "existing@16": existing((n,)),
        "existing@1,4,8,16": existing(COUNTS),
        "joint@1,4,8,16": joint,
        "joint_iou_only": joint_only,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--graders", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="images per metric call (evaluate's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--quick", action="store_true", help="200 images")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "metrics.json")
    args = p.parse_args()
    if args.quick:
        args.images = 200
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, m = args.samples, args.graders
    funcs = case_functions(n)
    totals = dict.fromkeys(funcs, 0.0)
    prefix_total = 0.0
    gen = torch.Generator().manual_seed(0)
    # warm-up (first matmul, scipy import)
    warm = synthetic_masks(2, n + m, args.size, gen, device)
    for fn in funcs.values():
        fn(warm[:, :n], warm[:, n:])
    done = 0
    while done < args.images:
        b = min(args.batch, args.images - done)
        masks = synthetic_masks(b, n + m, args.size, gen, device)
        s, y = masks[:, :n], masks[:, n:]
        for name, fn in funcs.items():
            sync(device)
            t0 = time.perf_counter()
            fn(s, y)
            sync(device)
            totals[name] += time.perf_counter() - t0
        ious = joint_iou(s, y)
        sync(device)
        t0 = time.perf_counter()
        prefix_metrics(ious, n, COUNTS)
        sync(device)
        prefix_total += time.perf_counter() - t0
        done += b
    totals["prefix_only"] = prefix_total
    rows = [{"case": k, "seconds": v, "ms_per_image": 1000 * v / args.images, "images_per_s": args.images / v}
            for k, v in totals.items()]
    print(f"{args.images} images x {n} samples x {m} graders, {args.size}x{args.size}, batch {args.batch}, "
          f"{device}, {torch.get_num_threads()} threads")
    print(f"{'case':<20} {'seconds':>9} {'ms/image':>9} {'images/s':>10}")
    for r in rows:
        print(f"{r['case']:<20} {r['seconds']:>9.3f} {r['ms_per_image']:>9.3f} {r['images_per_s']:>10.0f}")
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    write_json_atomic(args.out, {"params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                 "env": env, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
