"""What each stage of ``lidcseg reproduce`` calls: one library function per stage.

Every stage function takes the :class:`Context` and its :class:`~lidcseg.reproduce.plan.Stage`,
writes into the stage's folder through the library function that owns that output
(each checks its own folder: :mod:`lidcseg.io.outputs`), and returns the ``detail`` that
plan.json and the completion record keep. Progress goes to ``ctx.progress(stage, model,
step, steps)``; nothing prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidcseg.reproduce.options import M_HEADS_KEYS, ReproduceOptions
from lidcseg.reproduce.plan import Plan, Stage, last_step

#: ``progress(stage, model, step, steps, kind)``: kind ``progress`` or ``checkpoint`` (a
#: training's ``last/`` written at ``step``).
StageProgress = Callable[[str, str | None, int, int, str], None]
#: The Fig. 6 figure in ``OUT/latent``.
LATENT_PNG = "latent.png"


@dataclass
class Context:
    """What every stage needs: the plan, the options and where progress goes."""

    plan: Plan
    options: ReproduceOptions
    progress: StageProgress

    @property
    def out(self) -> Path:
        """The reproduction's output folder."""
        return self.plan.out

    def folder(self, name: str) -> Path:
        """The folder of the stage called ``name``."""
        return self.plan.stage(name).path(self.out)

    @property
    def data(self) -> Path:
        """The LIDC crops: ``OUT/data``, or the folder given with ``--data``."""
        return self.folder("prepare")

    def runs(self, stage: Stage) -> dict[str, Path]:
        """Run key -> run folder of the training stages ``stage`` reads, in plan order."""
        return {self.plan.stage(n).key or n: self.folder(n) for n in stage.needs
                if self.plan.stage(n).kind == "train"}

    def reporter(self, stage: Stage, model: str | None = None) -> Callable[[str, int, int], None]:
        """A library ``progress(what, done, total)`` callback feeding :attr:`progress`."""
        return lambda what, done, total: self.progress(stage.name, model or what, done, total, "progress")


def run_stage(ctx: Context, stage: Stage) -> dict[str, Any]:
    """Run ``stage``; its detail for plan.json."""
    return STAGES[stage.kind](ctx, stage)


