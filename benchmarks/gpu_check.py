"""Benchmark: the GPU path in one short run (issue #14): training modes, bf16 vs fp32, sampling + GED, DDP.

One script for a session that has a GPU for a few minutes (it stays under
``--budget-s``, 8 minutes by default, on one H100/H200-class GPU), and that CI
runs on the CPU in a tiny ``--smoke`` form so that it cannot rot:

1. **Data**: ``--data DIR`` (``lidcseg prepare`` output), else a phantom
   (``lidcseg phantom --count`` scans written in parallel, then ``lidcseg
   prepare --workers``); ``--synthetic`` (and ``--smoke``) write disc crops instead.
2. **Training modes** of the ``paper`` preset through :func:`lidcseg.training.train`,
   ``--steps`` each from the same seed (same weights, data order and noise):
   fp32, bf16 autocast, bf16 + channels_last, bf16 + channels_last + ``torch.compile``.
   (The models are channels-last already, :mod:`lidcseg.models`; ``channels_last``
   converts the input too, which for one-channel CT tiles changes nothing.)
   Steady steps/s and images/s come from ``metrics.jsonl`` (rows after the first
   ``--warmup-steps``, whose time is reported as start-up: cuDNN autotuning, the
   compiler); the 240k-step schedule is projected from them. A mode past its time
   cap stops at the next step (``stopped``). The tiles are the centre crops
   (``augment`` off) so the modes measure the GPU; ``--augment`` trains on the paper's
   augmentation instead. The loader row times the paper's augmentation alone
   (``--workers`` DataLoader workers), in the workers (``augment_on=loader``) and batched
   on the device (``augment_on=device``): the projection is bounded by the model and the
   faster of the two.
3. **bf16 tracks fp32**: the losses of both modes over the same steps; the relative
   difference of their mean over the last 50 steps (target 2%).
4. **Sampling + GED**: the test split, ``-n`` (100) hypotheses per crop from the
   fp32 mode's model, scored by :func:`lidcseg.evaluation.evaluate_model` (GED and
   Hungarian IoU), and the split repeated to ``--crops`` (2000) tiles: hypotheses
   (:func:`lidcseg.inference.draw_image_foreground`) and GED (Eq. 6,
   :func:`lidcseg.metrics.ged_terms`) on the device, end to end (target 5 s).
5. **DDP**: 2 processes (:func:`torch.multiprocessing.spawn`, the library's
   ``WORLD_SIZE``/``RANK`` init) when the machine has 2 GPUs; skipped otherwise
   (``--ddp-cpu`` runs it with gloo on the CPU, to test the check itself).

Prints one table and writes JSON (``benchmarks/results/gpu_check.json``).

    python benchmarks/gpu_check.py                                  # a GPU session
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json  # CI: CPU, < 1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.io.atomic import write_json_atomic
from lidcseg.presets import apply_overrides, preset

#: Steps of the paper's LIDC schedule (Appendix H.1).
PAPER_STEPS = 240_000
#: (name, bf16, channels_last, compile), in the order they run.
MODES: tuple[tuple[str, bool, bool, bool], ...] = (
    ("fp32", False, False, False),
    ("bf16", True, False, False),
    ("bf16+channels_last", True, True, False),
    ("bf16+channels_last+compile", True, True, True),
)
TARGET_HOURS = 2.0  # the paper schedule on one H100-class GPU
TARGET_SAMPLE_S = 5.0  # 2000 test crops x 100 hypotheses sampled and GED-scored
TARGET_BF16_REL = 0.02  # bf16 mean loss within 2% of fp32 over the last 50 of 300 steps
LAST_STEPS = 50  # the steps the bf16/fp32 comparison averages


class TimeUp(Exception):
    """Raised from the training callback when a mode has used its time."""


# -- environment and data -------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the machine: torch, CUDA, the GPU's name, device count, CPUs."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": str(device), "cpus": os.cpu_count(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return env


def disc_crops(n: int, size: int, seed: int, first_patient: int) -> Any:
    """``n`` synthetic crops: a bright disc in lung-like noise, 4 graders drawing it with
    radii r - 3, r - 1, r + 1, r + 3 (a stand-in when no phantom is wanted; the step's cost
    does not depend on the pixels). Three crops per synthetic patient."""
    from lidcseg.data.store import CropBatch

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = 4.0 + 0.08 * size * rng.random(n)
    cy, cx = (size / 2 + rng.uniform(-3, 3, (2, n))).astype(np.float32)
    d = np.hypot(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None])  # (n, S, S)
    noise = rng.standard_normal((n, size, size)).astype(np.float32)
    image = np.where(d <= r[:, None, None] + 1, 40.0 + 30.0 * noise, -850.0 + 60.0 * noise)
    masks = np.stack([d <= np.maximum(r + dr, 1.0)[:, None, None] for dr in (-3, -1, 1, 3)], 1)
    meta = {
        "patient_id": np.asarray([f"SYN-{first_patient + i // 3:05d}" for i in range(n)], dtype=object),
        "scan_id": np.arange(n, dtype=np.int32), "lesion_id": np.zeros(n, np.int32),
        "slice_index": np.arange(n, dtype=np.int32), "z_mm": np.arange(n, dtype=np.float64),
        "n_graders": np.full(n, 4, np.int8), "centre_mm": np.zeros((n, 3), np.float64),
    }
    return CropBatch(np.clip(image, -1024, 3000).astype(np.int16), masks.astype(np.uint8), meta)


def synthetic_data(out: Path, n_train: int, n_val: int, n_test: int, size: int = 180) -> dict[str, Any]:
    """Disc crops (:func:`disc_crops`) as ``{train,val,test}.h5``."""
    from lidcseg.data.store import write_crops

    out.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        write_crops(out / f"{split}.h5", disc_crops(n, size, seed=i, first_patient=10_000 * i),
                    {"split": split})
    return {"source": "synthetic discs", "crops": {"train": n_train, "val": n_val, "test": n_test}}


def _phantom_part(root: str, patients: list[str], seed: int) -> None:
    from lidcseg.lidc.phantom import make_phantom

    make_phantom(root, patients=patients, seed=seed)


def phantom_data(work: Path, scans: int, seed: int, workers: int) -> dict[str, Any]:
    """``lidcseg phantom --count scans`` (patients written in parallel) and ``lidcseg prepare``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from lidcseg.data.prepare import prepare
    from lidcseg.lidc.phantom import choose_scans

    lidc, data, parts = work / "lidc", work / "data", work / "lidc-parts"
    t0 = time.perf_counter()
    if not (data / "manifest.json").is_file():
        patients = sorted({s.patient_id for s in choose_scans(None, scans, seed)})
        shutil.rmtree(parts, ignore_errors=True)
        shutil.rmtree(lidc, ignore_errors=True)
        lidc.mkdir(parents=True)
        groups = [patients[i::workers] for i in range(min(workers, len(patients)))]
        with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
            jobs = [pool.submit(_phantom_part, str(parts / str(i)), g, seed) for i, g in enumerate(groups)]
            for job in jobs:
                job.result()
        for i, g in enumerate(groups):  # one tree: prepare reads <root>/<patient>/...
            for p in g:
                (parts / str(i) / p).rename(lidc / p)
        t_phantom = time.perf_counter() - t0
        prepare(lidc, data, workers=workers)
    else:
        t_phantom = 0.0
    patients = json.loads((data / "manifest.json").read_text()).get("patients") or {}
    return {"source": f"phantom ({scans} scans, seed {seed})",
            "crops": {s: _crops(data / f"{s}.h5") for s in ("train", "val", "test")},
            "patients": {s: list(patients.values()).count(s) for s in ("train", "val", "test")},
            "phantom_s": round(t_phantom, 1), "prepare_s": round(time.perf_counter() - t0 - t_phantom, 1)}


