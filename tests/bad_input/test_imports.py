"""``lidcseg import``: pickles that attack the parser, and image bombs, refused in one line.

The pickle is scanned before it is loaded (nesting depth, integer width, declared lengths,
memo slots) and the calls that allocate by size are bounded; a PNG's size is read from its
header before a pixel is decoded. Each case also checks that a data set already in
``--out`` is left as it was, even with ``--overwrite``.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.bad_input.conftest import cli, refused

# --------------------------------------------------------------------------- helpers


def _slices(n_patients: int = 3, size: int = 8) -> dict[str, Any]:
    """A tiny LIDCv1 pickle's content: one slice per patient."""
    rng = np.random.default_rng(0)
    return {f"LIDC-IDRI-{p + 1:04d}_slice1": {
        "image": (rng.integers(0, 256, (size, size)) / 255.0).astype(np.float32),
        "masks": [np.eye(size, dtype=np.uint8)] * 4, "series_uid": f"1.{p}"} for p in range(n_patients)}


class _Call:
    """Pickles as the call ``fn(*args)``."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


@pytest.fixture
def imported(tmp_path: Path) -> Path:
    """A data folder that a first, valid import wrote (what a refused import must not touch)."""
    src = tmp_path / "good.pickle"
    src.write_bytes(pickle.dumps(_slices(), protocol=4))
    out = tmp_path / "data"
    assert cli("import", "pytorch-pickle", src, "--out", out).exit_code == 0
    return out


def _run_import(kind: str, src: Path, out: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``lidcseg import KIND SRC --out OUT --overwrite`` in its own process (a crash stays there)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("LIDCSEG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lidcseg_cli.main", "import", kind, str(src), "--out", str(out),
                           "--overwrite"], capture_output=True, text=True, env=env, timeout=120)


# --------------------------------------------------------------------------- nesting: in a subprocess

_TUPLES = b"N" + b"\x85" * 200_000  # ((((None,),),)...) built by 200k TUPLE1: hashing it overflows the C stack
#: Pickles that nest deeper than MAX_DEPTH; each crashed the interpreter or hit the recursion limit.
NESTED = {
    "tuple-as-dict-key": b"\x80\x02}" + _TUPLES + b"Ns.",
    "frozenset-of-nested-tuple": b"\x80\x02c__builtin__\nfrozenset\n" + _TUPLES + b"\x85R.",
    "nested-lists-as-value": b"\x80\x02}X\x01\x00\x00\x00a" + b"]" * 100_000 + b"a" * 99_999 + b"s.",
    "open-marks": b"\x80\x02" + b"(" * 100_000 + b"l" * 100_000 + b".",
}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_deep_nesting_is_refused_not_a_crash(name: str, imported: Path, tmp_path: Path, unchanged) -> None:
    src = tmp_path / f"{name}.pickle"
    src.write_bytes(NESTED[name])
    with unchanged(imported):
        res = _run_import("pytorch-pickle", src, imported, tmp_path)
    assert res.returncode == 2, f"exit {res.returncode} (-11 is a segfault)\n{res.stderr[-2000:]}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert str(src) in lines[0] and "nest deeper than 100" in lines[0]


# --------------------------------------------------------------------------- sizes: in process


def _long4(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<I", len(data)) + data


HOSTILE = {
    # name: (pickle bytes, what the line must say)
    "huge-int-key": (b"\x80\x02}" + _long4(10**100_000) + b"Ns.", "integer of 332193 bits (at most 256)"),
    "huge-decimal-int": (b"I" + b"9" * 100_000 + b"\n.", "number of 100000 digits"),
    "bytes8-past-the-end": (b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"xx.", "declares a 4611686018427387904-byte"),
    "unicode4-past-the-end": (b"\x80\x02X" + struct.pack("<I", 2**31) + b"abc.", "but only 4 bytes follow"),
    "frame-past-the-end": (b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.", "frame of 1099511627776 bytes"),
    "far-memo-slot": (b"\x80\x02}r\xff\xff\xff\xff.", "memo slot 4294967295"),
    "array-memory-bomb": (pickle.dumps({"k": _Call(np._core.multiarray._reconstruct,
                                                   np.ndarray, (10**5, 10**5), b"f")}, protocol=2),
                          "array of 40000000000 bytes"),
    "bytes-memory-bomb": (pickle.dumps({"k": _Call(bytes, 10**12)}, protocol=2), "bytes of 1000000000000 bytes"),
    "ndarray-called": (pickle.dumps({"k": _Call(np.ndarray, (10**5, 10**5))}, protocol=2), "numpy.ndarray(...) directly"),
    "garbage": (bytes(range(256)) * 4, "not a readable pickle"),
    "no-stop": (b"\x80\x02}", "not a readable pickle"),
    "stack-underflow": (b"\x80\x02a.", "malformed opcode stream"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pickle_is_refused_naming_the_limit(name: str, imported: Path, tmp_path: Path, unchanged) -> None:
    content, needle = HOSTILE[name]
    src = tmp_path / f"{name}.pickle"
    src.write_bytes(content)
    with unchanged(imported):
        refused(cli("import", "pytorch-pickle", src, "--out", imported, "--overwrite"), str(src), needle)


def test_object_mask_is_refused(tmp_path: Path) -> None:
    data = _slices()
    next(iter(data.values()))["masks"] = [np.array([["a"] * 8] * 8, dtype=object)] * 4
    src = tmp_path / "objmask.pickle"
    src.write_bytes(pickle.dumps(data))
    refused(cli("import", "pytorch-pickle", src, "--out", tmp_path / "out"), str(src), "mask 0 has dtype object")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- PNG image bombs


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` 8-bit grey pixels, with a tiny IDAT."""
    idat = zlib.compress(b"\0" * (width + 1) * 4)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _png_tree(root: Path) -> Path:
    """A one-crop LIDCv2 test split; returns the image's path."""
    img = root / "test" / "images" / "LIDC-IDRI-0001" / "z-1.0_c0.png"
    mask = root / "test" / "gt" / "LIDC-IDRI-0001" / "z-1.0_c0_l0.png"
    for p in (img, mask):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((180, 180), np.uint8)).save(p)
    return img


