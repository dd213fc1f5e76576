"""What a MONAI bundle says about its model: ``configs/metadata.json`` and ``docs/README.md``.

:func:`bundle_facts` gathers the run's provenance once (model, checkpoint, step, validation
GED, data version and whether it is the phantom, preset, crop protocol, versions);
:func:`bundle_metadata` writes it in the keys of MONAI's bundle specification
(``version``, ``monai_version``, ``pytorch_version``, ``numpy_version``,
``required_packages_version``, ``task``, ``description``, ``authors``, ``copyright``,
``network_data_format`` with ``inputs``/``outputs``) plus a ``lidcseg`` section, and
:func:`bundle_readme` the model card. Both say PHANTOM in large letters for a model
trained on ``lidcseg phantom`` data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The JSON schema MONAI's ``verify_metadata`` downloads (named, never vendored).
MONAI_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: Keys MONAI's bundle specification requires in ``metadata.json`` (schema 20240725 renamed
#: ``optional_packages_version`` to ``required_packages_version``; MONAI 1.6 warns on the old name).
REQUIRED_KEYS: tuple[str, ...] = (
    "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "task", "description", "authors", "copyright", "network_data_format",
)
#: Keys the specification requires of every tensor format in ``network_data_format``.
TENSOR_KEYS: tuple[str, ...] = (
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
    "is_patch_data", "channel_def",
)
#: Hypotheses per lesion that ``configs/inference.json`` draws by default (``lidcseg sample``'s).
DEFAULT_N = 16
PAPER = ("Kohl S. et al. A Probabilistic U-Net for Segmentation of Ambiguous Images. "
         "NeurIPS 2018. https://arxiv.org/abs/1806.05034")


@dataclass
class BundleFacts:
    """The provenance of an exported run (what metadata.json and README.md state).

    Attributes:
        run: the run folder exported.
        checkpoint: ``best`` or ``last``.
        model: the registry name; ``model_config`` its ModelConfig as a dict.
        step: the checkpoint's training step; ``val`` its validation numbers (``ged``, ...).
        input_size: T, the model's input tile; ``crop_size``, ``spacing_mm``: the crop protocol.
        num_classes: C; ``max_samples``: the most hypotheses the model has (None: any).
        data: :func:`lidcseg.reports.html.provenance.data_provenance`'s answer (version, phantom).
        preset: the preset the run was trained with (None: not recorded).
        weights_sha256: of ``model.safetensors``; ``torchscript``: None, or why there is no model.ts.
        versions: lidcseg, monai, torch, numpy, nibabel, safetensors here; ``env``: the run's env.json.
    """

    run: Path
    checkpoint: str
    model: str
    model_config: dict[str, Any]
    step: int | None
    val: dict[str, Any]
    input_size: int
    crop_size: int
    spacing_mm: float
    num_classes: int
    max_samples: int | None
    data: dict[str, Any]
    preset: str | None
    weights_sha256: str | None
    versions: dict[str, str]
    env: dict[str, Any] = field(default_factory=dict)
    torchscript: str | None = None

    @property
    def phantom(self) -> bool | None:
        """Trained on the phantom (True), on real scans (False), or unknown (None)."""
        value = self.data.get("phantom")
        return value if isinstance(value, bool) else None

    @property
    def ged(self) -> float | None:
        """The checkpoint's validation GED, or None."""
        value = self.val.get("ged")
        return float(value) if isinstance(value, (int, float)) else None


def data_notice(facts: BundleFacts) -> str:
    """One line on the training data: PHANTOM, real scans, or unknown."""
    if facts.phantom is True:
        return ("TRAINED ON THE PHANTOM (`lidcseg phantom`: synthetic intensities), NOT ON LIDC-IDRI: "
                "its hypotheses say nothing about real lesions")
    if facts.phantom is False:
        return f"trained on real LIDC-IDRI scans ({facts.data.get('version_text', 'version unknown')})"
    return ("TRAINING DATA UNKNOWN: the run's data folder is gone or has no manifest; it may be the "
            "phantom (synthetic scans)")


