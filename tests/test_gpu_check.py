"""benchmarks/gpu_check.py: the GPU check runs in its CPU smoke form, and its arithmetic is right."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_rate_and_loss_tracking_by_hand() -> None:
    gc = _script()
    rows = [{"step": 10, "time_s": 5.0}, {"step": 20, "time_s": 6.0}, {"step": 30, "time_s": 7.0}]
    r = gc.steady_rate(rows, warmup_steps=20, batch_size=32)
    assert r["steps_per_s"] == 10.0 and r["images_per_s"] == 320.0
    assert r["startup_s"] == 4.0  # step 20 at 6 s, of which 2 s at 10 steps/s
    assert r["projected_240k_h"] == pytest.approx(240_000 / 10 / 3600)
    assert gc.steady_rate(rows[:1], 0, 32)["steps_per_s"] is None
    fp32 = {"mode": "fp32", "losses": [[10, 100.0], [20, 80.0], [30, 60.0]]}
    bf16 = {"mode": "bf16", "losses": [[10, 101.0], [20, 82.0], [30, 61.0], [40, 1.0]]}
    t = gc.loss_tracking(fp32, bf16, last=15)  # steps 20 and 30: means 70 and 71.5
    assert t["steps"] == [10, 20, 30] and t["last_steps"] == [20, 30]
    assert t["rel_diff_last"] == pytest.approx(1.5 / 70) and t["max_rel_diff"] == pytest.approx(0.025)


@pytest.mark.slow
def test_smoke_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sample + GED" in res.stdout and f"wrote {out}" in res.stdout
    r = json.loads(out.read_text())
    assert r["smoke"] and r["env"]["device"] == "cpu" and r["env"]["torch"]
    gc = _script()
    modes = {m["mode"]: m for m in r["modes"]}
    assert list(modes) == [m[0] for m in gc.MODES]
    for name in ("fp32", "bf16", "bf16+channels_last"):
        m = modes[name]
        assert m["error"] is None and m["stopped"] is None and m["steps_done"] == 6
        for k in ("steps_per_s", "images_per_s", "projected_240k_h", "startup_s"):
            assert math.isfinite(m[k]) and m[k] >= 0, (name, k)
        assert m["images_per_s"] == pytest.approx(4 * m["steps_per_s"])
        assert all(math.isfinite(loss) for _, loss in m["losses"])
    assert "torch.compile" in modes["bf16+channels_last+compile"]["stopped"]  # skipped on the CPU, said why
    # On the CPU bf16 autocast is off: the same seed gives the same losses.
    assert r["bf16_vs_fp32"]["rel_diff_last"] == 0.0 and r["bf16_vs_fp32"]["steps"] == [2, 4, 6]
    for key in ("loader", "loader_device"):
        assert r[key]["batches"] >= 1 and math.isfinite(r[key]["images_per_s"])
    assert r["loader_device"]["augment_on"] == "device"
    sampling = {s["what"]: s for s in r["sampling"]}
    assert sampling["sample + GED"]["crops"] == 16 and sampling["sample + GED"]["hypotheses"] == 8
    for s in r["sampling"]:
        assert math.isfinite(s["seconds"]) and 0.0 <= s["ged"] <= 2.0
    assert r["ddp"]["status"] == "skipped" and "2 CUDA devices" in r["ddp"]["reason"]
    t = r["targets"]
    assert set(t) == {"paper_schedule_h", "sample_ged_s", "bf16_rel_diff"}
    assert all(v["pass"] is None for v in t.values())  # the targets are a GPU's
    assert math.isfinite(t["paper_schedule_h"]["value"]) and t["sample_ged_s"]["crops"] == 16
