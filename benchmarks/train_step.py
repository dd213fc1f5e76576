"""Benchmark one training step (loss terms, the trainer's objective, backward, Adam) of the Probabilistic U-Net.

Paper architecture (5 scales, base 32, N = 6) at batch 32 on 128 x 128 tiles by
default. Variants: eager, channels_last, torch.compile (with ``--compile``),
and on CUDA bf16 autocast. Reports seconds per step and images/s on CPU (at each
``--threads`` count) and on CUDA when present. Prints a table and writes JSON.

    python benchmarks/train_step.py [--steps 3] [--threads 1,2] [--compile]
                                    [--out benchmarks/results/train_step.json]

Target on a 2-core CPU: <= 10 s per step at batch 32 (a public PyTorch port: 13.2 s).
The random images and disc masks stand in for data: the step's cost does not
depend on the pixel values. Data loading is not included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from lidcseg.models.registry import create_model
from lidcseg.presets import preset
from lidcseg.training import objective


def _batch(b: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = 5 + 15 * torch.rand(b, 1, 1, generator=g)
    y = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < r**2).long()
    return x.to(device), y.to(device)


def time_variant(
    name: str, device: torch.device, args: argparse.Namespace
) -> dict[str, float | str | int]:
    """Seconds per step of one variant, after ``--warmup`` untimed steps."""
    mcfg, tcfg = preset(args.preset)
    torch.manual_seed(0)
    model = create_model(mcfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    x, y = _batch(args.batch, args.size, device)
    channels_last = "channels_last" in name
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.compile(model.loss) if "compile" in name else model.loss
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if "bf16" in name
                else contextlib.nullcontext())

    def step() -> float:
        with autocast:
            terms = loss_fn(x, y)
        loss = objective(terms, mcfg.beta, mcfg, tcfg)  # the trainer's weighting (step 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())  # synchronises CUDA

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    best, mean = min(times), sum(times) / len(times)
    return {"device": str(device), "variant": name, "threads": torch.get_num_threads(),
            "s_per_step_mean": mean, "s_per_step_min": best,
            "img_per_s": args.batch / mean, "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper", help="model architecture of this preset")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", default="1,2", help="CPU thread counts to try, comma-separated")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--no-cpu", action="store_true", help="CUDA only")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = ap.parse_args()

    variants = ["eager", "channels_last"] + (["compile"] if args.compile else [])
    rows = []
    if not args.no_cpu:
        for n in [int(t) for t in args.threads.split(",") if t.strip()]:
            torch.set_num_threads(n)
            for v in variants:
                rows.append(time_variant(v, torch.device("cpu"), args))
                print(_fmt(rows[-1]), flush=True)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        cuda_variants = variants + ["bf16", "bf16+channels_last"] + (
            ["bf16+channels_last+compile"] if args.compile else [])
        for v in cuda_variants:
            rows.append(time_variant(v, dev, args))
            print(_fmt(rows[-1]), flush=True)

    print()
    print(f"{'device':8} {'variant':28} {'thr':>3} {'s/step':>8} {'min':>8} {'img/s':>8}")
    for r in rows:
        print(_fmt(r))
    result = {
        "benchmark": "train_step",
        "preset": args.preset, "batch": args.batch, "size": args.size,
        "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _fmt(r: dict) -> str:
    return (f"{r['device']:8} {r['variant']:28} {r['threads']:>3} {r['s_per_step_mean']:8.3f} "
            f"{r['s_per_step_min']:8.3f} {r['img_per_s']:8.1f}")


if __name__ == "__main__":
    main()
