"""The plan of a reproduction: its stages, their state, ``plan.json`` and the completion records.

A stage is *done* when its folder holds a completion record
(:data:`RECORD`, ``{"stage", "finished", "wall_s", "inputs", "digest", "detail"}``)
whose ``inputs`` equal what the stage would be run with now: its own parameters (the
resolved model and training configs of a training, the counts of the evaluation) and the
digests of the records of the stages it reads (:attr:`Stage.needs`). A finished stage is
therefore never redone, and a stage whose inputs changed is either redone or refused:

* cheap stages that only read other stages (evaluate, ambiguity, latent, scenes,
  calibration, cases, report) are **redone**;
* stages that cost hours (prepare, every training, the Cityscapes conversion) are
  **refused** with one line naming the folder and what differs: delete the folder to redo
  it, or choose another ``--out``. One exception: a training whose only change is a larger
  step budget continues from its last checkpoint.

The state is always derived from the records, never trusted from an old ``plan.json``
(a ``kill -9`` leaves a stage ``running`` there). A training stage without a record but
with ``runs/<key>/last`` resumes from that checkpoint (:func:`lidcseg.training.train`
with ``resume=True``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.jsonfile import read_json_object

#: The completion record in every stage's folder (the report's is ``OUT/.reproduce-stage.json``).
RECORD = ".reproduce-stage.json"
#: The plan, rewritten atomically after every change of a stage.
PLAN = "plan.json"
PLAN_VERSION = 1
#: The states of a stage in plan.json.
STATES: tuple[str, ...] = ("pending", "running", "done", "failed")
#: Stage kinds whose changed inputs refuse the run instead of redoing the stage (hours of work).
COSTLY: frozenset[str] = frozenset({"prepare", "train", "cityscapes"})


def now() -> str:
    """The current time, ISO 8601 in UTC to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Stage:
    """One step of the reproduction.

    Attributes:
        name: ``prepare``, ``train:<key>``, ``evaluate``, ``ambiguity``, ``latent``,
            ``flip:data``, ``flip:train:<key>``, ``calibration``, ``cases``, ``report``.
        kind: what runs it (:mod:`lidcseg.reproduce.stages`): ``prepare``, ``data`` (crops
            given with ``--data``: always done, nothing written), ``train``, ``evaluate``,
            ``ambiguity``, ``latent``, ``scenes``, ``cityscapes``, ``calibration``, ``cases``,
            ``report``.
        folder: where it writes, relative to OUT (absolute for ``--data``); ``.`` for the report.
        needs: the stages whose outputs it reads.
        params: its own inputs (JSON-ready), part of the completion record.
        key: the run key of a training stage.
        steps: the step budget of a training stage (kept out of ``params``: more steps continue).
        configs: a training stage's (ModelConfig, TrainConfig).
        state, started, finished, wall_s, estimate_s, detail: as in plan.json.
        note: what a run would do (``resumes at step 150 of 300``), or ``blocked`` why not.
        blocked: a refusal (one line) when the stage's folder holds work of other settings.
        done_steps: a training's steps already in its ``last/`` checkpoint (resumed from there).
    """

    name: str
    kind: str
    folder: str
    needs: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    steps: int | None = None
    configs: tuple[Any, Any] | None = None
    state: str = "pending"
    started: str | None = None
    finished: str | None = None
    wall_s: float | None = None
    estimate_s: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    blocked: str = ""
    done_steps: int = 0

    def path(self, out: Path) -> Path:
        """The stage's folder."""
        return out / self.folder

    def to_json(self) -> dict[str, Any]:
        """The stage as plan.json lists it."""
        return {"name": self.name, "state": self.state, "folder": self.folder, "started": self.started,
                "finished": self.finished, "wall_s": self.wall_s, "estimate_s": round(self.estimate_s, 1),
                "detail": self.detail}


