"""Build the plan of a reproduction from its options: the stages, their inputs and estimates.

Nothing here writes: :func:`build_plan` is what ``--dry-run`` prints, and what
:func:`lidcseg.reproduce.reproduce` then runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError
from lidcseg.io.jsonfile import read_json_object
from lidcseg.io.outputs import OutputKind, check_output_folder
from lidcseg.reproduce import estimate as est
from lidcseg.reproduce.options import FLIP_KEYS, RUN_KEYS, ReproduceOptions
from lidcseg.reproduce.plan import Plan, Stage, refresh, train_params
from lidcseg.reproduce.stages import sampling_keys

#: ``lidcseg reproduce``'s output folder (:mod:`lidcseg.io.outputs`).
REPRODUCE_OUTPUT = OutputKind("reproduce")
#: The grid of Fig. 6 (``lidcseg latent`` defaults).
LATENT_PARAMS: dict[str, Any] = {"grid": 19, "extent": 3.0, "dims": [0, 1], "split": "test"}
#: The synthetic scenes of the flip experiment (``lidcseg scenes make`` defaults).
SCENES: dict[str, Any] = {"n_train": 400, "n_val": 50, "n_test": 100, "height": 32, "width": 64, "seed": 0}
#: Modules of the cases and the HTML report.
REPORT_MODULES: tuple[str, ...] = ("lidcseg.cases", "lidcseg.reports.html")


def world_size() -> int:
    """Processes of this run: ``WORLD_SIZE`` under ``torchrun``, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _train_stage(name: str, folder: str, key: str, options: ReproduceOptions, task: str, data: str,
                 world: int) -> Stage:
    """A training stage: its configs composed as ``lidcseg train`` composes them."""
    from lidcseg.models.registry import model_config
    from lidcseg.presets import compose
    from lidcseg.training.prior_refit import has_prior_net

    model, implied = RUN_KEYS[key]
    model_cfg, train_cfg = compose(options.preset, model_defaults=model_config, task=task, model=model,
                                   overrides=[*options.sets, *implied], steps=options.steps,
                                   device=options.device)
    seconds = est.train_s(model_cfg.name, model_cfg.num_heads, options.preset, train_cfg.steps,
                          train_cfg.val_every, train_cfg.val_max_crops, train_cfg.val_samples, world, task)
    if train_cfg.prior_refit_steps and has_prior_net(model_cfg):
        size = SCENES["height"] * SCENES["width"] if task != "lidc" else train_cfg.input_size**2
        seconds += est.refit_s(train_cfg.prior_refit_steps, train_cfg.prior_refit_samples,
                               train_cfg.prior_refit_batch_size, size, options.preset)
    return Stage(name, "train", folder, needs=(data,), params=train_params(model_cfg, train_cfg), key=key,
                 steps=train_cfg.steps, configs=(model_cfg, train_cfg), estimate_s=seconds)


def _data_stage(options: ReproduceOptions) -> tuple[Stage, dict[str, int] | None, int]:
    """The ``prepare`` stage (or the crops given with ``--data``), the split sizes when known,
    and the number of scans."""
    from lidcseg.config import DataConfig, to_dict

    if options.data is not None:
        data = Path(options.data).absolute()
        _check_lidc_data(data)
        manifest = data / "manifest.json"
        files = {p.name: p.stat().st_size for p in sorted(data.glob("*.h5"))}
        sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        stage = Stage("prepare", "data", str(data), params={"data": str(data), "manifest_sha256": sha,
                                                             "files": files})
        sizes = _split_sizes(data)
        return stage, sizes, 0
    assert options.lidc_root is not None
    root = Path(options.lidc_root).absolute()
    scans = len(options.patients) if options.patients else sum(1 for p in root.iterdir() if p.is_dir())
    stage = Stage("prepare", "prepare", "data", params={
        "lidc_root": str(root), "patients": list(options.patients) if options.patients else None,
        "data_config": to_dict(DataConfig())}, estimate_s=est.prepare_s(scans, options.workers, options.preset))
    return stage, _split_sizes(Path(options.out) / "data"), scans


def _check_lidc_data(data: Path) -> None:
    from lidcseg.data.scenes import is_scene_data

    if is_scene_data(data):
        raise LidcsegError("holds flip-task scenes; --data takes LIDC crops of `lidcseg prepare` "
                           "(the flip experiment makes its own scenes with --flip)", data)
    for split in ("train", "val", "test"):
        if not (data / f"{split}.h5").is_file():
            raise LidcsegError(f"missing split file {split}.h5 (run `lidcseg prepare` first)", data)


