"""Training: ``train(data_dir, model_cfg, train_cfg, out_dir) -> run dir``.

One function runs the whole optimisation of the paper's Section 4 / Appendix
H.1 on the crop files ``DATA/train.h5`` and ``DATA/val.h5`` (or the flip task's
scenes, Section 4.2), single-process or under ``torchrun``
(DistributedDataParallel, detected from ``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK``). It never prints: progress goes to ``callback``.

The package, in reading order:

* :mod:`~lidcseg.training.loop` - :func:`train`, the step loop, :class:`TrainEvent`;
* :mod:`~lidcseg.training.schedule` - learning rate, beta and the objective;
* :mod:`~lidcseg.training.stats` - the step's numbers kept on the device, read back (and
  checked finite) at sync points, not every step;
* :mod:`~lidcseg.training.run_state` - the run directory, ``metrics.jsonl``,
  checkpoints and the training state that resume restores;
* :mod:`~lidcseg.training.validation` - GED on the validation split (LIDC, flip task);
* :mod:`~lidcseg.training.prior_refit` - the optional refit of the prior net after training;
* :mod:`~lidcseg.training.distributed` - DDP, the device, autocast.

The run directory::

    RUN/
      config.json      resolved model + train config, data folder, world size
      env.json         versions (python, torch, monai, numpy, lidcseg), device
      metrics.jsonl    one JSON object a line: {"split": "train", step, loss, elbo, rec, kl,
                       kl_per_dim, beta, lr, it_s, img_s, ...} every ``log_every`` steps,
                       {"split": "val", step, ged, diversity, ...} at each validation
      last/            model.safetensors + config.json (lidcseg.models.checkpoint), and the
                       training state: state.safetensors (optimizer moments, torch RNG
                       states) + state.json (step, optimizer scalars, NumPy/Python RNG,
                       data-order position, best GED). No pickle anywhere.
      best/            the checkpoint of the lowest validation GED@``val_samples``
      refit/           with ``prior_refit_steps`` > 0: best/ with its prior net refitted after
                       training (:mod:`~lidcseg.training.prior_refit`); a run folder given to
                       any command means this checkpoint when it exists

``last/`` is replaced atomically (written to a temporary folder, then swapped
by two renames; a crash between them leaves ``.last.old/``, which resume
recovers). After ``kill -9``, ``train(..., resume=True)`` restores weights,
Adam state, schedule position, RNG states and the data-order position; on CPU
the result equals an uninterrupted run bit for bit.

Loss (Eq. 4): ``rec + beta * KL``. The trainer owns beta: models return the
terms (cross-entropy summed over pixels, averaged over the batch; see
:mod:`lidcseg.losses`) and :func:`objective` weights them. Two optional
counters of posterior collapse, both off in the ``paper`` preset:
``kl_free_bits`` (the KL term becomes ``max(KL, N * kl_free_bits)``) and a
linear beta warm-up (``beta_warmup_steps``). ``metrics.jsonl`` logs the
objective as ``loss`` and ``rec + beta * KL`` at the model's beta as ``elbo``.
"""

from lidcseg.training.loop import Callback, TrainEvent, train
from lidcseg.training.run_state import RESUMABLE_CHANGES, iter_metrics, load_run_config
from lidcseg.training.schedule import beta_at, elbo, lr_at, lr_schedule, noise_scale_at, objective
from lidcseg.training.validation import validate_flip_task

__all__ = [
    "RESUMABLE_CHANGES",
    "Callback",
    "TrainEvent",
    "beta_at",
    "elbo",
    "iter_metrics",
    "load_run_config",
    "lr_at",
    "lr_schedule",
    "noise_scale_at",
    "objective",
    "train",
    "validate_flip_task",
]
