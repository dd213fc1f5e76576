"""Benchmark: do two versions of lidcseg give the same numbers? (a refactoring check, not a test)

Runs one fixed chain through the ``lidcseg`` command and records every number it
produces, so that a redesign can be compared with the commit before it on one
machine with the same seeds:

1. ``lidcseg phantom`` (3 scans) and ``lidcseg prepare``;
2. ``lidcseg train --preset cpu-quick --steps 40 --set seed=5`` with a
   ``metrics.jsonl`` line at every step (``train.log_every=1``) and validation
   every 20 steps: the per-step losses;
3. ``lidcseg evaluate -n 1,4,8,16``, ``lidcseg ambiguity -n 16`` and
   ``lidcseg latent`` on that run;
4. ``lidcseg sample --lidc -n 8`` on one scan: a digest of every output array;
5. ``lidcseg scenes make`` (small), ``lidcseg train --preset cpu-quick --steps 30
   --set seed=5`` (scenes-quick) and ``lidcseg calibration --oracle``.

    python benchmarks/same_numbers.py --work /tmp/after --out after.json
    python benchmarks/same_numbers.py --compare before.json after.json

``--lidcseg "CMD"`` runs another installation (e.g. a checkout of the old commit:
``--lidcseg "python -c 'from lidcseg_cli.main import app; app()'"`` with that
checkout first on ``PYTHONPATH``). ``--compare`` prints every number that differs
by more than the relative tolerance (1e-4) and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PATIENTS = "LIDC-IDRI-0061,LIDC-IDRI-0045,LIDC-IDRI-0012"
SAMPLE_SCAN = "LIDC-IDRI-0061"
REL_TOL = 1e-4


def run(cmd: list[str], env: dict[str, str]) -> None:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {shlex.join(cmd)}\n{res.stderr[-3000:]}")
    print(f"  {time.perf_counter() - t0:6.1f} s  {shlex.join(cmd[-12:])}", file=sys.stderr)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def numbers(obj: Any, drop: tuple[str, ...]) -> Any:
    """``obj`` without keys that hold times, paths or versions (they differ between runs)."""
    if isinstance(obj, dict):
        return {k: numbers(v, drop) for k, v in obj.items()
                if not any(d in k for d in drop)}
    if isinstance(obj, list):
        return [numbers(v, drop) for v in obj]
    return obj


def nifti_digest(path: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    return {"shape": list(data.shape), "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            "sum": float(data.sum()), "affine": np.asarray(img.affine).round(6).tolist()}


VOLATILE = ("time", "it_s", "img_s", "path", "dir", "run", "checkpoint", "file", "version",
            "weights_sha256", "split_file", "data")


def measure(lidcseg: list[str], work: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lidc, data, runs = work / "lidc", work / "data", work / "runs"
    if not (data / "manifest.json").is_file():
        run([*lidcseg, "phantom", "--out", str(lidc), "--patients", PATIENTS], env)
        run([*lidcseg, "prepare", "--lidc-root", str(lidc), "--out", str(data)], env)
    out: dict[str, Any] = {}
    pu = runs / "probunet"
    run([*lidcseg, "train", "--data", str(data), "--model", "probunet", "--preset", "cpu-quick",
         "--steps", "40", "--set", "seed=5", "--set", "train.log_every=1", "--set", "train.val_every=20",
         "--out", str(pu), "--overwrite"], env)
    out["train"] = numbers(jsonl(pu / "metrics.jsonl"), VOLATILE)
    rep = work / "evaluate"
    run([*lidcseg, "evaluate", "--data", str(data), "--run", str(pu), "-n", "1,4,8,16",
         "--out", str(rep), "--threads", "1"], env)
    summary = json.loads((rep / "summary.json").read_text())
    out["evaluate"] = numbers(summary["runs"], VOLATILE)
    out["evaluate_csv_sha256"] = hashlib.sha256((rep / "per_image.csv").read_bytes()).hexdigest()
    amb = work / "ambiguity"
    run([*lidcseg, "ambiguity", "--data", str(data), "--run", str(pu), "--out", str(amb),
         "--threads", "1"], env)
    out["ambiguity"] = numbers(json.loads((amb / "ambiguity.json").read_text())["runs"], VOLATILE)
    run([*lidcseg, "latent", "--data", str(data), "--run", str(pu), "--index", "0",
         "--out", str(work / "latent.png"), "--grid", "5"], env)
    out["latent_png_sha256"] = hashlib.sha256((work / "latent.png").read_bytes()).hexdigest()
    scan = next((lidc / SAMPLE_SCAN).rglob("*.dcm")).parent
    smp = work / "sample"
    run([*lidcseg, "sample", str(scan), "--lidc", "-n", "8", "--run", str(pu), "--out", str(smp),
         "--overwrite", "--threads", "1"], env)
    s = json.loads((smp / "summary.json").read_text())
    out["sample"] = {"lesions": numbers(s["lesions"], VOLATILE), "noise": s["noise"],
                     "hypotheses": nifti_digest(smp / "hypotheses.nii.gz"),
                     "frequency": nifti_digest(smp / "frequency.nii.gz")}
    scenes = work / "scenes"
    if not (scenes / "manifest.json").is_file():
        run([*lidcseg, "scenes", "make", "--out", str(scenes), "--n-train", "64", "--n-val", "8",
             "--n-test", "16", "--seed", "3"], env)
    fr = runs / "flip"
    run([*lidcseg, "train", "--data", str(scenes), "--preset", "cpu-quick", "--steps", "30",
         "--set", "seed=5", "--set", "train.log_every=1", "--set", "train.val_every=15",
         "--out", str(fr), "--overwrite"], env)
    out["flip_train"] = numbers(jsonl(fr / "metrics.jsonl"), VOLATILE)
    cal = work / "calibration"
    run([*lidcseg, "calibration", "--data", str(scenes), "--run", str(fr), "--oracle",
         "--out", str(cal), "--posterior-scenes", "4", "--threads", "1"], env)
    out["calibration"] = numbers(json.loads((cal / "calibration.json").read_text())["runs"], VOLATILE)
    return out


def compare(a: Any, b: Any, where: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ (numbers: by more than REL_TOL relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            diffs += compare(a[k], b[k], f"{where}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in compare(x, y, f"{where}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        if abs(a - b) <= REL_TOL * max(abs(a), abs(b), 1e-12):
            return []
        return [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("bench-out/same-numbers"))
    p.add_argument("--out", type=Path, default=None, help="JSON of every number (default: WORK/numbers.json)")
    p.add_argument("--lidcseg", default=None, help="the command to run (default: lidcseg beside python)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        before, after = (json.loads(f.read_text()) for f in args.compare)
        diffs = compare(before, after)
        leaves = len(json.dumps(before).split(","))
        for d in diffs:
            print(d)
        print(f"{len(diffs)} differences in about {leaves} values (relative tolerance {REL_TOL:g})")
        return 1 if diffs else 0
    cmd = shlex.split(args.lidcseg) if args.lidcseg else [str(Path(sys.executable).parent / "lidcseg")]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = measure(cmd, args.work)
    out = args.out or args.work / "numbers.json"
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
