"""Benchmark: does a CPU-trained Prob. U-Net learn the flip task's 32-mode distribution, on every seed?

The measurement behind the class-flip experiment (Kohl et al. 2018, Section 4.2,
Fig. 5) on the synthetic scenes, end to end through the CLI:

1. ``lidcseg scenes make`` (32 x 64 scenes, 400 / 50 / 100, data seed ``--data-seed``);
2. ``lidcseg train --preset cpu-quick`` (on scenes: ``scenes-quick``) with
   ``--set seed=S`` for each training seed S of ``--seeds``: the Prob. U-Net and each
   baseline, ``--jobs`` runs at a time (default 2), one torch thread each;
3. ``lidcseg calibration`` per seed on the test split (``--oracle`` with the first
   seed): GED (Eq. 7) at 1/4/8/16, mode-frequency Pearson r and MAE (Fig. 5),
   pixel-marginal MAE, and which flips the Prob. U-Net's posterior encodes.

Then the spread over the seeds: mean +- sd (sample sd, n - 1) of every number.

    python benchmarks/flip_calibration.py                         # seed 0: probunet + dropout-unet
    python benchmarks/flip_calibration.py --seeds 0,1,2           # the README's table
    python benchmarks/flip_calibration.py --seeds 0,1,2 --baseline-seeds 0
    python benchmarks/flip_calibration.py --baseline m-heads --baseline dropout-unet

Prints a table and writes JSON (default ``benchmarks/results/flip_calibration.json``);
the runs and reports stay in ``--work`` (default ``bench-out/flip``): ``runs/seed-S/MODEL``
and ``report/seed-S``. Finished runs are reused (delete ``--work`` to retrain). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_json_atomic
from lidcseg.presets import preset
from lidcseg.training import iter_metrics


def lidcseg(*args: str) -> list[str]:
    """The ``lidcseg`` command installed beside this interpreter."""
    return [str(Path(sys.executable).parent / "lidcseg"), *args]


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2] (distinct integers >= 0)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return seeds


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample sd (n - 1; 0 for one value), min and max of the values given (None skipped)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": len(v), "mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v)}


def _train_all(jobs: list[tuple[int, str, list[str], Path]], parallel: int) -> dict[tuple[int, str], float]:
    """Run the training commands ``parallel`` at a time; each run's own wall time, in seconds."""
    pending, running, times = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            seed, name, cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as fh:  # the child keeps its own handle
                running[(seed, name)] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT),
                                         time.perf_counter())
        for key, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise SystemExit(f"training {key[1]} (seed {key[0]}) failed (exit {proc.returncode}); "
                                     f"see its log")
                times[key] = time.perf_counter() - started
                del running[key]
        time.sleep(1.0)
    return times


def _finished(run: Path, steps: int) -> bool:
    """Whether ``run`` holds a finished training of ``steps`` steps (its last checkpoint at that step)."""
    if not (run / "last" / "config.json").is_file():
        return False
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        step = max(json.loads(x).get("step", 0) for x in lines if x.strip())
        cfg = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg["train"]["steps"] == steps and step >= steps


def _loop_time(info: dict[str, Any] | None) -> float | None:
    """The training loop's own time (``time_s`` of the run's last training row in
    ``metrics.jsonl``): known for runs an earlier invocation trained, which this one reuses."""
    checkpoint = (info or {}).get("checkpoint")
    if not checkpoint:
        return None
    try:
        rows = list(iter_metrics(Path(checkpoint).parent, "train"))
    except LidcsegError:
        return None
    return rows[-1].get("time_s") if rows else None


