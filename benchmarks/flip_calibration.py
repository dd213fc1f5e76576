"""Benchmark: does a CPU-trained Prob. U-Net learn the flip task's 32-mode distribution?

The measurement behind the class-flip experiment (Kohl et al. 2018, Section 4.2,
Fig. 5) on the synthetic scenes, end to end through the CLI:

1. ``lidcseg scenes make`` (32 x 64 scenes, 400 / 50 / 100);
2. ``lidcseg train --preset cpu-quick`` (on scenes: ``scenes-quick``) for the
   Prob. U-Net and each baseline, all at once, one torch thread each;
3. ``lidcseg calibration --oracle`` on the test split: GED (Eq. 7) at 1/4/8/16,
   mode-frequency Pearson r and MAE (Fig. 5), pixel-marginal MAE, and which
   flips the Prob. U-Net's posterior encodes.

    python benchmarks/flip_calibration.py                    # probunet + dropout-unet
    python benchmarks/flip_calibration.py --steps 2000       # shorter training
    python benchmarks/flip_calibration.py --baseline m-heads --baseline dropout-unet

Prints a table and writes JSON (default ``benchmarks/results/flip_calibration.json``);
the runs and the report stay in ``--work`` (default ``bench-out/flip``). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lidcseg.io.atomic import write_json_atomic


def lidcseg(*args: str) -> list[str]:
    """The ``lidcseg`` command installed beside this interpreter."""
    return [str(Path(sys.executable).parent / "lidcseg"), *args]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("bench-out/flip"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--baseline", action="append", default=None, help="baselines (default: dropout-unet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flip_calibration.json")
    args = p.parse_args(argv)
    models = ["probunet", *(args.baseline or ["dropout-unet"])]
    data, runs, report = args.work / "data", args.work / "runs", args.work / "report"

    t0 = time.perf_counter()
    if not (data / "manifest.json").is_file():
        subprocess.run(lidcseg("scenes", "make", "--out", str(data), "--seed", str(args.seed)), check=True)
    t_data = time.perf_counter() - t0

    # Every model at once, one torch thread each (the preset's): as many processes as cores.
    procs, t_train = {}, {}
    for name in models:
        cmd = lidcseg("train", "--data", str(data), "--model", name, "--preset", "cpu-quick",
                      "--out", str(runs / name), "--overwrite", "--set", f"seed={args.seed}")
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL), time.perf_counter())
    while len(t_train) < len(procs):  # each run's own wall time, whichever ends first
        for name, (proc, started) in procs.items():
            if name not in t_train and proc.poll() is not None:
                if proc.returncode != 0:
                    raise SystemExit(f"training {name} failed (exit {proc.returncode})")
                t_train[name] = time.perf_counter() - started
        time.sleep(1.0)

    t1 = time.perf_counter()
    cmd = lidcseg("calibration", "--data", str(data), "--out", str(report), "--oracle", "--threads", "2")
    for name in models:
        cmd += ["--run", str(runs / name)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    t_cal = time.perf_counter() - t1

    cal = json.loads((report / "calibration.json").read_text())
    rows = []
    for r in cal["runs"]:
        rows.append({
            "model": r["label"],
            "ged": {n: r["ged"][n]["mean"] for n in ("1", "4", "8", "16")},
            "mode_r": r["modes"]["pearson_r"], "mode_mae": r["modes"]["mae"],
            "pixel_mae": r["pixels"]["mae"],
            "posterior": ({p["class"]: p["accuracy"] for p in r["posterior"]["per_switch"]}
                          if r.get("posterior") else None),
            "train_s": t_train.get(r["label"]),
            "steps": (r["info"].get("step") if r.get("info") else None),
        })
    result = {
        "benchmark": "flip_calibration",
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "platform": platform.platform()},
        "settings": {"steps": args.steps, "models": models, "seed": args.seed,
                     "scenes": cal["data"]["scenes"], "size": [cal["data"]["height"], cal["data"]["width"]]},
        "times_s": {"scenes": t_data, "train": t_train, "calibration": t_cal},
        "paper_ged": cal["paper_ged"],
        "rows": rows,
        "report": str(report),
    }
    print(f"{'model':<14} {'GED@1':>6} {'GED@4':>6} {'GED@8':>6} {'GED@16':>6} {'mode r':>7} "
          f"{'mode MAE':>8} {'pix MAE':>7} {'train s':>8}")
    for row in rows:
        g = row["ged"]
        train_s = f"{row['train_s']:.0f}" if row["train_s"] else "-"
        print(f"{row['model']:<14} {g['1']:6.3f} {g['4']:6.3f} {g['8']:6.3f} {g['16']:6.3f} "
              f"{row['mode_r']:7.3f} {row['mode_mae']:8.4f} {row['pixel_mae']:7.3f} {train_s:>8}")
        if row["posterior"]:
            print("    posterior encodes: " + ", ".join(f"{k} {v:.2f}" for k, v in row["posterior"].items()))
    pg = cal["paper_ged"]
    print(f"{'paper (T.2)':<14} {pg['1']:6.3f} {pg['4']:6.3f} {pg['8']:6.3f} {pg['16']:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}; report in {report}")
    return result


if __name__ == "__main__":
    main()
