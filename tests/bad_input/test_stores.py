"""Our own stores and run folders, damaged: split files, manifests, training state, metrics, configs.

Each is checked when it is opened and refused in one line that names the file, says what
is wrong and how to recover (re-run the command with ``--overwrite``, or start a new run);
nothing already on disk changes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from lidcseg.config import ModelConfig, TrainConfig
from tests.bad_input.conftest import cli, refused

TINY = ["--preset", "cpu-quick", "--set", "base_channels=4", "--set", "num_scales=3", "--set", "fcomb_channels=8",
        "--set", "latent_dim=2", "--set", "batch_size=4", "--set", "input_size=32", "--set", "val_max_crops=4",
        "--set", "val_samples=4", "--set", "val_every=2", "--set", "checkpoint_every=2", "--device", "cpu"]


@pytest.fixture
def data(disc_data: Path, tmp_path: Path) -> Path:
    """A copy of the session's crop data folder, to damage."""
    return Path(shutil.copytree(disc_data, tmp_path / "data"))


def _train(data_dir: Path, out: Path, *extra: object):
    return cli("train", "--data", data_dir, "--out", out, "--steps", 1, *TINY, *extra)


# --------------------------------------------------------------------------- HDF5 split files


def _rewrite(name: str, make: Callable[[h5py.File, np.ndarray], None]) -> Callable[[h5py.File], None]:
    """Replace dataset ``name`` by ``make(file, old values)``."""
    def edit(f: h5py.File) -> None:
        old = f[name][...]
        del f[name]
        make(f, old)
    return edit


H5_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "not-hdf5": (lambda p: p.write_bytes(b"not an HDF5 file at all" * 100), "cannot read HDF5"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "damaged or truncated"),
    "no-masks": (lambda p: _edit(p, lambda f: f.__delitem__("masks")), "no 'masks' dataset"),
    "no-crop-size": (lambda p: _edit(p, lambda f: f.attrs.__delitem__("crop_size")), "attribute crop_size: missing"),
    "crop-size-text": (lambda p: _edit(p, lambda f: f.attrs.__setitem__("crop_size", "big")),
                       "attribute crop_size: 'big' is not an integer"),
    "short-column": (lambda p: _edit(p, _rewrite("z_mm", lambda f, v: f.create_dataset("z_mm", data=v[:-3]))),
                     "datasets of different lengths: image 12, z_mm 9"),
    "float-image": (lambda p: _edit(p, _rewrite("image", lambda f, v: f.create_dataset("image", data=v.astype("f4")))),
                    "dataset 'image' has dtype float32, expected int16"),
    "masks-rank": (lambda p: _edit(p, _rewrite("masks", lambda f, v: f.create_dataset("masks", data=v[:, 0]))),
                   "dataset 'masks' has shape (12, 180, 180), expected (N, 4, 180, 180)"),
    "group-not-dataset": (lambda p: _edit(p, lambda f: (f.__delitem__("image"), f.create_group("image"))),
                          "'image' is not a dataset"),
    "other-format": (lambda p: _edit(p, lambda f: f.attrs.__setitem__("format", "lidcseg-scenes")),
                     "not a lidcseg-crops file"),
}


def _edit(path: Path, change: Callable[[h5py.File], object]) -> None:
    with h5py.File(path, "r+") as f:
        change(f)


@pytest.mark.parametrize("damage", sorted(H5_DAMAGE))
def test_damaged_split_file_is_refused_with_the_way_back(damage: str, data: Path, tmp_path: Path, unchanged) -> None:
    how, needle = H5_DAMAGE[damage]
    how(data / "train.h5")
    with unchanged(data):
        refused(_train(data, tmp_path / "run"), str(data / "train.h5"), needle, "re-run `lidcseg prepare`",
                "--overwrite")
    assert not (tmp_path / "run").exists()


def test_damaged_split_is_refused_by_evaluate(data: Path, run: Path, tmp_path: Path, unchanged) -> None:
    H5_DAMAGE["short-column"][0](data / "test.h5")
    with unchanged(data, run):
        refused(cli("evaluate", "--data", data, "--run", run, "--out", tmp_path / "report", "-n", "2"),
                str(data / "test.h5"), "different lengths")
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------- scene data and manifests


@pytest.fixture(scope="module")
def scenes_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lidcseg.data.scenes import make_scenes

    out = tmp_path_factory.mktemp("scenes") / "data"
    make_scenes(out, n_train=4, n_val=2, n_test=2, height=32, width=64, seed=1)
    return out


@pytest.fixture
def scenes(scenes_src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(scenes_src, tmp_path / "scenes"))


def _manifest(content: bytes | Callable[[dict], object]) -> Callable[[Path], Path]:
    def damage(folder: Path) -> Path:
        path = folder / "manifest.json"
        if callable(content):
            data = json.loads(path.read_text())
            content(data)
            path.write_text(json.dumps(data))
        else:
            path.write_bytes(content)
        return path
    return damage


