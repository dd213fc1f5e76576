"""Make a phantom LIDC-IDRI and prepare its crops through the public API.

    python examples/prepare_phantom.py [OUT]

Writes OUT/lidc (DICOM, TCIA layout) and OUT/data ({train,val,test}.h5, manifest.json),
then prints the crop counts and the first crop's metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lidcseg.config import DataConfig
from lidcseg.data.prepare import prepare
from lidcseg.data.store import CropStore
from lidcseg.lidc.phantom import make_phantom


def main(out: Path) -> None:
    make_phantom(out / "lidc", patients=["LIDC-IDRI-0078", "LIDC-IDRI-0983", "LIDC-IDRI-0719"], seed=0)
    manifest = prepare(out / "lidc", out / "data", DataConfig(seed=0), workers=1)
    for split, c in manifest["counts"].items():
        print(f"{split:>5}: {c['crops']:4d} crops from {c['patients']} patient(s)")
    store = CropStore(out / "data" / "val.h5")
    image, masks = store[0]
    print("crop 0:", image.shape, image.dtype, masks.shape, {k: v[0] for k, v in store.meta.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "example-out"))
