"""``OUT/report.html`` and the case viewer's data (``lidcseg.cases``), on a tiny reproduction.

The session fixture builds what ``lidcseg reproduce`` leaves in OUT from the library's own
functions on the phantom: data, two briefly trained runs (and an untrained M-Heads one),
the evaluation, the ambiguity study, Fig. 6, the cases and ``plan.json``. The Chromium tests
(headless, Debian's ``chromium``) load the report from disk; they are skipped when it is
not on PATH.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from lidcseg.cases import sample_cases
from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_json_atomic
from lidcseg.metrics import generalized_energy_distance
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import create_model, model_config
from lidcseg.reports.cases import CasesStore, pack_bits, unpack_bits
from lidcseg.reports.html import write_report
from lidcseg.reports.html.markup import is_number, table
from lidcseg.reports.html.provenance import data_fingerprint
from lidcseg.seed import seed_everything

TINY = ModelConfig(base_channels=4, num_scales=3, fcomb_channels=8, latent_dim=2)
TRAIN = TrainConfig(steps=4, batch_size=4, lr=1e-3, lr_final=1e-4, lr_decay_steps=1, input_size=32,
                    aug_max_shift=8, num_workers=0, log_every=1, val_every=2, val_samples=4, val_max_crops=4,
                    val_batch_size=4, checkpoint_every=2, device="cpu", threads=1)
SECTIONS = ("provenance", "fig4a", "table1", "ablations", "cases", "fig6")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (Debian: apt-get install chromium)")


def _untrained_m_heads(root: Path) -> Path:
    """A run folder (config.json + best/) of an untrained 4-head M-Heads model."""
    seed_everything(3)
    cfg = model_config("m-heads", TINY, num_heads=4)
    train = to_dict(TRAIN)
    save_checkpoint(root / "best", create_model(cfg), meta={"step": 0, "train": train})
    write_json_atomic(root / "config.json", {"model": to_dict(cfg), "train": train, "data": {"crop_size": 180}})
    return root


@pytest.fixture(scope="session")
def reproduction(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT as ``lidcseg reproduce`` leaves it, built from the library's functions on tiny data."""
    from lidcseg.ambiguity import ambiguity_runs
    from lidcseg.evaluation import evaluate_runs
    from lidcseg.latent import latent_figure
    from lidcseg.training import train

    out = tmp_path_factory.mktemp("reproduction")
    shutil.copytree(prepared, out / "data")
    runs = {"probunet": train(out / "data", TINY, TRAIN, out / "runs" / "probunet"),
            "fixed-prior": train(out / "data", model_config("fixed-prior", TINY), TRAIN, out / "runs" / "fixed-prior"),
            "m-heads-4": _untrained_m_heads(out / "runs" / "m-heads-4")}
    with torch.random.fork_rng():
        evaluate_runs(out / "data", list(runs.values()), out=out / "evaluate", counts=(1, 4), device="cpu",
                      threads=1)
        ambiguity_runs(out / "data", [runs["probunet"], runs["fixed-prior"]], out=out / "ambiguity", n=4,
                       device="cpu", threads=1)
        (out / "latent").mkdir()
        latent_figure(runs["probunet"], out / "data", 0, out / "latent" / "probunet.png", size=5, device="cpu")
        sample_cases(out / "data", runs, out / "cases", n=4, device="cpu", threads=1)
    write_json_atomic(out / "plan.json", {
        "version": 1, "options": {"preset": "test"},
        "environment": {"machine": {"hostname": "test", "cpus": 2}, "packages": {"torch": torch.__version__},
                        "commit": "0123abc"},
        "stages": [{"name": "prepare", "state": "done", "folder": "data", "wall_s": 3.0, "estimate_s": 4.0},
                   {"name": "evaluate", "state": "done", "folder": "evaluate", "wall_s": 75.4}],
    })
    write_report(out)
    return out


# -- the cases --------------------------------------------------------------------------------------


def test_bits_pack_and_unpack() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((2, 11, 5, 6)) > 0.5  # 11 masks: two bytes per pixel
    bits = pack_bits(masks)
    assert bits.shape == (2, 5, 6, 2) and bits.dtype == np.uint8
    assert np.array_equal(unpack_bits(bits, 11), masks)
    one = np.zeros((1, 3, 2, 2), bool)
    one[0, 2, 1, 0] = True  # mask 2 -> bit 2 of byte 0
    assert pack_bits(one)[0, 1, 0, 0] == 4