SCENE_DAMAGE: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "split-without-label": (lambda d: (_edit(d / "train.h5", lambda f: f.__delitem__("label")), d / "train.h5")[1],
                            ("no 'label' dataset", "re-run `lidcseg scenes make` with --overwrite")),
    "manifest-not-json": (_manifest(b'{"task": "flip-scenes", '), ("manifest is not valid JSON", "line 1")),
    "manifest-not-utf8": (_manifest(b'{"task": "flip-\xff\xfe"}'), ("manifest is not UTF-8 text",)),
    "manifest-a-list": (_manifest(b'["flip-scenes"]'), ("manifest is a JSON array, expected an object",)),
    "manifest-no-classes": (_manifest(lambda m: m.pop("num_classes")),
                            ("lacks the field 'num_classes'", "re-run `lidcseg scenes make`")),
    "manifest-height-text": (_manifest(lambda m: m.__setitem__("height", "32")),
                             ("field 'height' is a JSON string, expected int",)),
}


@pytest.mark.parametrize("damage", sorted(SCENE_DAMAGE))
def test_damaged_scene_data_is_refused(damage: str, scenes: Path, tmp_path: Path, unchanged) -> None:
    how, needles = SCENE_DAMAGE[damage]
    named = how(scenes)
    with unchanged(scenes):
        refused(cli("train", "--data", scenes, "--out", tmp_path / "run", "--steps", 1, "--preset", "scenes-quick",
                    "--device", "cpu"), str(named), *needles)
    assert not (tmp_path / "run").exists()


def test_damaged_manifest_of_crop_data_is_refused(data: Path, tmp_path: Path, unchanged) -> None:
    (data / "manifest.json").write_bytes(b"\x00\x01 not json")
    with unchanged(data):
        refused(_train(data, tmp_path / "run"), str(data / "manifest.json"), "manifest is not valid JSON",
                "--overwrite")


# --------------------------------------------------------------------------- a run's training state


@pytest.fixture(scope="module")
def run_src(tmp_path_factory: pytest.TempPathFactory, disc_data: Path) -> Path:
    """A tiny run of 2 steps with ``last/`` (model, state.json, state.safetensors)."""
    from lidcseg.training import train

    model = ModelConfig(base_channels=4, num_scales=3, fcomb_channels=8, latent_dim=2)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, lr_final=1e-4, lr_decay_steps=1, input_size=32,
                      aug_max_shift=8, num_workers=0, log_every=1, val_every=2, val_samples=2, val_max_crops=4,
                      val_batch_size=4, checkpoint_every=2, device="cpu", threads=1)
    return train(disc_data, model, cfg, tmp_path_factory.mktemp("run") / "run")


@pytest.fixture
def run(run_src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_src, tmp_path / "run"))


def _state_json(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    def damage(run_dir: Path) -> Path:
        path = run_dir / "last" / "state.json"
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))
        return run_dir / "last"
    return damage


def _tensors(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    def damage(run_dir: Path) -> Path:
        from safetensors.torch import load_file, save_file

        path = run_dir / "last" / "state.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "lidcseg-train-state"})
        return run_dir / "last"
    return damage


def _write(rel: str, content: bytes) -> Callable[[Path], Path]:
    def damage(run_dir: Path) -> Path:
        (run_dir / rel).write_bytes(content)
        return run_dir / rel
    return damage


def _reshape_first_moment(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if k.endswith("/exp_avg") and tensors[k].dim() == 4)
    tensors[key] = tensors[key].flatten()[:5].clone()


STATE_DAMAGE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "state-json-not-json": (_write("last/state.json", b'{"format": "lidcseg-train-state", "step": '),
                            "training state is not valid JSON"),
    "state-json-step-text": (_state_json(lambda s: s.__setitem__("step", "two")),
                             "field 'step' is a JSON string, expected int"),
    "state-json-no-rng": (_state_json(lambda s: s.pop("rng")), "lacks the field 'rng'"),
    "state-json-groups": (_state_json(lambda s: s["optimizer"].__setitem__("param_groups", [])),
                          "0 parameter groups saved, the optimizer has 1"),
    "state-json-betas": (_state_json(lambda s: s["optimizer"]["param_groups"][0].__setitem__("betas", "x")),
                         "parameter group 0: betas is x"),
    "state-json-numpy-rng": (_state_json(lambda s: s["rng"][0]["numpy"].__setitem__("keys", [1, 2])),
                             "the NumPy RNG state is not one"),
    "tensors-garbage": (_write("last/state.safetensors", b"\xff" * 64), "training state tensors unreadable"),
    "tensors-wrong-shape": (_tensors(_reshape_first_moment), "its parameter needs a float"),
    "tensors-no-torch-rng": (_tensors(lambda t: t.pop("rank0/rng/torch_cpu")), "no torch RNG state"),
    "tensors-unknown-param": (_tensors(lambda t: t.__setitem__("optim/9999/exp_avg", t["rank0/rng/torch_cpu"].clone())),
                              "names no parameter of the model"),
    "config-a-list": (_write("config.json", b"[1, 2]"), "run config is a JSON array, expected an object"),
    "config-wrong-type": (lambda r: _config(r, "base_channels", "4"),
                          'ModelConfig.base_channels: "4" is a string, expected an integer'),
}


