"""The report's case viewer: every crop of ``OUT/cases`` packed small, its markup, static examples.

Per crop the page carries (:func:`case_payload`):

- the view box: a square around the graders' masks (:func:`lesion_box`), and per run the
  pixels of each hypothesis that lie outside it (a model may draw far from the lesion);
- the CT of the box as a grey PNG (base64);
- one zlib stream (base64) of the box's mask bits, pixel-major: a byte per pixel for the
  graders (bit g: grader g), then per run ``ceil(count / 8)`` bytes per pixel (bit k % 8
  of byte k // 8: hypothesis k);
- the crop's row, patient, GED² per run, graders marking, grader disagreement.

The script (:data:`lidcseg.reports.html.assets.VIEWER_JS`) decodes a crop only when it is
shown, so thousands of crops cost a few kB each in the file and nothing until viewed.
Without JavaScript, :func:`static_examples` still shows a few crops, as tables of pictures.
"""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.reports.cases import CASES_FILE, CasesStore, hypothesis_bytes
from lidcseg.reports.html.assets import GRADER_OUTLINE, HYPOTHESIS_OUTLINE
from lidcseg.reports.html.markup import Raw, img, join, json_script, missing, para, section, tag

#: Crops of the static figure, and hypotheses per run shown in it.
STATIC_CASES = 4
STATIC_HYPOTHESES = 8


