"""Tests of gradprobe.report: the self-contained HTML report of a run.

The run used here is real: small plain and residual MLPs trained on the bundled
digits with plain torch, and the schema's columns computed in this file with
torch.autograd (no probe), so the report is tested on realistic numbers
independently of the probe engine.
"""

from __future__ import annotations

import base64
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from gradprobe import records
from gradprobe.reporting import FIGURES, report
from gradprobe.summary import summary as summary_table

HOSTILE = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------- a real run, measured by hand


class _Block(torch.nn.Module):
    """y = relu(s(x) + F(x)) with F = W2 relu(W1 x); s = identity (residual), 0 (plain) or projection."""

    def __init__(
        self, n_in: int, n_out: int, residual: bool, gen: torch.Generator, branch_scale: float = 1.0
    ):
        super().__init__()
        self.l1 = torch.nn.Linear(n_in, n_out)
        self.l2 = torch.nn.Linear(n_out, n_out)
        self.residual = residual and n_in == n_out
        for layer in (self.l1, self.l2):
            fan_in = layer.weight.shape[1]
            with torch.no_grad():  # He init; residual branches scaled down so deep sums do not blow up
                scale = branch_scale if layer is self.l2 and self.residual else 1.0
                layer.weight.normal_(0.0, scale * math.sqrt(2.0 / fan_in), generator=gen)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.l2(torch.relu(self.l1(x)))
        return torch.relu(x + f) if self.residual else torch.relu(f)


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().norm())


def _rows_of_step(step, blocks, xs, ys, gxs, gys, prev_params, jac):
    rows = []
    last_grad_out = _norm(gys[-1])
    for i, (name, block) in enumerate(blocks):
        x, y, gx, gy = xs[i], ys[i], gxs[i], gys[i]
        same = x.shape == y.shape
        params = torch.cat([p.detach().flatten() for p in block.parameters()]).double()
        grads = torch.cat([p.grad.detach().flatten() for p in block.parameters()]).double()
        prev = prev_params.get(name)
        row = {
            "step": step,
            "block": name,
            "index": i,
            "calls": 1,
            "grad_out": _norm(gy),
            "grad_in": _norm(gx),
            "gain": _norm(gx) / _norm(gy),
            "cum_gain": _norm(gx) / last_grad_out,
            "skip_grad": _norm(gy) if same else math.nan,
            "branch_grad": _norm(gx - gy) if same else math.nan,
            "branch_cos": float(
                torch.nn.functional.cosine_similarity(gy.flatten(), (gx - gy).flatten(), dim=0).detach()
            )
            if same
            else math.nan,
            "res_ratio": _norm(y - x) / _norm(x) if same else math.nan,
            "cos_xy": float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).detach())
            if same
            else math.nan,
            "in_rms": float(x.detach().double().pow(2).mean().sqrt()),
            "out_rms": float(y.detach().double().pow(2).mean().sqrt()),
            "param_norm": _norm(params),
            "param_grad_norm": _norm(grads),
            "update_ratio": _norm(params - prev) / _norm(params) if prev is not None else math.nan,
        }
        row.update(jac.get(i, {}))
        prev_params[name] = params.clone()
        rows.append(row)
    return rows


def _jacobians(blocks, x0: torch.Tensor) -> dict[int, dict[str, float]]:
    """Exact per-sample Jacobians of each block and of the products up to the output (float64)."""
    mats, inputs = [], []
    h = x0.double()
    for _, block in blocks:
        block64 = _double_copy(block)
        inputs.append(h)
        j = torch.autograd.functional.jacobian(block64, h)
        mats.append(j)
        h = block64(h).detach()
    out: dict[int, dict[str, float]] = {}
    prod = torch.eye(mats[-1].shape[0], dtype=torch.float64)
    for i in reversed(range(len(mats))):
        j = mats[i]
        prod = prod @ j
        n = j.shape[0]
        sv = torch.linalg.svdvals(j)
        psv = torch.linalg.svdvals(prod)
        out[i] = {
            "jac_fro": float(j.norm() / math.sqrt(n)),
            "jac_spec": float(sv.max()),
            "jac_id": float((j - torch.eye(n, dtype=j.dtype)).norm() / math.sqrt(n))
            if j.shape[0] == j.shape[1]
            else math.nan,
            "prod_fro": float(prod.norm() / math.sqrt(prod.shape[0])),
            "prod_spec": float(psv.max()),
        }
    return out