def _config(run_dir: Path, field: str, value: object) -> Path:
    path = run_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model"][field] = value
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGE))
def test_damaged_training_state_is_refused_on_resume(damage: str, run: Path, disc_data: Path, unchanged) -> None:
    how, needle = STATE_DAMAGE[damage]
    named = how(run)
    with unchanged(run, disc_data):
        refused(cli("train", "--data", disc_data, "--out", run, "--resume", "--steps", 3), str(named), needle,
                "cannot resume: start a new run")


def test_torn_metrics_lines_are_skipped_alike_by_reading_and_resume(run: Path, disc_data: Path) -> None:
    from lidcseg.training import iter_metrics

    path = run / "metrics.jsonl"
    good = path.read_bytes()
    rows = list(iter_metrics(run))
    path.write_bytes(good + b'[1, 2]\n{"step": "x", "split": "train"}\n\xff\xfe{"step": 1}\n'
                     b'{"step": true}\n7\n{"split": "train", "step": 2, "lo')
    assert list(iter_metrics(run)) == rows  # every damaged line skipped
    assert cli("train", "--data", disc_data, "--out", run, "--resume", "--steps", 3).exit_code == 0
    lines = path.read_bytes().splitlines()
    assert lines[: len(rows)] == good.splitlines()  # the rows up to the checkpoint, as they were
    assert [json.loads(ln) for ln in lines] == list(iter_metrics(run))  # no damaged line kept
    assert max(r["step"] for r in iter_metrics(run)) == 3


# --------------------------------------------------------------------------- --set and --config values


CONFIGS: dict[str, tuple[bytes, str]] = {
    "float-for-channels": (b'{"model": {"base_channels": 4.0}}', "ModelConfig.base_channels: 4.0 is a number, "
                                                                  "expected an integer"),
    "string-for-int": (b'{"train": {"steps": "10"}}', 'TrainConfig.steps: "10" is a string, expected an integer'),
    "list-for-float": (b'{"train": {"lr": [0.1]}}', "TrainConfig.lr: [0.1] is an array, expected a number"),
    "int-for-bool": (b'{"model": {"posterior_context": 1}}', "expected true or false"),
    "bool-for-int": (b'{"model": {"latent_dim": true}}', "ModelConfig.latent_dim: true is a boolean"),
    "object-for-float": (b'{"model": {"beta": {"value": 1}}}', "ModelConfig.beta: {\"value\": 1} is an object"),
    "unknown-nested-key": (b'{"model": {"base_channel": 4}}', "unknown ModelConfig field(s): base_channel"),
    "model-a-list": (b'{"model": [4]}', '"model" must be a JSON object'),
    "not-json": (b'{"model": {"beta": 1,}}', "config file is not valid JSON"),
    "not-utf8": (b'{"model": {"name": "\xe9"}}', "config file is not UTF-8 text"),
    "deeply-nested": (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "config file is not readable JSON"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_file_value_of_the_wrong_type(name: str, disc_data: Path, tmp_path: Path) -> None:
    content, needle = CONFIGS[name]
    path = tmp_path / "cfg.json"
    path.write_bytes(content)
    refused(_train(disc_data, tmp_path / "run", "--config", path), str(path), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("pair", "needle"), [
    ("base_channels=3.5", "--set base_channels: cannot read '3.5' as int"),
    ("augment=maybe", "--set augment: cannot read 'maybe' as bool"),
    ("lr=[0.1]", "--set lr: cannot read '[0.1]' as float"),
])
def test_set_value_of_the_wrong_type(pair: str, needle: str, disc_data: Path, tmp_path: Path) -> None:
    refused(_train(disc_data, tmp_path / "run", "--set", pair), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("damage", "needle"), [
    (b"{not json", "manifest is not valid JSON"),
    (b"[1, 2]", "manifest is a JSON array, expected an object"),
    (b"\xff\xfe{}", "manifest is not UTF-8"),
])
def test_prepare_refuses_a_damaged_manifest(damage: bytes, needle: str, fault_root, tmp_path: Path,
                                            unchanged) -> None:
    root = fault_root("")
    out = tmp_path / "data"
    assert cli("prepare", "--lidc-root", root, "--out", out).exit_code == 0
    (out / "manifest.json").write_bytes(damage)
    with unchanged(out):
        refused(cli("prepare", "--lidc-root", root, "--out", out), "manifest.json", needle,
                "--overwrite")
