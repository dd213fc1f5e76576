"""Calibration on a known distribution: the flip task of Kohl et al. 2018 (Section 4.2, Appendix C).

Each test scene has exactly 32 correct segmentations, the modes Y_k of
:mod:`lidcseg.flips`, with known probabilities w_k. A model's samples are
scored against that exact mixture in three ways.

The metrics (the distance, Eq. 7 against the mixture, mode-wise frequencies of
Fig. 5 and pixel-wise marginals) are :mod:`lidcseg.metrics.flips`.

A model only needs ``sample(x, n, generator=None) -> (B, n, C, H, W)``
logits with C = 24; :class:`FlipOracle` is a fake model that samples the true
distribution (correlation ~ 1, small errors: the floor of each number at a
finite sample count). :func:`validate_flip_task` is the validation ``lidcseg
train`` runs on this task; :func:`calibrate_runs` is ``lidcseg calibration``.
Nothing here prints: progress goes to ``progress(stage, done, total)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.device import resolve_device
from lidcseg.errors import LidcsegError
from lidcseg.flips import (
    CLASS_NAMES,
    EVAL_CLASSES,
    FLIP_PROBS,
    IGNORE_INDEX,
    NUM_CLASSES,
    NUM_MODES,
    NUM_SWITCHES,
    SWITCHES,
    check_unflipped,
    flips_to_mode,
    mode_flips,
    mode_labels,
    mode_name,
    mode_probabilities,
)
from lidcseg.metrics.flips import (
    DEFAULT_COUNTS,
    DEFAULT_SAMPLES,
    PAPER_GED,
    CalibrationAccumulator,
    switch_counts,
)

#: Label of the oracle's row in the reports.
ORACLE_LABEL = "oracle"

Progress = Callable[[str, int, int], None]


def posterior_switch_accuracy(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    ignore: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    min_pixels: int = 1,
) -> dict[str, Any]:
    """Which flips the posterior net encodes: a diagnosis of miscalibrated modes.

    For every scene and every one of the 32 modes Y_k, the posterior-mean
    reconstruction S(X, mu_post(X, Y_k)) (``model.reconstruct``) is compared with
    Y_k switch by switch: switch i is *right* when more of its region R_i is
    labelled with Y_k's class for it (original or twin) than with the other one.
    A switch at 0.5 is not encoded at all: the decoder answers the same whatever
    the posterior saw, so the prior's samples cannot get its frequency right
    either. Only switches present with at least ``min_pixels`` pixels count.

    Args:
        model: with ``reconstruct(x, y, ignore) -> (B, C, H, W)`` logits.
        images: (N, 3, H, W) uint8 RGB or normalised float; labels (N, H, W)
            un-flipped trainIds; ignore (N, H, W) bool.

    Returns:
        ``{"per_switch": [{"class", "accuracy", "cases"}], "all_right": share of
        (scene, mode) pairs with every present switch right, "cases": pairs}``.
    """
    from lidcseg.data.scenes import normalize_rgb

    labels = labels.masked_fill(ignore, 0).to(torch.int64)
    check_unflipped(labels, "labels")
    bits = torch.as_tensor(mode_flips())  # (32, 5)
    right = torch.zeros(NUM_SWITCHES, dtype=torch.float64)
    cases = torch.zeros(NUM_SWITCHES, dtype=torch.float64)
    all_right, pairs = 0.0, 0
    if hasattr(model, "eval"):
        model.eval()
    with torch.no_grad():
        for s in range(0, labels.shape[0], batch_size):
            x = images[s : s + batch_size]
            x = (normalize_rgb(x) if x.dtype == torch.uint8 else x).to(device)
            lab, ign = labels[s : s + batch_size], ignore[s : s + batch_size]
            modes = mode_labels(lab)  # (b, 32, H, W)
            for k in range(NUM_MODES):
                rec = model.reconstruct(x, modes[:, k].to(device), ign.to(device)).argmax(1).cpu()
                c = switch_counts(rec[:, None], lab, ign)
                present = c.region >= max(1, min_pixels)  # (b, 5)
                said_twin = c.hit_twin[:, 0] > c.hit_original[:, 0]
                ok = (said_twin == bits[k][None]) & present
                right += ok.sum(0).double()
                cases += present.sum(0).double()
                all_right += float((ok | ~present).all(1).sum())
                pairs += lab.shape[0]
    return {
        "per_switch": [{"class": sw.name, "accuracy": float(right[i] / cases[i]) if cases[i] else math.nan,
                        "cases": int(cases[i])} for i, sw in enumerate(SWITCHES)],
        "all_right": all_right / pairs if pairs else math.nan,
        "cases": pairs,
    }


# -- models ---------------------------------------------------------------------------------


def _image_key(x: torch.Tensor) -> bytes:
    return hashlib.blake2b(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).digest()


class FlipOracle(torch.nn.Module):
    """A fake model that knows every scene's un-flipped label and samples the flips' distribution.

    ``sample(x, n, generator)`` looks each image up (by its exact pixel values),
    draws independent flips with probabilities ``probs`` per sample and returns
    one-hot logits (B, n, 24, H, W). With the true probabilities it is the
    perfectly calibrated model: its numbers are the floor of each metric at a
    finite sample count.

    Args:
        images: (N, 3, H, W) the model inputs it will be asked about (uint8 RGB is
            normalised as the datasets do).
        labels: (N, H, W) un-flipped trainIds (255 at ignored pixels is read as 0).
        probs: (5,) flip probabilities (default: the truth); others give a miscalibrated model.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, probs: np.ndarray | None = None) -> None:
        super().__init__()
        self.labels = labels.to(torch.int64).masked_fill(labels == IGNORE_INDEX, 0)
        self.probs = torch.tensor(np.array(FLIP_PROBS if probs is None else probs, dtype=np.float64))
        from lidcseg.data.scenes import normalize_rgb

        self._index = {_image_key(normalize_rgb(img) if img.dtype == torch.uint8 else img): i
                       for i, img in enumerate(images)}

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, n, 24, H, W) one-hot logits of flipped labels."""
        rows = []
        for img in x:
            key = _image_key(img)
            if key not in self._index:
                raise LidcsegError("the oracle was asked about an image it does not know")
            rows.append(self._index[key])
        flips = torch.rand((x.shape[0], n, NUM_SWITCHES), generator=generator, dtype=torch.float64) < self.probs
        modes = torch.as_tensor(flips_to_mode(flips.numpy()))  # (B, n)
        every = mode_labels(self.labels[rows])  # (B, 32, H, W)
        chosen = torch.gather(every, 1, modes[:, :, None, None].expand(-1, -1, *every.shape[2:]))
        out = torch.zeros((x.shape[0], n, NUM_CLASSES, *chosen.shape[2:]))
        out.scatter_(2, chosen[:, :, None], 1.0)
        return out.to(x.device)


def draw_label_samples(
    model: Any, x: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` sampled label maps per image: (B, 3, H, W) -> (B, n, H, W) int64 (argmax of the logits).

    Raises:
        LidcsegError: the model returns another shape or not the task's 24 classes.
    """
    logits = model.sample(x, n, generator=generator)
    if logits.ndim != 5 or logits.shape[:2] != (x.shape[0], n) or logits.shape[3:] != x.shape[2:]:
        raise LidcsegError(f"{type(model).__name__}.sample returned shape {tuple(logits.shape)}, "
                           f"expected ({x.shape[0]}, {n}, {NUM_CLASSES}, {x.shape[2]}, {x.shape[3]})")
    if logits.shape[2] != NUM_CLASSES:
        raise LidcsegError(f"the model predicts {logits.shape[2]} classes; the flip task has {NUM_CLASSES}")
    return logits.argmax(dim=2)