def _double_copy(block: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(block).double()


#: Figures that the hand-built run of :func:`trained_run` has no data for.
NOT_IN_HAND_BUILT_RUN = ("paths", "signal", "lesion")


def trained_run(
    depths=(4, 12), steps: int = 30, width: int = 32, jacobian_every: int = 10, seed: int = 0
) -> records.Run:
    """Train plain and residual MLPs of the given depths on digits; return a Run in the runner's schema."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these nets are tiny: thread hand-offs cost 10x the work on a busy machine
    try:
        return _train(depths, steps, width, jacobian_every, seed)
    finally:
        torch.set_num_threads(threads)


def _train(depths, steps: int, width: int, jacobian_every: int, seed: int) -> records.Run:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(
        (digits.data - digits.data.mean(0)) / (digits.data.std(0) + 1e-8), dtype=torch.float32
    )
    y_all = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x_all[:1400], y_all[:1400], x_all[1400:], y_all[1400:]
    frames, scalars = [], []
    for depth in depths:
        for residual in (False, True):
            name = f"{'resnet' if residual else 'plain'}-mlp-{depth}"
            gen = torch.Generator().manual_seed(seed)
            blocks = [("stem", _Block(64, width, residual, gen))]
            blocks += [
                (f"blocks.{i}", _Block(width, width, residual, gen, branch_scale=depth**-0.5))
                for i in range(depth)
            ]
            head = torch.nn.Linear(width, 10)
            modules = torch.nn.ModuleList([b for _, b in blocks] + [head])
            opt = torch.optim.SGD(modules.parameters(), lr=0.01, momentum=0.9)
            prev: dict[str, torch.Tensor] = {}
            rows = []
            for step in range(steps):
                idx = torch.randint(0, len(x_train), (64,), generator=gen)
                h, xs, ys = x_train[idx], [], []
                for _, block in blocks:
                    xs.append(h)
                    h = block(h)
                    ys.append(h)
                loss = torch.nn.functional.cross_entropy(head(h), y_train[idx])
                opt.zero_grad()
                grads = torch.autograd.grad(loss, xs[1:] + ys, retain_graph=True)
                loss.backward()
                # the stem's input is the data: its gradient is computed directly
                x0 = xs[0].clone().requires_grad_()
                g_stem_in = torch.autograd.grad(blocks[0][1](x0), x0, grads[len(xs) - 1])[0]
                gxs = [g_stem_in, *grads[: len(xs) - 1]]
                gys = list(grads[len(xs) - 1 :])
                jac = _jacobians(blocks, xs[0][0]) if step % jacobian_every == 0 or step == steps - 1 else {}
                rows += _rows_of_step(step, blocks, xs, ys, gxs, gys, prev, jac)
                opt.step()
                test_acc = math.nan
                if step % 10 == 9 or step == steps - 1:
                    with torch.no_grad():
                        h = x_test
                        for _, block in blocks:
                            h = block(h)
                        test_acc = float((head(h).argmax(1) == y_test).float().mean())
                scalars.append(
                    {
                        "model": name,
                        "depth": depth,
                        "residual": residual,
                        "step": step,
                        "epoch": step // 10,
                        "train_loss": float(loss.detach()),
                        "train_acc": math.nan,
                        "test_acc": test_acc,
                        "lr": 0.01,
                    }
                )
            frame = records.rows_to_frame(rows)
            frame.insert(0, "model", name)
            frame.insert(1, "depth", depth)
            frame.insert(2, "residual", residual)
            frames.append(frame)
    meta = {
        "gradprobe_version": "0.0.test",
        "torch_version": torch.__version__,
        "created": "2024-01-02T03:04:05",
        "seed": seed,
        "command": "pytest tests/test_report.py",
        "models": list(dict.fromkeys(f["model"].iloc[0] for f in frames)),
    }
    return records.Run(pd.concat(frames, ignore_index=True), pd.DataFrame(scalars), meta)


# ----------------------------------------------------------------------------- HTML checks

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "track"}


class _Page(HTMLParser):
    """Collects tags, attributes and text, and checks that elements nest and close properly."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag):
        return [attrs for t, attrs in self.tags if t == tag]


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    assert not page.problems, page.problems
    assert not page.stack, f"unclosed elements: {page.stack}"
    return page


def external_references(page: _Page) -> list[str]:
    found = []
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "data", "action", "poster"):
            value = (attrs.get(name) or "").strip()
            if value and not (value.startswith("#") or value.startswith("data:image/png;base64,")):
                found.append(f"<{tag} {name}={value[:60]!r}>")
    return found


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _close_all():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def run() -> records.Run:
    return trained_run(depths=(3, 8), steps=20, jacobian_every=10)


