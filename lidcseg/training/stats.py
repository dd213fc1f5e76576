"""The numbers of each training step: computed on the device, read back at sync points.

Every optimizer step gives one small float32 vector on the training device
(:func:`step_vector`): ``loss`` (the objective), ``elbo``, ``rec``, ``kl``
(latent models) and ``kl_per_dim`` (N,), averaged over DDP ranks by one
all-reduce that stays on the device.

Reading such a vector back to the host (``.cpu()``, ``float()``) waits until
the GPU has finished the step, so the host cannot queue the next steps while
the GPU works. :class:`StatsWindow` therefore keeps the vectors on the device
and reads every pending one back in ONE copy at a *sync point*. The loop makes
a sync point of every ``log_every``-th step (and at least every
:data:`MAX_UNCHECKED_STEPS` steps), of every step that validates or writes a
checkpoint, and of the last step. On the CPU nothing runs ahead, so every
step is a sync point (:func:`defer_sync`), as before this module existed.

**Non-finite loss.** The sync point checks every step since the previous one
and reports the first whose loss is NaN or infinite. On CUDA up to
``min(log_every, MAX_UNCHECKED_STEPS) - 1`` more optimizer steps have then
updated the weights in memory, but nothing was saved after the bad step:
``last/`` and ``best/`` are written only after a sync point has checked every
step before them, so the last checkpoint on disk is good. On the CPU the check
comes before the bad step's optimizer update, as always.

**Same numbers.** The means of ``metrics.jsonl`` are sums of the read-back
float32 values as Python floats, in step order, divided by the step count:
the arithmetic does not depend on where the sync points fall, so they are
bit for bit those of a read-back at every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from lidcseg.training.distributed import Dist
from lidcseg.training.schedule import elbo

#: On CUDA, a sync point comes at least this often (steps), whatever ``log_every`` says:
#: the most optimizer steps that can run on after a non-finite loss before it is caught.
MAX_UNCHECKED_STEPS = 50


def defer_sync(device: torch.device) -> bool:
    """Whether step numbers stay on ``device`` between sync points: on CUDA (which runs
    asynchronously), not on the CPU (which does not; each step is then checked at once)."""
    return device.type == "cuda"


def step_vector(
    loss: torch.Tensor, terms: Mapping[str, torch.Tensor], beta: float, dist: Dist
) -> tuple[tuple[str, ...], torch.Tensor]:
    """The step's numbers as one float32 vector on the loss's device, averaged over DDP ranks.

    No host sync: the all-reduce (DDP) and the division stay on the device.

    Args:
        loss: the objective of the step (a scalar).
        terms: the model's loss terms: ``rec``, and ``kl``, ``kl_per_dim`` (N,) for latent models.
        beta: the model's own beta (``elbo`` = ``rec + beta * kl``).
        dist: this process's place in the run.

    Returns:
        ``(names, vector)``: the names of the scalars (``loss``, ``elbo``, then ``rec`` and
        ``kl`` when present) and a (len(names) + N,) vector, ``kl_per_dim`` after the scalars
        (N = 0 for models without it).
    """
    parts = [loss.detach().float().reshape(1)]
    names = ["loss"]
    with torch.no_grad():
        parts.append(elbo(terms, beta).detach().float().reshape(1))
    names.append("elbo")
    for k in ("rec", "kl"):
        if k in terms:
            parts.append(terms[k].detach().float().reshape(1))
            names.append(k)
    per_dim = terms.get("kl_per_dim")
    if per_dim is not None:
        parts.append(per_dim.detach().float().reshape(-1))
    vec = torch.cat(parts)
    if dist.world > 1:
        torch.distributed.all_reduce(vec)
        vec /= dist.world
    return tuple(names), vec


class StatsWindow:
    """The training numbers since the last ``metrics.jsonl`` line (module docstring).

    Per step: :meth:`record` (the step's vector, left on its device), then, at a sync
    point, :meth:`sync`; after the optimizer step :meth:`tick` (host-side counters).
    :meth:`flush` gives the means of a ``metrics.jsonl`` line.

    Args:
        sync_every: the cadence of :meth:`due`: 1 checks every step (CPU); on CUDA the
            loop passes ``min(log_every, MAX_UNCHECKED_STEPS)``.
    """

    def __init__(self, sync_every: int = 1) -> None:
        self.sync_every = max(1, int(sync_every))
        self.ema: float | None = None  # smoothed it/s, kept across windows
        self.t_step = time.perf_counter()
        self.latest: dict[str, float] = {}  # the scalars of the last step read back
        self._pending: list[tuple[int, tuple[str, ...], torch.Tensor]] = []
        self.reset()

    def reset(self) -> None:
        """Start a new window (pending steps are kept: they are not read back yet)."""
        self.sums: dict[str, Any] = {}
        self.n = 0
        self.images = 0
        self.t0 = time.perf_counter()
        self.last: tuple[float, float] = (0.0, 0.0)

    def record(self, step: int, names: tuple[str, ...], vec: torch.Tensor) -> None:
        """Keep step ``step``'s vector (:func:`step_vector`) until the next :meth:`sync`."""
        self._pending.append((step, names, vec))

    def due(self, step: int) -> bool:
        """Whether ``step`` is a sync point by the cadence alone (the loop adds its own)."""
        return step % self.sync_every == 0

    @property
    def pending(self) -> int:
        """Steps recorded but not read back yet."""
        return len(self._pending)

    def sync(self) -> int | None:
        """Read the pending vectors back in one copy and add them to the window's sums.

        Returns:
            The first pending step whose loss is not finite (then nothing is added), else None.
        """
        if not self._pending:
            return None
        rows = torch.stack([vec for _, _, vec in self._pending]).cpu().tolist()
        pending, self._pending = self._pending, []
        for (step, _, _), row in zip(pending, rows, strict=True):
            if not math.isfinite(row[0]):
                return step
        for (_, names, _), row in zip(pending, rows, strict=True):
            k = len(names)
            stats: dict[str, Any] = dict(zip(names, row[:k], strict=True))
            if len(row) > k:
                stats["kl_per_dim"] = row[k:]
            self._add(stats)
            self.latest = {name: stats[name] for name in names}
        return None

    def _add(self, stats: Mapping[str, Any]) -> None:
        for k, v in stats.items():
            if isinstance(v, list):
                prev = self.sums.get(k, [0.0] * len(v))
                self.sums[k] = [a + b for a, b in zip(prev, v, strict=True)]
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v

    def tick(self, lr: float, beta: float, images: int) -> None:
        """One optimizer step done on ``images`` images (over all ranks) at ``lr`` and ``beta``."""
        self.n += 1
        self.images += images
        self.last = (lr, beta)
        now = time.perf_counter()
        rate = 1.0 / max(now - self.t_step, 1e-9)
        self.ema = rate if self.ema is None else 0.8 * self.ema + 0.2 * rate
        self.t_step = now

    def it_s(self) -> float:
        """Smoothed steps per second (host time: on CUDA it settles to the GPU's pace)."""
        return float(self.ema or 0.0)

    def flush(self) -> dict[str, Any]:
        """Means of the window's numbers, ``lr``, ``beta``, ``it_s``, ``img_s`` and
        ``steps_in_mean``; starts a new window. Call :meth:`sync` first."""
        if self._pending:
            raise RuntimeError("flush() before sync(): steps are still on the device")
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        row: dict[str, Any] = {}
        for k, v in self.sums.items():
            row[k] = [a / self.n for a in v] if isinstance(v, list) else v / self.n
        row.update(lr=self.last[0], beta=self.last[1], it_s=self.n / elapsed,
                   img_s=self.images / elapsed, steps_in_mean=self.n)
        self.reset()
        return row
