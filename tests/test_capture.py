"""The capture rule (gradprobe.capture): which tensors are a block's input and output.

Every probe row here is compared with a float64 reference computed directly with
torch.autograd on a chain whose block inputs/outputs are held explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.capture import describe, find_output, locate_input, rules, swap_input
from gradprobe.jacobian import capture_blocks

F64 = torch.float64
COLUMNS = (
    *("grad_out", "grad_in", "gain", "cum_gain", "res_ratio"),
    *("cos_xy", "in_rms", "out_rms", "branch_cos"),
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _re_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.vdot(a.detach().reshape(-1), b.detach().reshape(-1)).real)


def _norm(a: torch.Tensor) -> float:
    return math.sqrt(_re_dot(a, a))


def chain_reference(fns, x: torch.Tensor, loss_fn) -> list[dict[str, float]]:
    """Metrics of the chain y_i = fns[i](x_i), x_{i+1} = y_i, loss = loss_fn(y_last), by autograd.

    Complex tensors are vectors of R^2n: norms sqrt(sum |z|^2), cosines Re<a, b> / (|a||b|).
    """
    xs, ys = [], []
    h = x.detach().clone().requires_grad_(True)
    for fn in fns:
        xs.append(h)
        y = fn(h)
        ys.append(y)
        h = y
    loss = loss_fn(h)
    g_ys = torch.autograd.grad(loss, ys, retain_graph=True)
    rows = []
    for xi, yi, g_y in zip(xs, ys, g_ys, strict=True):
        (g_x,) = torch.autograd.grad(yi, xi, g_y, retain_graph=True)
        r = {"grad_out": _norm(g_y), "grad_in": _norm(g_x)}
        r["gain"] = r["grad_in"] / r["grad_out"]
        r["in_rms"] = _norm(xi) / math.sqrt(xi.numel())
        r["out_rms"] = _norm(yi) / math.sqrt(yi.numel())
        if xi.shape == yi.shape:
            r["res_ratio"] = _norm(yi - xi) / _norm(xi)
            r["cos_xy"] = _re_dot(xi, yi) / (_norm(xi) * _norm(yi))
            b = g_x - g_y
            r["branch_cos"] = _re_dot(b, g_y) / (_norm(b) * _norm(g_y))
        else:
            r["res_ratio"] = r["cos_xy"] = r["branch_cos"] = math.nan
        rows.append(r)
    for r in rows:
        r["cum_gain"] = r["grad_in"] / rows[-1]["grad_out"]
    return rows


def assert_rows_match(frame, reference, columns=COLUMNS, rel=1e-9):
    assert len(frame) == len(reference), frame
    for (_, row), ref in zip(frame.sort_values("index").iterrows(), reference, strict=True):
        for c in columns:
            if math.isnan(ref[c]):
                assert math.isnan(row[c]), (row["block"], c, row[c])
            else:
                assert row[c] == pytest.approx(ref[c], rel=rel, abs=1e-12), (row["block"], c)


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (y.abs() ** 2).sum() if y.is_complex() else (y.sin() * y).sum()


# ---------------------------------------------------------------------- nets
class MaskFirst(nn.Module):
    """``block(mask, hidden)``: an integer/bool tensor before the hidden state."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, mask, hidden):
        return hidden + torch.tanh(self.fc(hidden)) * mask.unsqueeze(-1)


class NoneFirst(nn.Module):
    """``block(None, hidden)`` and ``block(None, hidden_states=h)``."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, past=None, hidden=None, hidden_states=None):
        h = hidden if hidden is not None else hidden_states
        return h + torch.tanh(self.fc(h))


@dataclasses.dataclass
class BlockOut:
    ids: torch.Tensor
    hidden: torch.Tensor
    extra: list


class DataclassOut(nn.Module):
    """Returns a plain @dataclass whose first field is an integer tensor."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return BlockOut(torch.zeros(1, dtype=torch.long), x + torch.tanh(self.fc(x)), [1])


class Chain(nn.Module):
    """Calls its blocks in a row, each the way ``call`` says."""

    def __init__(self, blocks, call):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.call = call

    def forward(self, x):
        for b in self.blocks:
            x = self.call(b, x)
        return x


def _mask(x):
    return torch.tensor([1, 0, 1, 1, 1, 1][: x.shape[0]], dtype=torch.long).unsqueeze(-1).expand(x.shape[:-1])


CALLS = {
    "mask_first_long": (MaskFirst, lambda b, x: b(_mask(x), x)),
    "mask_first_bool": (MaskFirst, lambda b, x: b(_mask(x).bool(), x)),
    "none_first": (NoneFirst, lambda b, x: b(None, x)),
    "none_then_keyword": (NoneFirst, lambda b, x: b(None, hidden_states=x)),
    "dataclass_output": (DataclassOut, lambda b, x: b(x).hidden),
}


