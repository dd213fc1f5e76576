"""Benchmark ``lidcseg prepare`` on a phantom LIDC of 10 scans.

Measures crops/s and scans/s with 1 and 2 workers and the peak RSS of the whole
process tree, next to the floor: the time just to read every series with
SimpleITK's series reader. Prints a table and writes JSON.

    python benchmarks/prepare.py [--work bench-out] [--out benchmarks/results/prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PATIENTS = (
    "LIDC-IDRI-0061,LIDC-IDRI-0045,LIDC-IDRI-0751,LIDC-IDRI-0049,LIDC-IDRI-0012,"
    "LIDC-IDRI-0855,LIDC-IDRI-0124,LIDC-IDRI-0195,LIDC-IDRI-0139,LIDC-IDRI-0368"
)


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (seconds, peak RSS in MB of the process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return dt, usage.ru_maxrss / 1024


def floor_seconds(lidc: Path) -> float:
    code = (
        "import sys,time,SimpleITK as sitk;from pathlib import Path\n"
        "t=time.perf_counter()\n"
        "for d in sorted({p.parent for p in Path(sys.argv[1]).rglob('*.dcm')}):\n"
        "    r=sitk.ImageSeriesReader();r.SetFileNames(r.GetGDCMSeriesFileNames(str(d)));r.Execute()\n"
        "print(time.perf_counter()-t)"
    )
    return float(subprocess.check_output([sys.executable, "-c", code, str(lidc)]).decode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare.json"))
    args = ap.parse_args()
    lidc = args.work / "lidc"
    cli = [sys.executable, "-m", "lidcseg_cli.main"]
    if not lidc.exists():
        print("writing the phantom (once)...", flush=True)
        run_measured([*cli, "phantom", "--out", str(lidc), "--patients", PATIENTS])
    n_scans = len(PATIENTS.split(","))
    rows = []
    floor = floor_seconds(lidc)
    for workers in (1, 2):
        out = args.work / f"data-w{workers}"
        dt, rss = run_measured(
            [*cli, "prepare", "--lidc-root", str(lidc), "--out", str(out), "--workers", str(workers), "--overwrite"]
        )
        crops = json.loads((out / "manifest.json").read_text())["total_crops"]
        rows.append({"workers": workers, "seconds": dt, "scans_per_s": n_scans / dt, "crops": crops,
                     "crops_per_s": crops / dt, "peak_rss_mb": rss, "x_floor": dt / floor})
    print(f"\nprepare on a phantom of {n_scans} scans (floor: SimpleITK series read = {floor:.2f} s)")
    print(f"{'workers':>7} {'seconds':>8} {'scans/s':>8} {'crops':>6} {'crops/s':>8} {'peak RSS MB':>12} {'x floor':>8}")
    for r in rows:
        print(f"{r['workers']:>7} {r['seconds']:>8.2f} {r['scans_per_s']:>8.2f} {r['crops']:>6} "
              f"{r['crops_per_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['x_floor']:>8.2f}")
    result = {"benchmark": "prepare", "n_scans": n_scans, "floor_sitk_read_s": floor, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
