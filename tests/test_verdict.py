"""gradprobe.verdict: each sentence appears when the numbers support it, and only then."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from gradprobe import verdict
from gradprobe.summary import summary
from gradprobe.verdict import findings, gradient_word

nan, inf = math.nan, math.inf


def compare_table(**changes: dict[str, float]) -> pd.DataFrame:
    """A summary table of plain-20, plain-56, resnet-20, resnet-56 where the textbook story holds;
    ``changes`` maps a model to the columns to change."""
    rows = {
        "plain-20": {"depth": 20, "residual": False, "train_loss": 0.01, "cum_gain_init": 14.0},
        "plain-56": {"depth": 56, "residual": False, "train_loss": 1.6, "cum_gain_init": 3000.0},
        "resnet-20": {"depth": 20, "residual": True, "train_loss": 0.01, "cum_gain_init": 1.3},
        "resnet-56": {"depth": 56, "residual": True, "train_loss": 0.006, "cum_gain_init": 1.2},
    }
    table = []
    for model, row in rows.items():
        row = dict(row, model=model, cum_gain_end=1.0, effective_length_init=nan, effective_length_end=nan)
        row["res_ratio_init"] = 0.0 if row["residual"] else 1.2
        row.update(changes.get(model, {}))
        table.append(row)
    return pd.DataFrame(table)


def texts(table: pd.DataFrame, frame: pd.DataFrame | None = None, **kw) -> list[str]:
    frame = frame if frame is not None else pd.DataFrame({"step": [0], "block": ["a"], "index": [0]})
    return [f.text for f in findings(table, frame, **kw)]


def joined(*args, **kw) -> str:
    return "\n".join(texts(*args, **kw))


def test_gradient_word_follows_the_named_thresholds():
    assert gradient_word(verdict.VANISH * 0.99) == "vanishes"
    assert gradient_word(verdict.VANISH) == "shrinks"
    assert gradient_word(verdict.EXPLODE * 1.01) == "explodes"
    assert gradient_word(verdict.EXPLODE) == "grows"
    assert gradient_word(1 / verdict.NEAR_ONE) == gradient_word(verdict.NEAR_ONE) == "stays near 1"
    assert gradient_word(inf) == gradient_word(nan) == ""


def test_the_textbook_compare_run_gets_every_sentence_with_its_figure():
    found = findings(compare_table(), pd.DataFrame({"step": [0], "block": ["a"], "index": [0]}))
    by_figure = {f.figure: f.text for f in found}
    assert "trains worse" in by_figure["training"] and "1.6" in by_figure["training"]
    assert "residual nets of the same depths do not" in by_figure["training"]
    plain, residual = [f.text for f in found if f.figure == "highway"]
    assert "explodes" in plain and "3e+03 in plain-56" in plain and "vanishes" not in plain
    assert "stays near 1" in residual and "gradient highway" in residual
    assert "start as the identity" in by_figure["identity"]
    assert "non-finite" not in " ".join(by_figure.values())


def test_no_degradation_sentence_when_the_deep_plain_net_trains_as_well():
    text = joined(compare_table(**{"plain-56": {"train_loss": 0.012}}))
    assert "trains worse" not in text and "No degradation" in text


def test_no_degradation_between_two_near_perfect_fits():
    # twice the loss, but 0.002 against 0.001 is no worse fit: the absolute margin decides
    text = joined(compare_table(**{"plain-20": {"train_loss": 0.001}, "plain-56": {"train_loss": 0.002}}))
    assert "trains worse" not in text


def test_residual_nets_that_degrade_too_are_said_to():
    text = joined(compare_table(**{"resnet-56": {"train_loss": 1.0}}))
    assert "residual nets degrade too" in text and "do not" not in text


def test_no_degradation_sentence_with_a_single_plain_depth():
    table = compare_table()
    table = table[table["depth"] == 56]
    assert "degradation" not in joined(table) and "trains worse" not in joined(table)


def test_vanishing_plain_nets_are_said_to_vanish_not_explode():
    text = joined(compare_table(**{"plain-20": {"cum_gain_init": 0.05}, "plain-56": {"cum_gain_init": 1e-4}}))
    assert "vanishes (cum_gain 0.05 in plain-20, 1.00e-04 in plain-56)" in text
    assert "explodes" not in text


def test_mixed_plain_nets_get_one_clause_per_word():
    text = joined(compare_table(**{"plain-20": {"cum_gain_init": 1.1}}))
    assert "stays near 1 (cum_gain 1.1 in plain-20); it explodes (cum_gain 3e+03 in plain-56)" in text


def test_no_highway_claim_when_a_residual_net_leaves_the_band():
    text = joined(compare_table(**{"resnet-56": {"cum_gain_init": 40.0}}))
    assert "gradient highway" not in text and "explodes (cum_gain 40 in resnet-56)" in text


def test_no_identity_claim_when_residual_blocks_start_away_from_it():
    text = joined(
        compare_table(**{"resnet-20": {"res_ratio_init": 0.3}, "resnet-56": {"res_ratio_init": 0.02}})
    )
    assert "start as the identity:" not in text
    assert "resnet-20 (largest res_ratio 0.3) and resnet-56 (largest res_ratio 0.02) do not start" in text
    half = joined(compare_table(**{"resnet-20": {"res_ratio_init": 0.3}}))
    assert "blocks of resnet-56 start as the identity" in half and "resnet-20 (largest res_ratio 0.3)" in half


def test_path_lengths_are_compared_with_half_the_branching_blocks():
    paths = pd.DataFrame(
        {"model": ["resnet-20", "resnet-56"], "step": 9, "stack": 0, "length": 1, "n_paths": [9.0, 27.0]}
    )
    short = compare_table(
        **{"resnet-20": {"effective_length_end": 2.0}, "resnet-56": {"effective_length_end": 5.0}}
    )
    text = joined(short, paths=paths)
    assert "Short paths" in text and "2 of resnet-20's 9 and 5 of resnet-56's 27" in text
    long = compare_table(
        **{"resnet-20": {"effective_length_end": 6.0}, "resnet-56": {"effective_length_end": 20}}
    )
    assert "Long paths" in joined(long, paths=paths) and "Short" not in joined(long, paths=paths)
    mixed = compare_table(
        **{"resnet-20": {"effective_length_end": 6.0}, "resnet-56": {"effective_length_end": 2}}
    )
    assert "Short" not in joined(mixed, paths=paths) and "Long" not in joined(mixed, paths=paths)
    assert "effective length" not in joined(short)  # no paths recorded: nothing said


# ----------------------------------------------------------------------------- a run of one model


def one_model_frame(first_gains, res_ratio, steps=(0, 5)) -> pd.DataFrame:
    """Blocks b0..bn at two steps; cum_gain at the first step is ``first_gains``, 1 at the last."""
    rows = []
    for step in steps:
        for i, gain in enumerate(first_gains):
            cum = gain if step == steps[0] else 1.0
            rows.append(
                {
                    "step": step,
                    "block": f"b{i}",
                    "index": i,
                    "grad_out": 1.0,
                    "grad_in": cum,
                    "gain": 1.0,
                    "cum_gain": cum,
                    "skip_grad": nan,  # a plain block has no skip: NaN is "not measured", not lost
                    "res_ratio": res_ratio[i],
                }
            )
    return pd.DataFrame(rows)


def test_a_single_model_says_where_the_gradient_vanishes():
    frame = one_model_frame([1e-3, 0.05, 0.5, 1.0], [0.0, 0.005, 0.4, 1.0])
    found = findings(summary(frame), frame)
    highway = [f.text for f in found if f.figure == "highway"]
    assert highway == [
        "The gradient reaching the first block vanishes at the first recorded step (cum_gain 0.001) and "
        "stays near 1 at the last (cum_gain 1). At the first recorded step it has vanished at 2 of 4 blocks "
        "(b0 and b1)."
    ]
    identity = [f.text for f in found if f.figure == "identity"]
    assert identity == [
        "At the last recorded step 2 of 4 measured blocks are the identity (res_ratio at most 0.01): "
        "b0 and b1."
    ]
    assert not [f for f in found if "non-finite" in f.text]


def test_a_single_model_with_an_exploding_gradient_and_no_identity_block():
    frame = one_model_frame([500.0, 20.0, 3.0, 1.0], [0.5, 0.6, 0.7, 0.8])
    text = joined(summary(frame), frame)
    assert "explodes at the first recorded step (cum_gain 500)" in text
    assert "it has exploded at 2 of 4 blocks (b0 and b1)" in text and "vanish" not in text
    assert "No block is the identity at the last recorded step: the smallest res_ratio is 0.5." in text


def test_a_healthy_single_model_gets_no_gradient_alarm():
    frame = one_model_frame([0.9, 1.0], [0.1, 0.2])
    text = joined(summary(frame), frame)
    assert "stays near 1 at the first and at the last recorded step" in text
    assert "vanish" not in text and "explode" not in text


def test_non_finite_values_are_reported_only_when_present():
    frame = one_model_frame([0.9, 1.0], [nan, 0.2])  # NaN res_ratio (a projection) is not "lost"
    assert "non-finite" not in joined(summary(frame), frame)
    broken = frame.copy()
    broken.loc[(broken["step"] == 5) & (broken["index"] == 1), "gain"] = inf
    broken.loc[(broken["step"] == 5) & (broken["index"] == 0), "grad_in"] = nan
    text = joined(summary(broken), broken)
    assert (
        "The block frame holds non-finite values: 1 infinite and 1 NaN in grad_in and gain, first at step 5."
        in text
    )
    scalars = pd.DataFrame(
        {"step": [0, 1], "loss": [1.0, nan], "acc": [nan, 0.5]}
    )  # NaN accuracy: not measured
    text = joined(summary(frame, scalars), frame, scalars=scalars)
    assert "The logged scalars hold non-finite values: 1 NaN in loss, first at step 1." in text


def test_several_models_that_are_not_a_compare_run_are_told_apart():
    a = one_model_frame([1e-3, 1.0], [0.5, 0.5]).assign(model="a")
    b = one_model_frame([1.0, 1.0], [0.0, 0.0]).assign(model="b")
    frame = pd.concat([a, b], ignore_index=True)
    text = joined(summary(frame), frame)
    assert "In a the gradient reaching the first block vanishes" in text
    assert "2 of 2 measured blocks of b are the identity" in text
    assert "plain nets" not in text and "degradation" not in text


def test_an_empty_run_has_nothing_to_say():
    assert findings(summary(pd.DataFrame({"step": [], "block": [], "index": []})), pd.DataFrame()) == []


@pytest.mark.parametrize("term", ["vanishes", "explodes", "near 1", "identity", "degradation"])
def test_the_glossary_states_each_threshold(term):
    value = {
        "vanishes": verdict.VANISH,
        "explodes": verdict.EXPLODE,
        "near 1": verdict.NEAR_ONE,
        "identity": verdict.IDENTITY,
        "degradation": verdict.DEGRADATION_RATIO,
    }[term]
    assert f"{value:g}" in verdict.GLOSSARY[term]


# ----------------------------------------------------------------------------- lesions
def _lesion_table(single_acc, down=None, base=0.9, random_acc=()):
    import pandas as pd

    n = len(single_acc)
    down = down or [False] * n
    rows = [{"kind": "none", "k": 0, "block": None, "downsampling": False, "removable": True, "acc": base}]
    rows += [
        {"kind": "single", "k": 1, "block": f"b{i}", "downsampling": d, "removable": True, "acc": a}
        for i, (a, d) in enumerate(zip(single_acc, down, strict=True))
    ]
    rows += [
        {"kind": "random", "k": k, "block": None, "downsampling": False, "removable": True, "acc": a}
        for k, a in enumerate(random_acc, start=1)
    ]
    return pd.DataFrame(rows)


def test_lesion_sentence_says_single_deletions_barely_matter_within_the_threshold():
    from gradprobe.verdict import LESION_HARMLESS, lesion_findings

    base = 0.9
    accs = [base - LESION_HARMLESS / 2, base, base - 2 * LESION_HARMLESS, base - 3 * LESION_HARMLESS]
    table = _lesion_table(accs, [False, False, False, True])
    (finding,) = lesion_findings(table)
    assert finding.figure == "lesion"
    assert "barely matters for 2 of its 3 shape-preserving blocks" in finding.text
    assert "at b3 (downsampling)" in finding.text
    assert "random" not in finding.text  # no random rows: no sentence about k


def test_lesion_sentence_says_collapse_below_the_threshold():
    from gradprobe.verdict import LESION_COLLAPSE, lesion_findings

    base = 0.8
    table = _lesion_table([LESION_COLLAPSE * base, 0.1, 0.79], random_acc=[0.3, 0.1])
    (finding,) = lesion_findings(table)
    assert "2 of 3 removable blocks collapse the net" in finding.text
    assert "barely" not in finding.text
    assert "0.3 at k = 1 and 0.1 at k = 2" in finding.text
    # just above the threshold: no collapse
    (finding,) = lesion_findings(_lesion_table([LESION_COLLAPSE * base + 0.01, 0.79, 0.79], base=base))
    assert "collapse" not in finding.text


def test_no_lesion_table_no_lesion_sentence():
    import pandas as pd

    from gradprobe.summary import summary
    from gradprobe.verdict import findings

    f = pd.DataFrame({"step": 0, "block": ["a", "b"], "index": [0, 1], "cum_gain": [1.0, 1.0],
                      "gain": [1.0, 1.0], "grad_in": [1.0, 1.0], "grad_out": [1.0, 1.0]})  # fmt: skip
    assert not [x for x in findings(summary(f), f) if x.figure == "lesion"]
    with_lesion = findings(summary(f), f, lesion=_lesion_table([0.9, 0.9]))
    assert [x.figure for x in with_lesion].count("lesion") == 1
