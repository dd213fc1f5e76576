"""Import the two public preprocessed LIDC releases into the crop format of :mod:`lidcseg.data.store`.

Published LIDC numbers are quoted on one of two preprocessings (FIELD-NOTES, "Published
LIDC numbers"), so results are only comparable on the same data:

* **LIDCv1**, the pickle of the PyTorch port (stefanknegt/Probabilistic-Unet-Pytorch,
  ``data_lidc.pickle``; also used by PHiSeg, SSN, MoSE, CCDM). One dict keyed by slice name
  ``<patient>_<rest>`` (e.g. ``LIDC-IDRI-0001_...``); each value is a dict with ``'image'``
  (128 x 128 float in [0, 1]), ``'masks'`` (a list of 4 128 x 128 arrays, 0/1) and
  ``'series_uid'``. The release has no split. Read from the port's ``load_LIDC_data.py``
  (it asserts images and masks lie in [0, 1]), PHiSeg's ``data/lidc_data_loader.py``
  (splits by ``series_uid``) and the generalized Prob. U-Net's split script (patient =
  ``key.split('_')[0]``).
* **LIDCv2**, the 180 x 180 PNG crops of the hierarchical Prob. U-Net
  (google-deepmind/deepmind-research ``hierarchical_probabilistic_unet/README.md``): one
  archive per split that unpacks to ``[lidc_crops_<split>/]<split>/images/<patient>/
  z-<z>_c<crop>.png`` and ``.../gt/<patient>/z-<z>_c<crop>_l<grader>.png`` (graders
  numbered 0..3 in the files in use, 1..4 in the README; any integer is accepted and
  sorted). Pixels are 0.5 mm; the images are 8-bit windowed CT, not Hounsfield units.

Intensity convention (file attribute ``intensity``, also in ``manifest.json``):

============================  ==============================================================
``intensity``                 meaning of the int16 ``image``
============================  ==============================================================
``"HU"``                      Hounsfield units (``lidcseg prepare``)
``"png-uint8"``               LIDCv2: the PNG's 8-bit grey value 0..255, stored as is
``"unit-float-x255"``         LIDCv1: ``round(255 * x)`` of the pickle's float ``x`` in [0, 1]
============================  ==============================================================

For both imports ``image / intensity_scale`` (attribute, 255.0) gives the release's own
[0, 1] image. LIDCv1 loses at most 1/510 to the rounding; the largest error actually met is
recorded as ``quantisation_max_error`` in the manifest.

Metadata columns of imported crops: ``patient_id`` from the names; ``scan_id`` -1;
``lesion_id`` the crop number ``c<k>`` of the name where there is one (LIDCv2: crop number
within the slice), else a running index within the patient; ``slice_index`` a parsed
``slice<k>`` where there is one, else a running index within the patient in name order;
``z_mm`` the ``z-<z>`` of the name where there is one (LIDCv2), else NaN; ``n_graders`` the
number of masks the release gives; ``centre_mm`` NaN. Masks are binarised (> 0) and padded
to 4 graders with empty masks.

The pickle is read by :func:`safe_load_pickle`, which never runs code from the file.

The package: :mod:`~lidcseg.data.releases.lidcv1` (the pickle),
:mod:`~lidcseg.data.releases.lidcv2` (the PNGs), :mod:`~lidcseg.data.releases.common` (the
folder both write) and :mod:`~lidcseg.data.releases.safe_pickle`.
"""

from lidcseg.data.releases.common import (
    INTENSITY_SCALE,
    MANIFEST,
    SPLIT_PROPORTIONS,
    ImportSummary,
)
from lidcseg.data.releases.lidcv1 import import_pytorch_pickle
from lidcseg.data.releases.lidcv2 import import_hpunet_png
from lidcseg.data.releases.safe_pickle import safe_load_pickle
from lidcseg.data.split import SPLITS

__all__ = [
    "INTENSITY_SCALE",
    "MANIFEST",
    "SPLITS",
    "SPLIT_PROPORTIONS",
    "ImportSummary",
    "import_hpunet_png",
    "import_pytorch_pickle",
    "safe_load_pickle",
]