def _png(grey: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def lesion_box(grader_bits: np.ndarray, hyp_bits: np.ndarray, size: int) -> tuple[slice, slice]:
    """The view of a crop: a square around the graders' masks (around every hypothesis when
    every grader mask is empty; the centre when those are empty too), with a margin, at least
    32 px (:func:`lidcseg.reports.plots.view_box`). Hypotheses may reach beyond it: the viewer
    says by how many pixels."""
    from lidcseg.reports.plots import view_box

    marked = grader_bits != 0
    if not marked.any():
        marked = np.bitwise_or.reduce(np.bitwise_or.reduce(hyp_bits, axis=0), axis=-1) != 0
    return view_box(marked[None], size, min_side=min(size, 32), margin=0.5)


def case_payload(store: CasesStore, i: int, image: np.ndarray, grader_bits: np.ndarray,
                 hyp_bits: np.ndarray) -> dict[str, Any]:
    """Crop ``i`` of ``store`` as the viewer's JSON entry (see the module docstring).

    Args:
        store: the cases (its runs and per-crop columns).
        i: the crop.
        image, grader_bits, hyp_bits: the crop as stored (:meth:`CasesStore.bits`).
    """
    t = store.input_size
    rs, cs = lesion_box(grader_bits, hyp_bits, t)
    side = rs.stop - rs.start
    stream = [np.ascontiguousarray(grader_bits[rs, cs]).tobytes()]
    meta = store.meta
    outside: dict[str, list[int]] = {}
    for r, run in enumerate(store.runs):
        inner = np.ascontiguousarray(hyp_bits[r, rs, cs, :hypothesis_bytes(run["count"])])
        stream.append(inner.tobytes())
        total = meta["pixels"][i, r, :run["count"]]
        if total.sum() > 0:
            within = np.unpackbits(inner, axis=-1, count=run["count"], bitorder="little").reshape(-1, run["count"])
            beyond = total - within.sum(0)
            if beyond.any():
                outside[str(r)] = [int(x) for x in beyond]
    g = store.n_graders
    marking = int(meta["marking"][i])
    return {
        "o": outside,
        "r": int(meta["row"][i]), "p": str(meta["patient"][i]), "m": marking, "a": int(0 < marking < g),
        "d": round(float(meta["grader_diversity"][i]), 4),
        "g": [None if not np.isfinite(v) else round(float(v), 4) for v in meta["ged"][i]],
        "s": side, "b": [rs.start, cs.start],
        "i": base64.b64encode(_png(image[rs, cs])).decode("ascii"),
        "k": base64.b64encode(zlib.compress(b"".join(stream), 6)).decode("ascii"),
    }


def viewer_data(store: CasesStore, block: int = 64) -> dict[str, Any]:
    """The viewer's whole JSON: the runs, the graders, the tile size and every crop (read
    ``block`` crops at a time)."""
    cases = []
    for start in range(0, len(store), block):
        images, graders, hyps = store.block(start, min(start + block, len(store)))
        cases += [case_payload(store, start + j, images[j], graders[j], hyps[j]) for j in range(len(images))]
    return {
        "runs": [{"label": r["label"], "model": r["model"], "count": r["count"],
                  "bytes": hypothesis_bytes(r["count"])} for r in store.runs],
        "graders": store.n_graders, "size": store.input_size, "split": store.info.get("split"),
        "cases": cases,
    }


def choose_static(store: CasesStore, k: int = STATIC_CASES) -> list[int]:
    """Crops for the static figure: graders disagreeing on presence first, then by disagreement,
    one per lesion as long as possible (:func:`lidcseg.reports.examples.choose_examples`)."""
    from lidcseg.reports.examples import choose_examples

    meta = store.meta
    n = len(store)
    if n == 0 or k <= 0:
        return []
    score = np.asarray(meta["grader_diversity"], float)
    order = np.lexsort((np.arange(n), -score))
    mixed = (meta["marking"] > 0) & (meta["marking"] < store.n_graders)
    return choose_examples(k, [order[mixed[order]], order], quotas=[(k + 1) // 2, k], keys=meta["lesion"])


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    return tuple(int(hex_colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]


def _strip(tiles: list[np.ndarray], zoom: int) -> bytes:
    """Tiles (h, w, 3) in [0, 1], side by side with white gaps, zoomed by ``zoom``, as PNG."""
    from PIL import Image

    gap = 3
    h, w = tiles[0].shape[:2]
    out = np.ones((h * zoom, len(tiles) * (w * zoom + gap) - gap, 3))
    for j, t in enumerate(tiles):
        out[:, j * (w * zoom + gap): j * (w * zoom + gap) + w * zoom] = t.repeat(zoom, 0).repeat(zoom, 1)
    buf = io.BytesIO()
    Image.fromarray(np.round(out * 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _size_text(total: int, inside: int) -> str:
    if not total:
        return "empty"
    return f"{total} px" + (f" ({total - inside} outside the view)" if total > inside else "")


def static_example(store: CasesStore, i: int) -> Raw:
    """One crop as a table of picture strips (works without JavaScript): the CT and the graders,
    then per run its first :data:`STATIC_HYPOTHESES` hypotheses, outlined in the viewer's colours."""
    from lidcseg.reports.plots import mask_overlay

    stored = store.bits(i)
    _, grader_bits, hyp_bits = stored
    case = store.unpack(*stored)
    t = store.input_size
    rs, cs = lesion_box(grader_bits, hyp_bits, t)
    side = rs.stop - rs.start
    zoom = max(1, round(96 / side))
    grey = case.image[rs, cs].astype(np.float32) / 255.0
    window = (0.0, 1.0)
    meta = store.meta
    name = f"crop {int(meta['row'][i])} ({meta['patient'][i]})"
    marked = [int(m.sum()) for m in case.graders]
    tiles = [mask_overlay(grey, None, window=window)]
    tiles += [mask_overlay(grey, g[rs, cs], _rgb(GRADER_OUTLINE), alpha=0.25, window=window) for g in case.graders]
    graders_alt = f"{name}: the CT, then graders 1 to {len(marked)} outlined: " + ", ".join(
        f"{px} px" if px else "empty" for px in marked)
    rows = [[tag("th", f"CT, graders 1–{len(marked)}", scope="row"), tag("td", img(_strip(tiles, zoom), graders_alt))]]
    for r, run in enumerate(store.runs):
        hyps = case.hypotheses[r][:STATIC_HYPOTHESES]
        tiles = [mask_overlay(grey, h[rs, cs], _rgb(HYPOTHESIS_OUTLINE), alpha=0.25, window=window) for h in hyps]
        sizes = ", ".join(_size_text(int(h.sum()), int(h[rs, cs].sum())) for h in hyps)
        alt = f"{name}: the first {len(hyps)} hypotheses of {run['label']}: {sizes}"
        ged = meta["ged"][i][r]
        head = f"{run['label']} (GED² {ged:.3f})" if np.isfinite(ged) else run["label"]
        rows.append([tag("th", head, scope="row"), tag("td", img(_strip(tiles, zoom), alt))])
    caption = (f"{name}: {int(meta['marking'][i])} of {store.n_graders} graders marked a lesion; "
               f"view {side} px of {t}")
    body = tag("tbody", join(tag("tr", join(row)) for row in rows))
    return tag("div", tag("table", Raw(tag("caption", caption) + body), class_="strips"), class_="table-wrap")


def static_examples(store: CasesStore, k: int = STATIC_CASES) -> Raw:
    """A few crops where the graders disagree (:func:`choose_static`), as :func:`static_example` tables."""
    return join(static_example(store, i) for i in choose_static(store, k))


def _controls(runs: list[dict[str, Any]]) -> Raw:
    filters = [("all", "all crops"), ("presence", "graders disagree on presence"),
               ("agree", "graders agree on presence"), ("differ", "graders' masks differ (d > 0)")]
    sorts = [("disagreement", "grader disagreement, high to low"), ("ged-desc", "GED², high to low"),
             ("ged-asc", "GED², low to high"), ("file", "file order")]
    option = lambda v, t: tag("option", t, value=v)  # noqa: E731
    return tag("div", join([
        tag("label", "Show", for_="filter"), tag("select", join(option(v, t) for v, t in filters), id="filter"),
        tag("label", "Sort by", for_="sort"), tag("select", join(option(v, t) for v, t in sorts), id="sort"),
        tag("label", "GED² of", for_="sort-run"), tag("select", "", id="sort-run"),
        tag("p", "", id="case-count", aria_live="polite"),
    ]), class_="controls", role="group", aria_label="Choose which crops to list")


def _viewer_markup(runs: list[dict[str, Any]]) -> Raw:
    most = max((r["count"] for r in runs), default=1)
    hyp = join([
        tag("label", "Hypothesis", for_="hyp"),
        Raw(f'<input type="range" id="hyp" min="1" max="{most}" value="1" step="1">'),
        tag("output", f"1 of {most}", id="hyp-out", for_="hyp"),
        tag("button", "Previous hypothesis", type="button", id="prev-hyp"),
        tag("button", "Next hypothesis", type="button", id="next-hyp"),
        tag("label", Raw('<input type="checkbox" id="show-graders"> grader outlines on the hypotheses')),
    ])
    legend = para(Raw(
        f'<span class="swatch" style="background:{GRADER_OUTLINE}"></span> grader outline &nbsp; '
        f'<span class="swatch" style="background:{HYPOTHESIS_OUTLINE}"></span> hypothesis outline &nbsp; '
        '<span class="scale"></span> per-pixel frequency, 0 to 1 (share of hypotheses, or of graders, '
        'marking the pixel). Keys in the viewer: ← → step through the hypotheses, ↑ ↓ move between crops.'),
        class_="legend")
    listing = tag("div", join([
        tag("label", "Crops: row · patient · GED² · graders marking (⚑: they disagree on presence)",
            for_="case-list"),
        tag("select", "", id="case-list", size=18),
        tag("div", join([tag("button", "Previous crop", type="button", id="prev-case"),
                         tag("button", "Next crop", type="button", id="next-case")])),
    ]), class_="case-list")
    view = tag("div", join([
        tag("h3", "", id="case-title"), para("", id="case-facts"),
        tag("div", "", id="grader-panels", class_="panels"),
        tag("div", hyp, class_="hyp-controls"),
        tag("div", "", id="model-panels", class_="panels"),
        para("", id="viewer-status", role="status"), legend,
    ]), class_="case-view")
    return tag("div", join([_controls(runs), tag("div", join([listing, view]), class_="viewer-body")]),
               id="viewer", hidden=True)


def cases_section(folder: Path, data: dict[str, Any] | None) -> tuple[Raw, bool]:
    """The case viewer's section, and whether it holds the viewer (so the page needs its script)."""
    title = "Case viewer: the test crops, their graders and every model's hypotheses"
    path = folder / CASES_FILE
    if not path.is_file():
        return section("cases", title, missing("The cases stage did not run (no cases/cases.h5).")), False
    with CasesStore(path) as store:
        payload = viewer_data(store)
        static = static_examples(store, STATIC_CASES if len(store.runs) <= 4 else 2)
        info = store.info
    runs = payload["runs"]
    phantom = " These are PHANTOM crops, not LIDC-IDRI." if data and data.get("phantom") else ""
    intro = para(
        f"{len(payload['cases'])} crops of the {info.get('split')} split ({info.get('input_size')} px tiles, "
        f"as the models see them), zoomed on the graders' masks (a caption says when a hypothesis reaches "
        f"outside the view). Each run drew its hypotheses with seed "
        f"{info.get('seed')} (M-Heads and ensembles give one per head or member): "
        + ", ".join(f"{r['label']} {r['count']}" for r in runs)
        + f". GED² per crop: {info.get('ged', 'V-statistic')}.{phantom}")
    noscript = Raw("<noscript>" + para("The interactive viewer needs JavaScript. The tables below show "
                                       "a few crops as pictures.", class_="note") + "</noscript>")
    body = [intro, noscript, _viewer_markup(runs), tag("h3", "Example crops"),
            para(f"Crops where the graders disagree, shown with or without JavaScript: the CT and the grader "
                 f"outlines, then the first {STATIC_HYPOTHESES} hypotheses of each run.", class_="note"),
            static or missing("No crop to show."), json_script("cases-data", payload)]
    return section("cases", title, *body), True
