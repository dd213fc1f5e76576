"""``lidcseg reproduce``: the plan, completion records, resume after a kill, dry run, one-line errors.

Tiny runs: the 3-scan phantom, 4 training steps of small batches, two models
(``probunet`` and ``m-heads-4``, so the evaluation counts are 1 and 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lidcseg.errors import LidcsegError
from lidcseg.reproduce import RECORD, ReproduceEvent, ReproduceOptions, build_plan, reproduce
from lidcseg.reproduce.options import check_m_heads
from lidcseg.reproduce.plan import differences
from lidcseg_cli.main import app

runner = CliRunner()

#: Small and fast: every training takes a few seconds on one thread.
TINY_SETS = ("batch_size=4", "val_max_crops=4", "val_samples=4", "log_every=1")
TINY = ["--preset", "cpu-quick", "--steps", "4", "--models", "probunet,m-heads-4", "-n", "1,4",
        *(a for s in TINY_SETS for a in ("--set", s))]


def tiny(out: Path, data: Path | None = None, lidc_root: Path | None = None, **kw) -> ReproduceOptions:
    fields = dict(out=out, data=data, lidc_root=lidc_root, preset="cpu-quick", steps=4,
                  models=("probunet", "m-heads-4"), counts=(1, 4), sets=TINY_SETS, report=False, device="cpu")
    fields.update(kw)
    return ReproduceOptions(**fields)


def report_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("lidcseg.cases", "lidcseg.reports.html"))


def records(out: Path) -> dict[str, float]:
    """Completion record path (relative) -> mtime, for every record under ``out``."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob(RECORD)}


