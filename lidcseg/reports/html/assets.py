"""The report's style sheet and the case viewer's script, inlined into ``report.html``.

Plain CSS and vanilla JavaScript (no library, nothing fetched). The script reads the
viewer's data from ``<script type="application/json" id="cases-data">`` (written by
:mod:`lidcseg.reports.html.viewer`) and decodes a crop only when it is shown: its image
(a PNG of the view box) and one zlib stream of mask bits (``DecompressionStream``).
Without JavaScript the viewer stays hidden and the static examples remain.
"""

from __future__ import annotations

#: Outline colours of the viewer (blue and amber: told apart with common colour-vision deficiencies).
GRADER_OUTLINE = "#4fc3f7"
HYPOTHESIS_OUTLINE = "#ffb000"

CSS = """
:root { color-scheme: light; --fg: #1a1a1a; --muted: #4a4a4a; --line: #c8c8c8; --accent: #0b57d0; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: #fff; }
header { background: #f3f5f8; border-bottom: 1px solid var(--line); padding: 0.8rem 1.5rem; }
header h1 { margin: 0 0 0.3rem; font-size: 1.45rem; }
nav ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 0.3rem 1.2rem; }
a { color: var(--accent); }
.skip { position: absolute; left: -999px; top: 0; background: #fff; padding: 0.4rem; }
.skip:focus { left: 0.5rem; z-index: 10; }
main { max-width: 1480px; margin: 0 auto; padding: 0 1.5rem 3rem; }
section { border-bottom: 1px solid var(--line); padding: 0.6rem 0 1.2rem; }
h2 { font-size: 1.3rem; margin: 1rem 0 0.5rem; }
h3 { font-size: 1.08rem; margin: 1rem 0 0.4rem; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.table-wrap { overflow-x: auto; margin: 0.5rem 0 0.8rem; }
table { border-collapse: collapse; font-size: 0.88rem; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 0 0 0.3rem; max-width: 70rem; }
th, td { border: 1px solid var(--line); padding: 0.25rem 0.55rem; vertical-align: top; }
thead th { background: #eef1f5; text-align: left; }
tbody th { text-align: left; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 0.8rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.9rem; max-width: 70rem; }
.note { color: var(--muted); max-width: 70rem; }
.missing { color: var(--muted); font-style: italic; }
.phantom { background: #fdecea; color: #7a1010; border: 1px solid #e8a09a; padding: 0.5rem 0.8rem;
           font-weight: 600; max-width: 70rem; }
pre.json { background: #f6f8fa; border: 1px solid var(--line); padding: 0.5rem; max-height: 24rem;
           overflow: auto; font-size: 0.8rem; }
details { margin: 0.3rem 0; }
table.strips td { padding: 0.2rem; }
table.strips img { display: block; image-rendering: pixelated; }
summary { cursor: pointer; }
.controls { display: flex; flex-wrap: wrap; gap: 0.4rem 0.8rem; align-items: center; margin: 0.5rem 0; }
select, button, input { font: inherit; }
button { padding: 0.15rem 0.6rem; }
.viewer-body { display: flex; gap: 1.2rem; align-items: flex-start; }
.case-list { flex: 0 0 18rem; }
.case-list select { width: 100%; font-size: 0.82rem; font-variant-numeric: tabular-nums; }
.case-view { flex: 1 1 auto; min-width: 0; }
.panels { display: flex; flex-wrap: wrap; gap: 0.6rem; margin: 0.4rem 0 0.8rem; }
.panel { margin: 0; width: 9.5rem; }
.panel canvas { width: 9.5rem; height: 9.5rem; image-rendering: pixelated; background: #000; display: block; }
.panel figcaption { font-size: 0.82rem; color: var(--fg); }
.model-card { border: 1px solid var(--line); border-radius: 4px; padding: 0.4rem 0.6rem; max-width: 21rem; }
.model-card h4 { margin: 0 0 0.3rem; font-size: 0.95rem; }
.model-card .panels { margin: 0; }
.hyp-controls { display: flex; flex-wrap: wrap; gap: 0.5rem 0.9rem; align-items: center; margin: 0.4rem 0; }
.hyp-controls input[type=range] { width: 16rem; }
.legend { font-size: 0.85rem; color: var(--muted); }
.swatch { display: inline-block; width: 1.6rem; height: 0.7rem; vertical-align: middle; border: 1px solid #666; }
.scale { display: inline-block; width: 8rem; height: 0.7rem; vertical-align: middle; border: 1px solid #666;
         background: linear-gradient(to right, #440154, #3b528b, #21918c, #5ec962, #fde725); }
@media (max-width: 900px) { .viewer-body { flex-direction: column; } .case-list { flex: none; width: 100%; } }
"""