@pytest.fixture(scope="module")
def written(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    spectra = {m: np.linspace(0.2, 3.0, 40) ** (1 + i) for i, m in enumerate(run.models[:2])}
    start = time.perf_counter()
    index = report(run, out, spectra=spectra, progress=False)
    seconds = time.perf_counter() - start
    return index, index.read_text(encoding="utf-8"), seconds


# ----------------------------------------------------------------------------- the report of a real run


def test_report_writes_index_figures_and_tables(run, written):
    index, _, _ = written
    folder = index.parent
    assert index.name == "index.html"
    pngs = sorted(p.stem for p in folder.glob("*.png"))
    # this hand-built run has data for every figure but the path-length and signal propagation
    # ones (no probe recorded it); tests/test_paths.py and tests/test_signal.py draw those
    assert pngs == sorted(spec.name for spec in FIGURES if spec.name not in NOT_IN_HAND_BUILT_RUN)
    back = records.load(folder)
    pd.testing.assert_frame_equal(back.frame(), run.frame())
    pd.testing.assert_frame_equal(back.scalars(), run.scalars())
    assert back.meta["command"] == run.meta["command"]


def test_report_is_self_contained_and_embeds_every_figure(written):
    index, html, _ = written
    page = parse(html)
    assert external_references(page) == []
    assert "http://" not in html and "https://" not in html
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    assert "@import" not in html and "url(" not in html
    images = page.all("img")
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in images}
    files = {p.read_bytes() for p in index.parent.glob("*.png")}
    assert embedded == files and len(images) == len(files)
    for img in images:
        assert img["alt"] and int(img["width"]) > 300 and int(img["height"]) > 150


def test_report_shows_metadata_summary_captions_and_glossary(run, written):
    _, html, _ = written
    text = " ".join(parse(html).text)
    for needle in ("2024-01-02T03:04:05", torch.__version__, "pytest tests/test_report.py", "0.0.test"):
        assert needle in text
    for model in run.models:
        assert model in text
    for spec in FIGURES:
        if spec.name not in NOT_IN_HAND_BUILT_RUN:  # a figure without data is left out, caption too
            assert spec.title in text and spec.caption[:60] in text
    for column, meaning in records.GLOSSARY.items():
        assert column in text and meaning[:40] in text
    from gradprobe import verdict

    for word, meaning in verdict.GLOSSARY.items():  # the thresholds of "What this run shows"
        assert word in text and meaning[:40] in text


def test_summary_table_matches_the_tables(run):
    frame, scalars = run.frame(), run.scalars()
    table = summary_table(frame, scalars, band=(0.8, 1.25)).set_index("model")
    assert list(table.index) == run.models
    for model in run.models:
        rows = frame[frame["model"] == model]
        logged = scalars[scalars["model"] == model]
        row = table.loc[model]
        last_epoch = logged[logged["epoch"] == logged["epoch"].max()]
        assert len(last_epoch) == 10
        assert row["train_loss"] == pytest.approx(last_epoch["train_loss"].mean(), rel=1e-12)
        assert row["test_acc"] == logged["test_acc"].dropna().iloc[-1]
        first = rows[rows["step"] == 0]["cum_gain"]
        last = rows[rows["step"] == rows["step"].max()]["cum_gain"]
        assert (row["cum_gain_min_init"], row["cum_gain_max_init"]) == (first.min(), first.max())
        assert (row["cum_gain_min_end"], row["cum_gain_max_end"]) == (last.min(), last.max())
        outside = rows[(rows["gain"] < 0.8) | (rows["gain"] > 1.25)]["block"].unique().tolist()
        assert row["gain_outside"] == len(outside)
        assert row["gain_outside_blocks"] == ", ".join(outside)
        assert row["max_res_ratio"] == rows["res_ratio"].max()
        assert row["max_res_ratio_block"] == rows.loc[rows["res_ratio"].idxmax(), "block"]
        assert row["blocks"] == rows["block"].nunique() and row["steps"] == 20