def _chain(kind: str, n: int = 3, seed: int = 0) -> Chain:
    cls, call = CALLS[kind]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Chain([cls() for _ in range(n)], call)
    return net.double()


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_blocks_called_with_masks_none_or_returning_dataclasses_match_the_reference(kind, no_leaks):
    net = no_leaks(_chain(kind))
    x = torch.randn(6, 3, 5, generator=_gen(1), dtype=F64)
    reference = chain_reference([lambda h, b=b: net.call(b, h) for b in net.blocks], x, _loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all, least of all one blaming the data
        with gradprobe.attach(net, blocks=["blocks.*"], jacobian=True, probes=2) as probe:
            _loss(net(x)).backward()
    frame = probe.frame()
    assert_rows_match(frame, reference)
    assert frame["jac_fro"].notna().all() and frame["prod_fro"].notna().all()


def test_dataclass_output_block_gives_rows_not_an_empty_frame():
    net = _chain("dataclass_output")
    with gradprobe.attach(net, blocks=["blocks.*"]) as probe:
        _loss(net(torch.randn(4, 5, dtype=F64))).backward()
    assert list(probe.frame()["block"]) == ["blocks.0", "blocks.1", "blocks.2"]


# ---------------------------------------------------------------------- overrides
class GateFirst(nn.Module):
    """``block(gate, hidden)`` with a *float* gate: the default rule takes the gate, input=1 fixes it."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, gate, hidden, scale=1.0):
        return hidden + gate * torch.tanh(self.fc(hidden)) * scale


class TwoOutputs(nn.Module):
    """Returns ``{"attn": ..., "hidden": ...}``: the default rule takes attn, output="hidden" fixes it."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return {"attn": torch.softmax(x, -1), "hidden": x + torch.tanh(self.fc(x))}


def _gate(x):
    return torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype).unsqueeze(-1)


@pytest.mark.parametrize(
    "given",
    [1, "hidden", lambda args, kwargs: args[1], {"blocks.0": 1, "blocks.1": "hidden", "blocks.2": 1}],
    ids=["position", "name_given_positionally", "callable", "per_block"],
)
def test_input_override_picks_the_hidden_state_not_the_float_gate(given):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Chain([GateFirst() for _ in range(3)], lambda b, x: b(_gate(x), x)).double()
    x = torch.randn(4, 5, generator=_gen(2), dtype=F64)
    reference = chain_reference([lambda h, b=b: b(_gate(h), h) for b in net.blocks], x, _loss)
    with gradprobe.attach(net, blocks=["blocks.*"], input=given, jacobian=True, probes=2) as probe:
        _loss(net(x)).backward()
    assert_rows_match(probe.frame(), reference)


def test_input_override_by_keyword_name():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Chain([GateFirst() for _ in range(2)], lambda b, x: b(gate=_gate(x), hidden=x)).double()
    x = torch.randn(4, 5, generator=_gen(2), dtype=F64)
    reference = chain_reference([lambda h, b=b: b(_gate(h), h) for b in net.blocks], x, _loss)
    with gradprobe.attach(net, blocks=["blocks.*"], input="hidden") as probe:
        _loss(net(x)).backward()
    assert_rows_match(probe.frame(), reference)


@pytest.mark.parametrize(
    "given", ["hidden", lambda out: out["hidden"], {"blocks.0": "hidden", "blocks.1": "hidden"}]
)
def test_output_override_picks_the_hidden_state(given):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Chain([TwoOutputs() for _ in range(2)], lambda b, x: b(x)["hidden"]).double()
    x = torch.randn(4, 5, generator=_gen(3), dtype=F64)
    reference = chain_reference([lambda h, b=b: b(h)["hidden"] for b in net.blocks], x, _loss)
    with gradprobe.attach(net, blocks=["blocks.*"], output=given, jacobian=True, probes=2) as probe:
        _loss(net(x)).backward()
    assert_rows_match(probe.frame(), reference)


def test_output_override_by_dataclass_field_position():
    net = _chain("dataclass_output")
    x = torch.randn(4, 5, generator=_gen(4), dtype=F64)
    reference = chain_reference([lambda h, b=b: b(h).hidden for b in net.blocks], x, _loss)
    with gradprobe.attach(net, blocks=["blocks.*"], output=1) as probe:
        _loss(net(x)).backward()
    assert_rows_match(probe.frame(), reference)