VIEWER_JS = """
(function () {
  "use strict";
  var source = document.getElementById("cases-data");
  var root = document.getElementById("viewer");
  if (!source || !root) { return; }
  var data = JSON.parse(source.textContent);
  var runs = data.runs, cases = data.cases, G = data.graders;
  var $ = function (id) { return document.getElementById(id); };
  var list = $("case-list"), sortSel = $("sort"), sortRun = $("sort-run"), filterSel = $("filter");
  var slider = $("hyp"), hypOut = $("hyp-out"), status = $("viewer-status"), showGraders = $("show-graders");
  var GRADER = "__GRADER__", HYP = "__HYP__";
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var order = [], current = -1, shown = null, cache = new Map();
  root.hidden = false;
  if (typeof DecompressionStream === "undefined") {
    status.textContent = "This browser cannot decode the viewer's data (no DecompressionStream); " +
      "the static examples below still show some crops.";
    return;
  }

  function fmt(x) { return (x === null || x === undefined || isNaN(x)) ? "–" : x.toFixed(3); }
  function bytesOf(b64) {
    var bin = atob(b64), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { out[i] = bin.charCodeAt(i); }
    return out;
  }
  function inflate(bytes) {
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(function (b) { return new Uint8Array(b); });
  }
  function loadImage(b64) {
    return new Promise(function (resolve, reject) {
      var im = new Image();
      im.onload = function () { resolve(im); };
      im.onerror = function () { reject(new Error("the crop's image does not decode")); };
      im.src = "data:image/png;base64," + b64;
    });
  }
  function decode(i) {
    var c = cases[i];
    return Promise.all([loadImage(c.i), inflate(bytesOf(c.k))]).then(function (got) {
      var n = c.s * c.s, off = n, bits = got[1];
      var hyps = runs.map(function (r) { var v = bits.subarray(off, off + n * r.bytes); off += n * r.bytes; return v; });
      return { index: i, image: got[0], side: c.s, graders: bits.subarray(0, n), hyps: hyps };
    });
  }
  function get(i) {
    if (!cache.has(i)) {
      cache.set(i, decode(i));
      if (cache.size > 32) { cache.delete(cache.keys().next().value); }
    }
    return cache.get(i);
  }

  // -- drawing ---------------------------------------------------------------------------------
  function scaleFor(side) { return Math.max(2, Math.ceil(152 / side)); }
  function base(canvas, d, dim) {
    var s = scaleFor(d.side);
    canvas.width = canvas.height = d.side * s;
    var ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(d.image, 0, 0, d.side * s, d.side * s);
    if (dim) { ctx.fillStyle = "rgba(0,0,0," + dim + ")"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
    return ctx;
  }
  function outline(ctx, side, test, colour) {
    var s = scaleFor(side);
    ctx.strokeStyle = colour;
    ctx.lineWidth = Math.max(1.5, s * 0.35);
    ctx.beginPath();
    for (var y = 0; y < side; y++) {
      for (var x = 0; x < side; x++) {
        var p = y * side + x;
        if (!test(p)) { continue; }
        if (y === 0 || !test(p - side)) { ctx.moveTo(x * s, y * s); ctx.lineTo((x + 1) * s, y * s); }
        if (y === side - 1 || !test(p + side)) { ctx.moveTo(x * s, (y + 1) * s); ctx.lineTo((x + 1) * s, (y + 1) * s); }
        if (x === 0 || !test(p - 1)) { ctx.moveTo(x * s, y * s); ctx.lineTo(x * s, (y + 1) * s); }
        if (x === side - 1 || !test(p + 1)) { ctx.moveTo((x + 1) * s, y * s); ctx.lineTo((x + 1) * s, (y + 1) * s); }
      }
    }
    ctx.stroke();
  }
  function colour(f) {
    var t = Math.min(1, Math.max(0, f)) * (VIRIDIS.length - 1), k = Math.min(VIRIDIS.length - 2, Math.floor(t));
    var u = t - k, a = VIRIDIS[k], b = VIRIDIS[k + 1];
    return "rgb(" + [0, 1, 2].map(function (j) { return Math.round(a[j] + u * (b[j] - a[j])); }).join(",") + ")";
  }
  function frequency(canvas, d, bits, bytes, count) {
    var ctx = base(canvas, d, 0.35), s = scaleFor(d.side), n = d.side * d.side, covered = 0;
    for (var p = 0; p < n; p++) {
      var hits = 0;
      for (var k = 0; k < count; k++) { hits += (bits[p * bytes + (k >> 3)] >> (k & 7)) & 1; }
      if (hits) {
        covered++;
        ctx.fillStyle = colour(hits / count);
        ctx.fillRect((p % d.side) * s, Math.floor(p / d.side) * s, s, s);
      }
    }
    return covered;
  }
  function bit(bits, bytes, k) { return function (p) { return (bits[p * bytes + (k >> 3)] >> (k & 7)) & 1; }; }
  function pixels(test, n) { var c = 0; for (var p = 0; p < n; p++) { c += test(p); } return c; }

  // -- panels ----------------------------------------------------------------------------------
  function panel(parent, caption) {
    var fig = document.createElement("figure"), cv = document.createElement("canvas"), cap = document.createElement("figcaption");
    fig.className = "panel";
    cv.setAttribute("role", "img");
    cap.textContent = caption;
    fig.appendChild(cv); fig.appendChild(cap); parent.appendChild(fig);
    return { canvas: cv, caption: cap };
  }
  var imagePanel = panel($("grader-panels"), "CT");
  var graderPanels = [];
  for (var g = 0; g < G; g++) { graderPanels.push(panel($("grader-panels"), "Grader " + (g + 1))); }
  var graderFreq = panel($("grader-panels"), "Graders' frequency");
  var modelPanels = runs.map(function (r, i) {
    var card = document.createElement("div"), h = document.createElement("h4"), row = document.createElement("div");
    card.className = "model-card"; row.className = "panels";
    h.id = "run-title-" + i;
    card.setAttribute("role", "group"); card.setAttribute("aria-labelledby", h.id);
    card.appendChild(h); card.appendChild(row); $("model-panels").appendChild(card);
    return { title: h, hyp: panel(row, "hypothesis"), freq: panel(row, "frequency") };
  });
  var maxCount = Math.max.apply(null, runs.map(function (r) { return r.count; }));
  slider.max = String(maxCount);

  function label(el, text) { el.canvas.setAttribute("aria-label", text); }
  function drawCase(d) {
    var c = cases[d.index], n = d.side * d.side;
    base(imagePanel.canvas, d, 0);
    label(imagePanel, "CT crop " + c.r + " of patient " + c.p + ", " + d.side + " pixels square");
    for (var g = 0; g < G; g++) {
      var t = bit(d.graders, 1, g), px = pixels(t, n), ctx = base(graderPanels[g].canvas, d, 0);
      outline(ctx, d.side, t, GRADER);
      graderPanels[g].caption.textContent = "Grader " + (g + 1) + (px ? "" : " (empty)");
      label(graderPanels[g], "Grader " + (g + 1) + " outline: " + (px ? px + " pixels" : "empty mask"));
    }
    var covered = frequency(graderFreq.canvas, d, d.graders, 1, G);
    label(graderFreq, "Graders' per-pixel frequency: " + covered + " pixels marked by at least one grader");
    runs.forEach(function (r, i) {
      var m = modelPanels[i];
      m.title.textContent = r.label + (r.model === r.label ? "" : " (" + r.model + ")") + " — GED² " + fmt(c.g[i]) + " with " + r.count +
        " hypothes" + (r.count === 1 ? "is" : "es");
      var cov = frequency(m.freq.canvas, d, d.hyps[i], r.bytes, r.count);
      m.freq.caption.textContent = "frequency over " + r.count + (c.o[String(i)] ? " (some reach outside the view)" : "");
      label(m.freq, r.label + " per-pixel frequency over " + r.count + " hypotheses: " + cov + " pixels in at least one");
    });
    drawHypothesis(d);
  }
  function drawHypothesis(d) {
    var k = Number(slider.value) - 1, n = d.side * d.side, c = cases[d.index];
    hypOut.value = hypOut.textContent = (k + 1) + " of " + maxCount;
    slider.setAttribute("aria-valuetext", "hypothesis " + (k + 1) + " of " + maxCount);
    runs.forEach(function (r, i) {
      var m = modelPanels[i], ctx = base(m.hyp.canvas, d, 0);
      if (showGraders.checked) {
        for (var g = 0; g < G; g++) { outline(ctx, d.side, bit(d.graders, 1, g), GRADER); }
      }
      m.hyp.canvas.dataset.hyp = String(k + 1);
      if (k >= r.count) {
        m.hyp.caption.textContent = "no hypothesis " + (k + 1) + " (" + r.count + " in all)";
        m.hyp.canvas.dataset.pixels = "";
        label(m.hyp, r.label + ": no hypothesis " + (k + 1) + ", the model gives " + r.count);
        return;
      }
      var t = bit(d.hyps[i], r.bytes, k), px = pixels(t, n);
      var out = (c.o[String(i)] || [])[k] || 0, text;
      outline(ctx, d.side, t, HYP);
      m.hyp.canvas.dataset.pixels = String(px);
      if (!px && !out) { text = "empty"; }
      else { text = (px + out) + " px" + (out ? ", " + out + " of them outside the view" : ""); }
      m.hyp.caption.textContent = "hypothesis " + (k + 1) + " of " + r.count + ": " + text;
      label(m.hyp, r.label + " hypothesis " + (k + 1) + " of " + r.count + ": " + text);
    });
  }

  // -- choosing a crop -------------------------------------------------------------------------
  function show(i) {
    if (i < 0 || i === current) { return; }
    current = i;
    var c = cases[i];
    $("case-title").textContent = "Crop " + c.r + " (" + c.p + ")";
    $("case-facts").textContent = c.m + " of " + G + " graders marked a lesion" +
      (c.a ? " — the graders disagree on presence" : "") + "; graders' mean pairwise d = 1 − IoU: " + fmt(c.d) +
      "; view " + c.s + " px of " + data.size + ".";
    status.textContent = "Loading crop " + c.r + "…";
    get(i).then(function (d) {
      if (current !== i) { return; }
      shown = d;
      drawCase(d);
      status.textContent = "Crop " + c.r + ", hypothesis " + slider.value + ".";
    }, function (err) { status.textContent = "Crop " + c.r + " could not be shown: " + err.message; });
  }
  function key(i) {
    var c = cases[i], how = sortSel.value, r = Number(sortRun.value);
    if (how === "file") { return i; }
    if (how === "disagreement") { return -c.d; }
    var v = c.g[r];
    if (v === null || isNaN(v)) { return Infinity; }
    return how === "ged-desc" ? -v : v;
  }
  function keep(c) {
    switch (filterSel.value) {
      case "presence": return c.a === 1;
      case "agree": return c.a === 0;
      case "differ": return c.d > 0;
      default: return true;
    }
  }
  function rebuild() {
    var r = Number(sortRun.value);
    order = [];
    for (var i = 0; i < cases.length; i++) { if (keep(cases[i])) { order.push(i); } }
    order.sort(function (a, b) { return (key(a) - key(b)) || (a - b); });
    var frag = document.createDocumentFragment();
    order.forEach(function (i) {
      var c = cases[i], o = document.createElement("option");
      o.value = String(i);
      o.textContent = c.r + " · " + c.p + " · " + fmt(c.g[r]) + " · " + c.m + "/" + G + (c.a ? " ⚑" : "");
      frag.appendChild(o);
    });
    list.replaceChildren(frag);
    $("case-count").textContent = "Showing " + order.length + " of " + cases.length + " crops.";
    var pos = order.indexOf(current);
    if (!order.length) { status.textContent = "No crop matches this choice."; return; }
    if (pos < 0) { pos = 0; current = -1; }
    list.selectedIndex = pos;
    show(order[pos]);
  }
  function step(delta) {
    if (!order.length) { return; }
    var pos = Math.min(order.length - 1, Math.max(0, list.selectedIndex + delta));
    list.selectedIndex = pos;
    show(order[pos]);
  }
  function hyp(delta) {
    slider.value = String(Math.min(maxCount, Math.max(1, Number(slider.value) + delta)));
    slider.dispatchEvent(new Event("input", { bubbles: true }));
  }

  runs.forEach(function (r, i) {
    var o = document.createElement("option");
    o.value = String(i); o.textContent = r.label;
    sortRun.appendChild(o);
  });
  list.addEventListener("change", function () { if (list.selectedIndex >= 0) { show(order[list.selectedIndex]); } });
  [sortSel, sortRun, filterSel].forEach(function (el) { el.addEventListener("change", rebuild); });
  slider.addEventListener("input", function () {
    if (shown && shown.index === current) {
      drawHypothesis(shown);
      status.textContent = "Crop " + cases[current].r + ", hypothesis " + slider.value + ".";
    }
  });
  showGraders.addEventListener("change", function () { if (shown) { drawHypothesis(shown); } });
  $("prev-case").addEventListener("click", function () { step(-1); });
  $("next-case").addEventListener("click", function () { step(1); });
  $("prev-hyp").addEventListener("click", function () { hyp(-1); });
  $("next-hyp").addEventListener("click", function () { hyp(1); });
  root.addEventListener("keydown", function (e) {
    var tag = e.target.tagName;
    if (tag === "SELECT" || tag === "INPUT" || e.altKey || e.ctrlKey || e.metaKey) { return; }
    if (e.key === "ArrowLeft" || e.key === "ArrowRight") { hyp(e.key === "ArrowLeft" ? -1 : 1); e.preventDefault(); }
    else if (e.key === "ArrowUp" || e.key === "ArrowDown") { step(e.key === "ArrowUp" ? -1 : 1); e.preventDefault(); }
  });
  rebuild();
})();
""".replace("__GRADER__", GRADER_OUTLINE).replace("__HYP__", HYPOTHESIS_OUTLINE)