def plan_json(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


def states(out: Path) -> dict[str, str]:
    return {s["name"]: s["state"] for s in plan_json(out)["stages"]}


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def full_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One whole tiny reproduction through the CLI, from the phantom (prepare included)."""
    out = tmp_path_factory.mktemp("reproduce") / "out"
    extra = [] if report_available() else ["--no-report"]
    result = runner.invoke(app, ["reproduce", "--lidc-root", str(phantom_root), "--out", str(out),
                                 "--device", "cpu", *TINY, *extra])
    assert result.exit_code == 0, result.output
    return out


def test_full_run_finishes_every_stage(full_run: Path) -> None:
    plan = plan_json(full_run)
    names = [s["name"] for s in plan["stages"]]
    assert names[:5] == ["prepare", "train:probunet", "train:m-heads-4", "evaluate", "ambiguity"]
    assert "latent" in names
    assert set(states(full_run).values()) == {"done"}
    for s in plan["stages"]:
        assert s["wall_s"] is not None and s["finished"] and s["estimate_s"] > 0
        assert (full_run / s["folder"] / RECORD).is_file()
    assert plan["options"]["keys"] == ["probunet", "m-heads-4"]
    env = plan["environment"]
    assert env["torch"] and env["cpu_count"] >= 1 and "platform" in env
    # The layout: runs, the experiments' own reports, the latent figure.
    assert (full_run / "runs/probunet/last/state.json").is_file()
    assert json.loads((full_run / "runs/m-heads-4/config.json").read_text())["model"]["num_heads"] == 4
    assert json.loads((full_run / "runs/probunet/config.json").read_text())["preset"] == "cpu-quick"
    summary = json.loads((full_run / "evaluate/summary.json").read_text())
    assert summary is not None and (full_run / "evaluate/ged.png").is_file()
    assert (full_run / "ambiguity/ambiguity.json").is_file()
    assert (full_run / "latent/latent.png").is_file()
    rec = json.loads((full_run / "runs/probunet" / RECORD).read_text())
    assert rec["stage"] == "train:probunet" and rec["detail"]["steps"] == 4
    assert "prepare" in rec["inputs"]["upstream"]
    if report_available():
        assert (full_run / "report.html").is_file()


def test_second_run_redoes_nothing(full_run: Path) -> None:
    before = records(full_run)
    metrics = (full_run / "runs/probunet/metrics.jsonl").read_bytes()
    events: list[ReproduceEvent] = []
    options = tiny(full_run, lidc_root=json_path(full_run, "lidc_root"), report=report_available())
    reproduce(options, callback=events.append)
    assert {e.kind for e in events} == {"skip"}
    assert len(events) == len(before)
    assert records(full_run) == before
    assert (full_run / "runs/probunet/metrics.jsonl").read_bytes() == metrics


def json_path(out: Path, key: str) -> Path:
    return Path(plan_json(out)["options"][key])


def test_dry_run_prints_the_plan_and_writes_nothing(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "new"
    result = runner.invoke(app, ["reproduce", "--data", str(full_run / "data"), "--out", str(out),
                                 "--dry-run", "--no-report", "--flip", *TINY])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    lines = result.output.splitlines()
    assert lines[0].split() == ["stage", "state", "estimate", "folder", "note"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:-1]}
    assert list(rows) == ["prepare", "train:probunet", "train:m-heads-4", "evaluate", "ambiguity", "latent",
                          "flip:data", "flip:train:probunet", "flip:train:dropout-unet", "calibration"]
    assert rows["prepare"][1] == "done" and rows["prepare"][4] == "given"
    assert all(r[1] == "pending" for name, r in rows.items() if name != "prepare")
    assert lines[-1].startswith("estimate: ")
    # On a finished folder the dry run says everything is done, and changes nothing.
    before = records(full_run)
    extra = [] if report_available() else ["--no-report"]
    result = runner.invoke(app, ["reproduce", "--lidc-root", str(json_path(full_run, "lidc_root")),
                                 "--out", str(full_run), "--dry-run", "--device", "cpu", *TINY, *extra])
    assert result.exit_code == 0, result.output
    assert all(ln.split()[1] == "done" for ln in result.output.splitlines()[1:-1])
    assert records(full_run) == before


def interrupt_at(kind: str, stage: str, step: int | None = None):
    """A reproduce callback that stops the run (KeyboardInterrupt) at the first event of ``kind``
    in ``stage`` (and at ``step``, when given): a kill at a known place."""

    def callback(e: ReproduceEvent) -> None:
        if e.kind == kind and e.stage == stage and (step is None or e.step == step):
            raise KeyboardInterrupt

    return callback


def test_resume_after_a_kill_between_stages(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = tiny(out, data=full_run / "data")

    with pytest.raises(KeyboardInterrupt):
        reproduce(options, callback=interrupt_at("done", "train:probunet"))
    assert states(out)["train:probunet"] == "done"
    assert states(out)["train:m-heads-4"] == "pending"
    first = records(out)
    events: list[ReproduceEvent] = []
    reproduce(options, callback=events.append)
    kinds = {e.stage: e.kind for e in events if e.kind in ("skip", "done")}
    assert kinds == {"prepare": "skip", "train:probunet": "skip", "train:m-heads-4": "done",
                     "evaluate": "done", "ambiguity": "done", "latent": "done"}
    assert {k: v for k, v in records(out).items() if k in first} == first
    assert set(states(out).values()) == {"done"}


def test_resume_inside_a_training_stage(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = tiny(out, data=full_run / "data", models=("probunet",), counts=(1, 4), steps=6,
                   sets=(*TINY_SETS, "checkpoint_every=2"))

    kill_at_step_4 = interrupt_at("checkpoint", "train:probunet", step=4)

    with pytest.raises(KeyboardInterrupt):
        reproduce(options, callback=kill_at_step_4)
    stage = next(s for s in plan_json(out)["stages"] if s["name"] == "train:probunet")
    assert stage["state"] == "failed" and stage["detail"]["error"] == "interrupted"
    assert not (out / "runs/probunet" / RECORD).exists()
    plan = build_plan(options)
    assert plan.stage("train:probunet").note == "resumes at step 4 of 6"
    events: list[ReproduceEvent] = []
    reproduce(options, callback=events.append)
    start = next(e for e in events if e.kind == "start" and e.stage == "train:probunet")
    assert start.message == "resumes at step 4 of 6"
    steps = [e.step for e in events if e.kind == "progress" and e.stage == "train:probunet"]
    assert steps == [5, 6]
    rows = [json.loads(ln) for ln in (out / "runs/probunet/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # nothing repeated, nothing lost
    rec = json.loads((out / "runs/probunet" / RECORD).read_text())
    assert rec["detail"]["resumed_from"] == 4
    # A larger step budget continues the finished run; other settings are refused.
    more = tiny(out, data=full_run / "data", models=("probunet",), counts=(1, 4), steps=8,
                sets=(*TINY_SETS, "checkpoint_every=2"))
    assert build_plan(more).stage("train:probunet").note == "resumes at step 6 of 8"
    other = tiny(out, data=full_run / "data", models=("probunet",), counts=(1, 4), steps=6,
                 sets=(*TINY_SETS, "checkpoint_every=2", "lr=0.01"))
    with pytest.raises(LidcsegError, match=r"runs/probunet holds a finished train:probunet with other "
                                           r"settings \(train\.lr\); delete that folder"):
        reproduce(other)


def test_changed_counts_redo_only_what_reads_them(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = tiny(out, data=full_run / "data", models=("probunet",), counts=(1, 4))
    reproduce(options)
    before = records(out)
    events: list[ReproduceEvent] = []
    reproduce(tiny(out, data=full_run / "data", models=("probunet",), counts=(1, 2)), callback=events.append)
    done = [e.stage for e in events if e.kind == "done"]
    assert done == ["evaluate", "ambiguity"]  # latent reads no counts; the training is kept
    after = records(out)
    assert after["runs/probunet/" + RECORD] == before["runs/probunet/" + RECORD]
    assert after["latent/" + RECORD] == before["latent/" + RECORD]
    assert after["evaluate/" + RECORD] != before["evaluate/" + RECORD]


def test_bad_models_name_is_one_line(tmp_path: Path, phantom_root: Path) -> None:
    result = runner.invoke(app, ["reproduce", "--lidc-root", str(phantom_root), "--out", str(tmp_path / "o"),
                                 "--models", "probunet,unet-ensembel", "--dry-run"])
    _one_line_error(result, "unknown --models name 'unet-ensembel'", "valid names: probunet, dropout-unet")
    assert not (tmp_path / "o").exists()


def test_missing_lidc_root_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["reproduce", "--out", str(tmp_path / "o")])
    _one_line_error(result, "give --lidc-root DIR", "--data DATA")
    result = runner.invoke(app, ["reproduce", "--out", str(tmp_path / "o"), "--lidc-root", str(tmp_path / "nope")])
    _one_line_error(result, "nope: --lidc-root: folder not found")
    assert not (tmp_path / "o").exists()


def test_foreign_out_is_refused(tmp_path: Path, phantom_root: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    result = runner.invoke(app, ["reproduce", "--lidc-root", str(phantom_root), "--out", str(out), *TINY,
                                 "--no-report"])
    _one_line_error(result, "not empty", "lidcseg reproduce")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_m_heads_keys_must_match_the_counts() -> None:
    check_m_heads(["probunet", "m-heads-4", "m-heads-8", "m-heads-16"], (1, 4, 8, 16))
    check_m_heads(["probunet"], (1, 4, 8, 16))  # no M-Heads at all
    with pytest.raises(LidcsegError, match="add m-heads-8, m-heads-16 in --models"):
        check_m_heads(["m-heads-4"], (1, 4, 8, 16))
    with pytest.raises(LidcsegError, match="drop m-heads-16 or add its count to -n"):
        check_m_heads(["m-heads-4", "m-heads-16"], (1, 4))
    with pytest.raises(LidcsegError, match="-n 2 has none"):
        check_m_heads(["m-heads-4"], (1, 2, 4))


def test_differences_name_the_changed_fields() -> None:
    a = {"params": {"train": {"lr": 1, "steps": 2}}, "upstream": {"prepare": "x"}}
    b = {"params": {"train": {"lr": 2, "steps": 2}}, "upstream": {"prepare": "y"}}
    assert differences(a, b) == ["params.train.lr", "upstream.prepare"]
    assert differences(a, a) == []


def test_other_ranks_wait_for_rank_0_and_stop_when_it_fails(full_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun only rank 0 runs the stages that are not trainings; the others wait for
    its record, and stop with one line when plan.json says the stage failed."""
    import lidcseg.reproduce.runner as runner_module

    out = tmp_path / "out"
    options = tiny(out, data=full_run / "data", models=("probunet",))

    with pytest.raises(KeyboardInterrupt):
        reproduce(options, callback=interrupt_at("progress", "evaluate"))
    assert states(out)["evaluate"] == "failed"
    saved = (out / "plan.json").read_bytes()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(runner_module, "POLL_S", 0.01)
    events: list[ReproduceEvent] = []
    with pytest.raises(LidcsegError, match="rank 0 failed at stage evaluate"):
        reproduce(options, callback=events.append)
    assert events == []  # only rank 0 reports
    assert (out / "plan.json").read_bytes() == saved  # and only rank 0 writes


@pytest.mark.slow
def test_under_torchrun_two_processes(full_run: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo on CPU): the trainings run on both processes with
    DistributedDataParallel, every other stage once, on rank 0."""
    import os
    import signal
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    lidcseg = Path(sys.executable).parent / "lidcseg"
    if not torchrun.is_file() or not lidcseg.is_file():
        pytest.skip("torchrun or the lidcseg script is not installed beside this python")
    out = tmp_path / "out"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(lidcseg), "reproduce",
           "--data", str(full_run / "data"), "--out", str(out), "--device", "cpu", "--no-report", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own process group: a hang is killed with the workers, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    plan = plan_json(out)
    assert plan["world_size"] == 2 and set(states(out).values()) == {"done"}
    assert json.loads((out / "runs/probunet/config.json").read_text())["world_size"] == 2
    assert stderr.count("evaluate: done in") == 1  # rank 0 alone reports