def _break_png(img: Path, how: str) -> Path:
    if how == "bomb-100000x100000":
        img.write_bytes(_png_header_only(100_000, 100_000))
    elif how == "bomb-20000x10000":  # over PIL's own limit: its DecompressionBombError before
        img.write_bytes(_png_header_only(20_000, 10_000))
    elif how == "wide-5000x180":
        img.write_bytes(_png_header_only(5000, 180))
    elif how == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 180)).astype(np.uint8)).save(img)
        img.write_bytes(img.read_bytes()[:1500])
    elif how == "jpeg-named-png":
        Image.fromarray(np.zeros((180, 180), np.uint8)).save(img, format="JPEG")
    elif how == "corrupt-idat":
        img.write_bytes(_png_header_only(180, 180).replace(b"IDAT", b"IDAT\x00\x01garbage", 1))
    elif how == "mask-bomb":
        img = img.parents[2] / "gt" / "LIDC-IDRI-0001" / "z-1.0_c0_l0.png"
        img.write_bytes(_png_header_only(60_000, 60_000))
    else:
        raise AssertionError(how)
    return img


PNG_CASES = {
    "bomb-100000x100000": "declares 100000x100000 pixels: at most 1024x1024",
    "bomb-20000x10000": "declares 20000x10000 pixels",
    "wide-5000x180": "declares 5000x180 pixels",
    "truncated": "not a readable PNG",
    "jpeg-named-png": "not a readable PNG",
    "corrupt-idat": "not a readable PNG",
    "mask-bomb": "mask is 60000x60000, its image 180x180",
}


@pytest.mark.parametrize("how", sorted(PNG_CASES))
def test_png_bomb_or_damage_is_refused(how: str, imported: Path, tmp_path: Path, unchanged) -> None:
    named = _break_png(_png_tree(tmp_path / "v2"), how)
    with unchanged(imported):
        refused(cli("import", "hpunet-png", tmp_path / "v2", "--out", imported, "--overwrite"), str(named),
                PNG_CASES[how])
