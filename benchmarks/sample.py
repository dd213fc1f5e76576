"""Benchmark: sampling hypotheses with late injection vs naive full forward passes, and every model.

Times ``ProbUNet.sample`` (U-Net and prior net once per image, f_comb on all
latents in one go) against ``ProbUNet.sample_naive`` (n full forward passes
with z tiled and concatenated, as Eq. 2 reads), for one crop and for a batch,
with the paper's LIDC architecture (base 32, 5 scales, 3 convs per block).
Each case runs in a fresh subprocess so its peak RSS (``getrusage``) is its own.
An ablation times f_comb alone (tiled F.linear, batched F.linear, 1x1 conv) and
the U-Net in contiguous vs channels-last memory.

Every registered model (``lidcseg.models.MODEL_NAMES``: the Prob. U-Net, its
Appendix D ablations and the Fig. 2 baselines) is timed side by side on one
crop: hypotheses/s at ``--samples`` samples (or as many as the model has:
one for ``unet``), and the cost of one more sample, (t(n) - t(1)) / (n - 1).
Ensemble and M-heads use M = 16 members/heads at the paper's size.

    python benchmarks/sample.py            # paper model, 128x128, 16 samples, 64 crops
    python benchmarks/sample.py --quick    # small model, a few seconds
    python benchmarks/sample.py --only-models --threads 1   # just the model table

Prints a table and writes JSON (default ``benchmarks/results/sample.json``).
Never a timed assertion in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lidcseg.config import ModelConfig
from lidcseg.io.atomic import write_json_atomic
from lidcseg.models import MODEL_NAMES, create_model, model_config
from lidcseg.seed import seed_everything

PAPER = ModelConfig()  # base 32, 5 scales, 3 convs/block, N = 6, f_comb 3 x 32
QUICK = ModelConfig(base_channels=8, num_scales=3, convs_per_block=2)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn: Any, repeats: int) -> tuple[float, list[float], float]:
    """Best and all wall times, and the least CPU time, of ``repeats`` runs of ``fn()``.

    CPU time (all threads of this process) is what the run cost whatever else
    the machine was doing; with one thread it estimates an undisturbed wall time.
    """
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), times, min(cpu)


def run_model_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Hypotheses/s of the model ``name`` on one crop, and the cost of one more sample."""
    cfg = model_config(name, QUICK if args.quick else PAPER)
    seed_everything(0)
    model = create_model(cfg).eval()
    n = args.samples if model.max_samples is None else min(args.samples, model.max_samples)
    x = torch.randn(1, cfg.in_channels, args.size, args.size)
    gen = torch.Generator()
    out: dict[str, Any] = {
        "case": f"model:{name}",
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "samples": n,
    }
    with torch.no_grad():
        for k in sorted({1, n}):
            model.sample(x, k, generator=gen.manual_seed(1))  # warm-up (oneDNN primitives)
            best, times, cpu = timed(
                lambda k=k: model.sample(x, k, generator=gen.manual_seed(0)), args.model_repeats
            )
            out[f"seconds_n{k}"], out[f"all_seconds_n{k}"], out[f"cpu_seconds_n{k}"] = best, times, cpu
    out["seconds"], out["cpu_seconds"] = out[f"seconds_n{n}"], out[f"cpu_seconds_n{n}"]
    out["hypotheses_per_s"] = n / out["seconds"]
    out["hypotheses_per_cpu_s"] = n / out["cpu_seconds"]
    if n > 1:
        out["seconds_per_extra_sample"] = (out[f"seconds_n{n}"] - out["seconds_n1"]) / (n - 1)
        out["cpu_seconds_per_extra_sample"] = (out[f"cpu_seconds_n{n}"] - out["cpu_seconds_n1"]) / (n - 1)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    if case.startswith("model:"):
        return run_model_case(case.removeprefix("model:"), args)
    cfg = QUICK if args.quick else PAPER
    seed_everything(0)
    model = create_model(cfg).eval()
    rss_model = peak_rss_mb()
    size, n = args.size, args.samples
    batch = 1 if case.startswith("single") else args.batch
    x = torch.randn(batch, cfg.in_channels, size, size)
    gen = torch.Generator()

    if case.endswith("_late"):

        def fn() -> None:
            model.sample(x, n, generator=gen.manual_seed(0), chunk_size=args.chunk_size)

    elif case.endswith("_naive"):

        def fn() -> None:
            model.sample_naive(x, n, generator=gen.manual_seed(0), chunk_size=args.chunk_size)

    else:
        return run_ablation(case, model, args)
    repeats = args.repeats if batch == 1 else args.batch_repeats
    with torch.no_grad():  # warm-up (oneDNN primitive creation) on one chunk
        model.sample(x[: args.chunk_size], 2, generator=gen.manual_seed(1))
    best, times, cpu = timed(fn, repeats)
    return {
        "case": case,
        "images": batch,
        "samples": n,
        "seconds": best,
        "all_seconds": times,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_model_mb": rss_model,
    }


