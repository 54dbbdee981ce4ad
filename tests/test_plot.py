"""Tests of gradprobe.plot on small synthetic frames in the schema of Probe.frame() / Run.frame().

The frames are built here with known values (a plain net whose blocks halve the
gradient, a residual net whose blocks barely change it), so the tests can check
what is drawn, not only that drawing does not crash.
"""

from __future__ import annotations

import math
from itertools import combinations

import matplotlib

matplotlib.use("Agg")  # tests never open windows

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import seaborn as sns
from matplotlib.colors import to_rgb

from gradprobe import plot
from gradprobe.records import FRAME_COLUMNS, JACOBIAN_COLUMNS

HOSTILE = "<script>alert(1)</script> $x$"


@pytest.fixture(autouse=True)
def _close_all():
    yield
    plt.close("all")


def make_frame(
    models=(("plain-6", 6, False), ("resnet-6", 6, True)),
    *,
    steps: int = 5,
    jacobian: bool = True,
    model_column: bool = True,
    projection: bool = True,
) -> pd.DataFrame:
    """Rows for every (model, step, block); block 0 is a projection (shape change) when ``projection``.

    Plain blocks have gain 0.5 (gradients vanish: cum_gain halves per block
    towards the input), residual blocks gain 1.1. Jacobian columns are
    recorded at step 0 and at the last step only.
    """
    rows = []
    for name, depth, residual in models:
        gain = 1.1 if residual else 0.5
        for step in range(steps):
            for i in range(depth):
                proj = projection and i == 0
                cum = gain ** (depth - i)
                jac_step = jacobian and step in (0, steps - 1)
                row = {
                    "step": step,
                    "block": f"layer{i // 3}.{i % 3}",
                    "index": i,
                    "calls": 1,
                    "stack": "0",
                    "grad_out": cum / gain,
                    "grad_in": cum,
                    "gain": gain * (1 + 0.01 * step),
                    "cum_gain": cum,
                    "skip_grad": math.nan if proj else cum / gain,
                    "branch_grad": math.nan if proj else (0.1 if residual else 1.0) * cum,
                    "branch_cos": math.nan if proj else 0.0,
                    "res_ratio": math.nan if proj else (0.01 * (step + 1) * (i + 1) if residual else 1.0),
                    "cos_xy": math.nan if proj else 0.9,
                    "in_rms": 1.0,
                    "out_rms": float(1 + i) if residual else 1.0 / (1 + i),
                    "param_norm": 3.0,
                    "param_grad_norm": 0.1,
                    "update_ratio": math.nan if step == 0 else 0.01,
                    "chan_mean_sq": 0.1 * (i + 1),
                    "chan_var": float(1 + i) if residual else 1.0,
                    "branch_var": math.nan if proj else 1.0,
                    "jac_fro": (1.0 + 0.1 * i) if jac_step else math.nan,
                    "jac_spec": (2.0 + 0.1 * i) if jac_step else math.nan,
                    "jac_id": (math.nan if proj else 0.1 * (step + 1)) if jac_step else math.nan,
                    "prod_fro": cum if jac_step else math.nan,
                    "prod_spec": 2 * cum if jac_step else math.nan,
                    "jac_batch": 32.0 if jac_step else math.nan,
                }
                if model_column:
                    row = {"model": name, "depth": depth, "residual": residual, **row}
                rows.append(row)
    frame = pd.DataFrame(rows)
    if not jacobian:
        frame = frame.drop(columns=list(JACOBIAN_COLUMNS))
    return frame


def make_scalars(models=(("plain-6", False), ("resnet-6", True)), steps: int = 200) -> pd.DataFrame:
    rows = []
    for name, residual in models:
        for step in range(steps):
            rows.append(
                {
                    "model": name,
                    "residual": residual,
                    "step": step,
                    "train_loss": 2.3 * math.exp(-step / (40 if residual else 400)),
                    "test_acc": (0.9 if residual else 0.4) if step % 50 == 49 else math.nan,
                }
            )
    return pd.DataFrame(rows)


