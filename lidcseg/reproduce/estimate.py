"""How long each stage of ``lidcseg reproduce`` should take: the figures and the arithmetic.

A training stage costs ``steps x step_s(model)`` plus its validations
(``steps / val_every`` of them, each ``val_max_crops`` crops sampled
``val_samples`` times); an evaluation costs, per crop, the sampling of every model
plus the metrics; prepare costs a constant per scan. The figures:

* **cpu-quick** (:data:`CPU_STEP_S`, :data:`CPU_SAMPLE_S`, :data:`CPU_DATA_S`): measured
  on the 2-core machine of the demo with one torch thread, by
  ``benchmarks/reproduce_costs.py`` (``benchmarks/results/reproduce_costs.json``): one
  training step of each model at the preset's batch of 16 at 64 x 64, and 16 samples of 16
  crops, in CPU time (what one thread takes on an idle machine; the machine was shared).
* **paper** (:data:`GPU_STEP_S`): no GPU measurement is stored in this repository. The
  figure assumed is 0.05 s per step of the Prob. U-Net at batch 32 on 128 x 128 tiles on
  one current data-centre GPU (eager, fp32); the other models are scaled by their CPU ratio
  to the Prob. U-Net, and ``torchrun`` over W GPUs divides the training time by W.
  ``benchmarks/train_step.py`` measures the real figure on a GPU machine.
* **prepare**: :data:`PREPARE_S_PER_SCAN`, from ``benchmarks/results/prepare.json`` (10
  phantom scans, one worker); real LIDC scans are larger (assumed :data:`LIDC_SCAN_FACTOR`
  times). Before prepare has run, a split's crop count is guessed from the scans
  (:data:`CROPS_PER_SCAN`, :data:`TEST_FRACTION`); afterwards the manifest's counts are used.
"""

from __future__ import annotations

#: cpu-quick: seconds per training step (batch 16, 64 x 64, one thread), per model name
#: (benchmarks/results/reproduce_costs.json; M-Heads at 4 heads).
CPU_STEP_S: dict[str, float] = {
    "probunet": 0.43, "dropout-unet": 0.37, "unet-ensemble": 4.07, "m-heads": 0.29, "i2i-vae": 0.32,
    "fixed-prior": 0.32, "fixed-prior-no-context": 0.32, "early-injection": 0.38,
}
#: M-Heads' step grows with the heads: seconds per step per head beyond the first 4.
CPU_STEP_S_PER_HEAD = 0.015
#: cpu-quick: seconds per step of loading and augmenting a batch of 16 LIDC crops in the
#: training process (num_workers 0): a whole 300-step Prob. U-Net run took 205 s of CPU
#: time, 0.68 s per step, of which the model's step is 0.43 s.
CPU_DATA_S = 0.24
#: cpu-quick: seconds to draw 16 samples of one 64 x 64 crop, per model name.
CPU_SAMPLE_S: dict[str, float] = {
    "probunet": 0.010, "dropout-unet": 0.19, "unet-ensemble": 0.071, "m-heads": 0.010, "i2i-vae": 0.067,
    "fixed-prior": 0.0067, "fixed-prior-no-context": 0.0067, "early-injection": 0.068,
}
#: scenes-quick on flip scenes (batch 16 at 32 x 64, no augmentation): seconds per step. Measured
#: at batch 8 (0.055 and 0.048), times 1.65, the ratio of batch 16 to 8 measured on another
#: machine (issue #13: 0.064 s against 0.039 s of CPU per step).
SCENES_STEP_S: dict[str, float] = {"probunet": 0.091, "dropout-unet": 0.079}
#: scenes-quick's prior refit (2 scenes, 256 draws a step, validations included): seconds per
#: refit step, CPU (issue #13: 300 steps in 125 s, two runs side by side on 2 cores).
SCENES_REFIT_STEP_S = 0.42
#: Draws x images x pixels of that measurement; other refits are scaled by theirs.
SCENES_REFIT_SIZE = 256 * 2 * 32 * 64
#: Seconds to start a training (imports, data, model) and write its checkpoints, CPU.
TRAIN_START_S = 5.0
#: Assumed seconds per training step of the Prob. U-Net, paper preset, one GPU (see above).
GPU_STEP_S = 0.05
#: Assumed ratio of a GPU's sampling speed to one CPU thread's, at the paper's sizes.
GPU_SPEEDUP = 200.0
#: The paper's tiles (128 x 128, 5 scales, base 32) cost this many times cpu-quick's per crop.
PAPER_SIZE_FACTOR = 16.0
#: Seconds per phantom scan of ``lidcseg prepare`` with one worker (benchmarks/results/prepare.json).
PREPARE_S_PER_SCAN = 2.6
#: Real LIDC scans against the phantom's small ones (assumed).
LIDC_SCAN_FACTOR = 3.0
#: Crops per scan, to guess the split sizes before prepare (phantom demo: 418 crops / 10 scans).
CROPS_PER_SCAN = 42.0
#: Share of the patients in val and in test each (144 of 1010).
TEST_FRACTION = 144 / 1010
#: Seconds of the metrics (IoU matrix, Hungarian matching) per crop and model row.
METRIC_S_PER_CROP = 0.01
#: Constant seconds of the small stages (loading, figures), CPU.
STAGE_S: dict[str, float] = {"evaluate": 4.0, "ambiguity": 2.0, "latent": 2.0, "scenes": 5.0,
                             "cityscapes": 600.0, "calibration": 20.0, "cases": 2.0, "report": 5.0}


