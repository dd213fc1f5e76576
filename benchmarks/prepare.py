"""Benchmark ``lidcseg prepare`` on a phantom LIDC (default 30 random annotated scans).

Measures, side by side in one run, with one thread per process:

* the floor: the time just to read every series with SimpleITK's series reader
  (measured before and after the prepare runs; the mean is the floor);
* ``prepare`` with 1 and 2 workers, each with a cold cluster cache (an empty folder:
  pylidc's ``cluster_annotations`` runs and the result is stored) and then a warm one
  (the same folder: the clusters are read back), as separate CLI processes.

For each run: seconds, CPU seconds (user + system, the process and its workers), crops/s,
scans/s, the ratios to the floor (wall and CPU), the peak RSS of the largest process and
the peak of the summed RSS of the whole process tree (sampled every 0.1 s). Prints a table
and writes JSON. Absolute times depend on the machine's load; compare the ratios of one
run. On a busy machine the CPU ratio is the steadier one.

    python benchmarks/prepare.py [--count 30] [--seed 0] [--work bench-out] [--out benchmarks/results/prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

#: One thread per process: numpy/BLAS, ITK (SimpleITK) and torch, if anything imports it.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
}


def _tree_rss_mb(pgid: int) -> float:
    """Summed RSS (MB) of the processes in process group ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat: the process group
                continue
            with open(f"/proc/{entry.name}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, float]:
    """Run ``cmd`` in its own process group.

    Returns:
        (seconds, CPU seconds of the process and its reaped children, peak RSS in MB of the
        largest process, peak summed RSS in MB of the tree).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    # ru_maxrss of a waited child: the largest of it and its own waited-for descendants.
    return dt, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak[0]


def floor_seconds(lidc: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds, CPU seconds) for SimpleITK's series reader to read every series under ``lidc``
    (one thread)."""
    code = (
        "import sys,time,SimpleITK as sitk;from pathlib import Path\n"
        "sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)\n"
        "t=time.perf_counter();c=time.process_time()\n"
        "for d in sorted({p.parent for p in Path(sys.argv[1]).rglob('*.dcm')}):\n"
        "    r=sitk.ImageSeriesReader();r.SetFileNames(r.GetGDCMSeriesFileNames(str(d)));r.Execute()\n"
        "print(time.perf_counter()-t,time.process_time()-c)"
    )
    wall, cpu = subprocess.check_output([sys.executable, "-c", code, str(lidc)], env=env).decode().split()
    return float(wall), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=30, help="annotated scans in the phantom")
    ap.add_argument("--seed", type=int, default=0, help="seed of the phantom's scan choice")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare.json"))
    args = ap.parse_args()
    env = {**os.environ, **ONE_THREAD}
    lidc = args.work / f"lidc-count{args.count}-seed{args.seed}"
    cli = [sys.executable, "-m", "lidcseg_cli.main"]
    if not lidc.exists():
        print(f"writing the phantom of {args.count} scans (once)...", flush=True)
        run_measured([*cli, "phantom", "--out", str(lidc), "--count", str(args.count), "--seed", str(args.seed)], env)
    files = sorted(lidc.rglob("*.dcm"))
    n_scans = len({p.parent for p in files})
    for p in files:  # every run finds the files in the page cache
        p.read_bytes()
    floors = [floor_seconds(lidc, env)]
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        cache = args.work / f"clusters-w{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
            out = args.work / f"data-w{workers}-{state}"
            dt, cpu, rss, tree = run_measured(
                [*cli, "prepare", "--lidc-root", str(lidc), "--out", str(out), "--workers", str(workers),
                 "--overwrite", "--cluster-cache", str(cache)], env,
            )
            manifest = json.loads((out / "manifest.json").read_text())
            crops = manifest["total_crops"]
            rows.append({"workers": workers, "cluster_cache": state, "seconds": dt, "cpu_s": cpu,
                         "scans_per_s": n_scans / dt,
                         "crops": crops, "crops_per_s": crops / dt, "peak_rss_mb": rss, "peak_tree_rss_mb": tree,
                         "cache": manifest.get("cluster_cache")})
            print(f"  {workers} worker(s), {state} cluster cache: {dt:.1f} s", flush=True)
    floors.append(floor_seconds(lidc, env))
    floor = sum(f[0] for f in floors) / len(floors)
    floor_cpu = sum(f[1] for f in floors) / len(floors)
    for r in rows:
        r["x_floor"] = r["seconds"] / floor
        r["x_floor_cpu"] = r["cpu_s"] / floor_cpu
    print(f"\nprepare on a phantom of {n_scans} scans, {len(files)} slices, 1 thread per process "
          f"(floor: SimpleITK series read = {floor:.2f} s, {floor_cpu:.2f} CPU s; "
          f"{floors[0][0]:.2f} s before / {floors[1][0]:.2f} s after)")
    print(f"{'workers':>7} {'clusters':>8} {'seconds':>8} {'CPU s':>7} {'scans/s':>8} {'crops':>6} {'crops/s':>8} "
          f"{'RSS MB':>7} {'tree MB':>8} {'x floor':>8} {'x CPU':>6}")
    for r in rows:
        print(f"{r['workers']:>7} {r['cluster_cache']:>8} {r['seconds']:>8.2f} {r['cpu_s']:>7.2f} "
              f"{r['scans_per_s']:>8.2f} {r['crops']:>6} {r['crops_per_s']:>8.1f} {r['peak_rss_mb']:>7.0f} "
              f"{r['peak_tree_rss_mb']:>8.0f} {r['x_floor']:>8.2f} {r['x_floor_cpu']:>6.2f}")
    result = {
        "benchmark": "prepare", "phantom": {"count": args.count, "seed": args.seed, "scans": n_scans,
                                             "slices": len(files)},
        "threads_per_process": 1, "floor_sitk_read_s": floor, "floor_sitk_read_cpu_s": floor_cpu,
        "floor_runs_s": [f[0] for f in floors], "rows": rows,
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