def run_ablation(case: str, model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """f_comb alone on one crop's features, and U-Net + prior net in two memory formats."""
    size, n = args.size, args.samples
    variants: dict[str, Any] = {}
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        features = model.unet(x)
    z = torch.randn(1, n, model.config.latent_dim)
    fc = model.fcomb
    variants["fcomb_linear_tiled"] = lambda: fc(features, z)
    variants["fcomb_linear_batched"] = lambda: fc.combine(
        fc.project_features(features), z, tile=None
    )
    variants["fcomb_conv_per_sample"] = lambda: [
        fc.forward_naive(features, z[:, i]) for i in range(n)
    ]
    for b in (1, args.chunk_size):
        xb = torch.randn(b, 1, size, size)
        for fmt in ("contiguous_format", "channels_last"):
            name = f"unet_prior_{fmt}_b{b}"
            variants[name] = lambda xb=xb, fmt=fmt: (
                model.to(memory_format=getattr(torch, fmt)),
                model.unet(xb),
                model.prior(xb),
            )
    out: dict[str, Any] = {"case": case}
    with torch.no_grad():
        for name, fn in variants.items():
            fn()
            out[name], _, out[f"{name}_cpu"] = timed(fn, args.repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and images")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "sample.json"
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=None, help="crops in the batch case (64)")
    parser.add_argument("--size", type=int, default=None, help="crop side (128)")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="runs of the single-crop cases")
    parser.add_argument("--batch-repeats", type=int, default=2, help="runs of the batch cases")
    parser.add_argument("--no-naive-batch", action="store_true", help="skip the slow naive batch")
    parser.add_argument(
        "--models", default="all", help="comma-separated model names for the model table, or all/none"
    )
    parser.add_argument("--model-repeats", type=int, default=3, help="runs of each model case")
    parser.add_argument(
        "--only-models", action="store_true", help="only the model table (no late/naive/ablation)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (8 if args.quick else 64)
    args.size = args.size or (64 if args.quick else 128)

    if args.case:  # child process: one measurement, printed as JSON
        print(json.dumps(run_case(args.case, args)))
        return

    cases = ["single_late", "single_naive", "batch_late", "batch_naive", "ablation"]
    if args.no_naive_batch:
        cases.remove("batch_naive")
    if args.only_models:
        cases = []
    models = {"all": list(MODEL_NAMES), "none": []}.get(args.models, args.models.split(","))
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODEL_NAMES)}")
    cases += [f"model:{m}" for m in models]
    results: dict[str, Any] = {}
    child_args = [
        *(["--quick"] if args.quick else []),
        *("--samples", str(args.samples), "--batch", str(args.batch), "--size", str(args.size)),
        *("--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)),
        *("--batch-repeats", str(args.batch_repeats), "--model-repeats", str(args.model_repeats)),
        *(("--threads", str(args.threads)) if args.threads else ()),
    ]
    load_before = os.getloadavg()
    for case in cases:
        cmd = [sys.executable, __file__, *child_args, "--case", case]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {case}: done", file=sys.stderr)

    cfg = QUICK if args.quick else PAPER
    summary = {
        "config": asdict(cfg),
        "size": args.size,
        "samples": args.samples,
        "batch": args.batch,
        "chunk_size": args.chunk_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        # Other processes on the machine slow torch's threads down badly: keep the load.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    for kind in ("single", "batch"):
        late, naive = results.get(f"{kind}_late"), results.get(f"{kind}_naive")
        if late and naive:
            summary[f"{kind}_speedup"] = naive["seconds"] / late["seconds"]

    print(
        f"\nsampling {args.samples} hypotheses, {args.size}x{args.size}, "
        f"{'quick' if args.quick else 'paper'} model, {summary['threads']} threads, "
        f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    if any(k in results for k in ("single_late", "single_naive", "batch_late", "batch_naive")):
        print(f"{'case':<7} {'images':>6} {'method':<8} {'wall s':>9} {'cpu s':>9} {'peak MB':>8}")
    for kind in ("single", "batch"):
        for method in ("late", "naive"):
            r = results.get(f"{kind}_{method}")
            if r:
                print(
                    f"{kind:<7} {r['images']:>6} {method:<8} {r['seconds']:9.3f} "
                    f"{r['cpu_seconds']:9.3f} {r['peak_rss_mb']:8.0f}"
                )
        if f"{kind}_speedup" in summary:
            print(f"{kind:<7} {'':>6} {'ratio':<8} {summary[f'{kind}_speedup']:8.1f}x")
    abl = results.get("ablation")
    if abl:
        print("\nablation, one crop (best wall s / cpu s):")
        for k, v in abl.items():
            if k != "case" and not k.endswith("_cpu"):
                print(f"  {k:<34} {v:8.4f} {abl[k + '_cpu']:8.4f}")
    rows = [r for c, r in results.items() if c.startswith("model:")]
    if rows:
        summary["models"] = {r["model"]: r for r in rows}
        print(f"\nevery model, one {args.size}x{args.size} crop (best of {args.model_repeats}; "
              "cpu s is this process's CPU time):")
        print(f"{'model':<24} {'params':>9} {'n':>3} {'wall s':>8} {'cpu s':>8} {'hyp/s':>8} "
              f"{'hyp/cpu-s':>9} {'+1 sample ms':>12} {'peak MB':>8}")
        for r in rows:
            extra = r.get("cpu_seconds_per_extra_sample")
            extra_s = f"{1000 * extra:12.1f}" if extra is not None else f"{'-':>12}"
            print(f"{r['model']:<24} {r['parameters']:>9} {r['samples']:>3} {r['seconds']:8.3f} "
                  f"{r['cpu_seconds']:8.3f} {r['hypotheses_per_s']:8.1f} "
                  f"{r['hypotheses_per_cpu_s']:9.1f} {extra_s} {r['peak_rss_mb']:8.0f}")
    write_json_atomic(args.out, summary)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
