"""Models of the harness: the Probabilistic U-Net, its Appendix D ablations and the paper's baselines.

Build one with :func:`create_model` from a :class:`lidcseg.config.ModelConfig`
(``model_config(name)`` gives a named model's config); every model implements
:class:`SegmentationModel` (``loss``, ``sample``). :data:`MODEL_SPECS` lists
the names: ``probunet``, ``fixed-prior``, ``fixed-prior-no-context``,
``early-injection``, ``dropout-unet``, ``unet``, ``unet-ensemble``,
``m-heads``, ``i2i-vae``.
"""

from lidcseg.models.dropout_unet import DropoutUNet
from lidcseg.models.ensemble import UNetEnsemble, assemble
from lidcseg.models.fcomb import FComb
from lidcseg.models.i2i_vae import Image2ImageVAE
from lidcseg.models.m_heads import MHeadsUNet
from lidcseg.models.prob_unet import FixedGaussian, Hypotheses, ProbUNet
from lidcseg.models.registry import (
    MODEL_NAMES,
    MODEL_SPECS,
    ModelSpec,
    SegmentationModel,
    create_model,
    model_config,
    resolve_config,
)
from lidcseg.models.unet import Encoder, OutputHead, UNet

__all__ = [
    "MODEL_NAMES",
    "MODEL_SPECS",
    "DropoutUNet",
    "Encoder",
    "FComb",
    "FixedGaussian",
    "Hypotheses",
    "Image2ImageVAE",
    "MHeadsUNet",
    "ModelSpec",
    "OutputHead",
    "ProbUNet",
    "SegmentationModel",
    "UNet",
    "UNetEnsemble",
    "assemble",
    "create_model",
    "model_config",
    "resolve_config",
]