def _crops(path: Path) -> int:
    from lidcseg.data.store import CropStore

    return len(CropStore(path)) if path.is_file() else 0


# -- training modes -------------------------------------------------------------------------


def train_mode(
    name: str, data: Path, out: Path, model_cfg: ModelConfig, cfg: TrainConfig, cap_s: float,
    warmup_steps: int,
) -> dict[str, Any]:
    """One mode's run: steady steps/s and images/s from ``metrics.jsonl``, start-up, losses."""
    from lidcseg.training import iter_metrics, train

    t0 = time.perf_counter()

    def stop_when_out_of_time(event: Any) -> None:
        if event.kind == "step" and time.perf_counter() - t0 > cap_s:
            raise TimeUp(event.step)

    row: dict[str, Any] = {"mode": name, "bf16": cfg.bf16, "channels_last": cfg.channels_last,
                           "compile": cfg.compile, "steps": cfg.steps, "batch_size": cfg.batch_size,
                           "cap_s": round(cap_s, 1), "stopped": None, "error": None}
    try:
        train(data, model_cfg, cfg, out, overwrite=True, callback=stop_when_out_of_time)
    except TimeUp as e:
        row["stopped"] = f"time cap {cap_s:.0f} s at step {e.args[0]}"
    except Exception as e:  # noqa: BLE001 - a mode that fails (a compiler error) is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    rows = list(iter_metrics(out, "train")) if (out / "metrics.jsonl").is_file() else []
    row["losses"] = [[r["step"], r["loss"]] for r in rows]
    row["steps_done"] = rows[-1]["step"] if rows else 0
    row.update(steady_rate(rows, warmup_steps, cfg.batch_size))
    return row