def data_lines(ax):
    """Lines that show data (not reference lines, which are drawn at zorder 1 with a dotted style)."""
    return [line for line in ax.get_lines() if line.get_linestyle() != ":"]


def assert_no_overlaps(fig):
    """No two visible tick labels of an axis overlap, and no legend covers an axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            boxes = []
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                label = tick.label1
                inside = lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo)
                if label.get_visible() and label.get_text() and inside:
                    boxes.append((label.get_text(), label.get_window_extent(renderer)))
            for (ta, a), (tb, b) in combinations(boxes, 2):
                assert not a.overlaps(b), f"tick labels {ta!r} and {tb!r} overlap on {ax.get_title()!r}"
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if ax.get_visible() and ax.get_label() != "<colorbar>":
                assert not box.overlaps(ax.get_window_extent(renderer)), "a legend covers an axes"


# ----------------------------------------------------------------------------- palette


def test_model_palette_is_colourblind_ordered_and_distinct():
    pal = plot.model_palette(["b", "a", "b", "c"])
    assert list(pal) == ["b", "a", "c"]
    assert list(pal.values()) == [tuple(c) for c in sns.color_palette("colorblind", 3)]
    many = plot.model_palette([f"m{i}" for i in range(14)])
    assert len(set(many.values())) == 14


def test_same_palette_gives_same_colour_in_every_figure():
    frame, scalars = make_frame(), make_scalars()
    pal = plot.model_palette(["resnet-6", "plain-6"])  # order differs from the frame's on purpose
    ax1 = plot.plot_highway(frame, palette=pal)
    ax2 = plot.plot_loss(scalars, palette=pal, smooth=1)
    ax3 = plot.plot_responses(frame, palette=pal)
    for ax in (ax1, ax2, ax3):
        colours = {line.get_label(): to_rgb(line.get_color()) for line in data_lines(ax)}
        assert colours == {m: pal[m] for m in ("plain-6", "resnet-6")}


def test_partial_palette_gets_unused_colours_for_unknown_models():
    frame = make_frame()
    given = {"plain-6": (0.0, 0.0, 0.0)}
    ax = plot.plot_highway(frame, palette=given)
    colours = [to_rgb(line.get_color()) for line in data_lines(ax)]
    assert colours[0] == (0.0, 0.0, 0.0) and colours[1] != colours[0]


# ----------------------------------------------------------------------------- gradient highway


def test_highway_draws_cum_gain_of_the_chosen_step_on_a_log_axis():
    frame = make_frame()
    ax = plot.plot_highway(frame)
    assert ax.get_yscale() == "log"
    assert "block index" in ax.get_xlabel() and "cumulative gain" in ax.get_ylabel()
    lines = {line.get_label(): line for line in data_lines(ax)}
    assert set(lines) == {"plain-6", "resnet-6"}
    np.testing.assert_allclose(lines["plain-6"].get_ydata(), [0.5 ** (6 - i) for i in range(6)])
    assert any(line.get_linestyle() == ":" and line.get_ydata()[0] == 1 for line in ax.get_lines())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["plain-6", "resnet-6"]


def test_highway_step_choice_and_unknown_step():
    frame = make_frame(steps=3)
    frame.loc[frame["step"] == 2, "cum_gain"] = 7.0
    first = plot.plot_highway(frame, step="first")
    assert not np.allclose(data_lines(first)[0].get_ydata(), 7.0)
    last = plot.plot_highway(frame, step="last")
    np.testing.assert_allclose(data_lines(last)[0].get_ydata(), 7.0)
    with pytest.raises(ValueError, match=r"no recorded .* at step 99"):
        plot.plot_highway(frame, step=99)
    with pytest.raises(ValueError, match="'first', 'last' or an int"):
        plot.plot_highway(frame, step="middle")


def test_highway_inf_and_zero_are_counted_not_drawn():
    frame = make_frame()
    last = frame["step"] == frame["step"].max()
    frame.loc[last & (frame["index"] == 0), "cum_gain"] = [math.inf, 0.0]
    ax = plot.plot_highway(frame)
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["not drawn (log axis): 1 infinite, 1 zero or negative"]
    assert np.isnan(data_lines(ax)[0].get_ydata()[0])


def test_highway_without_model_column_has_one_line_and_no_legend():
    frame = make_frame(models=(("x", 4, True),), model_column=False)
    assert list(frame.columns) == list(FRAME_COLUMNS)
    ax = plot.plot_highway(frame)
    assert len(data_lines(ax)) == 1 and ax.get_legend() is None


def test_highway_figure_two_panels_share_y_and_legend_lists_models():
    fig = plot.highway_figure(make_frame())
    assert len(fig.axes) == 2
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])
    assert "initialisation" in fig.axes[0].get_title() and "after training" in fig.axes[1].get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["plain-6", "resnet-6"]
    assert_no_overlaps(fig)


def test_missing_column_and_wrong_type_give_clear_errors():
    with pytest.raises(ValueError, match=r"needs column\(s\) \['cum_gain'\]"):
        plot.plot_highway(make_frame().drop(columns="cum_gain"))
    with pytest.raises(TypeError, match="takes a pandas DataFrame"):
        plot.plot_highway({"cum_gain": [1.0]})


# ----------------------------------------------------------------------------- gain heatmap


def test_gain_heatmap_is_log_centred_on_one_with_blocks_in_forward_order():
    frame = make_frame(models=(("plain-6", 6, False),), steps=4)
    frame.loc[(frame["step"] == 1) & (frame["index"] == 2), "gain"] = math.nan
    frame.loc[(frame["step"] == 2) & (frame["index"] == 3), "gain"] = math.inf
    ax = plot.plot_gain_heatmap(frame)
    mesh = ax.collections[0]
    norm = mesh.norm
    assert norm(1.0) == pytest.approx(0.5)  # 1 sits at the centre of the colour map
    assert norm.vmin == pytest.approx(1 / norm.vmax)
    values = mesh.get_array()  # rows = blocks (index), columns = steps
    assert values.shape == (6, 4)
    assert values.mask[2, 1]  # NaN stays NaN (drawn grey)
    assert values[3, 2] == pytest.approx(norm.vmax)  # inf saturates
    assert [t.get_text() for t in ax.get_yticklabels()] == frame["block"].unique().tolist()
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # input at the top
    bar = ax.figure.axes[-1]
    assert bar.get_ylabel().startswith("gain (log scale")
    ticks = [float(t.get_text()) for t in bar.get_yticklabels()]
    assert 1.0 in ticks and len(ticks) % 2 == 1
    np.testing.assert_allclose(np.log10(ticks), -np.log10(ticks)[::-1], atol=0.02)  # symmetric around 1


def test_gain_heatmap_needs_a_model_when_there_are_several():
    with pytest.raises(ValueError, match="gain_heatmaps"):
        plot.plot_gain_heatmap(make_frame())
    ax = plot.plot_gain_heatmap(make_frame(), model="resnet-6")
    assert ax.collections[0].get_array().shape == (6, 5)


def test_gain_heatmaps_one_panel_per_model_plain_left_of_residual():
    models = (("resnet-3", 3, True), ("plain-3", 3, False), ("resnet-9", 9, True), ("plain-9", 9, False))
    fig = plot.gain_heatmaps(make_frame(models=models))
    panels = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["plain-3", "resnet-3", "plain-9", "resnet-9"]
    pal = plot.model_palette(make_frame(models=models))  # plain in oranges, residual in blues
    assert [to_rgb(ax.title.get_color()) for ax in panels] == [pal[ax.get_title()] for ax in panels]
    norms = {(ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) for ax in panels}
    assert len(norms) == 1  # one colour scale shared by every panel
    assert_no_overlaps(fig)


def test_gain_heatmaps_hides_the_spare_panel_and_thins_long_block_labels():
    models = (("a", 40, True), ("b", 40, False), ("c", 40, True))
    fig = plot.gain_heatmaps(make_frame(models=models, steps=30, jacobian=False), palette=None)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(visible) == 3
    assert len(visible[0].get_yticklabels()) <= 24
    assert_no_overlaps(fig)


# ----------------------------------------------------------------------------- distance from identity


def test_over_steps_one_line_per_block_log_when_spanning_decades():
    frame = make_frame(models=(("resnet-6", 6, True),))
    ax = plot.plot_over_steps(frame, y="res_ratio")
    lines = data_lines(ax)
    assert len(lines) == 6
    assert len(lines[0].get_xdata()) == 0  # the projection block has no res_ratio
    np.testing.assert_allclose(lines[1].get_ydata(), [0.02 * (s + 1) for s in range(5)])
    assert ax.get_yscale() == "linear"  # 0.02 .. 0.3: barely more than a decade
    colours = [line.get_color() for line in lines[1:]]
    assert len({tuple(c) for c in colours}) == 5  # colour encodes depth
    frame.loc[frame["index"] == 5, "res_ratio"] *= 10  # now 0.02 .. 3: two decades
    assert plot.plot_over_steps(frame, y="res_ratio").get_yscale() == "log"


def test_over_steps_keeps_exact_zeros_visible_on_a_symlog_axis():
    frame = make_frame(models=(("resnet-6", 6, True),))
    frame.loc[frame["step"] == 0, "res_ratio"] = 0.0  # identity initialisation
    frame.loc[frame["index"] == 5, "res_ratio"] *= 100
    ax = plot.plot_over_steps(frame, y="res_ratio")
    assert ax.get_yscale() == "symlog" and ax.get_ylim()[0] == 0
    assert data_lines(ax)[1].get_ydata()[0] == 0.0  # drawn, not dropped
    assert not ax.texts  # nothing left out
    assert "0 shown" in ax.get_ylabel()
    fig = plot.identity_figure(frame.assign(model="m"))
    assert fig.axes[0].get_yscale() == "symlog"


def test_over_steps_sparse_jacobian_draws_only_recorded_steps():
    frame = make_frame(models=(("resnet-6", 6, True),), steps=6)
    ax = plot.plot_over_steps(frame, y="jac_id", log=False)
    assert ax.get_yscale() == "linear"
    assert list(data_lines(ax)[1].get_xdata()) == [0, 5]


def test_identity_figure_rows_per_metric_and_columns_per_model():
    with_jac = plot.identity_figure(make_frame())
    panels = [ax for ax in with_jac.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4  # res_ratio and jac_id rows x two models
    assert [ax.get_title() for ax in panels[:2]] == ["plain-6", "resnet-6"]
    assert_no_overlaps(with_jac)
    without = plot.identity_figure(make_frame(jacobian=False))
    assert len([ax for ax in without.axes if ax.get_label() != "<colorbar>"]) == 2
    with pytest.raises(ValueError, match="none of"):
        plot.identity_figure(make_frame(jacobian=False).drop(columns="res_ratio"))


# ----------------------------------------------------------------------------- skip versus branch


def test_skip_branch_two_lines_per_model_with_gap_at_projection():
    frame = make_frame()
    ax = plot.plot_skip_branch(frame)
    lines = data_lines(ax)
    assert len(lines) == 4
    skip = next(line for line in lines if line.get_label() == "resnet-6 skip")
    branch = next(line for line in lines if line.get_label() == "resnet-6 branch")
    assert np.isnan(skip.get_ydata()[0]) and np.isnan(branch.get_ydata()[0])
    np.testing.assert_allclose(np.asarray(branch.get_ydata()[1:]) / np.asarray(skip.get_ydata()[1:]), 0.11)
    assert skip.get_linestyle() == "-" and branch.get_linestyle() == "--"
    assert to_rgb(skip.get_color()) == to_rgb(branch.get_color())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["plain-6", "resnet-6", "skip |g_y|", "branch |g_x - g_y|"]


def test_block_axes_show_every_block_even_when_only_one_has_a_value():
    frame = make_frame(models=(("r", 4, True),))
    frame.loc[frame["index"] != 2, ["skip_grad", "branch_grad"]] = math.nan
    ax = plot.plot_skip_branch(frame)
    assert ax.get_xlim() == (-0.5, 3.5)


def test_skip_branch_figure_panels_share_scale():
    fig = plot.skip_branch_figure(make_frame())
    assert [ax.get_title() for ax in fig.axes] == ["plain-6", "resnet-6"]
    assert {ax.get_yscale() for ax in fig.axes} == {"log"}
    assert_no_overlaps(fig)


# ----------------------------------------------------------------------------- training curves


def test_loss_is_log_scaled_smoothed_and_coloured_per_model():
    scalars = make_scalars()
    pal = plot.model_palette(["plain-6", "resnet-6"])
    ax = plot.plot_loss(scalars, palette=pal)
    assert ax.get_yscale() == "log" and "train loss" in ax.get_ylabel()
    labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["plain-6", "resnet-6"]
    assert len(ax.get_lines()) == 4  # a faint raw line under each smoothed one
    raw = [line for line in ax.get_lines() if line.get_alpha() == 0.25]
    assert [to_rgb(line.get_color()) for line in raw] == [pal["plain-6"], pal["resnet-6"]]


def test_loss_falls_back_to_probe_column_and_linear_for_nonpositive_values():
    single = pd.DataFrame({"step": [0, 1, 2], "loss": [1.0, -0.5, 0.2]})
    ax = plot.plot_loss(single, smooth=1)
    assert ax.get_yscale() == "linear" and ax.get_legend() is None
    with pytest.raises(ValueError, match="no loss column"):
        plot.plot_loss(pd.DataFrame({"step": [0], "lr": [0.1]}))


def test_accuracy_skips_unmeasured_steps_and_shows_percent():
    ax = plot.plot_accuracy(make_scalars())
    lines = data_lines(ax)
    assert [len(line.get_xdata()) for line in lines] == [4, 4]
    assert ax.yaxis.get_major_formatter()(0.5, 0).startswith("50")
    assert "test accuracy" in ax.get_ylabel()


def test_training_figure_panels_follow_available_columns():
    both = plot.training_figure(make_scalars())
    assert len(both.axes) == 2
    assert_no_overlaps(both)
    only_loss = plot.training_figure(make_scalars().drop(columns="test_acc"))
    assert len(only_loss.axes) == 1
    with pytest.raises(ValueError, match="no loss"):
        plot.training_figure(pd.DataFrame({"step": [0], "lr": [0.1]}))


# ----------------------------------------------------------------------------- layer responses


def test_responses_forward_and_sorted():
    frame = make_frame()
    forward = plot.plot_responses(frame)
    lines = {line.get_label(): line for line in data_lines(forward)}
    np.testing.assert_allclose(lines["resnet-6"].get_ydata(), [1, 2, 3, 4, 5, 6])
    ranked = plot.plot_responses(frame, order="sorted")
    lines = {line.get_label(): line for line in data_lines(ranked)}
    np.testing.assert_allclose(lines["resnet-6"].get_ydata(), [6, 5, 4, 3, 2, 1])
    np.testing.assert_allclose(lines["resnet-6"].get_xdata(), range(6))
    assert "rank" in ranked.get_xlabel()
    with pytest.raises(ValueError, match="'forward' or 'sorted'"):
        plot.plot_responses(frame, order="reverse")


def test_responses_on_a_linear_axis_start_at_zero():
    frame = make_frame(models=(("flat", 5, False),))
    frame["out_rms"] = 0.7 + 0.001 * frame["index"]  # nearly equal: must not look very different
    ax = plot.plot_responses(frame)
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0


def test_responses_figure_and_log_axis_when_spanning_decades():
    frame = make_frame(models=(("deep", 60, True),), jacobian=False)
    fig = plot.responses_figure(frame)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]  # 1 .. 60
    assert_no_overlaps(fig)


# ----------------------------------------------------------------------------- Jacobians


def test_jacobian_uses_the_last_step_where_it_was_computed():
    frame = make_frame(steps=5)
    frame.loc[frame["step"] == 0, "jac_fro"] = 9.0
    ax = plot.plot_jacobian(frame, step="first")
    np.testing.assert_allclose(data_lines(ax)[0].get_ydata(), 9.0)
    last = plot.plot_jacobian(frame)
    np.testing.assert_allclose(data_lines(last)[0].get_ydata(), [1 + 0.1 * i for i in range(6)])
    assert len(data_lines(last)) == 4 and "block Jacobian" in last.get_ylabel()
    product = plot.plot_jacobian(frame, columns=("prod_fro", "prod_spec"))
    assert "product" in product.get_ylabel() and product.get_yscale() == "log"


def test_jacobian_all_nan_is_a_clear_error():
    frame = make_frame()
    frame[list(JACOBIAN_COLUMNS)] = math.nan
    with pytest.raises(ValueError, match="jacobian=True"):
        plot.plot_jacobian(frame)
    with pytest.raises(ValueError, match="no Jacobian values"):
        plot.jacobian_figure(frame)
    assert not plot.has_jacobian(frame) and plot.has_jacobian(make_frame())


def test_spectrum_histogram_counts_every_finite_value():
    values = np.array([0.01, 0.1, 0.5, 1.0, 1.0, 2.0, 10.0, math.nan, math.inf])
    ax = plot.plot_spectrum(values)
    counts = sum(patch.get_height() for patch in ax.patches)
    assert counts == 7
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.texts] == ["not drawn: 1 infinite"]  # NaN is not counted
    assert any(line.get_xdata()[0] == 1 for line in ax.get_lines())  # the isometry marker


def test_spectrum_overlays_named_arrays_and_rejects_empty():
    ax = plot.plot_spectrum({"a": [0.9, 1.0, 1.1], "b": [0.8, 1.2]}, log=False)
    assert ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="empty"):
        plot.plot_spectrum(np.array([]))


def test_jacobian_figure_with_and_without_spectrum():
    frame = make_frame()
    fig = plot.jacobian_figure(frame)
    assert len(fig.axes) == 2
    assert_no_overlaps(fig)
    rng = np.random.default_rng(0)
    fig = plot.jacobian_figure(frame, spectrum={"plain-6": rng.lognormal(size=50)})
    assert len(fig.axes) == 3
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["plain-6", "resnet-6"] and legend.count("plain-6") == 1
    only_spectrum = plot.jacobian_figure(make_frame(jacobian=False), spectrum=rng.lognormal(size=50))
    assert len(only_spectrum.axes) == 1


# ----------------------------------------------------------------------------- every figure, every frame


FIGURE_LEVEL = [
    plot.highway_figure,
    plot.gain_heatmaps,
    plot.identity_figure,
    plot.skip_branch_figure,
    plot.responses_figure,
]


@pytest.mark.parametrize("draw", FIGURE_LEVEL, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "kind", ["one model", "several models", "no model column", "no jacobian", "no projection"]
)
def test_figure_functions_on_every_kind_of_frame(draw, kind):
    frame = {
        "one model": lambda: make_frame(models=(("only", 5, True),)),
        "several models": lambda: make_frame(
            models=(("p20", 9, False), ("r20", 9, True), ("p56", 27, False), ("r56", 27, True))
        ),
        "no model column": lambda: make_frame(models=(("x", 5, False),), model_column=False),
        "no jacobian": lambda: make_frame(jacobian=False),
        "no projection": lambda: make_frame(projection=False),
    }[kind]()
    fig = draw(frame)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert panels and all(ax.get_lines() or ax.collections for ax in panels)  # every panel shows data
    assert any(ax.get_xlabel() for ax in panels) and any(ax.get_ylabel() for ax in panels)
    assert_no_overlaps(fig)


def test_hostile_and_dollar_model_names_are_drawn_literally():
    frame = make_frame(models=((HOSTILE, 4, True), ("a$b", 4, False)))
    fig = plot.highway_figure(frame)
    fig.canvas.draw()  # mathtext would fail or swallow "$x$" here if names were not escaped
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [HOSTILE.replace("$", r"\$"), r"a\$b"]


def test_offscreen_figures_bypass_pyplot():
    before = plt.get_fignums()
    with plot.offscreen():
        fig = plot.highway_figure(make_frame())
    assert plt.get_fignums() == before
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"
    outside = plot.highway_figure(make_frame())
    assert outside.number in plt.get_fignums()


def test_axes_level_functions_draw_into_a_given_axes():
    _, axes = plt.subplots(1, 3)
    assert plot.plot_highway(make_frame(), ax=axes[0]) is axes[0]
    assert plot.plot_responses(make_frame(), ax=axes[1]) is axes[1]
    assert plot.plot_spectrum([1.0, 2.0], ax=axes[2]) is axes[2]
    assert len(plt.get_fignums()) == 1


# ----------------------------------------------------------------------------- families, relative depth


def test_plain_nets_are_oranges_and_residual_nets_blues_deeper_darker():
    models = (("plain-3", 3, False), ("resnet-9", 9, True), ("plain-9", 9, False), ("resnet-3", 3, True))
    frame = make_frame(models=models, steps=1, jacobian=False)
    pal = plot.model_palette(frame)
    for name, colour in pal.items():
        r, _, b = colour
        assert (r > b) if name.startswith("plain") else (b > r), (name, colour)
    assert sum(pal["plain-9"]) < sum(pal["plain-3"]) and sum(pal["resnet-9"]) < sum(pal["resnet-3"])
    assert len(set(pal.values())) == 4
    # the same mapping by default in every figure: lines of the highway, panels of the heatmaps
    ax = plot.plot_highway(frame)
    assert {tuple(to_rgb(line.get_color())) for line in ax.get_lines()[:4]} <= set(pal.values())
    titles = [a for a in plot.gain_heatmaps(frame).axes if a.get_title()]
    assert all(to_rgb(a.title.get_color()) == pal[a.get_title()] for a in titles)


def test_models_of_different_depths_share_a_relative_depth_axis():
    frame = make_frame(models=(("plain-3", 3, False), ("plain-9", 9, False)), steps=1, jacobian=False)
    ax = plot.plot_highway(frame)
    assert ax.get_xlabel().startswith("relative depth")
    for line in ax.get_lines()[:2]:  # each model spans the whole axis, 0 (first block) to 1 (last)
        x = np.asarray(line.get_xdata(), dtype=float)
        assert x.min() == 0.0 and x.max() == 1.0
    same = make_frame(models=(("plain-6", 6, False), ("resnet-6", 6, True)), steps=1, jacobian=False)
    assert plot.plot_highway(same).get_xlabel() == plot.LABELS["index"]  # same blocks: block index
    sig = frame.assign(chan_mean_sq=0.1, chan_var=1.0, branch_var=0.5)
    assert all(
        a.get_xlabel().startswith("relative depth") for a in plot.plot_signal_propagation(sig).figure.axes
    )


def test_path_lengths_figure_has_a_panel_per_model_and_a_short_legend():
    rows = []
    for model, depth in (("plain-4", 4), ("resnet-4", 4), ("plain-8", 8), ("resnet-8", 8)):
        for step in (0, 9):
            for k in range(depth + 1):
                rows.append(
                    {
                        "model": model,
                        "depth": depth,
                        "residual": model.startswith("resnet"),
                        "step": step,
                        "stack": "0",
                        "length": k,
                        "share": math.comb(depth, k) / 2**depth,
                        "n_paths": float(math.comb(depth, k)),
                    }
                )
    fig = plot.path_lengths_figure(pd.DataFrame(rows))
    panels = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in panels] == ["plain-4", "resnet-4", "plain-8", "resnet-8"]
    for a in panels:  # first and last step, and one reference of the model's own L
        assert [line.get_linestyle() for line in a.get_lines()] == ["--", "-", ":"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["first decomposed step", "last decomposed step", "path count C(L, k) / 2^L"]
