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
    python benchmarks/sample.py --optimize --threads 1      # eager vs TorchScript vs inductor

``--optimize`` (issue #14), side by side in one process after warm-up, for one
crop and a batch with the same noise: eager vs copies whose U-Net and prior net
are traced + ``torch.jit.freeze`` (+ ``optimize_for_inference``) or
``torch.compile``d (inductor, from a cold cache, then warm), ``inference_mode``
and NCHW weights; build and first-call time, median of interleaved runs, largest
logit difference to eager. Measured: none is 10% faster, so sampling stays eager.

Prints a table and writes JSON (default ``benchmarks/results/sample.json``,
``--optimize``: ``sample_optimized.json``).
Never a timed assertion in CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lidcseg.config import ModelConfig
from lidcseg.inference import foreground_of
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
    if case == "optimize":
        return run_optimize_case(args)
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


# -- optimised inference (issue #14) ----------------------------------------------------------

#: The variants of ``--optimize``, in table order; "eager" is today's sampler and the reference.
OPT_VARIANTS = {
    "eager": "model.sample under no_grad (today)",
    "inference_mode": "model.sample under torch.inference_mode",
    "contiguous": "contiguous (NCHW) weights instead of channels-last",
    "jit_freeze": "U-Net + prior net traced and torch.jit.freeze'd",
    "jit_freeze_ofi": "... and torch.jit.optimize_for_inference (oneDNN)",
    "inductor": "U-Net + prior net torch.compile'd (inductor, default mode)",
    "inductor_freezing": "torch.compile, inductor options freezing=True (weights prepacked)",
    "inductor_autotune": "torch.compile, mode max-autotune-no-cudagraphs",
}


def inductor_unavailable() -> str | None:
    """Why inductor cannot compile for CPU here (no C++ compiler), or None."""
    tried = dict.fromkeys((os.environ.get("CXX", "g++"), "g++", "clang++"))
    if not any(shutil.which(c) for c in tried):
        return f"no C++ compiler ({', '.join(tried)} not on PATH): inductor needs one on CPU"
    return None


def optimized_copy(kind: str, model: Any, x: torch.Tensor) -> Any:
    """A copy of ``model`` (a ProbUNet) with its U-Net and prior net optimised as ``kind``.

    ``x`` (B, C, H, W) is the example input of the traces; a traced conv net
    still takes any batch size and image size (its shape checks are not traced:
    ``ProbUNet.sample`` makes them before). Inductor compiles on the first call.
    """
    m = copy.deepcopy(model)
    if kind == "contiguous":
        return m.to(memory_format=torch.contiguous_format)
    for name in ("unet", "prior"):
        mod = getattr(m, name)
        if kind.startswith("jit_"):
            with torch.no_grad():
                mod = torch.jit.freeze(torch.jit.trace(mod, x, check_trace=False).eval())
            if kind == "jit_freeze_ofi":
                mod = torch.jit.optimize_for_inference(mod)
        elif kind == "inductor":
            mod = torch.compile(mod)
        elif kind == "inductor_freezing":
            mod = torch.compile(mod, options={"freezing": True})
        elif kind == "inductor_autotune":
            mod = torch.compile(mod, mode="max-autotune-no-cudagraphs")
        setattr(m, name, mod)
    return m


def run_optimize_case(args: argparse.Namespace) -> dict[str, Any]:
    """Every ``--opt-variants`` variant side by side in this process, one crop and a batch."""
    cfg = QUICK if args.quick else PAPER
    seed_everything(0)
    model = create_model(cfg).eval()
    n, size = args.samples, args.size
    gen = torch.Generator().manual_seed(0)
    inputs = {
        kind: (torch.randn(b, cfg.in_channels, size, size, generator=gen),
               torch.randn(b, n, cfg.latent_dim, generator=gen))
        for kind, b in (("single", 1), ("batch", args.opt_batch))
    }

    def sampler(kind: str, m: Any, case: str) -> Any:
        x, eps = inputs[case]
        if kind == "inference_mode":
            def fn() -> torch.Tensor:
                with torch.inference_mode():
                    return m.sample(x, n, eps=eps, chunk_size=args.chunk_size)
            return fn
        return lambda: m.sample(x, n, eps=eps, chunk_size=args.chunk_size)

    ref = {case: sampler("eager", model, case)() for case in inputs}
    x1 = inputs["single"][0]  # what the traces see
    scale = {case: r.abs().max().item() for case, r in ref.items()}
    out: dict[str, Any] = {"case": "optimize", "variants": {}}
    fns: dict[str, dict[str, Any]] = {case: {} for case in inputs}
    for kind in args.opt_variants:
        row: dict[str, Any] = {"what": OPT_VARIANTS[kind]}
        out["variants"][kind] = row
        reason = inductor_unavailable() if kind.startswith("inductor") else None
        if reason is None:
            try:
                t0 = time.perf_counter()
                m = model if kind in ("eager", "inference_mode") else optimized_copy(kind, model, x1)
                row["build_s"] = time.perf_counter() - t0
                for case in inputs:  # first call: inductor compiles here (once per new batch shape)
                    fn = sampler(kind, m, case)
                    t0 = time.perf_counter()
                    logits = fn()
                    row[f"{case}_first_call_s"] = time.perf_counter() - t0
                    diff = (logits - ref[case]).abs().max().item()
                    row[f"{case}_max_abs_diff"], row[f"{case}_rel_diff"] = diff, diff / scale[case]
                    flips = foreground_of(logits) != foreground_of(ref[case])
                    row[f"{case}_foreground_flips"] = int(flips.sum())
                    fns[case][kind] = fn
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result, not a crash
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if reason is not None:
            row["unavailable"] = reason
            for case_fns in fns.values():
                case_fns.pop(kind, None)
            continue
    for case, case_fns in fns.items():
        repeats = args.repeats if case == "single" else args.batch_repeats
        for fn in case_fns.values():  # warm-up
            fn()
        wall: dict[str, list[float]] = {k: [] for k in case_fns}
        cpu: dict[str, list[float]] = {k: [] for k in case_fns}
        for _ in range(repeats):  # interleaved, so drifting machine load hits every variant alike
            for kind, fn in case_fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
        for kind in case_fns:
            row = out["variants"][kind]
            row[f"{case}_all_seconds"], row[f"{case}_all_cpu_seconds"] = wall[kind], cpu[kind]
            row[f"{case}_seconds"] = statistics.median(wall[kind])
            row[f"{case}_cpu_seconds"] = statistics.median(cpu[kind])
            row[f"{case}_min_cpu_seconds"] = min(cpu[kind])  # load only ever adds to it
        base = out["variants"]["eager"] if "eager" in case_fns else None
        for kind in case_fns:
            row = out["variants"][kind]
            if base is not None:
                row[f"{case}_speedup"] = base[f"{case}_seconds"] / row[f"{case}_seconds"]
                row[f"{case}_cpu_speedup"] = base[f"{case}_cpu_seconds"] / row[f"{case}_cpu_seconds"]
    x, eps = inputs["single"]
    for kind in fns["single"]:
        if kind.startswith("inductor"):  # as in a later process: the on-disk caches are warm
            torch._dynamo.reset()
            t0 = time.perf_counter()
            optimized_copy(kind, model, x).sample(x, n, eps=eps, chunk_size=args.chunk_size)
            out["variants"][kind]["single_first_call_warm_cache_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def print_optimize(res: dict[str, Any]) -> None:
    """The before/after table of ``--optimize``."""
    print("\nmedians of interleaved runs; x eager: eager's median wall / cpu s over the variant's; "
          "max|d|: largest logit difference to eager (same noise), rel: over max|logit|, "
          "fg flips: foreground pixels that differ")
    print(f"{'variant':<18} {'case':<7} {'wall s':>7} {'cpu s':>7} {'min cpu':>7} {'x wall':>6} "
          f"{'x cpu':>6} {'build s':>7} {'1st call':>8} {'max|d|':>8} {'rel':>8} {'fg flips':>8}")
    for kind, row in res["variants"].items():
        if "unavailable" in row:
            print(f"{kind:<18} unavailable: {row['unavailable']}")
            continue
        for case in ("single", "batch"):
            if f"{case}_seconds" not in row:
                continue
            print(f"{kind:<18} {case:<7} {row[f'{case}_seconds']:7.3f} {row[f'{case}_cpu_seconds']:7.3f} "
                  f"{row[f'{case}_min_cpu_seconds']:7.3f} {row.get(f'{case}_speedup', float('nan')):6.2f} "
                  f"{row.get(f'{case}_cpu_speedup', float('nan')):6.2f} "
                  f"{row['build_s']:7.2f} {row[f'{case}_first_call_s']:8.2f} "
                  f"{row[f'{case}_max_abs_diff']:8.1e} {row[f'{case}_rel_diff']:8.1e} "
                  f"{row[f'{case}_foreground_flips']:8d}")
        if "single_first_call_warm_cache_s" in row:
            print(f"{'':<18} first call with a warm inductor cache: {row['single_first_call_warm_cache_s']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and images")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (results/sample.json; --optimize: results/sample_optimized.json)")
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
    parser.add_argument(
        "--optimize", action="store_true",
        help="only the eager vs TorchScript vs inductor comparison (issue #14)",
    )
    parser.add_argument(
        "--opt-variants", default=",".join(v for v in OPT_VARIANTS if v != "inductor_autotune"),
        help=f"comma-separated --optimize variants, of {', '.join(OPT_VARIANTS)}",
    )
    parser.add_argument("--opt-batch", type=int, default=16, help="crops in the --optimize batch case")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (8 if args.quick else 64)
    args.size = args.size or (64 if args.quick else 128)
    args.opt_variants = [v for v in args.opt_variants.split(",") if v]
    unknown = sorted(set(args.opt_variants) - set(OPT_VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(OPT_VARIANTS)}")
    results_dir = Path(__file__).parent / "results"
    args.out = args.out or results_dir / ("sample_optimized.json" if args.optimize else "sample.json")

    if args.case:  # child process: one measurement, printed as JSON
        print(json.dumps(run_case(args.case, args)))
        return

    cases = ["single_late", "single_naive", "batch_late", "batch_naive", "ablation"]
    if args.no_naive_batch:
        cases.remove("batch_naive")
    if args.only_models:
        cases = []
    models = {"all": list(MODEL_NAMES), "none": []}.get(args.models, args.models.split(","))
    if args.optimize:
        cases, models = ["optimize"], []
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
        *("--opt-variants", ",".join(args.opt_variants), "--opt-batch", str(args.opt_batch)),
    ]
    load_before = os.getloadavg()
    for case in cases:
        cmd = [sys.executable, __file__, *child_args, "--case", case]
        with tempfile.TemporaryDirectory() as cache:  # inductor compiles from a cold cache
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
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
    if "optimize" in results:
        summary["opt_batch"] = args.opt_batch
        summary["compiler"] = shutil.which(os.environ.get("CXX", "g++"))
        print_optimize(results["optimize"])
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
