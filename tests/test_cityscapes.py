"""``lidcseg cityscapes prepare`` on a tiny fixture in the official Cityscapes layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lidcseg.data.cityscapes import (
    LABELS,
    VAL_CITIES,
    find_frames,
    label_lut,
    output_split,
    prepare_cityscapes,
    to_train_ids,
)
from lidcseg.data.scenes import SceneStore, read_manifest
from lidcseg.errors import LidcsegError
from lidcseg_cli.main import app

runner = CliRunner()
H, W = 32, 64  # fixture frames (the real ones are 1024 x 2048)

#: (official split, city, frame number): aachen stays train, ulm and darmstadt become val,
#: frankfurt (official val) becomes test.
FRAMES = [("train", "aachen", 0), ("train", "aachen", 1), ("train", "ulm", 0),
          ("train", "darmstadt", 4), ("val", "frankfurt", 2)]


def _label_ids(k: int) -> np.ndarray:
    """4 x 8 blocks of 8 x 8 pixels with known labelIds (0 unlabeled, 9 parking, 40 unknown)."""
    blocks = np.array([[7, 7, 8, 8, 26, 26, 24, 21],
                       [7, 7, 8, 8, 26, 26, 24, 21],
                       [23, 23, 11, 0, 9, 40, 33, 17],
                       [7, 8, 26, 24, 21, 11, 23, 7]], np.uint8)
    return np.roll(blocks, k, axis=1).repeat(8, 0).repeat(8, 1)


def make_fixture(root: Path, frames=FRAMES) -> Path:
    for official, city, n in frames:
        stem = f"{city}_000000_{n:06d}"
        img_dir = root / "leftImg8bit" / official / city
        gt_dir = root / "gtFine" / official / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[..., 0] = 10 * n + 20  # a uniform colour per frame survives area averaging
        rgb[..., 1] = np.arange(W)[None] * 4  # a ramp that averages to known values
        Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(_label_ids(n)).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        # Other official files in the folder are not read.
        Image.fromarray(_label_ids(n)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    (root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cityscapes")
    root = make_fixture(base / "cityscapes")
    out = base / "data"
    prepare_cityscapes(root, out, height=16, width=32)
    return root, out


def test_label_table_is_the_official_one() -> None:
    lut = label_lut()
    train_ids = {name: t for name, _, t in LABELS if 0 <= t < 255}
    assert sorted(train_ids.values()) == list(range(19))
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(256):
        assert lut[label_id] == expected.get(label_id, 255), label_id
    assert np.array_equal(to_train_ids(np.array([[7, 0, 26], [255, 9, 33]])), [[0, 255, 13], [255, 255, 18]])


def test_split_rule() -> None:
    assert VAL_CITIES == {"darmstadt", "monchengladbach", "ulm"}
    assert output_split("train", "ulm") == "val"
    assert output_split("train", "monchengladbach") == "val"
    assert output_split("train", "aachen") == "train"
    assert output_split("val", "frankfurt") == "test"
    assert output_split("val", "ulm") == "test"  # only training cities are held out


def test_prepare_splits_and_names(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    manifest = read_manifest(out)
    assert manifest["source"] == "cityscapes"
    assert manifest["counts"] == {"train": 2, "val": 2, "test": 1}
    assert manifest["cities"] == {"train": ["aachen"], "val": ["darmstadt", "ulm"], "test": ["frankfurt"]}
    assert SceneStore(out / "train.h5").names == ["aachen/aachen_000000_000000", "aachen/aachen_000000_000001"]
    assert SceneStore(out / "val.h5").names == ["darmstadt/darmstadt_000000_000004", "ulm/ulm_000000_000000"]
    assert SceneStore(out / "test.h5").names == ["frankfurt/frankfurt_000000_000002"]


def test_prepare_sizes_and_train_ids(prepared: tuple[Path, Path]) -> None:
    _, out = prepared
    store = SceneStore(out / "val.h5")
    assert (store.height, store.width) == (16, 32)
    image, label = store[0]  # darmstadt frame 4
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)
    # Labels: nearest neighbour of the 8 x 8 blocks (now 4 x 4), mapped to trainIds.
    expected = to_train_ids(_label_ids(4))[::2, ::2]
    assert np.array_equal(label, expected)
    assert set(np.unique(label)) <= set(range(19)) | {255}
    # Image: area averaging keeps a uniform channel and averages the ramp pairwise.
    assert (image[0] == 60).all()
    assert np.array_equal(image[1, 0], (np.arange(0, 64, 2) * 4 + 2).astype(np.uint8))


def test_find_frames_errors(tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="not found"):
        find_frames(tmp_path / "nope")
    with pytest.raises(LidcsegError, match="leftImg8bit/train"):
        find_frames(tmp_path)
    root = make_fixture(tmp_path / "cs")
    (root / "gtFine" / "train" / "ulm" / "ulm_000000_000000_gtFine_labelIds.png").unlink()
    with pytest.raises(LidcsegError, match="no label file"):
        find_frames(root)


def test_prepare_refuses_missing_val_cities(tmp_path: Path) -> None:
    root = make_fixture(tmp_path / "cs", [("train", "aachen", 0), ("val", "lindau", 1)])
    with pytest.raises(LidcsegError, match="val split"):
        prepare_cityscapes(root, tmp_path / "out", height=16, width=32)
    assert not (tmp_path / "out").exists()


def test_prepare_workers_give_the_same_files(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    root, out = prepared
    out2 = tmp_path / "w2"
    prepare_cityscapes(root, out2, height=16, width=32, workers=2)
    for split in ("train", "val", "test"):
        a, b = SceneStore(out / f"{split}.h5").read_all(), SceneStore(out2 / f"{split}.h5").read_all()
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_cli_cityscapes_prepare(tmp_path: Path) -> None:
    root = make_fixture(tmp_path / "cs")
    out = tmp_path / "data"
    result = runner.invoke(app, ["cityscapes", "prepare", "--root", str(root), "--out", str(out),
                                 "--size", "16x32"])
    assert result.exit_code == 0, result.output
    assert "train 2 / val 2 / test 1" in result.output
    again = runner.invoke(app, ["cityscapes", "prepare", "--root", str(root), "--out", str(out), "--size", "16x32"])
    assert again.exit_code == 2
    lines = [ln for ln in again.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]
    missing = runner.invoke(app, ["cityscapes", "prepare", "--root", str(tmp_path / "none"), "--out", str(out)])
    lines = [ln for ln in missing.output.splitlines() if ln.strip()]
    assert missing.exit_code == 2 and len(lines) == 1 and "not found" in lines[0]
