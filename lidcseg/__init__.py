"""lidcseg: ambiguous lung-lesion segmentation on LIDC-IDRI.

Implements "A Probabilistic U-Net for Segmentation of Ambiguous Images"
(Kohl et al., NeurIPS 2018) end to end: data preparation from the raw
LIDC-IDRI DICOM download, the model and its baselines, sampling into scan
geometry, and the paper's evaluations.

Data flows one way: LIDC on disk -> crops -> dataset -> model -> hypotheses
-> metrics/reports.
"""

from lidcseg.errors import LidcsegError

__version__ = "0.1.0"

__all__ = ["LidcsegError", "__version__"]