def steady_rate(rows: list[dict[str, Any]], warmup_steps: int, batch_size: int) -> dict[str, Any]:
    """Steps/s between the first log row at or past ``warmup_steps`` and the last one, and
    the start-up: the time of that first row beyond what its steps take at the steady rate."""
    after = [r for r in rows if r["step"] >= warmup_steps]
    if len(after) < 2 or after[-1]["time_s"] <= after[0]["time_s"]:
        return {"steps_per_s": None, "images_per_s": None, "startup_s": None, "projected_240k_h": None}
    a, b = after[0], after[-1]
    rate = (b["step"] - a["step"]) / (b["time_s"] - a["time_s"])
    return {"steps_per_s": rate, "images_per_s": rate * batch_size,
            "startup_s": max(0.0, a["time_s"] - a["step"] / rate),
            "projected_240k_h": PAPER_STEPS / rate / 3600}


def loader_rate(data: Path, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
                seconds: float, max_batches: int) -> dict[str, Any]:
    """Batches/s of the paper's augmented DataLoader alone (with the copy to ``device``)."""
    from lidcseg.training.loop import (
        batch_to_device,
        device_augment_for,
        training_datasets,
        training_loader,
    )
    from lidcseg.training.run_state import check_data

    train_ds = training_datasets(data, *check_data(data), model_cfg, cfg)[0]
    loader = training_loader(train_ds, cfg, device)
    augment = device_augment_for(train_ds)  # augment_on="device": batched on `device`
    t0 = time.perf_counter()
    t_first, n = None, 0
    for batch in loader:
        x, _, _ = batch_to_device(batch, device, cfg.channels_last, augment)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if t_first is None:
            t_first = time.perf_counter()  # the workers have started
            continue
        n += 1
        if n >= max_batches or time.perf_counter() - t_first > seconds:
            break
    del loader
    elapsed = time.perf_counter() - (t_first or t0)
    rate = n / elapsed if n and elapsed > 0 else None
    return {"workers": cfg.num_workers, "augment": cfg.augment, "augment_on": cfg.augment_on,
            "batches": n, "startup_s": round((t_first or t0) - t0, 2), "steps_per_s": rate,
            "images_per_s": rate * cfg.batch_size if rate else None,
            "projected_240k_h": PAPER_STEPS / rate / 3600 if rate else None}


