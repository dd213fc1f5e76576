"""``lidcseg reproduce``: the paper's whole pipeline in one resumable command."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from lidcseg_cli._common import console, one_line_errors, parse_counts, parse_csv, progress_bar

EPILOG = (
    "Run keys (--models): probunet, dropout-unet, unet-ensemble (16 members; n = 4, 8 score its first "
    "n), m-heads-4, m-heads-8, m-heads-16, i2i-vae (the default set), and the Appendix D ablations "
    "fixed-prior, fixed-prior-no-context, early-injection (--ablations adds all three)."
)


def duration(seconds: float | None) -> str:
    """``3h05m``, ``12m30s`` or ``45s``."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def plan_table(plan: Any) -> str:
    """The plan as a text table: stage, state, estimate, folder and what a run will do."""
    rows = [("stage", "state", "estimate", "folder", "note")]
    for s in plan.stages:
        rows.append((s.name, s.state, duration(s.estimate_s), s.folder, s.blocked or s.note))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
             for r in rows]
    procs = f" on {plan.world_size} processes" if plan.world_size > 1 else ""
    lines.append(f"estimate: {duration(plan.total_s)} in all, {duration(plan.remaining_s)} left{procs} "
                 f"({plan.options['preset']} figures; lidcseg.reproduce.estimate says how they were measured)")
    return "\n".join(lines)


@one_line_errors
def reproduce(
    out: Path = typer.Option(..., "--out", help="Output folder (new, empty, or one `lidcseg reproduce` wrote): plan.json, data/, runs/, evaluate/, ..., report.html."),
    lidc_root: Path = typer.Option(None, "--lidc-root", help="The LIDC-IDRI download (or a phantom), prepared into OUT/data."),
    data: Path = typer.Option(None, "--data", help="Start from crops of `lidcseg prepare` instead (used in place, not copied)."),
    preset: str = typer.Option("paper", "--preset", help="paper (the GPU job; under torchrun with several GPUs) or cpu-quick (the phantom demo)."),
    models: str = typer.Option(None, "--models", help="Comma-separated run keys (listed below); default: the Prob. U-Net and the four baselines."),
    ablations: bool = typer.Option(False, "--ablations", help="Also train the three Appendix D models."),
    flip: bool = typer.Option(False, "--flip", help="The calibration experiment: scenes, probunet and dropout-unet, Fig. 5."),
    cityscapes_root: Path = typer.Option(None, "--cityscapes-root", help="Cityscapes (leftImg8bit/, gtFine/) for --flip instead of synthetic scenes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda, for every stage."),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps of every model (default: the preset's)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a field of every training, e.g. --set checkpoint_every=100 (repeatable)."),
    n: str = typer.Option("1,4,8,16", "-n", "--n", help="Sample counts of the evaluation (Fig. 4a); M-Heads needs m-heads-<n> for each n > 1."),
    patients: str = typer.Option(None, "--patients", help="Prepare only these comma-separated patient IDs."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes of prepare (and the Cityscapes conversion)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the sampled cases and the HTML report."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its time estimate; write nothing."),
) -> None:
    """Reproduce the paper in one resumable command, with an HTML report.

    The stages: prepare, train every model, evaluate (Fig. 4a),
    ambiguity (Table 1), the latent space (Fig. 6), with --flip the
    calibration experiment (Fig. 5), and OUT/report.html.

    Resumable: run the same command again after an interruption. A finished
    stage is kept (its folder holds a completion record) and a half-trained
    model continues from its last checkpoint. OUT/plan.json lists the stages.
    """
    from lidcseg.reproduce import PAPER_KEYS, ReproduceOptions, build_plan
    from lidcseg.reproduce import reproduce as run
    from lidcseg.reproduce.runner import rank

    options = ReproduceOptions(
        out=out, lidc_root=lidc_root, data=data, preset=preset,
        models=tuple(parse_csv(models) or ()) if models is not None else PAPER_KEYS,
        ablations=ablations, flip=flip, cityscapes_root=cityscapes_root, device=device, steps=steps,
        sets=tuple(set_ or ()), counts=tuple(parse_counts(n)),
        patients=tuple(parse_csv(patients) or ()) or None, workers=workers, report=not no_report,
    )
    if dry_run:
        typer.echo(plan_table(build_plan(options)))
        return
    rank0 = rank() == 0
    with _Progress(disable=not rank0) as show:
        plan = run(options, callback=show)
    if not rank0:
        return
    wall = sum(s.wall_s or 0.0 for s in plan.stages)
    where = (f"report: {out / 'report.html'}" if options.report
             else f"evaluation: {out / 'evaluate' / 'summary.md'}")
    console.print(f"reproduce: {len(plan.stages)} stages done ({duration(wall)} of work in all); {where}",
                  markup=False, highlight=False, soft_wrap=True)


class _Progress:
    """The progress view: one bar per running stage (stage, model, step) and a line per stage."""

    def __init__(self, disable: bool) -> None:
        self.disable = disable
        self.stack = contextlib.ExitStack()
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def _say(self, text: str) -> None:
        if not self.disable:
            console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def __call__(self, e: Any) -> None:
        head = f"[{e.index}/{e.total}] {e.stage}"
        label = f"{e.index}/{e.total} {e.stage}"
        if e.kind == "skip":
            self._say(f"{head}: done already")
        elif e.kind == "start":
            self.stack.close()
            self.stack = contextlib.ExitStack()
            self.bar = self.stack.enter_context(progress_bar(
                label, "{task.fields[model]}", total=1, remaining=True, disable=self.disable,
                model=e.model or ""))
            if e.message:
                self._say(f"{head}: {e.message}")
        elif e.kind == "progress" and self.bar is not None:
            self.bar.update(completed=e.step, total=max(e.steps, 1), model=e.model or "")
        elif e.kind in ("done", "failed"):
            self.stack.close()
            self.bar = None
            if e.kind == "done":
                self._say(f"{head}: done in {duration(e.wall_s)}")
