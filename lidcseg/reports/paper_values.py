"""Published numbers to set beside ours, each with where it comes from and on which data.

Kohl et al. (NeurIPS 2018) show LIDC's Fig. 4a as box plots without numbers; the
LIDC numbers below are the Prob. U-Net's as later papers tabulated them (PHiSeg,
SSN, MoSE, CCDM, read for ``FIELD-NOTES.md``). Those compilations disagree with one
another by up to 0.09 GED for the same method, and they were computed on one of two
public preprocessings of LIDC-IDRI:

- **LIDCv1**: the PyTorch port's pickle (15,096 crops of 128 x 128 from 875 patients);
- **LIDCv2**: the hierarchical Prob. U-Net release (8843/1993/1980 crops).

Neither is the paper's own split (12,870 crops), nor ours (``lidcseg prepare``). So
every value carries its data version (:attr:`Published.data`), and the report says it.

The Cityscapes flip task's numbers are the paper's own (Table 2,
:func:`paper_flip_ged`, i.e. :data:`lidcseg.metrics.flips.PAPER_GED`).

Table 1 (Appendix E, lesion-presence ambiguity) and the ablations of Appendix D have
not been transcribed here: :data:`PAPER_TABLE1` and :data:`PAPER_ABLATIONS` are empty,
and the report prints "not transcribed" in their paper column until someone copies the
values from the paper (with the page they came from).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The paper, as the report cites it.
PAPER = "Kohl et al., A Probabilistic U-Net for Segmentation of Ambiguous Images, NeurIPS 2018"
#: Data versions, as the report names them.
DATA_VERSIONS: dict[str, str] = {
    "ours": "ours (lidcseg prepare from the LIDC-IDRI DICOMs)",
    "LIDCv1": "LIDCv1 (the PyTorch port's pickle: 15,096 crops of 128 x 128, 875 patients)",
    "LIDCv2": "LIDCv2 (the hierarchical Prob. U-Net release: 8843/1993/1980 crops)",
    "paper": "the paper's own split (12,870 crops: 8882/1996/1992), not released",
}


@dataclass(frozen=True)
class Published:
    """One published LIDC row.

    Attributes:
        method: the method as the compilations name it.
        ged16, ged100: GED² (V-statistic, d = 1 - IoU) at 16 and 100 samples; None if not given.
        hm_iou: Hungarian-matched IoU (the form varies between papers: see ``note``).
        data: ``LIDCv1`` or ``LIDCv2`` (:data:`DATA_VERSIONS`).
        source: where the number was read.
        model: our registry name of the same method, or None.
    """

    method: str
    ged16: float | None
    ged100: float | None
    hm_iou: float | None
    data: str
    source: str
    model: str | None = None


_COMPILED = "compiled in later papers' tables (PHiSeg, SSN, MoSE, CCDM); see FIELD-NOTES.md"

#: Published LIDC numbers (FIELD-NOTES.md, "Published LIDC numbers").
PUBLISHED_LIDC: tuple[Published, ...] = (
    Published("Prob. U-Net", 0.310, 0.252, 0.548, "LIDCv1", _COMPILED, "probunet"),
    Published("PHiSeg L=5", 0.262, 0.224, 0.595, "LIDCv1", _COMPILED),
    Published("SSN", 0.259, 0.225, 0.550, "LIDCv1", _COMPILED),
    Published("HPU-Net", 0.270, None, 0.530, "LIDCv2", _COMPILED),
    Published("MoSE", 0.218, 0.189, 0.624, "LIDCv1", _COMPILED),
    Published("CCDM", 0.212, 0.183, 0.631, "LIDCv1", _COMPILED),
    Published("CCDM", 0.239, 0.210, None, "LIDCv2", "the CCDM paper"),
)
#: HM-IoU comes in two incompatible forms; the note the report prints under the table.
HM_IOU_NOTE = ("HM-IoU comes in two incompatible forms (a rectangular samples x graders matching, or "
               "both sets replicated to lcm(n, 4), which lidcseg uses); published values mix them.")

#: Where :func:`paper_flip_ged` comes from.
PAPER_FLIP_SOURCE = "the paper's Table 2: the Prob. U-Net on Cityscapes with the synthetic flips"

#: Table 1 (Appendix E): model registry name -> test accuracy of ambiguity detection.
#: Not transcribed yet (the report shows "not transcribed").
PAPER_TABLE1: dict[str, float] = {}
#: Appendix D ablations: model registry name -> GED² at 16 samples. Not transcribed yet.
PAPER_ABLATIONS: dict[str, float] = {}
#: What the report prints where a paper value is missing.
NOT_TRANSCRIBED = "not transcribed"


def paper_flip_ged() -> dict[int, float]:
    """The flip task, the paper's Table 2 (Prob. U-Net): GED at 1, 4, 8, 16 samples
    (:data:`lidcseg.metrics.flips.PAPER_GED`, imported only when asked: it brings torch)."""
    from lidcseg.metrics.flips import PAPER_GED

    return dict(PAPER_GED)


def published_for(model: str) -> list[Published]:
    """The published rows of our model ``model`` (registry name), e.g. ``probunet``."""
    return [p for p in PUBLISHED_LIDC if p.model == model]