def loss_tracking(ref: dict[str, Any], other: dict[str, Any], last: int = LAST_STEPS) -> dict[str, Any]:
    """``other``'s logged losses against ``ref``'s over the steps both logged."""
    a, b = dict(map(tuple, ref["losses"])), dict(map(tuple, other["losses"]))
    steps = sorted(set(a) & set(b))
    if not steps:
        return {"steps": [], "rel_diff_last": None, "max_rel_diff": None}
    tail = [s for s in steps if s > steps[-1] - last]
    ma, mb = (sum(d[s] for s in tail) / len(tail) for d in (a, b))
    rel = [abs(b[s] - a[s]) / max(abs(a[s]), 1e-12) for s in steps]
    return {"steps": steps, ref["mode"]: [a[s] for s in steps], other["mode"]: [b[s] for s in steps],
            "last_steps": [tail[0], tail[-1]], "mean_last": {ref["mode"]: ma, other["mode"]: mb},
            "rel_diff_last": abs(mb - ma) / max(abs(ma), 1e-12), "max_rel_diff": max(rel)}


# -- sampling + GED -------------------------------------------------------------------------


def repeat_split(split: Any, n: int) -> Any:
    """``split``'s tiles repeated to ``n`` crops (rows 0..n-1, so each draws its own noise)."""
    from lidcseg.data.eval_split import EvalSplit

    idx = torch.arange(n) % len(split)
    return EvalSplit(split.path, split.input_size, split.images[idx].contiguous(), split.masks[idx].contiguous(),
                     np.arange(n, dtype=np.int64), split.patient[idx.numpy()], split.lesion[idx.numpy()])


def sample_and_ged(model: Any, split: Any, n: int, device: torch.device, batch_size: int,
                   autocast: contextlib.AbstractContextManager[Any], seed: int = 0) -> tuple[float, float]:
    """Seconds to draw ``n`` hypotheses of every crop and score its GED (Eq. 6) on ``device``,
    and the mean GED. The per-crop sums stay on the device; one read-back at the end."""
    from lidcseg.inference import draw_image_foreground
    from lidcseg.metrics.ged import ged_terms

    gen = torch.Generator().manual_seed(seed)
    sums = []
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s, e, x in split.batches(batch_size, device):
            with autocast:
                samples = draw_image_foreground(model, x, n, split.rows[s:e], seed=seed, generator=gen)
            sums.append(ged_terms(samples, split.masks[s:e].to(device, non_blocking=True)).ged.sum())
        total = float(torch.stack(sums).sum())
    return time.perf_counter() - t0, total / len(split)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling_checks(run: Path | None, model_cfg: ModelConfig, data: Path, input_size: int,
                    device: torch.device, n: int, crops: int, batch_size: int) -> list[dict[str, Any]]:
    """The test split through ``evaluate_model``; ``crops`` tiles through sample + GED (fp32, bf16)."""
    from lidcseg.data.eval_split import load_split
    from lidcseg.evaluation import evaluate_model
    from lidcseg.inference import open_run
    from lidcseg.models.registry import create_model

    if run is not None and (run / "last").is_dir():
        model, source = open_run(run, device).model, f"{run.name} (trained)"
    else:
        torch.manual_seed(0)
        model, source = create_model(model_cfg).to(device).eval(), "untrained (no finished run)"
    t0 = time.perf_counter()
    split = load_split(data, "test", input_size)
    load_s = time.perf_counter() - t0
    rows = []
    warm = repeat_split(split, min(batch_size, len(split)))  # cuDNN autotuning and allocator, untimed
    sample_and_ged(model, warm, n, device, batch_size, contextlib.nullcontext())
    t0 = time.perf_counter()
    metrics, _, _ = evaluate_model(model, split, (n,), device=device, batch_size=batch_size)
    rows.append({"what": "evaluate_model", "scores": "GED + Hungarian IoU", "crops": len(split), "hypotheses": n,
                 "precision": "fp32", "seconds": time.perf_counter() - t0, "load_s": load_s,
                 "ged": float(np.mean(metrics["ged"][0])), "model": source})
    big = repeat_split(split, crops)
    precisions = [("fp32", contextlib.nullcontext())]
    if device.type == "cuda":
        precisions.append(("bf16", torch.autocast("cuda", dtype=torch.bfloat16)))
    for name, autocast in precisions:
        with autocast:  # warm this precision's kernels on one batch
            sample_and_ged(model, warm, n, device, batch_size, contextlib.nullcontext())
        seconds, ged = sample_and_ged(model, big, n, device, batch_size, autocast)
        rows.append({"what": "sample + GED", "scores": "GED", "crops": crops, "hypotheses": n, "precision": name,
                     "seconds": seconds, "ged": ged, "model": source})
    return rows


