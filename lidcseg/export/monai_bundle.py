"""``lidcseg export RUN --format monai-bundle``: a trained run as a MONAI Bundle.

The bundle (MONAI's bundle specification)::

    DIR/
      configs/metadata.json      the specification's keys, network_data_format, provenance
      configs/inference.json     NIfTI scan + lesion points (or mask) -> hypotheses as NIfTI
      models/model.pt            the state dict (torch.load(..., weights_only=True))
      models/model.ts            TorchScript sample(x, n) / sample_eps(x, eps) (Prob. U-Net family)
      models/lidcseg-run/        the run's config.json (+ env.json) and its refit/ (else best/, else last/)
                                 safetensors checkpoint: what inference.json samples from
      docs/README.md             provenance and limits (PHANTOM in large letters)

``configs/inference.json`` calls :func:`bundle_infer`, which is
:func:`lidcseg.sampling.sample_scan` on ``models/lidcseg-run``: the same hypotheses as
``lidcseg sample`` with the same seed. The folder is written whole (a temporary folder
swapped in at the end) and marked as ``lidcseg export``'s: ``overwrite`` replaces only a
bundle this command wrote (:func:`lidcseg.io.outputs.replaced_folder`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lidcseg.errors import LidcsegError
from lidcseg.export.metadata import DEFAULT_N, BundleFacts, bundle_metadata, bundle_readme
from lidcseg.export.torchscript import NotScriptable, script_sampler
from lidcseg.inference import CT_CHANNELS, RUN_CHECKPOINTS, OpenRun, open_run, require_input_size
from lidcseg.io.atomic import atomic_path, write_bytes_atomic, write_json_atomic
from lidcseg.io.jsonfile import read_json_object
from lidcseg.io.outputs import OutputKind, replaced_folder

#: ``lidcseg export``'s output folder (its marker).
EXPORT_OUTPUT = OutputKind("export", noun="bundle folder")
#: Where the bundle keeps the run that inference.json samples from.
RUN_FOLDER = "models/lidcseg-run"
#: The bundle files, relative to its root.
METADATA_FILE, INFERENCE_FILE = "configs/metadata.json", "configs/inference.json"
WEIGHTS_PT, TORCHSCRIPT, README = "models/model.pt", "models/model.ts", "docs/README.md"


def check_run(run: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` of a complete ``lidcseg train`` run of a known model.

    Raises:
        LidcsegError: one line naming the file: not a folder, no run ``config.json``, an
            unknown model name, no ``best/`` or ``last/`` checkpoint, or a checkpoint without
            its ``config.json`` or ``model.safetensors``.
    """
    from lidcseg.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, first_checkpoint
    from lidcseg.models.registry import MODEL_NAMES

    run = Path(run)
    if not run.is_dir():
        raise LidcsegError("run folder not found" if not run.exists() else "not a folder (export takes "
                           "a `lidcseg train` run folder)", run)
    config = read_json_object(run / CONFIG_FILE, 16 * 2**20)
    if config is None or not isinstance(config.get("model"), dict) or "train" not in config:
        raise LidcsegError(f"incomplete run folder: no run {CONFIG_FILE} (with model and train configs)",
                           run / CONFIG_FILE)
    folder = first_checkpoint(run, RUN_CHECKPOINTS)
    if folder is None:
        raise LidcsegError("incomplete run folder: no best/ or last/ checkpoint", run)
    if not (folder / WEIGHTS_FILE).is_file():
        raise LidcsegError(f"incomplete checkpoint: no {WEIGHTS_FILE}", folder)
    for path, data in ((run / CONFIG_FILE, config), (folder / CONFIG_FILE, read_json_object(folder / CONFIG_FILE))):
        model = (data or {}).get("model")
        name = model.get("name", "probunet") if isinstance(model, dict) else None
        if name not in MODEL_NAMES:
            raise LidcsegError(f"unknown model {name!r}; lidcseg exports {', '.join(MODEL_NAMES)}", path)
    return run, folder