@dataclass
class Plan:
    """The stages of one reproduction, in order, and what plan.json records around them."""

    out: Path
    options: dict[str, Any]
    stages: list[Stage]
    environment: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def remaining_s(self) -> float:
        """Estimated seconds of the stages not done (a training that resumes: its steps left)."""
        return sum(s.estimate_s * (1 - s.done_steps / s.steps if s.steps else 1.0)
                   for s in self.stages if s.state != "done")

    @property
    def total_s(self) -> float:
        """Estimated seconds of every stage."""
        return sum(s.estimate_s for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        """plan.json: ``{"version", "options", "environment", "stages", "estimate_s", "updated"}``."""
        return {"version": PLAN_VERSION, "options": self.options, "environment": self.environment,
                "world_size": self.world_size, "stages": [s.to_json() for s in self.stages],
                "estimate_s": round(self.total_s, 1), "remaining_s": round(self.remaining_s, 1),
                "updated": now()}

    def save(self) -> Path:
        """Write ``OUT/plan.json`` atomically."""
        path = self.out / PLAN
        write_json_atomic(path, self.to_json())
        return path


# -- completion records ------------------------------------------------------------------------


def digest(obj: Any) -> str:
    """A short content hash of a JSON-ready object (16 hex digits of SHA-256)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(stage: Stage, out: Path) -> Path:
    """Where the completion record of ``stage`` lives."""
    return stage.path(out) / RECORD


def read_record(stage: Stage, out: Path) -> dict[str, Any] | None:
    """The stage's completion record, or None (missing or damaged: the stage is not done)."""
    rec = read_json_object(record_path(stage, out))
    if rec is None or rec.get("stage") != stage.name or not isinstance(rec.get("inputs"), dict):
        return None
    return rec


def write_record(stage: Stage, out: Path, inputs: dict[str, Any], detail: dict[str, Any]) -> dict[str, Any]:
    """Write the stage's completion record atomically; it carries the digest later stages read."""
    rec = {"stage": stage.name, "started": stage.started, "finished": stage.finished,
           "wall_s": stage.wall_s, "inputs": inputs, "detail": detail,
           "digest": digest({"inputs": inputs, "finished": stage.finished})}
    write_json_atomic(record_path(stage, out), rec)
    return rec


def inputs_of(stage: Stage, digests: dict[str, str]) -> dict[str, Any]:
    """What the stage's record must hold to count as done: its params and its inputs' digests."""
    return {"params": stage.params, "upstream": {n: digests[n] for n in stage.needs}}


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON values differ (``train.lr``, ``upstream.prepare``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "everything"]


def _describe(diffs: list[str]) -> str:
    names = [d.removeprefix("params.").replace("upstream.", "the output of ") for d in diffs]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def refresh(plan: Plan) -> dict[str, str]:
    """Set every stage's state, times and note from the records on disk; return the digests of
    the stages that are done.

    A stage after one that is not done is pending (its record, if any, is of older inputs).
    """
    digests: dict[str, str] = {}
    for stage in plan.stages:
        stage.state, stage.note, stage.blocked, stage.detail, stage.done_steps = "pending", "", "", {}, 0
        stage.started = stage.finished = stage.wall_s = None
        if stage.kind == "data":  # crops given with --data: nothing to do
            stage.state, stage.note, stage.detail = "done", "given", {"given": True}
            digests[stage.name] = digest(stage.params)
            continue
        if any(n not in digests for n in stage.needs):
            continue
        want = inputs_of(stage, digests)
        rec = read_record(stage, plan.out)
        if rec is not None and rec["inputs"] == want and _same_steps(stage, rec):
            stage.state = "done"
            stage.started, stage.finished, stage.wall_s = rec.get("started"), rec.get("finished"), rec.get("wall_s")
            stage.detail = rec.get("detail") or {}
            digests[stage.name] = str(rec.get("digest"))
            continue
        _explain(stage, plan.out, rec, want)
        stage.detail = {"note": stage.note} if stage.note else {}
    return digests


def _same_steps(stage: Stage, rec: dict[str, Any]) -> bool:
    return stage.kind != "train" or (rec.get("detail") or {}).get("steps") == stage.steps


def _explain(stage: Stage, out: Path, rec: dict[str, Any] | None, want: dict[str, Any]) -> None:
    """Note what running ``stage`` will do, or why it is refused (``stage.blocked``)."""
    where = stage.path(out)
    if rec is not None and rec["inputs"] != want:
        if stage.kind in COSTLY:
            stage.blocked = (f"{where} holds a finished {stage.name} with other settings "
                             f"({_describe(differences(rec['inputs'], want))}); delete that folder to "
                             "redo it, or choose another --out")
            stage.note = "blocked"
        else:
            stage.note = "redo (inputs changed)"
        return
    if stage.kind != "train":
        return
    done = (rec or {}).get("detail", {}).get("steps") if rec is not None else None
    if done is not None and stage.steps is not None and done > stage.steps:
        stage.blocked = (f"{where} was trained for {done} steps, more than the {stage.steps} asked; "
                         "delete that folder to retrain it, or ask for at least as many steps")
        stage.note = "blocked"
        return
    step = last_step(where)
    if step is None:
        return
    saved = read_json_object(where / "config.json") or {}
    diffs = differences(_comparable(saved), _comparable(stage.params))
    if diffs:
        stage.blocked = (f"{where} holds a training with other settings ({_describe(diffs)}); delete "
                         "that folder to retrain it, or choose another --out")
        stage.note = "blocked"
    else:
        stage.note = f"resumes at step {step} of {stage.steps}"
        stage.done_steps = min(step, stage.steps or step)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's (or a training stage's) model and train configs without the resumable fields."""
    from lidcseg.training.run_state import RESUMABLE_CHANGES

    train = {k: v for k, v in (config.get("train") or {}).items() if k not in RESUMABLE_CHANGES}
    return {"model": config.get("model"), "train": train}


def last_step(run_dir: Path) -> int | None:
    """The step of a run's ``last/`` checkpoint (None: no checkpoint with training state)."""
    state = read_json_object(run_dir / "last" / "state.json")
    if state is None:
        return None
    step = state.get("step")
    return step if isinstance(step, int) else None


def train_params(model_cfg: Any, train_cfg: Any) -> dict[str, Any]:
    """A training stage's params: both configs, the resumable fields of training left out."""
    from lidcseg.config import to_dict

    return _comparable({"model": to_dict(model_cfg), "train": to_dict(train_cfg)})


def mark(stage: Stage, state: str, **changes: Any) -> None:
    """Set a stage's state (one of :data:`STATES`) and any other fields."""
    if state not in STATES:
        raise ValueError(state)
    stage.state = state
    for k, v in changes.items():
        if not hasattr(stage, k):
            raise AttributeError(k)
        setattr(stage, k, v)