def bundle_metadata(facts: BundleFacts, bundle_version: str) -> dict[str, Any]:
    """``configs/metadata.json`` (MONAI bundle specification keys + a ``lidcseg`` section)."""
    t, c = facts.input_size, facts.num_classes
    warning = "" if facts.phantom is False else f" {data_notice(facts)}."
    hypotheses = "any number" if facts.max_samples is None else f"at most {facts.max_samples}"
    return {
        "schema": MONAI_SCHEMA_URL,
        "version": bundle_version,
        "changelog": {bundle_version: f"exported by lidcseg {facts.versions['lidcseg']} from run "
                                      f"{facts.run.name} ({facts.checkpoint}/, step {facts.step})"},
        "monai_version": facts.versions["monai"],
        "pytorch_version": facts.versions["torch"].split("+")[0],
        "numpy_version": facts.versions["numpy"],
        "required_packages_version": {k: facts.versions[k] for k in ("lidcseg", "nibabel", "safetensors")},
        "name": f"lidcseg {facts.model} ({facts.run.name})",
        "task": "Ambiguous lung-lesion segmentation in CT: n plausible segmentation hypotheses per lesion",
        "description": (
            f"A lidcseg {facts.model} model (Probabilistic U-Net family, Kohl et al. 2018) trained with "
            f"`lidcseg train`. Given a CT volume (NIfTI, HU) and lesion centres (or a lesion mask), "
            f"configs/inference.json cuts {t}x{t} tiles at {facts.spacing_mm} mm per lesion slice, draws "
            f"n hypotheses ({hypotheses}) and writes them, with their frequency map, as NIfTI in the scan's "
            f"geometry.{warning}"
        ),
        "authors": "lidcseg",
        "copyright": "the lidcseg authors",
        "intended_use": "Research only; not for clinical use." + warning,
        "data_source": facts.data.get("version_text", "unknown"),
        "data_type": "nifti",
        "references": [PAPER],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                "spatial_shape": [t, t], "dtype": "float32", "value_range": [-1, 1], "is_patch_data": True,
                "channel_def": {"0": f"CT in HU, window [-1024, 400] scaled to [-1, 1]; an axial slice "
                                     f"resampled to {facts.spacing_mm} mm, the centre {t}x{t} of a "
                                     f"{facts.crop_size}x{facts.crop_size} lesion-centred crop"},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "labels", "modality": "CT", "num_channels": c, "spatial_shape": [t, t],
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): ("background" if i == 0 else "lesion" if c == 2 else f"class {i}")
                                for i in range(c)},
                "num_hypotheses": {"default": DEFAULT_N, "max": facts.max_samples},
                "shape": "(B, n, C, H, W): n hypotheses per image, logits; foreground = argmax != 0",
            }},
        },
        "lidcseg": {
            "run": str(facts.run), "checkpoint": facts.checkpoint, "model": facts.model,
            "model_config": facts.model_config, "step": facts.step, "validation": facts.val,
            "validation_ged": facts.ged, "preset": facts.preset or "not recorded by the run",
            "data": {"version": facts.data.get("version"), "version_text": facts.data.get("version_text"),
                     "phantom": facts.phantom, "folder": facts.data.get("folder"),
                     "notice": data_notice(facts)},
            "crop": {"size": facts.crop_size, "spacing_mm": facts.spacing_mm, "input_size": t},
            "weights_sha256": facts.weights_sha256,
            "torchscript": "models/model.ts" if facts.torchscript is None else f"none: {facts.torchscript}",
            "trained_with": {k: facts.env[k] for k in ("lidcseg", "torch", "monai", "numpy", "device")
                             if k in facts.env},
        },
    }


def bundle_readme(facts: BundleFacts, bundle_version: str) -> str:
    """``docs/README.md``: what the model is, where it came from, how to run it, its limits."""
    t = facts.input_size
    ged = "not recorded" if facts.ged is None else f"{facts.ged:.4f}"
    banner = "" if facts.phantom is False else f"# ⚠ {data_notice(facts)}\n\n"
    ts = ("`models/model.ts` (TorchScript) samples without lidcseg:\n\n"
          "```python\nimport torch\nts = torch.jit.load(\"models/model.ts\")\n"
          f"logits = ts.sample(x, 16)          # x (B, 1, {t}, {t}) normalised CT -> (B, 16, C, {t}, {t})\n"
          "logits = ts.sample_eps(x, eps)     # eps (B, n, N) standard-normal noise of your own\n```\n"
          if facts.torchscript is None else f"There is no `models/model.ts`: {facts.torchscript}.\n")
    val = json.dumps(facts.val, sort_keys=True) if facts.val else "none recorded"
    return f"""{banner}# lidcseg {facts.model} — MONAI bundle {bundle_version}

Ambiguous lung-lesion segmentation (Kohl et al., NeurIPS 2018): for each lesion of a CT scan the
model draws *n* plausible segmentations (hypotheses), as the four LIDC-IDRI radiologists disagree.

## Provenance

| | |
|---|---|
| training data | {data_notice(facts)} |
| data version | {facts.data.get('version_text', 'unknown')} |
| data folder | {facts.data.get('folder') or 'unknown'} |
| run | `{facts.run}` ({facts.checkpoint}/, step {facts.step}) |
| preset | {facts.preset or 'not recorded by the run'} |
| validation GED | {ged} |
| validation | {val} |
| weights sha256 | {facts.weights_sha256} (`models/lidcseg-run/{facts.checkpoint}/model.safetensors`; `models/model.pt` holds the same tensors) |
| exported with | lidcseg {facts.versions['lidcseg']}, MONAI {facts.versions['monai']}, torch {facts.versions['torch']} |

## Run it

```bash
pip install "lidcseg=={facts.versions['lidcseg']}" "monai>={facts.versions['monai']}"
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --image scan.nii.gz --points "[[x, y, z]]" --output_dir out --n 16 --seed 0
```

`--points` are lesion centres in world mm, LPS (DICOM patient coordinates); `--points_voxel`
takes voxel indices `[[i, j, k]]`, `--lesions mask.nii.gz` a lesion mask on the scan's grid (one
lesion per connected component). `out/` receives `hypotheses.nii.gz` (I, J, K, n) uint8,
`frequency.nii.gz` (I, J, K) float32 and `summary.json`: exactly what
`lidcseg sample scan.nii.gz --run RUN --at x,y,z -n 16 --seed 0` writes (same seed, same arrays).
Pass `--overwrite true` to replace an earlier output.

{ts}
`models/model.pt` is the state dict (`torch.load(..., weights_only=True)`) of
`lidcseg.models.create_model(ModelConfig(**metadata["lidcseg"]["model_config"]))`;
`models/lidcseg-run/` holds the run's config and safetensors checkpoint that
`configs/inference.json` samples from.

## Limits

- {data_notice(facts)}.
- Research only; not validated for clinical use.
- A 2-D model: each axial slice of a lesion is a {t}x{t} tile at {facts.spacing_mm} mm around the
  given centre (a {t * facts.spacing_mm:g} mm field of view); a lesion must be located by you (points or mask).
  Hypothesis k shares its latent noise across a lesion's slices (one 3-D interpretation).
- The hypotheses are samples, not calibrated probabilities; the frequency map is their mean.
- Trained on lesions of 3 mm or more that LIDC-IDRI readers outlined; other findings are out of
  distribution.
"""