def test_summary_table_on_a_hand_made_frame():
    nan, inf = math.nan, math.inf
    frame = pd.DataFrame(
        {
            "step": [0, 0, 0, 1, 1, 1],
            "block": ["proj", "a", "b"] * 2,
            "index": [0, 1, 2] * 2,
            "gain": [nan, 0.4, 1.0, nan, 1.0, 3.0],
            "cum_gain": [0.2, 0.4, 1.0, 3.0, 3.0, 3.0],
            "res_ratio": [nan, 0.0, 0.1, nan, inf, 0.2],
        }
    )
    row = summary_table(frame).iloc[0]
    assert row["model"] == "run"
    assert row["gain_outside"] == 2 and row["gain_outside_blocks"] == "a, b"  # NaN is not "outside"
    assert (row["cum_gain_min_init"], row["cum_gain_max_init"]) == (0.2, 1.0)
    assert (row["cum_gain_min_end"], row["cum_gain_max_end"]) == (3.0, 3.0)
    assert row["max_res_ratio"] == inf and row["max_res_ratio_block"] == "a"
    assert math.isnan(row["train_loss"]) and math.isnan(row["test_acc"])
    probe_scalars = pd.DataFrame({"step": [0, 1, 2], "loss": [3.0, 2.0, nan], "acc": [0.1, nan, 0.5]})
    row = summary_table(frame, probe_scalars).iloc[0]  # no epochs: the last values logged
    assert (row["train_loss"], row["test_acc"]) == (2.0, 0.5)
    with pytest.raises(ValueError, match="0 < low < high"):
        summary_table(frame, band=(2.0, 0.5))


def test_report_escapes_hostile_model_and_block_names(run, tmp_path):
    frame, scalars = run.frame(), run.scalars()
    victim = run.models[0]
    frame["model"] = frame["model"].replace(victim, HOSTILE)
    scalars["model"] = scalars["model"].replace(victim, HOSTILE)
    mine = frame["model"] == HOSTILE
    worst = frame.loc[frame.loc[mine, "res_ratio"].idxmax(), "block"]  # named in the summary table
    frame.loc[mine & (frame["block"] == worst), "block"] = '"><img src=x onerror=alert(2)>'

    meta = dict(run.meta, command="run --name '<b>bold</b>' & more", note="<style>body{display:none}</style>")
    index = report(records.Run(frame, scalars, meta), tmp_path, progress=False, figures=["highway"])
    html = index.read_text(encoding="utf-8")
    page = parse(html)
    assert not page.all("script") and not page.all("b")
    assert len(page.all("style")) == 1 and len(page.all("img")) == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    assert HOSTILE in " ".join(page.text)  # shown literally to the reader


def test_report_accepts_a_folder_a_frame_and_a_probe_like_object(run, tmp_path):
    saved = run.save(tmp_path / "saved")
    index = report(saved, progress=False, figures=["highway", "training"])  # out defaults to the folder
    assert index == saved / "index.html"
    assert {p.name for p in saved.glob("*.png")} == {"highway.png", "training.png"}

    only_frame = report(run.frame(), tmp_path / "frame", progress=False, tables=False)
    assert not (only_frame.parent / "training.png").exists()  # no scalars, so no training curves
    assert not list(only_frame.parent.glob("*.parquet")) and not list(only_frame.parent.glob("*.csv"))
    assert len(parse(only_frame.read_text()).all("img")) == len(FIGURES) - 1 - len(NOT_IN_HAND_BUILT_RUN)

    class ProbeLike:
        def frame(self):
            return run.frame()

        def scalars(self):
            return run.scalars()

        def meta(self):
            return {"command": "probe-like"}

    index = report(ProbeLike(), tmp_path / "probe", progress=False, figures=["training"])
    assert "probe-like" in index.read_text()

    with pytest.raises(TypeError, match="takes a gradprobe Run"):
        report(42, tmp_path / "bad")
    with pytest.raises(TypeError, match="needs out="):
        report(run, progress=False)
    with pytest.raises(ValueError, match="lacks"):
        report(pd.DataFrame({"step": [0]}), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="unknown figure"):
        report(run, tmp_path / "bad", figures=["nope"])


def test_report_of_a_real_probe(tmp_path):
    import gradprobe

    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(3)]
    )
    with gradprobe.attach(net) as probe:
        for _ in range(3):
            net(torch.randn(4, 6, generator=gen)).pow(2).mean().backward()
            probe.log(loss=1.0)
    index = report(probe, tmp_path, progress=False)
    page = parse(index.read_text())
    assert len(page.all("img")) >= 4  # highway, gain, identity, responses at least


def test_report_of_an_empty_run_says_so(tmp_path):
    index = report(records.rows_to_frame([]), tmp_path, progress=False)
    page = parse(index.read_text())
    text = " ".join(page.text)
    assert "no recorded rows" in text and "No figure could be drawn" in text
    assert not page.all("img") and not list(tmp_path.glob("*.png"))