# -- DDP ------------------------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, data: str, out: str, model: dict, train_cfg: dict) -> None:
    from lidcseg.config_io import from_dict
    from lidcseg.training import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    train(data, from_dict(ModelConfig, model), from_dict(TrainConfig, train_cfg), out, overwrite=True)


def ddp_check(data: Path, out: Path, model_cfg: ModelConfig, cfg: TrainConfig, cpu: bool,
              single: dict[str, Any] | None, warmup_steps: int) -> dict[str, Any]:
    """Two processes, one GPU each (or gloo on the CPU with ``cpu``); skipped without 2 GPUs."""
    from lidcseg.training import iter_metrics

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not cpu and gpus < 2:
        return {"status": "skipped", "reason": f"needs 2 CUDA devices, found {gpus}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = apply_overrides(model_cfg, cfg, [f"device={'cpu' if cpu else 'cuda'}"])[1]
    t0 = time.perf_counter()
    try:
        torch.multiprocessing.spawn(_ddp_worker, args=(port, str(data), str(out), to_dict(model_cfg),
                                                        to_dict(cfg)), nprocs=2, join=True)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"}
    rows = list(iter_metrics(out, "train"))
    res = {"status": "ran", "backend": "gloo (CPU)" if cpu else "nccl", "world_size": 2,
           "steps_done": rows[-1]["step"] if rows else 0, "wall_s": round(time.perf_counter() - t0, 2),
           "final_loss": rows[-1]["loss"] if rows else None,
           **steady_rate(rows, warmup_steps, cfg.batch_size)}
    res["finite"] = bool(rows) and all(math.isfinite(r["loss"]) for r in rows)
    if single and single.get("steps_per_s") and res["steps_per_s"]:
        res["speedup_vs_1_gpu"] = res["steps_per_s"] / single["steps_per_s"]
    return res


# -- the report -----------------------------------------------------------------------------


def targets(result: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """Each target with its value and pass/fail (None on the CPU: the targets are a GPU's)."""
    modes = [m for m in result["modes"] if m.get("steps_per_s")]
    best = max(modes, key=lambda m: m["steps_per_s"], default=None)
    # The faster augmentation path bounds the schedule (augment_on=device is one --set away).
    loader = max((r.get("steps_per_s") or 0.0 for r in (result["loader"], result["loader_device"])),
                 default=0.0) or None
    hours = None
    if best is not None:
        rate = min(best["steps_per_s"], loader) if loader else best["steps_per_s"]
        hours = PAPER_STEPS / rate / 3600
    sampling = [r["seconds"] for r in result["sampling"] if r["what"] == "sample + GED"]
    bf16 = result["bf16_vs_fp32"].get("rel_diff_last")

    def verdict(value: float | None, ok: bool) -> bool | None:
        return None if not cuda or value is None else ok

    return {
        "paper_schedule_h": {"value": hours, "target": TARGET_HOURS, "best_mode": best and best["mode"],
                             "bound": None if best is None else
                             ("loader" if loader and loader < best["steps_per_s"] else "model"),
                             "pass": verdict(hours, hours is not None and hours < TARGET_HOURS)},
        "sample_ged_s": {"value": min(sampling, default=None), "target": TARGET_SAMPLE_S,
                         "crops": result["sampling"][-1]["crops"] if result["sampling"] else None,
                         "pass": verdict(min(sampling, default=None),
                                         bool(sampling) and min(sampling) < TARGET_SAMPLE_S)},
        "bf16_rel_diff": {"value": bf16, "target": TARGET_BF16_REL,
                          "pass": verdict(bf16, bf16 is not None and bf16 <= TARGET_BF16_REL)},
    }


def _f(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
    """The one table: check, setting, value, target, ok."""
    lines = [(f"device: {result['env']['gpu'] or result['env']['device']}  torch {result['env']['torch']}  "
              f"CUDA {result['env']['cuda']}  data: {result['data']['source']}"), ""]
    rows = [("check", "setting", "value", "target", "ok")]
    for m in result["modes"]:
        note = m["error"] or m["stopped"] or f"{m['steps_done']} steps"
        compiled = f", compile {m['compile_s']:.0f} s" if m.get("compile_s") is not None else ""
        rows.append(("train " + m["mode"], note[:48],
                     f"{_f(m['steps_per_s'])} it/s {_f(m['images_per_s'], '.0f')} img/s, "
                     f"240k: {_f(m['projected_240k_h'])} h, start-up {_f(m['startup_s'], '.1f')} s{compiled}",
                     "", ""))
    for key in ("loader", "loader_device"):
        lo = result[key]
        rows.append((key.replace("_", " "), f"{lo.get('workers')} workers, augment {lo.get('augment')} "
                     f"on {lo.get('augment_on')}",
                     f"{_f(lo.get('steps_per_s'))} it/s {_f(lo.get('images_per_s'), '.0f')} img/s "
                     f"240k: {_f(lo.get('projected_240k_h'))} h", "", ""))
    t = result["targets"]
    ok = {True: "yes", False: "NO", None: "n/a"}
    rows.append(("240k schedule", f"{t['paper_schedule_h']['best_mode']} ({t['paper_schedule_h']['bound']}-bound)",
                 f"{_f(t['paper_schedule_h']['value'])} h", f"< {TARGET_HOURS:g} h",
                 ok[t["paper_schedule_h"]["pass"]]))
    bf = result["bf16_vs_fp32"]
    rows.append(("bf16 vs fp32", f"mean loss, steps {bf.get('last_steps')}",
                 f"{_f(bf.get('rel_diff_last') and 100 * bf['rel_diff_last'])} % "
                 f"(max {_f(bf.get('max_rel_diff') and 100 * bf['max_rel_diff'])} %)",
                 f"<= {100 * TARGET_BF16_REL:g} %", ok[t["bf16_rel_diff"]["pass"]]))
    for s in result["sampling"]:
        target = f"< {TARGET_SAMPLE_S:g} s" if s["what"] == "sample + GED" else ""
        passed = ok[t["sample_ged_s"]["pass"]] if target and s["seconds"] == t["sample_ged_s"]["value"] else ""
        rows.append((s["what"], f"{s['crops']} crops x {s['hypotheses']} {s['precision']}",
                     f"{s['seconds']:.2f} s, GED {s['ged']:.3f}", target, passed))
    d = result["ddp"]
    rows.append(("DDP 2 processes", d["status"], d.get("reason") or
                 f"{_f(d.get('steps_per_s'))} it/s, x{_f(d.get('speedup_vs_1_gpu'))} vs 1", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"\ntotal {result['total_s']:.0f} s")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def configs(args: argparse.Namespace, device: torch.device) -> tuple[ModelConfig, TrainConfig]:
    """The ``paper`` preset (``--smoke``: cpu-quick's model at 32 x 32) set up for short timed runs."""
    model_cfg, cfg = preset("paper")
    sets = [f"steps={args.steps}", f"log_every={args.log_every}", "val_every=0",
            f"checkpoint_every={args.steps}", f"num_workers={args.workers}", f"device={device.type}",
            f"augment={str(args.augment).lower()}", f"seed={args.seed}", "threads=0", "val_max_crops=32"]
    if args.smoke:
        small, _ = preset("cpu-quick")
        model_cfg = small
        sets += ["batch_size=4", "input_size=32", "aug_max_shift=8", "val_max_crops=4", "val_samples=4",
                 "val_batch_size=4", "threads=1"]
    return apply_overrides(model_cfg, cfg, [*sets, *args.set])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and data, a few steps (CI)")
    p.add_argument("--data", type=Path, help="prepared crops (default: make a phantom)")
    p.add_argument("--synthetic", action="store_true", help="disc crops instead of a phantom")
    p.add_argument("--phantom-scans", type=int, default=24, help="scans of the phantom (about 40 crops each)")
    p.add_argument("--work", type=Path, help="data and runs (default: bench-out/gpu-check; smoke: a temp dir)")
    p.add_argument("--out", type=Path, help="the JSON (default: benchmarks/results/gpu_check.json)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--steps", type=int, help="steps per training mode (default 300; smoke 6)")
    p.add_argument("--log-every", type=int, help="metrics.jsonl cadence (default 10; smoke 2)")
    p.add_argument("--warmup-steps", type=int, help="steps left out of the rates (default 50; smoke 2)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default min(8, CPUs - 1); smoke 0)")
    p.add_argument("--augment", action="store_true", help="train the modes on the paper's augmentation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--modes", help="comma-separated subset of " + ",".join(m[0] for m in MODES))
    p.add_argument("--mode-cap-s", type=float, default=75.0, help="time cap of a mode without compile")
    p.add_argument("--compile-cap-s", type=float, default=150.0, help="time cap of the compile mode")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the compile mode on the CPU too")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole script's time")
    p.add_argument("--loader-s", type=float, default=15.0, help="seconds of the loader row")
    p.add_argument("-n", "--hypotheses", type=int, help="hypotheses per crop (default 100; smoke 8)")
    p.add_argument("--crops", type=int, help="crops of the sample + GED row (default 2000; smoke 16)")
    p.add_argument("--sample-batch", type=int, default=16, help="crops per model call when sampling")
    p.add_argument("--ddp-cpu", action="store_true", help="run the DDP check with gloo on the CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    small = args.smoke
    for name, full, smoke in (("steps", 300, 6), ("log_every", 10, 2), ("warmup_steps", 50, 2),
                              ("hypotheses", 100, 8), ("crops", 2000, 16),
                              ("workers", 0 if small else max(0, min(8, (os.cpu_count() or 1) - 1)), 0)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    if small and args.device == "auto":
        args.device = "cpu"
    return args


def get_data(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """``--data``, else synthetic disc crops (``--smoke``, ``--synthetic``), else a phantom."""
    if args.data is not None:
        return args.data, {"source": str(args.data),
                           "crops": {s: _crops(args.data / f"{s}.h5") for s in ("train", "val", "test")}}
    if args.smoke or args.synthetic:
        return work / "data", synthetic_data(work / "data", *((24, 8, 8) if args.smoke else (700, 150, 150)))
    return work / "data", phantom_data(work, args.phantom_scans, args.seed, max(1, args.workers))


def run_modes(args: argparse.Namespace, data: Path, work: Path, model_cfg: ModelConfig, cfg: TrainConfig,
              device: torch.device, t_start: float) -> list[dict[str, Any]]:
    """Every training mode asked for, each within its cap and the script's budget."""
    wanted = args.modes.split(",") if args.modes else [m[0] for m in MODES]
    rows: list[dict[str, Any]] = []
    for name, bf16, cl, comp in (m for m in MODES if m[0] in wanted):
        left = args.budget_s - (time.perf_counter() - t_start) - 60.0  # sampling and DDP after
        cap = min(args.compile_cap_s if comp else args.mode_cap_s, left)
        skip = ("torch.compile on the CPU takes minutes (--compile-on-cpu runs it)"
                if comp and device.type == "cpu" and not args.compile_on_cpu else
                "out of the time budget" if cap < 5 else None)
        if skip:
            rows.append({"mode": name, "stopped": f"skipped: {skip}", "error": None, "steps_done": 0,
                         **steady_rate([], 0, cfg.batch_size)})
            continue
        mode_cfg = apply_overrides(model_cfg, cfg, [f"bf16={bf16}", f"channels_last={cl}", f"compile={comp}"])[1]
        rows.append(train_mode(name, data, work / "runs" / name, model_cfg, mode_cfg, cap, args.warmup_steps))
        m = rows[-1]
        print(f"  {name}: {_f(m['steps_per_s'])} it/s, {m['steps_done']} steps "
              f"{m['error'] or m['stopped'] or ''} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    ran = {m["mode"]: m for m in rows}
    eager, compiled = ran.get("bf16+channels_last"), ran.get("bf16+channels_last+compile")
    if eager and compiled and eager["startup_s"] is not None and compiled["startup_s"] is not None:
        compiled["compile_s"] = compiled["startup_s"] - eager["startup_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    from lidcseg.device import resolve_device

    device = resolve_device(args.device)
    if args.smoke:
        torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-") if args.work is None and args.smoke else None
    work = Path(tmp.name) if tmp else (args.work or Path("bench-out/gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or Path("benchmarks/results/gpu_check.json")
    result: dict[str, Any] = {"benchmark": "gpu_check", "smoke": args.smoke, "env": environment(device)}
    try:
        data, result["data"] = get_data(args, work)
        empty = [k for k, v in result["data"]["crops"].items() if not v]
        if empty:
            sys.exit(f"{data}: no {' and no '.join(empty)} crops (a phantom of more scans: --phantom-scans)")
        model_cfg, cfg = configs(args, device)
        result["config"] = {"model": to_dict(model_cfg), "train": to_dict(cfg)}
        print(f"data ready ({time.perf_counter() - t_start:.0f} s): {result['data']['crops']}", flush=True)
        result["modes"] = run_modes(args, data, work, model_cfg, cfg, device, t_start)
        ran = {m["mode"]: m for m in result["modes"] if "losses" in m}
        result["bf16_vs_fp32"] = (loss_tracking(ran["fp32"], ran["bf16"]) if "fp32" in ran and "bf16" in ran
                                  else {"skipped": "needs the fp32 and bf16 modes"})
        if device.type != "cuda":
            result["bf16_vs_fp32"]["note"] = "bf16 autocast is CUDA-only: on the CPU both modes run float32"
        loader_cfg = apply_overrides(model_cfg, cfg, ["augment=true", f"steps={PAPER_STEPS}"])[1]
        result["loader"] = loader_rate(data, model_cfg, loader_cfg, device, args.loader_s,
                                       max_batches=4 if args.smoke else 10_000)
        device_cfg = apply_overrides(model_cfg, loader_cfg, ["augment_on=device"])[1]
        result["loader_device"] = loader_rate(data, model_cfg, device_cfg, device, args.loader_s,
                                              max_batches=4 if args.smoke else 10_000)
        result["sampling"] = sampling_checks(work / "runs" / "fp32" if "fp32" in ran else None, model_cfg,
                                             data, cfg.input_size, device, args.hypotheses, args.crops,
                                             args.sample_batch)
        ddp_cfg = apply_overrides(model_cfg, cfg, ["bf16=true", f"steps={min(cfg.steps, 100)}"])[1]
        result["ddp"] = ddp_check(data, work / "runs" / "ddp", model_cfg, ddp_cfg, args.ddp_cpu,
                                  ran.get("bf16"), args.warmup_steps)
        result["targets"] = targets(result, device.type == "cuda")
        result["total_s"] = time.perf_counter() - t_start
        print(table(result))
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        print(f"wrote {out}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