def test_overrides_reach_the_jacobian_passes_and_analyze():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Chain([GateFirst() for _ in range(2)], lambda b, x: b(_gate(x), x)).double()
    x = torch.randn(4, 5, generator=_gen(2), dtype=F64)
    _, caps = capture_blocks(net, x, blocks=["blocks.*"], input=1)
    assert [c.x.shape for c in caps] == [torch.Size([4, 5])] * 2
    frame = gradprobe.analyze(net, x, blocks=["blocks.*"], input=1, loss_fn=_loss, probes=2)
    reference = chain_reference([lambda h, b=b: b(_gate(h), h) for b in net.blocks], x, _loss)
    assert_rows_match(frame, reference)
    # the same Jacobian columns through the sub-batch pass of a training step (batch 4 > sub-batch 2)
    with gradprobe.attach(
        net, blocks=["blocks.*"], input=1, jacobian=True, probes=2, jacobian_options={"sub_batch": 2}
    ) as probe:
        _loss(net(x)).backward()
    f = probe.frame()
    assert (f["jac_batch"] == 2).all() and f["jac_fro"].notna().all()


def test_bad_overrides_fail_at_attach():
    net = _chain("none_first")
    with pytest.raises(TypeError, match="input= must be"):
        gradprobe.attach(net, blocks=["blocks.*"], input=1.5)
    with pytest.raises(ValueError, match="not probed"):
        gradprobe.attach(net, blocks=["blocks.*"], output={"nope": 0})


# ---------------------------------------------------------------------- nothing found
class IdsBlock(nn.Module):
    """Takes integer ids only: no floating-point input anywhere."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5)

    def forward(self, ids):
        return self.emb(ids)


class ListOut(nn.Module):
    """Returns its result inside an object the rule does not look into."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    class Box:
        def __init__(self, t):
            self.t = t

    def forward(self, x):
        return ListOut.Box(x + self.fc(x))


class IdsThenBox(nn.Module):
    def __init__(self):
        super().__init__()
        self.ids = IdsBlock()
        self.box = ListOut()
        self.last = nn.Linear(5, 5)

    def forward(self, ids):
        return self.last(self.box(self.ids(ids)).t)


def test_no_input_or_output_tensor_warns_once_per_block_naming_types_and_the_fix():
    net = IdsThenBox().double()
    ids = torch.randint(0, 10, (4, 3), generator=_gen(0))
    names = ["ids", "box", "last"]
    with pytest.warns(RuntimeWarning) as caught, gradprobe.attach(net, blocks=names) as probe:
        for _ in range(2):
            net(ids).sum().backward()
    messages = [str(w.message) for w in caught if "gradprobe" in str(w.message)]
    no_input = [m for m in messages if "'ids'" in m]
    no_output = [m for m in messages if "'box'" in m]
    assert len(no_input) == 1 and len(no_output) == 1, messages
    assert "Tensor[int64]" in no_input[0] and "input=" in no_input[0]
    assert "Box" in no_output[0] and "output=" in no_output[0]
    assert not any("Check the data" in m for m in messages)
    frame = probe.frame()
    assert sorted(set(frame["block"])) == ["box", "ids", "last"]  # rows, never silently none
    ids_rows = frame[frame["block"] == "ids"]
    assert ids_rows["grad_in"].isna().all() and ids_rows["grad_out"].notna().all()
    box_rows = frame[frame["block"] == "box"]
    assert box_rows["grad_out"].isna().all() and box_rows["grad_in"].notna().all()
    assert frame[frame["block"] == "last"]["gain"].notna().all()


# ---------------------------------------------------------------------- the rule itself
def test_rule_skips_none_masks_and_ids_and_falls_back_to_keywords():
    h = torch.ones(2, 3)
    ids = torch.ones(2, dtype=torch.long)
    assert locate_input((None, ids, ids.bool(), h), {})[1] == ("arg", 3)
    assert locate_input((None,), {"attention_mask": ids, "x": h})[1] == ("kw", "x")
    assert locate_input((ids,), {"input": h})[1] == ("kw", "input")
    assert locate_input((ids,), {}) is None
    z = torch.ones(2, dtype=torch.complex64)
    assert locate_input((ids, z), {})[0] is z
    assert swap_input((None, h), {}, lambda t: t * 0)[0][1].sum() == 0
    assert "NoneType" in describe((None,), {})


def test_output_rule_reads_tensors_tuples_dicts_model_outputs_and_dataclasses():
    from transformers.modeling_outputs import BaseModelOutput

    h = torch.ones(2)
    ids = torch.ones(2, dtype=torch.long)
    assert find_output(h) is h
    assert find_output((ids, None, h)) is h
    assert find_output({"ids": ids, "h": h}) is h
    assert find_output(BaseModelOutput(last_hidden_state=h)) is h
    assert find_output(BlockOut(ids, h, [])) is h
    assert find_output(([ids], (h,))) is h
    assert find_output(BlockOut(ids, h, []), "hidden") is h
    assert find_output((ids, h), 1) is h
    assert find_output((ids, h), 0) is None


def test_rules_accept_a_mapping_or_one_spec_for_every_block():
    got = rules(["a", "b"], input={"a": 2}, output="h")
    assert (got["a"].input, got["b"].input, got["a"].output, got["b"].output) == (2, None, "h", "h")