def step_s(model: str, num_heads: int, preset: str, task: str = "lidc") -> float:
    """Seconds per training step of ``model`` with ``preset`` on ``task`` (one process), data included."""
    if task != "lidc":
        cpu = SCENES_STEP_S.get(model, SCENES_STEP_S["probunet"])
        return cpu if preset == "cpu-quick" else GPU_STEP_S * 2.0 * cpu / SCENES_STEP_S["probunet"]
    cpu = CPU_STEP_S.get(model, CPU_STEP_S["probunet"])
    if model == "m-heads":
        cpu += CPU_STEP_S_PER_HEAD * max(0, num_heads - 4)
    return cpu + CPU_DATA_S if preset == "cpu-quick" else GPU_STEP_S * cpu / CPU_STEP_S["probunet"]


def sample_s(model: str, preset: str, n: int = 16) -> float:
    """Seconds to draw ``n`` samples of one crop with ``model`` (cpu-quick on CPU, paper on GPU)."""
    cpu = CPU_SAMPLE_S.get(model, CPU_SAMPLE_S["probunet"]) * n / 16
    return cpu if preset == "cpu-quick" else cpu * PAPER_SIZE_FACTOR / GPU_SPEEDUP


def train_s(model: str, num_heads: int, preset: str, steps: int, val_every: int, val_crops: int,
            val_samples: int, world: int = 1, task: str = "lidc") -> float:
    """Seconds of one training: its steps (over ``world`` processes) and its validations."""
    n_val = (steps // val_every if val_every > 0 else 0) + 1
    return (TRAIN_START_S + steps * step_s(model, num_heads, preset, task) / max(1, world)
            + n_val * val_crops * sample_s(model, preset, val_samples))


def refit_s(steps: int, samples: int, batch: int, pixels: int, preset: str) -> float:
    """Seconds of a prior refit after training (:mod:`lidcseg.training.prior_refit`): ``steps``
    of ``batch`` images of ``pixels`` pixels with ``samples`` draws each, scaled from scenes-quick's."""
    seconds = steps * SCENES_REFIT_STEP_S * samples * batch * pixels / SCENES_REFIT_SIZE
    return seconds if preset == "cpu-quick" else seconds / GPU_SPEEDUP


def prepare_s(scans: int, workers: int, preset: str) -> float:
    """Seconds of ``lidcseg prepare`` on ``scans`` scans with ``workers`` processes (one core
    goes to the parent: 2 workers on 2 cores measured no faster than one)."""
    import os

    factor = 1.0 if preset == "cpu-quick" else LIDC_SCAN_FACTOR
    return scans * PREPARE_S_PER_SCAN * factor / max(1, min(workers, os.cpu_count() or 1) - 1)


def crops_guess(scans: int) -> int:
    """Crops of the test (or val) split guessed from the number of scans."""
    return max(1, round(scans * CROPS_PER_SCAN * TEST_FRACTION))


def sampling_s(models: list[str], crops: int, preset: str, n: int, per_count: int = 1) -> float:
    """Seconds to sample ``n`` hypotheses of ``crops`` crops with every model and score them."""
    per_crop = sum(sample_s(m, preset, n) * (per_count if m == "unet-ensemble" else 1) for m in models)
    return crops * (per_crop + METRIC_S_PER_CROP * len(models))
