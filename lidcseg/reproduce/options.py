"""What ``lidcseg reproduce`` was asked to do: the run keys, the options and their checks.

A *run key* names one trained model of the reproduction and its folder
``OUT/runs/<key>``: a registry model name (:data:`lidcseg.models.registry.MODEL_SPECS`)
plus the ``--set`` overrides the key implies (``m-heads-8`` is ``m-heads`` with
``model.num_heads=8``; Section 3.2 trains M-Heads "with the corresponding number of
heads"). The U-Net ensemble is trained once with 16 members: the evaluation scores its
first n members at n samples (:func:`lidcseg.evaluation.evaluate_model`), so the
ensembles of 4 and 8 are the first members of that one run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError

#: Run key -> (registry model name, the overrides the key implies).
RUN_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "probunet": ("probunet", ()),
    "dropout-unet": ("dropout-unet", ()),
    "unet-ensemble": ("unet-ensemble", ("model.ensemble_size=16",)),
    "m-heads-4": ("m-heads", ("model.num_heads=4",)),
    "m-heads-8": ("m-heads", ("model.num_heads=8",)),
    "m-heads-16": ("m-heads", ("model.num_heads=16",)),
    "i2i-vae": ("i2i-vae", ()),
    "fixed-prior": ("fixed-prior", ()),
    "fixed-prior-no-context": ("fixed-prior-no-context", ()),
    "early-injection": ("early-injection", ()),
}
#: The Prob. U-Net and the four baselines of Fig. 4 (the default ``--models``).
PAPER_KEYS: tuple[str, ...] = ("probunet", "dropout-unet", "unet-ensemble", "m-heads-4", "m-heads-8",
                               "m-heads-16", "i2i-vae")
#: Appendix D's ablations (``--ablations``).
ABLATION_KEYS: tuple[str, ...] = ("fixed-prior", "fixed-prior-no-context", "early-injection")
#: The two models of the flip experiment (Section 4.2, Fig. 5).
FLIP_KEYS: tuple[str, ...] = ("probunet", "dropout-unet")
#: M-Heads run keys by head count.
M_HEADS_KEYS: dict[int, str] = {4: "m-heads-4", 8: "m-heads-8", 16: "m-heads-16"}
#: Presets of ``--preset`` (each read per task: on flip scenes, paper is cityscapes and
#: cpu-quick is scenes-quick; :data:`lidcseg.presets.TASK_PRESET_NAMES`).
PRESETS: tuple[str, ...] = ("paper", "cpu-quick")
#: The sample counts of Fig. 4a.
PAPER_COUNTS: tuple[int, ...] = (1, 4, 8, 16)


@dataclass(frozen=True)
class ReproduceOptions:
    """The options of one ``lidcseg reproduce`` (resolved; :meth:`check` validates them).

    Attributes:
        out: the output folder (see :mod:`lidcseg.reproduce`).
        lidc_root: the LIDC-IDRI download, prepared into ``OUT/data``; or
        data: crops of ``lidcseg prepare`` used in place (no copy).
        preset: ``paper`` (the GPU job) or ``cpu-quick`` (the phantom demo).
        models: run keys to train (:data:`RUN_KEYS`), in the order of the report's rows.
        ablations: add Appendix D's :data:`ABLATION_KEYS`.
        flip: the calibration experiment (scenes, Prob. U-Net and Dropout U-Net, Fig. 5).
        cityscapes_root: Cityscapes for the flip experiment (default: synthetic scenes).
        device: ``auto``, ``cpu`` or ``cuda`` for every stage.
        steps: training steps of every model (default: the preset's).
        sets: ``key=value`` overrides of every training (``lidcseg train --set``).
        counts: sample counts of the evaluation (Fig. 4a).
        patients: only these patients are prepared (default: all under ``lidc_root``).
        workers: processes of ``prepare`` (and the Cityscapes conversion).
        report: the cases and the HTML report (``--no-report``: False).
    """

    out: Path
    lidc_root: Path | None = None
    data: Path | None = None
    preset: str = "paper"
    models: tuple[str, ...] = PAPER_KEYS
    ablations: bool = False
    flip: bool = False
    cityscapes_root: Path | None = None
    device: str = "auto"
    steps: int | None = None
    sets: tuple[str, ...] = ()
    counts: tuple[int, ...] = PAPER_COUNTS
    patients: tuple[str, ...] | None = None
    workers: int = 1
    report: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        """The run keys to train: ``models``, then the ablations not already among them."""
        extra = ABLATION_KEYS if self.ablations else ()
        return tuple(dict.fromkeys((*self.models, *extra)))

    def to_json(self) -> dict[str, Any]:
        """The options as plan.json records them (paths absolute)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v.absolute())
            elif isinstance(v, tuple):
                d[k] = list(v)
        d["keys"] = list(self.keys)
        return d

    def check(self) -> ReproduceOptions:
        """Validate the options; return them with ``counts`` sorted.

        Raises:
            LidcsegError: one line: neither or both of ``lidc_root`` and ``data``, a missing
                folder, an unknown preset or run key (listing the valid ones), bad counts,
                M-Heads keys that do not match the counts, ``cityscapes_root`` without ``flip``.
        """
        if (self.lidc_root is None) == (self.data is None):
            why = "give" if self.lidc_root is None else "give only one of"
            raise LidcsegError(f"{why} --lidc-root DIR (the LIDC-IDRI download) or --data DATA "
                               "(crops of `lidcseg prepare`)")
        for flag, path in (("--lidc-root", self.lidc_root), ("--data", self.data),
                           ("--cityscapes-root", self.cityscapes_root)):
            if path is not None and not Path(path).is_dir():
                raise LidcsegError(f"{flag}: folder not found", path)
        if self.cityscapes_root is not None and not self.flip:
            raise LidcsegError("--cityscapes-root is the data of the flip experiment: add --flip")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise LidcsegError(f"unknown --device {self.device!r}; use auto, cpu or cuda")
        if self.preset not in PRESETS:
            raise LidcsegError(f"unknown --preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        check_keys(self.models)
        if self.steps is not None and self.steps < 1:
            raise LidcsegError(f"--steps must be >= 1, got {self.steps}")
        if self.workers < 1:
            raise LidcsegError(f"--workers must be >= 1, got {self.workers}")
        counts = tuple(sorted({int(c) for c in self.counts}))
        if not counts or counts[0] < 1:
            raise LidcsegError(f"-n expects sample counts >= 1, got {','.join(map(str, self.counts))}")
        check_m_heads(self.keys, counts)
        return dataclasses.replace(self, counts=counts)


def check_keys(keys: Sequence[str]) -> None:
    """Refuse an empty list or a name that is not a run key (listing the valid ones)."""
    if not keys:
        raise LidcsegError(f"--models is empty; valid names: {', '.join(RUN_KEYS)}")
    for k in keys:
        if k not in RUN_KEYS:
            raise LidcsegError(f"unknown --models name {k!r}; valid names: {', '.join(RUN_KEYS)}")


def check_m_heads(keys: Sequence[str], counts: Sequence[int]) -> None:
    """M-Heads is scored at n with the n-head model (Section 3.2): the M-Heads keys chosen
    must be exactly those of the counts above 1.

    Raises:
        LidcsegError: naming the keys to add or drop, or the counts no M-Heads key has.
    """
    chosen = [k for k in keys if k in M_HEADS_KEYS.values()]
    if not chosen:
        return
    odd = [n for n in counts if n > 1 and n not in M_HEADS_KEYS]
    if odd:
        raise LidcsegError(f"M-Heads is scored at n with an n-head model (Section 3.2) and the run keys "
                           f"have {', '.join(map(str, M_HEADS_KEYS))} heads; -n {','.join(map(str, odd))} "
                           "has none: drop those counts or the m-heads keys")
    need = [M_HEADS_KEYS[n] for n in counts if n > 1]
    missing = [k for k in need if k not in chosen]
    extra = [k for k in chosen if k not in need]
    if missing or extra:
        what = "; ".join(s for s in (f"add {', '.join(missing)}" if missing else "",
                                     f"drop {', '.join(extra)} or add its count to -n" if extra else "") if s)
        raise LidcsegError(f"M-Heads is scored at n = {', '.join(map(str, counts))} with one model per count "
                           f"(Section 3.2): {what} in --models")