def _prepare(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.config import DataConfig
    from lidcseg.data.prepare import prepare

    assert ctx.options.lidc_root is not None
    report = ctx.reporter(stage, "scans")
    manifest = prepare(ctx.options.lidc_root, stage.path(ctx.out), DataConfig(),
                       patients=ctx.options.patients, workers=ctx.options.workers,
                       on_scan=lambda r, done, total: report("scans", done, total))
    return {"crops": manifest["total_crops"], "counts": manifest["counts"],
            "skipped": len(manifest.get("skipped") or [])}


def _train(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.data.scenes import TASK as SCENES_TASK
    from lidcseg.presets import base_preset
    from lidcseg.training import TrainEvent, train

    assert stage.configs is not None and stage.key is not None
    model_cfg, train_cfg = stage.configs
    run_dir = stage.path(ctx.out)
    data = ctx.folder(stage.needs[0])
    start = last_step(run_dir)
    resume = start is not None
    # A folder without a checkpoint is a run killed before its first one (or only our record):
    # train replaces it, and only if it is a lidcseg run (anything else is refused).
    overwrite = not resume and run_dir.is_dir() and any(run_dir.iterdir())
    best: dict[str, float] = {}

    def on_event(e: TrainEvent) -> None:
        if e.kind == "step":
            ctx.progress(stage.name, stage.key, e.step, e.steps, "progress")
        elif e.kind == "val" and e.metrics.get("ged", float("inf")) < best.get("ged", float("inf")):
            best.update(ged=float(e.metrics["ged"]), step=float(e.step))
        elif e.kind == "checkpoint" and e.path is not None and e.path.name == "last":
            ctx.progress(stage.name, stage.key, e.step, e.steps, "checkpoint")

    train(data, model_cfg, train_cfg, run_dir, resume=resume, overwrite=overwrite, callback=on_event,
          preset=base_preset(ctx.options.preset, SCENES_TASK if stage.name.startswith("flip:") else "lidc"))
    return {"key": stage.key, "model": model_cfg.name, "steps": train_cfg.steps, "resumed_from": start,
            "best_val_ged": best.get("ged"), "best_step": int(best["step"]) if best else None}


def _evaluate(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.evaluation import evaluate_runs

    runs = ctx.runs(stage)
    ev = evaluate_runs(ctx.data, list(runs.values()), counts=ctx.options.counts, out=stage.path(ctx.out),
                       device=ctx.options.device, m_heads="matched", progress=ctx.reporter(stage))
    top = max(ev.counts)
    return {"counts": list(ev.counts), "images": len(ev.split), "reference": ev.reference,
            "rows": [{"label": r.label, "model": r.model,
                      "ged": {str(n): float(r.values("ged", n).mean()) for n in ev.counts},
                      "hm_iou": float(r.values("hm_iou", top).mean())} for r in ev.results],
            "comparisons": len(ev.comparisons)}


def _ambiguity(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.ambiguity import ambiguity_runs

    runs = ctx.runs(stage)
    info = ambiguity_runs(ctx.data, list(runs.values()), out=stage.path(ctx.out), n=max(ctx.options.counts),
                          device=ctx.options.device, progress=ctx.reporter(stage))
    return {"n": max(ctx.options.counts),
            "runs": [{"label": r["label"], "threshold": r["threshold"], "accuracy": r["test"]["accuracy"],
                      "balanced_accuracy": r["test"]["balanced_accuracy"]} for r in info["runs"]]}


def latent_crop(data: Path, input_size: int) -> int:
    """The test crop of Fig. 6: the one all graders marked, most differently (mean pairwise
    1 - IoU of the masks); any crop if none was marked by all."""
    from lidcseg.data.eval_split import load_split
    from lidcseg.evaluation import grader_disagreement

    split = load_split(data, "test", input_size)
    score = grader_disagreement(split.masks).numpy()
    marked = split.masks.flatten(2).any(-1).all(1).numpy()
    pool = score.copy()
    if marked.any():
        pool[~marked] = -1.0
    return int(split.rows[int(pool.argmax())])


def _latent(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.latent import latent_figure

    run = ctx.runs(stage)["probunet"]
    configs = ctx.plan.stage("train:probunet").configs
    assert configs is not None
    report = ctx.reporter(stage, "decode grid")
    report("choose crop", 0, 1)
    index = latent_crop(ctx.data, configs[1].input_size)
    folder = stage.path(ctx.out)
    folder.mkdir(parents=True, exist_ok=True)
    report("decode grid", 0, 1)
    p = stage.params
    png, grid = latent_figure(run, ctx.data, index, folder / LATENT_PNG, split=p["split"], dims=p["dims"],
                              size=p["grid"], extent=p["extent"], device=ctx.options.device)
    report("decode grid", 1, 1)
    return {"png": png.name, "index": index, "split": p["split"], "dims": [int(d) for d in grid.dims]}


def _scenes(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.data.scenes import make_scenes

    out = stage.path(ctx.out)
    manifest = make_scenes(out, overwrite=out.is_dir(), progress=ctx.reporter(stage), **stage.params["scenes"])
    return {"source": "synthetic", "counts": manifest["counts"]}


def _cityscapes(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.data.cityscapes import prepare_cityscapes

    assert ctx.options.cityscapes_root is not None
    out = stage.path(ctx.out)
    manifest = prepare_cityscapes(ctx.options.cityscapes_root, out, workers=ctx.options.workers,
                                  overwrite=out.is_dir(), progress=ctx.reporter(stage))
    return {"source": "cityscapes", "counts": manifest["counts"]}


def _calibration(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.calibration import calibrate_runs

    runs = ctx.runs(stage)
    report = calibrate_runs(ctx.folder("flip:data"), list(runs.values()), stage.path(ctx.out),
                            counts=ctx.options.counts, oracle=True, device=ctx.options.device,
                            progress=ctx.reporter(stage))
    return {"scenes": report["data"]["scenes"],
            "runs": [{"label": r["label"], "mode_r": r["modes"]["pearson_r"], "mode_mae": r["modes"]["mae"],
                      "ged": {k: v["mean"] for k, v in r["ged"].items()}} for r in report["runs"]]}


def _cases(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.cases import sample_cases

    runs = ctx.runs(stage)  # every model; one with fewer heads or members gives that many
    sample_cases(ctx.data, runs, stage.path(ctx.out), n=max(ctx.options.counts), device=ctx.options.device,
                 callback=ctx.reporter(stage))
    return {"runs": list(runs), "n": max(ctx.options.counts)}


def _report(ctx: Context, stage: Stage) -> dict[str, Any]:
    from lidcseg.reports.html import write_report

    ctx.plan.save()  # the report reads plan.json: every stage before it is done there
    path = write_report(ctx.out)
    return {"report": str(Path(path).name)}


def sampling_keys(keys: tuple[str, ...], counts: tuple[int, ...]) -> tuple[str, ...]:
    """The run keys that give ``max(counts)`` samples (the ambiguity stage): all but the
    M-Heads models with fewer heads."""
    top = max(counts)
    return tuple(k for k in keys if k not in M_HEADS_KEYS.values() or k == M_HEADS_KEYS.get(top))


STAGES: dict[str, Callable[[Context, Stage], dict[str, Any]]] = {
    "prepare": _prepare,
    "train": _train,
    "evaluate": _evaluate,
    "ambiguity": _ambiguity,
    "latent": _latent,
    "scenes": _scenes,
    "cityscapes": _cityscapes,
    "calibration": _calibration,
    "cases": _cases,
    "report": _report,
}