def _row(r: dict[str, Any], seed: int, t_train: dict[tuple[int, str], float]) -> dict[str, Any]:
    return {
        "model": r["label"], "seed": seed,
        "ged": {n: r["ged"][n]["mean"] for n in ("1", "4", "8", "16")},
        "mode_r": r["modes"]["pearson_r"], "mode_mae": r["modes"]["mae"],
        "mode_scenes": r["modes"].get("scenes"),
        "pixel_mae": r["pixels"]["mae"],
        "posterior": ({p["class"]: p["accuracy"] for p in r["posterior"]["per_switch"]}
                      if r.get("posterior") else None),
        # Where the decoder splits each flip, in prior sd from the quantile that samples it at p.
        "boundary_offset": ({p["class"]: p["boundary"] - p["quantile"] for p in r["geometry"]["per_switch"]}
                            if r.get("geometry") else None),
        "train_s": t_train.get((seed, r["label"])),
        "train_s_metrics": _loop_time(r.get("info")),
        "steps": (r["info"].get("step") if r.get("info") else None),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model, the spread over seeds of GED@n, mode r / MAE, pixel MAE, posterior accuracies, time."""
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        s: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for n in ("1", "4", "8", "16"):
            s[f"ged{n}"] = spread([r["ged"][n] for r in mine])
        for key in ("mode_r", "mode_mae", "pixel_mae", "train_s", "train_s_metrics"):
            s[key] = spread([r[key] for r in mine])
        if all(r["posterior"] for r in mine):
            s["posterior"] = {c: spread([r["posterior"][c] for r in mine]) for c in mine[0]["posterior"]}
            s["posterior_min"] = min(min(r["posterior"].values()) for r in mine)
        out[model] = s
    return out


def _pm(s: dict[str, Any], fmt: str) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:{fmt}} ± {s['sd']:{fmt}}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("bench-out/flip"))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--baseline", action="append", default=None, help="baselines (default: dropout-unet)")
    p.add_argument("--seeds", type=seed_list, default=[0], help="training seeds, e.g. 0,1,2 (default: 0)")
    p.add_argument("--baseline-seeds", type=seed_list, default=None,
                   help="seeds the baselines are trained with (default: --seeds)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of `scenes make` (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time, one thread each (default 2)")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="extra `train --set key=value` for the Prob. U-Net (repeatable)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "flip_calibration.json")
    args = p.parse_args(argv)
    baselines = args.baseline or ["dropout-unet"]
    baseline_seeds = args.seeds if args.baseline_seeds is None else args.baseline_seeds
    data, runs, report = args.work / "data", args.work / "runs", args.work / "report"

    t0 = time.perf_counter()
    if not (data / "manifest.json").is_file():
        subprocess.run(lidcseg("scenes", "make", "--out", str(data), "--seed", str(args.data_seed)), check=True)
    t_data = time.perf_counter() - t0

    # Every (seed, model) run, --jobs at a time, one torch thread each (the preset's);
    # the Prob. U-Nets first, so that a short budget spends itself on them.
    jobs, models_of = [], {}
    for seed in args.seeds:
        models_of[seed] = ["probunet", *(baselines if seed in baseline_seeds else [])]
    for seed in [s for s in baseline_seeds if s not in models_of]:
        models_of[seed] = list(baselines)
    order = sorted(((seed, name) for seed, names in models_of.items() for name in names),
                   key=lambda k: (k[1] != "probunet", k[0]))
    steps = args.steps or preset("cpu-quick", task="flip-scenes")[1].steps
    for seed, name in order:
        run = runs / f"seed-{seed}" / name
        if _finished(run, steps):
            continue
        cmd = lidcseg("train", "--data", str(data), "--model", name, "--preset", "cpu-quick",
                      "--out", str(run), "--overwrite", "--set", f"seed={seed}")
        if name == "probunet":
            for kv in args.sets:
                cmd += ["--set", kv]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        jobs.append((seed, name, cmd, runs / f"seed-{seed}" / f"{name}.log"))
    t_train = _train_all(jobs, max(1, args.jobs))

    rows, t_cal = [], {}
    for i, (seed, names) in enumerate(sorted(models_of.items())):
        t1 = time.perf_counter()
        out = report / f"seed-{seed}"
        cmd = lidcseg("calibration", "--data", str(data), "--out", str(out),
                      "--threads", str(max(1, args.jobs)))  # replaces its own earlier report
        if i == 0:
            cmd.append("--oracle")
        for name in names:
            cmd += ["--run", str(runs / f"seed-{seed}" / name)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        t_cal[seed] = time.perf_counter() - t1
        cal = json.loads((out / "calibration.json").read_text())
        rows += [_row(r, seed, t_train) for r in cal["runs"]]

    summary = summarise(rows)
    result = {
        "benchmark": "flip_calibration",
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "platform": platform.platform()},
        "settings": {"steps": steps, "models": ["probunet", *baselines], "seeds": args.seeds,
                     "baseline_seeds": baseline_seeds, "data_seed": args.data_seed, "jobs": args.jobs,
                     "probunet_sets": args.sets, "scenes": cal["data"]["scenes"],
                     "size": [cal["data"]["height"], cal["data"]["width"]]},
        "times_s": {"scenes": t_data, "train": {f"{s}/{m}": t for (s, m), t in t_train.items()},
                    "calibration": t_cal},
        "paper_ged": cal["paper_ged"],
        "rows": rows,
        "summary": summary,
        "report": str(report),
    }
    head = (f"{'model':<14} {'seed':>4} {'GED@1':>6} {'GED@4':>6} {'GED@8':>6} {'GED@16':>6} {'mode r':>7} "
            f"{'mode MAE':>8} {'pix MAE':>7} {'train s':>8}")
    print(head)
    for row in rows:
        g = row["ged"]
        train_s = row["train_s"] or row["train_s_metrics"]  # this invocation's wall time, else the loop's
        train_s = f"{train_s:.0f}" if train_s else "-"
        seed = "-" if row["model"] == "oracle" else str(row["seed"])
        print(f"{row['model']:<14} {seed:>4} {g['1']:6.3f} {g['4']:6.3f} {g['8']:6.3f} {g['16']:6.3f} "
              f"{row['mode_r']:7.3f} {row['mode_mae']:8.4f} {row['pixel_mae']:7.3f} {train_s:>8}")
        if row["posterior"]:
            print("    posterior encodes: " + ", ".join(f"{k} {v:.2f}" for k, v in row["posterior"].items()))
        if row.get("boundary_offset"):
            print("    boundary - quantile (prior sd, > 0 under-samples): "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in row["boundary_offset"].items()))
    pg = cal["paper_ged"]
    print(f"{'paper (T.2)':<14} {'':>4} {pg['1']:6.3f} {pg['4']:6.3f} {pg['8']:6.3f} {pg['16']:6.3f}")
    print("\nmean ± sd over seeds")
    for model, s in summary.items():
        if model == "oracle":
            continue
        print(f"{model:<14} seeds {','.join(map(str, s['seeds']))}: mode r {_pm(s['mode_r'], '.3f')}, "
              f"MAE {_pm(s['mode_mae'], '.4f')}, GED@16 {_pm(s['ged16'], '.3f')}, "
              f"GED@1 {_pm(s['ged1'], '.3f')}, train s {_pm(s['train_s'] if s['train_s']['n'] else s['train_s_metrics'], '.0f')}")
        if "posterior" in s:
            print("    posterior: " + ", ".join(f"{c} {_pm(v, '.2f')}" for c, v in s["posterior"].items())
                  + f" (lowest {s['posterior_min']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}; reports in {report}")
    return result


if __name__ == "__main__":
    main()