def test_rerun_removes_figures_that_are_no_longer_drawn(run, tmp_path):
    report(run, tmp_path, progress=False, figures=["highway", "gain"], tables=False)
    assert (tmp_path / "gain.png").exists()
    frame = run.frame().assign(gain=math.nan)
    report(records.Run(frame, run.scalars(), run.meta), tmp_path, progress=False, figures=["highway", "gain"])
    assert not (tmp_path / "gain.png").exists() and (tmp_path / "highway.png").exists()


def test_progress_bar_can_be_shown_and_hidden(run, tmp_path, capsys):
    report(run, tmp_path / "a", progress=True, figures=["highway"], tables=False)
    assert "report figures" in capsys.readouterr().err
    report(run, tmp_path / "b", progress=False, figures=["highway"], tables=False)
    assert "report figures" not in capsys.readouterr().err


def test_report_stays_small(written):
    index, _, seconds = written
    total = sum(p.stat().st_size for p in index.parent.iterdir())
    pngs = sum(p.stat().st_size for p in index.parent.glob("*.png"))
    assert pngs < 450_000, f"figures take {pngs} bytes"
    assert total < 1_500_000, f"the report folder takes {total} bytes"
    assert seconds < 60


# ----------------------------------------------------------------------------- in a real browser


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(written, tmp_path):
    index, _, _ = written
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        index.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert shot.exists() and shot.stat().st_size > 50_000  # a page with figures, not a blank one
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colours = image.convert("RGB").resize((60, 150)).getcolors(maxcolors=100_000)
    assert colours is not None and len(colours) > 50  # not a blank or error page


#: Injected into a copy of the report: measures the page and writes the result into the DOM.
_LAYOUT_CHECK = """<script>
window.addEventListener("load", () => {
  const wrapped = [];
  for (const cell of document.querySelectorAll("table.summary td, table.models td")) {
    const target = cell.querySelector("summary") || cell;
    if (!/[0-9]/.test(target.textContent)) continue;
    const tops = new Set();  // the line tops of the cell's text (not of the colour swatch beside it)
    const walker = document.createTreeWalker(target, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const range = document.createRange();
      range.selectNodeContents(node);
      for (const r of range.getClientRects()) if (r.width > 0) tops.add(Math.round(r.bottom));
    }
    if (tops.size > 1) wrapped.push(target.textContent.trim());
  }
  const boxes = [...document.querySelectorAll(".scroll")];
  const scrolled = boxes.filter(d => d.scrollWidth > d.clientWidth).length;
  const result = {viewport: window.innerWidth, scrollWidth: document.documentElement.scrollWidth, scrolled,
                  cells: document.querySelectorAll("table.summary td").length, wrapped: wrapped};
  document.body.setAttribute("data-layout", JSON.stringify(result));
});
</script>"""


def _layout(index, tmp_path, extra_css: str = "") -> dict:
    """Load a copy of the report at 1400 px in headless Chromium; the measurements of _LAYOUT_CHECK."""
    import html as html_lib
    import json
    import re

    page = index.read_text(encoding="utf-8").replace("</style>", extra_css + "</style>", 1)
    copy = tmp_path / f"layout{len(extra_css)}.html"
    copy.write_text(page.replace("</body>", _LAYOUT_CHECK + "</body>"), encoding="utf-8")
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--dump-dom",
        copy.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-layout="([^"]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    return json.loads(html_lib.unescape(found.group(1)))


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_fits_1400_px_and_never_wraps_a_number(written, tmp_path):
    index, _, _ = written
    layout = _layout(index, tmp_path)
    assert layout["viewport"] == 1400 and layout["cells"] > 20
    assert layout["scrollWidth"] <= layout["viewport"], layout
    assert layout["scrolled"] == 0, layout  # no table wider than the page, scrolling in its box
    assert layout["wrapped"] == []
    # the check sees wrapping: squeezed into 500 px with wrapping allowed, numbers break
    squeezed = _layout(index, tmp_path, "td.num { white-space: normal; } main { max-width: 500px; }")
    assert squeezed["wrapped"], squeezed
    shot = tmp_path / "page.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1400,1400",
        index.resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 1400)
        colours = image.convert("RGB").resize((70, 70)).getcolors(maxcolors=100_000)
    assert colours is not None and len(colours) > 50  # the story, the summary and a figure, not a blank page


