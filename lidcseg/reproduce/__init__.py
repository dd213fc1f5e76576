"""``lidcseg reproduce``: the paper's whole pipeline in one resumable call.

``reproduce(ReproduceOptions(out=OUT, lidc_root=DIR, preset="cpu-quick"))`` runs, in
order, every stage that is not done yet:

1. ``prepare``: the LIDC crops (:func:`lidcseg.data.prepare.prepare`), or the crops
   given with ``data`` (used in place, never copied);
2. ``train:<key>``: the Prob. U-Net and the baselines of Fig. 4 (``probunet``,
   ``dropout-unet``, ``unet-ensemble`` with 16 members, ``m-heads-4/8/16``, ``i2i-vae``),
   and with ``ablations`` Appendix D's ``fixed-prior``, ``fixed-prior-no-context``,
   ``early-injection`` (:func:`lidcseg.training.train`; configs composed as ``lidcseg
   train`` does: preset, the model's defaults, ``--set``, ``--steps``, ``--device``);
3. ``evaluate``: Fig. 4a at n = 1, 4, 8, 16 with the Wilcoxon tests
   (:func:`lidcseg.evaluation.evaluate_runs`; the ensemble scores its first n members,
   M-Heads the n-head model);
4. ``ambiguity``: Appendix E, Table 1 (:func:`lidcseg.ambiguity.ambiguity_runs`, every
   model that gives 16 samples);
5. ``latent``: Fig. 6 for the Prob. U-Net (:func:`lidcseg.latent.latent_figure`);
6. ``cases``: sampled test cases for the report (:func:`lidcseg.cases.sample_cases`);
7. with ``flip``: ``flip:data`` (synthetic scenes, or Cityscapes), ``flip:train:probunet``,
   ``flip:train:dropout-unet`` and ``calibration`` (Fig. 5; :func:`lidcseg.calibration.calibrate_runs`);
8. ``report``: ``OUT/report.html`` (:func:`lidcseg.reports.html.write_report`).

The output folder::

    OUT/
      .lidcseg-output.json   marker: written by `lidcseg reproduce`
      plan.json              {"version": 1, "options", "environment", "stages": [{"name", "state",
                             "folder", "started", "finished", "wall_s", "estimate_s", "detail"}],
                             "estimate_s", "remaining_s", "updated"}; rewritten after every change
      data/                  prepare (absent with --data: plan.json names the given folder)
      runs/<key>/            one `lidcseg train` run per key
      evaluate/ ambiguity/ latent/ cases/
      flip/data/ flip/runs/probunet/ flip/runs/dropout-unet/ flip/calibration/
      report.html

Each stage's folder receives a completion record ``.reproduce-stage.json`` when the stage
ends (the report's is ``OUT/.reproduce-stage.json``); when a stage counts as done, and
what happens when its inputs changed, is described in :mod:`lidcseg.reproduce.plan`.
Nothing prints: progress goes to the callback as :class:`ReproduceEvent` objects.
"""

from lidcseg.reproduce.build import REPRODUCE_OUTPUT, build_plan
from lidcseg.reproduce.options import (
    ABLATION_KEYS,
    FLIP_KEYS,
    PAPER_COUNTS,
    PAPER_KEYS,
    PRESETS,
    RUN_KEYS,
    ReproduceOptions,
)
from lidcseg.reproduce.plan import PLAN, RECORD, Plan, Stage
from lidcseg.reproduce.runner import ReproduceEvent, reproduce

__all__ = [
    "ABLATION_KEYS",
    "FLIP_KEYS",
    "PAPER_COUNTS",
    "PAPER_KEYS",
    "PLAN",
    "PRESETS",
    "RECORD",
    "REPRODUCE_OUTPUT",
    "RUN_KEYS",
    "Plan",
    "ReproduceEvent",
    "ReproduceOptions",
    "Stage",
    "build_plan",
    "reproduce",
]