def test_cases_hold_every_runs_hypotheses_and_their_ged(reproduction: Path) -> None:
    with CasesStore(reproduction / "cases" / "cases.h5") as store:
        assert [(r["label"], r["count"]) for r in store.runs] == [("probunet", 4), ("fixed-prior", 4),
                                                                   ("m-heads-4", 4)]
        assert len(store) == 4 and store.n_graders == 4 and store.input_size == 32
        meta = store.meta
        rows = meta["row"].tolist()
        for i in range(len(store)):
            case = store[i]
            assert case.graders.shape == (4, 32, 32) and [h.shape for h in case.hypotheses] == [(4, 32, 32)] * 3
            assert int(meta["marking"][i]) == int(case.graders.reshape(4, -1).any(1).sum())
            for r in range(3):  # the stored GED is the GED of the stored hypotheses
                want = generalized_energy_distance(torch.from_numpy(case.hypotheses[r][None]),
                                                   torch.from_numpy(case.graders[None]))
                assert meta["ged"][i, r] == pytest.approx(float(want[0]), abs=1e-5)
    # Same seed and noise as `lidcseg evaluate`: the Prob. U-Net's GED at n = 4 is the evaluation's.
    with (reproduction / "evaluate" / "per_image.csv").open() as f:
        evaluated = {int(r["image"]): float(r["ged"]) for r in csv.DictReader(f)
                     if r["run"] == "probunet" and r["n"] == "4"}
    assert [pytest.approx(evaluated[row], abs=1e-5) for row in rows] == meta["ged"][:, 0].tolist()
    info = json.loads((reproduction / "cases" / "cases.json").read_text())
    assert info["format"] == "lidcseg-cases" and info["n"] == 4 and info["crops"] == 4


def test_m_heads_give_their_own_count_and_the_folder_rules(reproduction: Path, tmp_path: Path) -> None:
    runs = {"m": reproduction / "runs" / "m-heads-4", "p": reproduction / "runs" / "probunet"}
    out = sample_cases(reproduction / "data", runs, tmp_path / "cases", n=6, max_crops=2, device="cpu")
    with CasesStore(out / "cases.h5") as store:
        assert [r["count"] for r in store.runs] == [4, 6] and len(store) == 2
        assert store.attrs["hyp_bytes"] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LidcsegError, match="not empty"):
        sample_cases(reproduction / "data", runs, foreign, device="cpu")
    with pytest.raises(LidcsegError, match="inside the input"):
        sample_cases(reproduction / "data", runs, reproduction / "data" / "cases", device="cpu")
    with pytest.raises(LidcsegError, match="1..64"):
        sample_cases(reproduction / "data", runs, tmp_path / "c2", n=0, device="cpu")


def test_data_fingerprint_follows_the_content(reproduction: Path, tmp_path: Path) -> None:
    import h5py

    data = tmp_path / "data"
    shutil.copytree(reproduction / "data", data)
    first = data_fingerprint(data)
    assert first.startswith("sha256:") and first == data_fingerprint(reproduction / "data")
    with h5py.File(data / "test.h5", "r+") as f:
        f["image"][0, 0, 0] += 1
    assert data_fingerprint(data) != first


def test_number_cells_are_right_aligned() -> None:
    assert is_number("0.310 (LIDCv1)") and is_number("0.87 ± 0.20") and is_number(3) and is_number("–")
    assert not is_number("not transcribed") and not is_number("LIDCv1 (pickle)") and not is_number(True)
    html = table(["a", "b", "c"], [["x", "0.5", "text"]])
    assert '<td class="num">0.5</td>' in html and "<td>text</td>" in html and '<th scope="row">x</th>' in html


# -- the report as a file -----------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def test_report_is_self_contained_with_its_sections(reproduction: Path) -> None:
    html = (reproduction / "report.html").read_text(encoding="utf-8")
    tags = _tags(html)
    ids = {a.get("id") for _, a in tags}
    assert set(SECTIONS) <= ids and "fig5" not in ids  # no flip stage, no Fig. 5
    for tag, attrs in tags:
        for key in ("src", "href", "action", "data", "poster"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, key, value[:60])
        assert not (tag == "link" and attrs.get("rel") == "stylesheet")
        assert not (tag == "script" and "src" in attrs)
    assert not re.search(r"url\(\s*['\"]?https?:|@import", html)
    images = [a for t, a in tags if t == "img"]
    assert len(images) >= 8 and all((a.get("alt") or "").strip() for a in images)
    canvases_labelled = all(a.get("aria-label") or a.get("role") for t, a in tags if t == "canvas")
    assert canvases_labelled
    for text in ("PHANTOM", "LIDCv1", "Wilcoxon", "0123abc", "not transcribed",
                 "sha256:", "1:15"):  # 75.4 s of evaluate
        assert text in html, text
    labels = {a.get("for") for t, a in tags if t == "label"}
    assert {"filter", "sort", "sort-run", "case-list", "hyp"} <= labels