# -- validation during training ------------------------------------------------------------------


@torch.no_grad()
def validate_flip_task(
    model: Any,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_samples: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Validation of ``lidcseg train`` on the flip task: Eq. 7 at ``n_samples`` and calibration.

    Args:
        model: a harness model (``sample``), put in eval mode here.
        batches: ``(images (b, 3, H, W), labels (b, H, W) un-flipped, ignore (b, H, W))``
            (:meth:`lidcseg.data.scenes.SceneEvalDataset.batches`).
        n_samples: samples per scene (the paper: 16).
        device: where the model runs.
        generator: the latent noise (seed it identically at every call to compare checkpoints).
        autocast: e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``.
        channels_last: feed the images channels-last.

    Returns:
        ``ged``, ``diversity`` (E d(S,S')), ``graders`` (E d(Y,Y') over the modes),
        ``cross`` (E d(S,Y)), ``pixels_varying``, ``mode_r``, ``mode_mae``,
        ``flip_mae``, ``crops``, ``samples``, ``time_s`` - the keys of the LIDC
        validation plus the calibration numbers.
    """
    t0 = time.perf_counter()
    if hasattr(model, "eval"):
        model.eval()
    acc = CalibrationAccumulator(counts=(n_samples,), samples=n_samples)
    varying = 0.0
    for images, labels, ignore in batches:
        x = images.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast if autocast is not None else contextlib.nullcontext():
            samples = draw_label_samples(model, x, n_samples, generator).cpu()
        acc.update(samples, labels, ignore)
        varying += float(((samples != samples[:, :1]).any(1) & ~ignore).flatten(1).float().mean(1).sum())
    res = acc.result()
    g = res["ged"][str(n_samples)]
    return {"ged": g["mean"], "diversity": g["diversity"], "graders": g["modes"], "cross": g["cross"],
            "pixels_varying": varying / max(acc.images, 1), "mode_r": res["modes"]["pearson_r"],
            "mode_mae": res["modes"]["mae"], "flip_mae": res["pixels"]["mae"],
            "crops": float(acc.images), "samples": float(n_samples), "time_s": time.perf_counter() - t0}


# -- evaluating runs -----------------------------------------------------------------------------


@dataclass
class FlipModel:
    """A model to calibrate.

    Attributes:
        label: display name (the run folder's name, or ``oracle``).
        model: anything with ``sample(x, n, generator=None) -> (B, n, 24, H, W)``.
        info: JSON-ready description (checkpoint, step, config).
    """

    label: str
    model: Any
    info: dict[str, Any] = field(default_factory=dict)


def load_flip_model(run: str | Path, device: torch.device | str = "cpu") -> FlipModel:
    """Load a ``lidcseg train`` run (``best/``, else ``last/``) or a checkpoint folder.

    Raises:
        LidcsegError: not a run or checkpoint, or a model that is not of the
            flip task (24 classes, 3 input channels).
    """
    from lidcseg.models.checkpoint import CONFIG_FILE, checkpoint_dir, load_checkpoint

    path = Path(run)
    if not path.exists():
        raise LidcsegError("run directory or checkpoint not found", path)
    folder = checkpoint_dir(path)
    if not _is_checkpoint(folder / CONFIG_FILE):
        for name in ("best", "last"):
            if _is_checkpoint(folder / name / CONFIG_FILE):
                folder = folder / name
                break
        else:
            raise LidcsegError("not a run directory (no best/ or last/ checkpoint) nor a checkpoint", path)
    ckpt = load_checkpoint(folder, device=device)
    cfg = ckpt.config
    if cfg.num_classes != NUM_CLASSES or cfg.in_channels != 3:
        raise LidcsegError(f"model has {cfg.in_channels} input channels and {cfg.num_classes} classes; "
                           f"the flip task needs 3 and {NUM_CLASSES}", folder)
    label = (path.parent.name if path.name in ("best", "last") else path.name) or str(path)
    info = {"checkpoint": str(folder), "name": cfg.name, "step": ckpt.meta.get("step"),
            "val": ckpt.meta.get("val"), "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    return FlipModel(label, ckpt.model, info)


def _is_checkpoint(path: Path) -> bool:
    import json

    try:
        return json.loads(path.read_text()).get("format") == "lidcseg-checkpoint"
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Examples:
    """Scenes kept for the figure.

    Attributes:
        rows: row of each scene in the split file.
        images: (k, 3, H, W) uint8 RGB.
        labels: (k, H, W) int64 un-flipped; ignore: (k, H, W) bool.
        samples: run label -> (k, n, H, W) int64 sampled label maps.
    """

    rows: list[int]
    images: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    samples: dict[str, np.ndarray] = field(default_factory=dict)


def calibrate_model(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    ignore: torch.Tensor,
    *,
    counts: Sequence[int] = DEFAULT_COUNTS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    min_pixels: int = 1,
    keep: Sequence[int] = (),
    progress: Progress | None = None,
    stage: str = "sampling",
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """All calibration numbers of one model on scenes in memory.

    Draws ``max(max(counts), samples)`` samples per scene ONCE (latents from a
    ``torch.Generator`` seeded with ``seed``, consumed batch by batch); the GED
    at n uses the first n, the mode and pixel statistics the first ``samples``.

    Args:
        model: ``sample(x, n, generator=None) -> (B, n, 24, H, W)``.
        images: (N, 3, H, W) model inputs, float, or uint8 RGB normalised batch by
            batch (:func:`lidcseg.data.scenes.normalize_rgb`; 6x less memory).
        labels: (N, H, W) un-flipped trainIds (any value at ignored pixels).
        ignore: (N, H, W) bool.
        keep: positions whose samples are returned for the figure.

    Returns:
        ``(result, kept)``: :meth:`CalibrationAccumulator.result` plus ``per_image_ged``
        (count -> list), and position -> (n, H, W) int64 samples for ``keep``.
    """
    from lidcseg.data.scenes import normalize_rgb

    labels = labels.masked_fill(ignore, 0)
    check_unflipped(labels, "labels")
    acc = CalibrationAccumulator(counts, samples, min_pixels)
    gen = torch.Generator().manual_seed(int(seed))
    keep_set, kept = set(keep), {}
    if hasattr(model, "eval"):
        model.eval()
    n_img = images.shape[0]
    for s in range(0, n_img, batch_size):
        e = min(s + batch_size, n_img)
        x = images[s:e]
        x = normalize_rgb(x) if x.dtype == torch.uint8 else x
        draws = draw_label_samples(model, x.to(device), acc.n_draw, gen).cpu()
        acc.update(draws, labels[s:e].to(torch.int64), ignore[s:e])
        for i in range(s, e):
            if i in keep_set:
                kept[i] = draws[i - s].numpy()
        if progress is not None:
            progress(stage, e, n_img)
    result = acc.result()
    result["per_image_ged"] = {str(n): acc.per_image_ged(n).tolist() for n in acc.counts}
    return result, kept


def choose_examples(labels: torch.Tensor, ignore: torch.Tensor, k: int) -> list[int]:
    """``k`` scenes for the figure: evenly spaced among those with all five classes present."""
    if k <= 0:
        return []
    present = torch.stack([((labels == sw.original) & ~ignore).flatten(1).any(1) for sw in SWITCHES], 1)
    full = torch.nonzero(present.all(1)).flatten().numpy()
    pool = full if full.size else np.arange(labels.shape[0])
    idx = np.unique(np.linspace(0, pool.size - 1, min(k, pool.size)).round().astype(int))
    return [int(pool[i]) for i in idx]


def calibrate_runs(
    data_dir: str | Path,
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    split: str = "test",
    counts: Sequence[int] = DEFAULT_COUNTS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 4,
    max_images: int | None = None,
    oracle: bool = False,
    min_pixels: int = 1,
    examples: int = 3,
    posterior_scenes: int = 20,
    threads: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``lidcseg calibration``: calibrate every run (and optionally the oracle) and write the report.

    Runs with a posterior net (``reconstruct``) also get
    :func:`posterior_switch_accuracy` on the first ``posterior_scenes`` scenes
    (0: skip), the diagnosis of which flips the model has learned to encode.

    Writes ``calibration.json``, ``calibration.md``, ``modes.png`` (Fig. 5),
    ``marginals.png`` (pixel-wise marginals), ``ged.png`` (GED vs samples with
    the paper's Table 2) and ``examples.png`` into ``out``.

    Returns:
        The JSON report.

    Raises:
        LidcsegError: no runs (and no oracle), a data folder that is not the flip
            task, a missing split, a run that is not a flip-task model.
    """
    from lidcseg.data.scenes import SceneEvalDataset, read_manifest, split_path
    from lidcseg.evaluation import torch_threads

    if not runs and not oracle:
        raise LidcsegError("no run given (--run RUN, or --oracle)")
    manifest = read_manifest(data_dir)
    ds = SceneEvalDataset(split_path(data_dir, split), limit=max_images)
    if len(ds) == 0:
        raise LidcsegError(f"split {split!r} has no scenes", split_path(data_dir, split))
    dev = resolve_device(device)
    t0 = time.perf_counter()
    with torch_threads(threads):
        models = [load_flip_model(r, dev) for r in runs]
        _unique_labels(models)
        raw_images, raw_labels = ds.arrays()  # uint8: 6x less memory than float inputs
        images, labels = torch.from_numpy(raw_images), torch.from_numpy(raw_labels)
        ignore = labels == IGNORE_INDEX
        if oracle:
            models.append(FlipModel(ORACLE_LABEL, FlipOracle(images, labels),
                                    {"name": "oracle", "note": "samples the true flip distribution"}))
        keep = choose_examples(labels, ignore, examples)
        ex = Examples([int(ds.indices[i]) for i in keep], raw_images[keep],
                      labels[keep].masked_fill(ignore[keep], 0).long().numpy(), ignore[keep].numpy())
        results = []
        for j, m in enumerate(models):
            t_run = time.perf_counter()
            res, kept = calibrate_model(
                m.model, images, labels, ignore, counts=counts, samples=samples, seed=seed,
                batch_size=batch_size, device=dev, min_pixels=min_pixels, keep=keep,
                progress=progress, stage=f"{m.label} ({j + 1}/{len(models)})")
            if keep:
                ex.samples[m.label] = np.stack([kept[i] for i in keep])
            if posterior_scenes > 0 and hasattr(m.model, "reconstruct"):
                if progress is not None:
                    progress(f"{m.label}: posterior", 0, 1)
                k = min(posterior_scenes, images.shape[0])
                res["posterior"] = posterior_switch_accuracy(
                    m.model, images[:k], labels[:k], ignore[:k], batch_size=batch_size, device=dev,
                    min_pixels=min_pixels)
            results.append({"label": m.label, "info": m.info, **res,
                            "time_s": time.perf_counter() - t_run})
    report = {
        "data": {"dir": str(Path(data_dir).resolve()), "split": split, "source": manifest.get("source"),
                 "scenes": len(ds), "height": ds.height, "width": ds.width},
        "protocol": {"switches": [{"class": s.name, "original": s.original, "twin": s.flipped,
                                   "probability": s.probability} for s in SWITCHES],
                     "classes": list(CLASS_NAMES), "eval_classes": list(EVAL_CLASSES),
                     "mode_probabilities": mode_probabilities().tolist()},
        "settings": {"counts": sorted(set(int(c) for c in counts)), "samples": samples, "seed": seed,
                     "min_pixels": min_pixels, "device": str(dev), "ged": "V-statistic (Eq. 7)",
                     "posterior_scenes": posterior_scenes},
        "paper_ged": {str(k): v for k, v in PAPER_GED.items()},
        "runs": results,
        "time_s": time.perf_counter() - t0,
    }
    write_calibration(report, ex, out)
    return report


def _unique_labels(models: list[FlipModel]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        seen[m.label] = seen.get(m.label, 0) + 1
        if seen[m.label] > 1:
            m.label = f"{m.label}#{seen[m.label]}"


# -- the report -----------------------------------------------------------------------------------


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as markdown: GED table with the paper's Table 2, modes, marginals."""
    from lidcseg.reports.tables import fmt, markdown_table

    d, runs = report["data"], report["runs"]
    counts = report["settings"]["counts"]
    lines = [
        "# Calibration on the flip task (Kohl et al. 2018, Section 4.2, Appendix C)",
        "",
        f"Data: {d['source']} `{d['split']}` split, {d['scenes']} scenes of {d['height']}x{d['width']}. "
        f"Samples per scene: {report['settings']['samples']} (modes and marginals); "
        f"seed {report['settings']['seed']}.",
        "",
        "## GED against the exact 32-mode mixture (Eq. 7)",
        "",
        "d = 1 - mean IoU over the 10 switchable classes present; V-statistic for E[d(S,S')]. "
        "Mean over scenes (± s.e.m.).",
        "",
    ]
    headers = ["model", *[f"GED@{n}" for n in counts]]
    rows = [[r["label"], *[f"{fmt(r['ged'][str(n)]['mean'])} ± {fmt(r['ged'][str(n)]['sem'])}"
                           for n in counts]] for r in runs]
    rows.append(["paper Prob. U-Net (Table 2)", *[fmt(PAPER_GED.get(n)) if n in PAPER_GED else "–"
                                                   for n in counts]])
    lines += [markdown_table(headers, rows), ""]
    lines += ["## Mode-wise frequencies (Fig. 5)", "",
              "Each sample matched to its closest mode by d; scenes with all five switchable classes "
              "present only.", ""]
    rows = [[r["label"], r["modes"]["scenes"], r["modes"]["matched_samples"],
             fmt(r["modes"]["pearson_r"]), fmt(r["modes"]["mae"], 4), fmt(r["modes"]["max_abs_error"], 4)]
            for r in runs]
    lines += [markdown_table(["model", "scenes", "samples", "Pearson r", "MAE", "max |error|"], rows), ""]
    mode_rows = []
    for k in np.argsort(-np.asarray(report["protocol"]["mode_probabilities"]), kind="stable"):
        row = runs[0]["modes"]["per_mode"][k] if runs else None
        mode_rows.append([int(k), row["flipped"] if row else mode_name(int(k)),
                          f"{100 * report['protocol']['mode_probabilities'][k]:.2f}%",
                          *[f"{100 * r['modes']['per_mode'][k]['frequency']:.2f}%" for r in runs]])
    lines += [markdown_table(["mode", "flipped", "true", *[r["label"] for r in runs]], mode_rows), ""]
    lines += ["## Pixel-wise marginals p(twin | original class) (Figs. 8-10)", ""]
    headers = ["class", "truth", *[r["label"] for r in runs]]
    rows = []
    for i, sw in enumerate(SWITCHES):
        rows.append([f"{sw.name} → {sw.name} 2", f"{sw.probability:.3f}",
                     *[fmt(r["pixels"]["per_class"][i]["p_twin"]) for r in runs]])
    rows.append(["mean abs error", "", *[fmt(r["pixels"]["mae"], 4) for r in runs]])
    lines += [markdown_table(headers, rows), ""]
    with_post = [r for r in runs if r.get("posterior")]
    if with_post:
        lines += ["## Which flips the posterior encodes", "",
                  "Share of (scene, mode) pairs where the posterior-mean reconstruction S(X, mu_post(X, Y_k)) "
                  "gets the switch right (0.5: not encoded, so the prior's samples cannot be calibrated "
                  f"for it); first {report['settings'].get('posterior_scenes')} scenes, all 32 modes.", ""]
        rows = [[sw.name, *[fmt(r["posterior"]["per_switch"][i]["accuracy"]) for r in with_post]]
                for i, sw in enumerate(SWITCHES)]
        rows.append(["all five right", *[fmt(r["posterior"]["all_right"]) for r in with_post]])
        lines += [markdown_table(["switch", *[r["label"] for r in with_post]], rows), ""]
    lines += ["Figures: `ged.png`, `modes.png`, `marginals.png`, `examples.png`.", ""]
    return "\n".join(lines)


def write_calibration(report: Mapping[str, Any], examples: Examples | None, out: str | Path) -> list[Path]:
    """Write ``calibration.json``, ``calibration.md`` and the figures into ``out``."""
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
    from lidcseg.reports import calibration_plots as plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    truth = np.asarray(report["protocol"]["mode_probabilities"])
    written = [out / "calibration.json", out / "calibration.md"]
    write_json_atomic(written[0], _json_safe(report))
    write_bytes_atomic(written[1], markdown_report(report).encode())
    counts = report["settings"]["counts"]
    written.append(plots.plot_ged(
        counts, {r["label"]: [r["ged"][str(n)]["mean"] for n in counts] for r in runs},
        {r["label"]: [r["ged"][str(n)]["sem"] for n in counts] for r in runs}, PAPER_GED,
        out / "ged.png"))
    written.append(plots.plot_mode_frequencies(
        truth, {r["label"]: np.asarray([m["frequency"] for m in r["modes"]["per_mode"]]) for r in runs},
        {r["label"]: (r["modes"]["pearson_r"], r["modes"]["mae"]) for r in runs}, out / "modes.png"))
    written.append(plots.plot_pixel_marginals(
        [s.name for s in SWITCHES], FLIP_PROBS,
        {r["label"]: np.asarray([p["p_twin"] for p in r["pixels"]["per_class"]]) for r in runs},
        out / "marginals.png"))
    if examples is not None and examples.rows and examples.samples:
        written.append(plots.plot_flip_examples(examples, out / "examples.png"))
    return written


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
