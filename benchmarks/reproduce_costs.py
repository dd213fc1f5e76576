"""Benchmark: the per-model figures behind ``lidcseg reproduce``'s time estimate.

For every run key of ``lidcseg reproduce`` with the ``cpu-quick`` preset (and the two flip
models with ``scenes-quick``), on one torch thread:

* ``step_s``: one training step (loss terms, the trainer's objective, backward, Adam) at the
  preset's batch and tile size, the median of ``--steps`` steps after one warm-up step;
* ``sample_s``: 16 samples of one crop (``model.sample(x, 16)`` on a batch of 16, divided by 16;
  M-Heads with fewer heads draw as many as they have, scaled to 16).

Times are the process's CPU time (``time.process_time``): with one thread that is the wall
time of an idle machine, and other jobs on a shared machine barely change it.

    python benchmarks/reproduce_costs.py [--steps 3] [--out benchmarks/results/reproduce_costs.json]

Prints a table and writes JSON; :mod:`lidcseg.reproduce.estimate` holds the figures (copy
them there after a new measurement). Random images stand in for data: a step's cost does not
depend on the pixel values; data loading and validation are not included. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lidcseg.models.registry import create_model, model_config
from lidcseg.presets import compose
from lidcseg.reproduce.options import FLIP_KEYS, RUN_KEYS
from lidcseg.training import objective


def measure(key: str, task: str, steps: int) -> dict[str, float | str]:
    """Seconds per training step and per 16 samples of one crop, for a run key on ``task``."""
    model_name, implied = RUN_KEYS[key]
    mcfg, tcfg = compose("cpu-quick", model_defaults=model_config, task=task, model=model_name,
                         overrides=list(implied))
    torch.manual_seed(0)
    model = create_model(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    b = tcfg.batch_size
    h, w = (tcfg.input_size, tcfg.input_size) if task == "lidc" else (32, 64)
    x = torch.randn(b, mcfg.in_channels, h, w)
    y = torch.randint(0, mcfg.num_classes, (b, h, w))
    times = []
    for _ in range(steps + 1):
        t = time.process_time()
        loss = objective(model.loss(x, y), mcfg.beta, mcfg, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.process_time() - t)
    model.eval()
    n = min(16, getattr(model, "max_samples", None) or 16)
    t = time.process_time()
    with torch.no_grad():
        model.sample(x, n)
    sample = (time.process_time() - t) / b * 16 / n
    return {"key": key, "task": task, "model": mcfg.name, "batch": b, "size": f"{h}x{w}",
            "step_s": statistics.median(times[1:]), "sample_s": sample}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reproduce_costs.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(k, "lidc", args.steps) for k in RUN_KEYS]
    rows += [measure(k, "flip-scenes", args.steps) for k in FLIP_KEYS]
    print(f"{'key':24s} {'task':12s} {'batch':>5s} {'size':>6s} {'step s':>8s} {'16 samples s/crop':>18s}")
    for r in rows:
        print(f"{r['key']:24s} {r['task']:12s} {r['batch']:5d} {r['size']:>6s} {r['step_s']:8.3f} "
              f"{r['sample_s']:18.4f}")
    result = {"benchmark": "reproduce_costs", "threads": 1, "steps": args.steps, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "platform": platform.platform(),
                          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