def _split_sizes(data: Path) -> dict[str, int] | None:
    """Crops per split from a prepared folder's manifest, or None."""
    manifest = read_json_object(data / "manifest.json") or {}
    try:
        return {s: int(manifest["counts"][s]["crops"]) for s in ("train", "val", "test")}
    except (KeyError, TypeError, ValueError):
        return None


def build_plan(options: ReproduceOptions) -> Plan:
    """The stages of ``options`` with their state on disk; nothing is written.

    Raises:
        LidcsegError: bad options (:meth:`ReproduceOptions.check`), an ``out`` that
            reproduce may not write (a foreign non-empty folder, an input inside or around
            it), a bad ``--set``, or a report asked for where its modules are missing.
    """
    options = options.check()
    out = Path(options.out)
    check_output_folder(out, REPRODUCE_OUTPUT,
                        inputs=[options.lidc_root, options.data, options.cityscapes_root])
    if options.report:
        missing = [m for m in REPORT_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise LidcsegError(f"this installation lacks {', '.join(missing)} (the cases and the HTML "
                               "report); pass --no-report")
    world, preset, counts = world_size(), options.preset, options.counts
    top = max(counts)
    data, sizes, scans = _data_stage(options)
    test = sizes["test"] if sizes else est.crops_guess(scans)
    val = sizes["val"] if sizes else est.crops_guess(scans)
    stages = [data]
    trains = [_train_stage(f"train:{k}", f"runs/{k}", k, options, "lidc", "prepare", world) for k in options.keys]
    stages += trains
    models = [t.configs[0].name for t in trains if t.configs]
    stages.append(Stage("evaluate", "evaluate", "evaluate", needs=("prepare", *(t.name for t in trains)),
                        params={"counts": list(counts), "m_heads": "matched", "seed": 0, "split": "test"},
                        estimate_s=est.STAGE_S["evaluate"]
                        + est.sampling_s(models, test, preset, top, per_count=len(counts))))
    sampled = [t for t in trains if t.key in sampling_keys(options.keys, counts)]
    sampled_models = [t.configs[0].name for t in sampled if t.configs]
    stages.append(Stage("ambiguity", "ambiguity", "ambiguity", needs=("prepare", *(t.name for t in sampled)),
                        params={"n": top, "criterion": "accuracy", "seed": 0},
                        estimate_s=est.STAGE_S["ambiguity"]
                        + est.sampling_s(sampled_models, test + val, preset, top)))
    if "probunet" in options.keys:
        stages.append(Stage("latent", "latent", "latent", needs=("prepare", "train:probunet"),
                            params=LATENT_PARAMS, estimate_s=est.STAGE_S["latent"]))
    if options.report:
        stages.append(Stage("cases", "cases", "cases", needs=("prepare", *(t.name for t in trains)),
                            params={"n": top, "split": "test", "seed": 0},
                            estimate_s=est.STAGE_S["cases"] + est.sampling_s(models, test, preset, top)))
    if options.flip:
        stages += _flip_stages(options, world)
    if options.report:
        stages.append(Stage("report", "report", ".", needs=tuple(s.name for s in stages),
                            estimate_s=est.STAGE_S["report"]))
    plan = Plan(out, options.to_json(), stages, world_size=world)
    refresh(plan)
    return plan


def _flip_stages(options: ReproduceOptions, world: int) -> list[Stage]:
    """The calibration experiment (Section 4.2, Fig. 5): scenes, two models, calibration."""
    if options.cityscapes_root is not None:
        root = str(Path(options.cityscapes_root).absolute())
        data = Stage("flip:data", "cityscapes", "flip/data", params={"root": root, "size": [256, 512]},
                     estimate_s=est.STAGE_S["cityscapes"])
    else:
        data = Stage("flip:data", "scenes", "flip/data", params={"scenes": SCENES},
                     estimate_s=est.STAGE_S["scenes"])
    trains = [_train_stage(f"flip:train:{k}", f"flip/runs/{k}", k, options, "flip-scenes", "flip:data", world)
              for k in FLIP_KEYS]
    calibration = Stage("calibration", "calibration", "flip/calibration",
                        needs=("flip:data", *(t.name for t in trains)),
                        params={"counts": list(options.counts), "samples": 16, "oracle": True, "seed": 0},
                        estimate_s=est.STAGE_S["calibration"])
    return [data, *trains, calibration]