# ----------------------------------------------------------------------------- the story, the tables


def _section(html: str, name: str) -> str:
    """The HTML of the <section> with id ``name``, without its closing tag."""
    start = html.rindex("<section", 0, html.index(f'id="{name}"'))
    return html[start : html.index("</section>", start)]


def test_the_story_comes_first_and_links_its_figures(run, written):
    _, html, _ = written
    assert html.index("What this run shows") < html.index('id="summary"') < html.index('id="fig-')
    story = _section(html, "story")
    items = story.count("<li>")
    assert items >= 3
    page = parse(html)
    ids = {attrs.get("id") for _, attrs in page.tags}
    links = [a["href"] for a in parse(story + "</section>").all("a") if a["href"] != "#glossary"]
    assert links and all(link[1:] in ids for link in links)  # every link lands on a drawn figure
    # the run's depths 3 and 8 have plain and residual nets: the compare sentences, with their numbers
    table = summary_table(run.frame(), run.scalars())
    deep = table.loc[table["model"] == "plain-mlp-8", "cum_gain_init"].iloc[0]
    assert f"{deep:.3g}" in story or _format_number(deep) in story


def _format_number(value: float) -> str:
    from gradprobe import _format

    return _format.number(value)


def test_run_metadata_is_a_readable_table_at_the_end(written):
    _, html, _ = written
    assert html.index('id="glossary"') < html.index('<section id="run"')
    run_section = _section(html, "run")
    text = " ".join(parse(run_section + "</section>").text)
    for literal in ("null", "false", "true", "None", "not recorded", "{", "model_info", "gradprobe_version"):
        assert literal not in text, literal
    for label in ("command line", "seed", "gradprobe version", "table format version"):
        assert label in text
    assert f'<meta name="gradprobe-format-version" content="{records.FORMAT_VERSION}">' in html


def test_summary_table_folds_block_lists_in_forward_order(run, tmp_path):
    frame = run.frame()
    model = run.models[0]
    mine = frame["model"] == model
    frame.loc[mine, "gain"] = 1.0
    # two blocks leave the band, the later one first in time: the list is still in forward order
    last, first = "blocks.2", "stem"
    frame.loc[mine & (frame["block"] == last) & (frame["step"] == 1), "gain"] = 9.0
    frame.loc[mine & (frame["block"] == first) & (frame["step"] == 5), "gain"] = 9.0
    index = report(records.Run(frame, run.scalars(), run.meta), tmp_path, progress=False, figures=["gain"])
    html = index.read_text()
    row = html[html.index(f"{model}</td>") :]
    row = row[: row.index("</tr>")]
    assert f"<summary>2 of {frame.loc[mine, 'block'].nunique()}</summary><span>{first}, {last}</span>" in row
    assert 'class="num"' in row and "white-space: nowrap" in html


def test_a_single_model_report_is_named_after_its_model_and_omits_what_was_not_recorded(tmp_path):
    import gradprobe

    class TinyNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(3)])

        def forward(self, x):
            return self.blocks(x)

    net = TinyNet()
    with gradprobe.attach(net) as probe:
        for _ in range(2):
            net(torch.randn(4, 5)).pow(2).mean().backward()
            probe.log(loss=1.0)
    html = report(probe, tmp_path / "a", progress=False, figures=["highway"]).read_text()
    text = " ".join(parse(html).text)
    assert "gradprobe report: TinyNet" in text and "TinyNet" in _section(html, "summary")
    run_text = " ".join(parse(_section(html, "run") + "</section>").text)
    assert "not recorded" not in run_text and "seed" not in run_text and ">run<" not in html
    named = report(probe, tmp_path / "b", progress=False, figures=["highway"], name="my net").read_text()
    assert "gradprobe report: my net" in named and "TinyNet" in named  # the class stays in the models table
    saved = records.load(tmp_path / "a")
    assert "model" not in saved.frame().columns  # the name is the report's: the saved tables are the probe's


def test_figure_remarks_describe_this_runs_pattern(run, tmp_path):
    frame = run.frame()
    for cum, word, other in ((1e-4, "vanishes", "explodes"), (1e4, "explodes", "vanishes")):
        f = frame.copy()
        f.loc[f["index"] == 0, "cum_gain"] = cum
        index = report(
            records.Run(f, run.scalars(), run.meta), tmp_path / word, progress=False, figures=["gain"]
        )
        caption = _section(index.read_text(), "fig-gain")
        remark = caption[caption.index('class="remark"') :]
        assert word in remark and other not in remark