def export_monai_bundle(run: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the MONAI bundle of a run (module docstring) to ``out``.

    Args:
        run: a ``lidcseg train`` run folder (uses ``best/``, else ``last/``).
        out: the bundle folder, written whole. An existing one is replaced only with
            ``overwrite`` and only if ``lidcseg export`` wrote it; one that is, holds or is
            inside the run is refused.
        overwrite: replace a bundle written earlier by this command.

    Returns:
        ``out``.

    Raises:
        LidcsegError: an incomplete run or an unknown model (:func:`check_run`), a model of
            another task (not 1-channel CT), no recorded input size, or an ``out`` that may
            not be written; then nothing is written.
    """
    from lidcseg.io.outputs import check_output_folder

    run_dir, ckpt = check_run(run)
    check_output_folder(out, EXPORT_OUTPUT, inputs=[run_dir], replace=True, overwrite=overwrite)
    opened = open_run(run_dir, "cpu", in_channels=CT_CHANNELS)
    facts = _facts(opened, run_dir, ckpt)
    from lidcseg import __version__

    version = __version__
    with replaced_folder(out, EXPORT_OUTPUT, inputs=[run_dir], overwrite=overwrite) as tmp:
        dest = tmp / RUN_FOLDER
        (dest / ckpt.name).mkdir(parents=True)
        for src in (run_dir / "config.json", run_dir / "env.json", ckpt / "config.json", ckpt / "model.safetensors"):
            if src.is_file():
                shutil.copyfile(src, dest / src.relative_to(run_dir))
        state = {k: v.detach().cpu().contiguous() for k, v in opened.model.state_dict().items()}
        with atomic_path(tmp / WEIGHTS_PT) as path:
            torch.save(state, path)
        try:
            scripted = script_sampler(opened.model, facts.input_size)
        except NotScriptable as e:
            facts.torchscript = str(e)
        metadata = bundle_metadata(facts, version)
        if facts.torchscript is None:
            with atomic_path(tmp / TORCHSCRIPT) as path, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13: "switch to torch.export"
                torch.jit.save(scripted, str(path), _extra_files={"metadata.json": json.dumps(metadata)})
        write_json_atomic(tmp / METADATA_FILE, metadata)
        write_json_atomic(tmp / INFERENCE_FILE, inference_config())
        write_bytes_atomic(tmp / README, bundle_readme(facts, version).encode())
    return Path(out)


def _facts(opened: OpenRun, run_dir: Path, ckpt: Path) -> BundleFacts:
    """The provenance of ``opened`` (see :class:`~lidcseg.export.metadata.BundleFacts`)."""
    import monai
    import nibabel
    import numpy as np
    import safetensors

    from lidcseg import __version__

    size = require_input_size(opened)
    run_cfg = read_json_object(run_dir / "config.json", 16 * 2**20) or {}
    data_dir = (run_cfg.get("data") or {}).get("dir")
    data: dict[str, Any] = {"version": "unknown", "version_text": "unknown: the run records no data folder",
                            "phantom": None}
    if isinstance(data_dir, str) and data_dir:
        from lidcseg.reports.html.provenance import data_provenance

        try:
            data = data_provenance(Path(data_dir), fingerprint=False)
        except (LidcsegError, OSError):
            data = {**data, "folder": data_dir, "version_text": "unknown: the data folder cannot be read"}
    preset = run_cfg.get("preset")  # what lidcseg.training.run_state.run_config records
    val = opened.info.get("val")
    return BundleFacts(
        run=run_dir.resolve(), checkpoint=ckpt.name, model=opened.name, model_config=opened.info.get("config") or {},
        step=opened.info.get("step"), val=dict(val) if isinstance(val, dict) else {}, input_size=size,
        crop_size=opened.data.crop_size, spacing_mm=opened.data.spacing_mm,
        num_classes=opened.config.num_classes, max_samples=getattr(opened.model, "max_samples", None),
        data=data, preset=preset if isinstance(preset, str) else None,
        weights_sha256=opened.info.get("weights_sha256"),
        versions={"lidcseg": __version__, "monai": monai.__version__, "torch": torch.__version__,
                  "numpy": np.__version__, "nibabel": nibabel.__version__, "safetensors": safetensors.__version__},
        env=read_json_object(run_dir / "env.json") or {},
    )


def inference_config() -> dict[str, Any]:
    """``configs/inference.json``: MONAI's ConfigParser calls :func:`bundle_infer` with the overrides.

    ``python -m monai.bundle run --config_file configs/inference.json --bundle_root DIR
    --image scan.nii.gz --points "[[x, y, z]]" --output_dir OUT`` (``run`` evaluates ``@infer``).
    """
    return {
        "imports": ["$import lidcseg.export"],
        "bundle_root": ".",
        "image": "",
        "points": [],
        "points_voxel": [],
        "lesions": None,
        "slices": None,
        "n": DEFAULT_N,
        "seed": 0,
        "independent": False,
        "device": "auto",
        "threads": 0,
        "overwrite": False,
        "output_dir": "$@bundle_root + '/eval'",
        "infer": {
            "_target_": "lidcseg.export.bundle_infer",
            "bundle_root": "@bundle_root", "image": "@image", "output_dir": "@output_dir",
            "points": "@points", "points_voxel": "@points_voxel", "lesions": "@lesions", "slices": "@slices",
            "n": "@n", "seed": "@seed", "independent": "@independent", "device": "@device",
            "threads": "@threads", "overwrite": "@overwrite",
        },
        "initialize": [],
        "run": ["@infer"],
        "finalize": [],
    }


def _triples(values: Any, what: str) -> list[tuple[float, float, float]]:
    """``[[x, y, z], ...]`` (or one ``[x, y, z]``) -> float triples; a one-line error otherwise."""
    if values is None or values == "":
        return []
    items = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(items) == 3 and all(isinstance(v, (int, float)) for v in items):
        items = [items]
    out = []
    for item in items:
        try:
            triple = tuple(float(v) for v in item)
        except (TypeError, ValueError):
            triple = ()
        if len(triple) != 3:
            raise LidcsegError(f"--{what} expects [[x, y, z], ...], got {values!r}")
        out.append(triple)
    return out  # type: ignore[return-value]


def bundle_infer(
    bundle_root: str | Path,
    image: str | Path,
    output_dir: str | Path,
    *,
    points: Sequence[Sequence[float]] | None = (),
    points_voxel: Sequence[Sequence[float]] | None = (),
    lesions: str | Path | None = None,
    slices: Sequence[int] | None = None,
    n: int = DEFAULT_N,
    seed: int = 0,
    independent: bool = False,
    device: str = "auto",
    threads: int = 0,
    overwrite: bool = False,
) -> str:
    """The bundle's inference: :func:`lidcseg.sampling.sample_scan` on ``bundle_root/models/lidcseg-run``.

    Args:
        bundle_root: the bundle folder.
        image: a NIfTI CT volume (HU) or a DICOM series folder.
        output_dir: receives ``hypotheses.nii.gz``, ``frequency.nii.gz``, ``summary.json``.
        points: lesion centres, world mm LPS (``lidcseg sample --at``); ``points_voxel``: voxel
            indices (``--at-voxel``); ``lesions``: a lesion mask NIfTI (``--lesions``).
        slices: ``[a, b]`` slices around each centre (``--slices a:b``).
        n, seed, independent, device, threads, overwrite: as ``lidcseg sample``.

    Returns:
        The output folder.
    """
    from lidcseg.sampling import sample_scan

    if not image:
        raise LidcsegError("no input scan: pass --image scan.nii.gz")
    rel = None
    if slices is not None:
        if len(slices) != 2 or int(slices[0]) > int(slices[1]):
            raise LidcsegError(f"--slices expects [a, b] with a <= b, got {slices!r}")
        rel = (int(slices[0]), int(slices[1]))
    result = sample_scan(
        image, Path(bundle_root) / RUN_FOLDER, output_dir, at=_triples(points, "points"),
        at_voxel=_triples(points_voxel, "points_voxel"), lesions_mask=lesions or None, slices=rel, n=int(n),
        seed=int(seed), shared_eps=not independent, device=device, threads=int(threads), overwrite=bool(overwrite),
    )
    return str(result.out)
