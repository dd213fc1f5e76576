"""Street scenes for the flip task (Section 4.2): on-disk format, torch datasets, synthetic scenes.

One format serves Cityscapes (``lidcseg cityscapes prepare``,
:mod:`lidcseg.data.cityscapes`) and the synthetic scenes of ``lidcseg scenes
make`` (:func:`make_scenes`), so one dataset trains and evaluates both.

- :mod:`~lidcseg.data.scenes.store`: the split files and ``manifest.json`` (layout, checks);
- :mod:`~lidcseg.data.scenes.dataset`: :class:`SceneTrainDataset` (a seeded stream with
  fresh flips) and :class:`SceneEvalDataset` (un-flipped labels);
- :mod:`~lidcseg.data.scenes.augment`: the training augmentation of Appendix H.2
  (:func:`draw_augmentation`, then :func:`augment_scene`);
- :mod:`~lidcseg.data.scenes.synthetic`: :func:`make_scene`, :func:`make_scenes`.
"""

from lidcseg.data.scenes.augment import (
    SceneAugmentation,
    SceneAugmentParams,
    augment_scene,
    draw_augmentation,
)
from lidcseg.data.scenes.dataset import SceneEvalDataset, SceneTrainDataset, normalize_rgb
from lidcseg.data.scenes.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TASK,
    SceneStore,
    SceneWriter,
    check_model_for_scenes,
    check_out_dir,
    finish_manifest,
    is_scene_data,
    protocol_manifest,
    read_manifest,
    split_path,
    write_manifest,
)
from lidcseg.data.scenes.synthetic import (
    MIN_SWITCH_PIXELS,
    SCENE_COLORS,
    SCENE_NOISE,
    make_scene,
    make_scenes,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "MIN_SWITCH_PIXELS",
    "SCENE_COLORS",
    "SCENE_NOISE",
    "SPLITS",
    "TASK",
    "SceneAugmentParams",
    "SceneAugmentation",
    "SceneEvalDataset",
    "SceneStore",
    "SceneTrainDataset",
    "SceneWriter",
    "check_model_for_scenes",
    "augment_scene",
    "check_out_dir",
    "finish_manifest",
    "draw_augmentation",
    "is_scene_data",
    "make_scene",
    "make_scenes",
    "normalize_rgb",
    "protocol_manifest",
    "read_manifest",
    "split_path",
    "write_manifest",
]