def test_report_notes_stages_that_did_not_run(reproduction: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reproduction / "data", out / "data")
    html = write_report(out, fingerprint=False).read_text(encoding="utf-8")
    assert "The evaluation did not run" in html and "The cases stage did not run" in html
    assert "plan.json records no stages" in html and "<script>" not in html
    with pytest.raises(LidcsegError, match="not found"):
        write_report(tmp_path / "missing")


# -- the report in headless Chromium -------------------------------------------------------------------


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
             *args, page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _with_script(report: Path, folder: Path, script: str) -> Path:
    """A copy of the report with a test-only script at the end of the body."""
    page = folder / "scripted.html"
    html = report.read_text(encoding="utf-8")
    page.write_text(html.replace("</body>", f"<script>{script}</script></body>"), encoding="utf-8")
    return page


@needs_chromium
def test_chromium_loads_the_report_without_console_errors(reproduction: Path) -> None:
    done = _chromium(reproduction / "report.html", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _console(done.stderr) == []
    dom = done.stdout
    assert 'id="viewer"' in dom and not re.search(r'id="viewer"[^>]*hidden', dom)
    assert dom.count('data-hyp="1"') == 3  # one hypothesis panel per run, drawn
    assert "Showing 4 of 4 crops." in dom


@needs_chromium
def test_slider_step_changes_the_displayed_hypothesis(reproduction: Path, tmp_path: Path) -> None:
    with CasesStore(reproduction / "cases" / "cases.h5") as store:
        d = store.meta["grader_diversity"]
        first = int(np.lexsort((np.arange(len(d)), -d))[0])  # the default order: disagreement, high to low
        case = store[first]
        want = [[int(h[k].sum()) for k in range(4)] for h in case.hypotheses]
    step = """
      setTimeout(function () {
        var s = document.getElementById("hyp");
        document.body.dataset.before = document.querySelector("canvas[data-hyp]").dataset.pixels;
        s.value = "3";
        s.dispatchEvent(new Event("input", {bubbles: true}));
      }, 2000);"""
    done = _chromium(_with_script(reproduction / "report.html", tmp_path, step), "--dump-dom")
    assert done.returncode == 0 and _console(done.stderr) == [], done.stderr[-2000:]
    dom = done.stdout
    assert re.search(r'<output[^>]*id="hyp-out"[^>]*>3 of 4</output>', dom)
    panels = re.findall(r'<canvas[^>]*data-hyp="(\d+)"[^>]*data-pixels="(\d*)"', dom)
    assert [int(k) for k, _ in panels] == [3, 3, 3]
    assert [int(px) for _, px in panels] == [w[2] for w in want]  # hypothesis 3 of each run
    assert f'data-before="{want[0][0]}"' in dom  # hypothesis 1 was shown before the step
    assert "Crop " in dom and "hypothesis 3 of 4" in dom


@needs_chromium
def test_screenshot_is_not_blank(reproduction: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    done = _chromium(reproduction / "report.html", "--window-size=1280,1600", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    grey = np.asarray(Image.open(shot).convert("L"), float)
    assert grey.shape == (1600, 1280) and grey.std() > 10 and (grey < 128).mean() > 0.01


def _dom_without_scripts(page: Path, timeout: float = 60.0) -> str:
    """The DOM of ``page`` loaded with JavaScript disabled, over the DevTools protocol
    (``--dump-dom`` needs the page's scripting, so it prints nothing then)."""
    import select

    to_chrome, from_chrome = os.pipe(), os.pipe()

    def fds() -> None:  # the pipe protocol: commands on fd 3, replies on fd 4
        os.dup2(to_chrome[0], 3)
        os.dup2(from_chrome[1], 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                                pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        os.close(to_chrome[0])
        os.close(from_chrome[1])
        buf, last = b"", 0

        def send(method: str, params: dict | None = None, session: str | None = None) -> int:
            nonlocal last
            last += 1
            msg = {"id": last, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
            os.write(to_chrome[1], json.dumps(msg).encode() + b"\0")
            return last

        def wait(pred) -> dict:
            nonlocal buf
            while True:
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    if pred(msg := json.loads(raw)):
                        assert "error" not in msg, msg
                        return msg
                assert select.select([from_chrome[0]], [], [], timeout)[0], "no reply from chromium"
                chunk = os.read(from_chrome[0], 1 << 20)
                assert chunk, "chromium closed the pipe"
                buf += chunk

        def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
            i = send(method, params, session)
            return wait(lambda m: m.get("id") == i)["result"]

        try:
            target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            call("Page.enable", session=sid)
            call("Emulation.setScriptExecutionDisabled", {"value": True}, session=sid)
            send("Page.navigate", {"url": page.as_uri()}, session=sid)
            wait(lambda m: m.get("method") == "Page.loadEventFired")
            root = call("DOM.getDocument", {"depth": -1}, session=sid)["root"]
            html = call("DOM.getOuterHTML", {"nodeId": root["nodeId"]}, session=sid)["outerHTML"]
            send("Browser.close")
            return html
        finally:
            os.close(to_chrome[1])
            os.close(from_chrome[0])
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@needs_chromium
def test_without_javascript_the_static_report_remains(reproduction: Path) -> None:
    dom = _dom_without_scripts(reproduction / "report.html")
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom
    assert re.search(r'id="viewer"[^>]*hidden', dom) and "The interactive viewer needs JavaScript" in dom
    assert "data-hyp" not in dom  # the script did not run: nothing was drawn
    assert dom.count("<img") >= 8 and "Example crops" in dom and "Wilcoxon" in dom



@needs_chromium
def test_arrow_keys_step_hypotheses_and_crops(reproduction: Path, tmp_path: Path) -> None:
    keys = """
      setTimeout(function () {
        var b = document.getElementById("next-hyp"), title = document.getElementById("case-title");
        b.focus();
        var press = function (key) { b.dispatchEvent(new KeyboardEvent("keydown", {key: key, bubbles: true})); };
        document.body.dataset.first = title.textContent;
        press("ArrowRight"); press("ArrowRight"); press("ArrowLeft");
        document.body.dataset.hyp = document.getElementById("hyp").value;
        press("ArrowDown");
        document.body.dataset.second = title.textContent;
        document.body.dataset.selected = String(document.getElementById("case-list").selectedIndex);
      }, 2000);"""
    done = _chromium(_with_script(reproduction / "report.html", tmp_path, keys), "--dump-dom")
    assert done.returncode == 0 and _console(done.stderr) == [], done.stderr[-2000:]
    dom = done.stdout
    first = re.search(r'data-first="([^"]*)"', dom).group(1)
    second = re.search(r'data-second="([^"]*)"', dom).group(1)
    assert 'data-hyp="2"' in dom and 'data-selected="1"' in dom
    assert first.startswith("Crop ") and second.startswith("Crop ") and first != second


def test_paper_values_appear_beside_ours_once_transcribed(reproduction: Path, monkeypatch) -> None:
    """PAPER_TABLE1 / PAPER_ABLATIONS are empty until copied from the paper; a value put there
    lands in the paper column of its model's row, and the others still say so."""
    from lidcseg.reports import paper_values
    from lidcseg.reports.html import results

    assert results.PAPER_TABLE1 is paper_values.PAPER_TABLE1  # one home for the numbers
    monkeypatch.setitem(paper_values.PAPER_TABLE1, "probunet", 0.876)
    monkeypatch.setitem(paper_values.PAPER_ABLATIONS, "fixed-prior", 0.432)
    table1 = str(results.table1_section(reproduction / "ambiguity", None))
    rows = [r for r in re.findall(r"<tr>.*?</tr>", table1, flags=re.S) if "<td" in r]
    assert any("0.876" in r and "probunet" in r for r in rows)
    assert all("not transcribed" in r for r in rows if "0.876" not in r)
    summary = json.loads((reproduction / "evaluate" / "summary.json").read_text())
    ablations = str(results.ablations_section(summary, None))
    rows = [r for r in re.findall(r"<tr>.*?</tr>", ablations, flags=re.S) if "<td" in r]
    assert any("0.432" in r and "fixed-prior" in r for r in rows)
    assert all("not transcribed" in r for r in rows if "0.432" not in r)
