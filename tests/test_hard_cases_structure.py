"""The probe's numbers on models whose structure is hard: blocks that are never called, blocks
with extra outputs, nested residuals, long skips and weight sharing, each against a
plain-autograd reference (float64 unless the case is about rounding).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.blocks import auto_blocks

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(d_in: int, d_out: int, gen: torch.Generator, scale: float = 1.0) -> nn.Linear:
    fc = nn.Linear(d_in, d_out).to(DT)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=DT) * scale / math.sqrt(d_in))
        fc.bias.copy_(0.1 * torch.randn(d_out, generator=gen, dtype=DT))
    return fc


def _warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


# ---------------------------------------------------------------------- never-called blocks
class _FF(nn.Module):
    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        self.a, self.b = _linear(d, d, gen), _linear(d, d, gen)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class XTransformersLike(nn.Module):
    """``layers`` is a ModuleList of ModuleLists [norm, f], run as ``x = x + f(norm(x))``."""

    def __init__(self, d: int = 8, depth: int = 3, seed: int = 0):
        super().__init__()
        gen = _gen(seed)
        self.layers = nn.ModuleList(
            [nn.ModuleList([nn.LayerNorm(d).to(DT), _FF(d, gen)]) for _ in range(depth)]
        )
        self.head = _linear(d, 2, gen)

    def forward(self, x):
        for norm, f in self.layers:
            x = x + f(norm(x))
        return self.head(x)


def test_auto_picks_called_modules_inside_lists_of_lists():
    net = XTransformersLike()
    assert [b.name for b in auto_blocks(net)] == ["layers.0.1", "layers.1.1", "layers.2.1"]


def test_auto_on_lists_of_lists_gives_the_branch_gradients():
    net, x = XTransformersLike(), torch.randn(6, 8, dtype=DT, generator=_gen(1))
    with pytest.warns(RuntimeWarning, match="branch f alone"):
        frame = gradprobe.analyze(net, x, jacobian=False, loss_fn=lambda out: out.pow(2).sum())
    assert len(frame) == 3 and frame["grad_in"].notna().all()
    # reference: g_x of f at each layer, by plain autograd
    xs: list[torch.Tensor] = []

    def alias(module, args):  # the gradient through f only: a view of f's input
        xs.append(args[0].view_as(args[0]))
        xs[-1].retain_grad()
        return (xs[-1],)

    hooks = [f.register_forward_pre_hook(alias) for _, f in net.layers]
    net(x).pow(2).sum().backward()
    for h in hooks:
        h.remove()
    for row, x_in in zip(frame.itertuples(), xs, strict=True):
        assert row.grad_in == pytest.approx(float(x_in.grad.norm()), rel=1e-9)


def test_never_called_blocks_are_named_in_one_warning_with_what_ran_inside():
    net, x = XTransformersLike(), torch.randn(4, 8, dtype=DT)
    probe = gradprobe.attach(net, blocks="layers.*")

    def train():
        for _ in range(2):
            net(x).sum().backward()
        probe.frame()

    messages = [m for m in _warnings(train) if "never called" in m]
    probe.detach()
    assert len(messages) == 1
    (message,) = messages
    assert "['layers.0', 'layers.1', 'layers.2']" in message
    assert "layers.0.0 (LayerNorm), layers.0.1 (_FF)" in message
    assert "blocks=['layers.0.1', 'layers.1.1', 'layers.2.1']" in message
    assert "ModuleList" in message


def test_paths_names_blocks_it_never_captured():
    net = XTransformersLike()
    messages = _warnings(lambda: gradprobe.paths(net, torch.randn(4, 8, dtype=DT), blocks="layers.*"))
    assert any("['layers.0', 'layers.1', 'layers.2'] were not called" in m for m in messages)


class FrozenTrunk(nn.Module):
    """Its blocks run under no_grad (a frozen feature extractor); only the head trains."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        with torch.no_grad():
            h = self.blocks(x)
        return self.head(h)


def test_a_recorded_step_without_rows_warns():
    net = FrozenTrunk()
    probe = gradprobe.attach(net, blocks="blocks.*")

    def train():
        for _ in range(3):
            net(torch.randn(2, 4)).sum().backward()
        probe.frame()

    messages = _warnings(train)
    frame = probe.frame()
    probe.detach()
    assert frame.empty
    assert sum("no probed block ran with gradients" in m for m in messages) == 1
    assert not any("never called" in m for m in messages)


def test_stand_ins_for_lists_say_they_are_the_branch_alone():
    net = XTransformersLike()
    probe = gradprobe.attach(net)
    messages = _warnings(lambda: (net(torch.randn(3, 8, dtype=DT)).sum().backward(), probe.frame()))
    probe.detach()
    assert not any("never called in the first" in m for m in messages)
    (message,) = [m for m in messages if "gradprobe" in m]
    assert "['layers.0.1', 'layers.1.1', 'layers.2.1'] stand for the ModuleLists" in message
    assert "branch f alone" in message


# ---------------------------------------------------------------------- blocks with extra outputs
class AuxBlock(nn.Module):
    """y = x + tanh(W x), returned with an auxiliary loss mean(tanh(W x)^2)."""

    def __init__(self, d: int, gen: torch.Generator, y_first: bool = True):
        super().__init__()
        self.fc, self.y_first = _linear(d, d, gen), y_first

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        y, aux = x + h, h.pow(2).mean()
        return (y, aux) if self.y_first else (aux, y)


class AuxNet(nn.Module):
    def __init__(self, d: int = 6, depth: int = 3, y_first: bool = True, aux_weight: float = 10.0):
        super().__init__()
        gen = _gen(2)
        self.blocks = nn.ModuleList([AuxBlock(d, gen, y_first) for _ in range(depth)])
        self.y_first, self.aux_weight = y_first, aux_weight

    def forward(self, x):
        total = x.new_zeros(())
        for block in self.blocks:
            out = block(x)
            x, aux = out if self.y_first else out[::-1]
            total = total + aux
        return x.pow(2).sum() + self.aux_weight * total


def _through_y(net: AuxNet, x: torch.Tensor) -> list[dict[str, float]]:
    """Per block: |g_y|, |(dy/dx)^T g_y| and |(dF/dx)^T g_y| by plain autograd (the loss's gradient
    at y, pushed back through y alone)."""
    xs, ys = [], []

    def pre(module, args):
        xs.append(args[0].view_as(args[0]))
        return (xs[-1],)

    def post(module, args, out):
        ys.append(out[0] if module.y_first else out[1])

    hooks = [b.register_forward_pre_hook(pre) for b in net.blocks]
    hooks += [b.register_forward_hook(post) for b in net.blocks]
    loss = net(x.detach().requires_grad_())
    for h in hooks:
        h.remove()
    g_ys = torch.autograd.grad(loss, ys, retain_graph=True)
    out = []
    for x_in, y, g_y in zip(xs, ys, g_ys, strict=True):
        (g_x,) = torch.autograd.grad(y, x_in, g_y, retain_graph=True)
        out.append(
            {
                "grad_out": float(g_y.norm()),
                "grad_in": float(g_x.norm()),
                "branch_grad": float((g_x - g_y).norm()),
            }
        )
    return out


def test_an_auxiliary_output_is_kept_out_of_grad_in():
    net, x = AuxNet(), torch.randn(5, 6, dtype=DT, generator=_gen(3), requires_grad=True)
    ref = _through_y(net, x)
    probe = gradprobe.attach(net)
    net(x).backward()
    frame = probe.frame()
    probe.detach()
    for row, r in zip(frame.itertuples(), ref, strict=True):
        assert row.grad_out == pytest.approx(r["grad_out"], rel=1e-10)
        assert row.grad_in == pytest.approx(r["grad_in"], rel=1e-10)
        assert row.gain == pytest.approx(r["grad_in"] / r["grad_out"], rel=1e-10)
        assert row.branch_grad == pytest.approx(r["branch_grad"], rel=1e-9)
    # the aux loss does reach x: the gradient through all of the block's outputs is larger
    total = torch.autograd.grad(net(x), x)[0]
    assert float(total.norm()) != pytest.approx(frame["grad_in"].iloc[0], rel=1e-3)


def test_an_output_without_gradient_changes_nothing():
    # aux_weight 0: the aux output takes part in the graph but carries zero gradient
    net, x = AuxNet(aux_weight=0.0), torch.randn(5, 6, dtype=DT, generator=_gen(4))
    ref = _through_y(net, x)
    frame = gradprobe.analyze(net, x, loss_fn=lambda out: out, jacobian=False)
    assert frame["grad_in"].tolist() == pytest.approx([r["grad_in"] for r in ref], rel=1e-10)


def test_an_output_rule_on_a_scalar_points_to_output():
    net, x = AuxNet(y_first=False), torch.randn(5, 6, dtype=DT, generator=_gen(5))
    messages = _warnings(lambda: gradprobe.analyze(net, x, loss_fn=lambda out: out, jacobian=False))
    named = [m for m in messages if "output=" in m and "blocks.0" in m]
    assert len(named) == 1 and "output={'blocks.0': 1}" in named[0]
    assert not any("shortcuts=" in m for m in messages)
    # with output= the columns are those of y
    frame = gradprobe.analyze(net, x, loss_fn=lambda out: out, jacobian=False, output=1)
    ref = _through_y(net, x)
    assert frame["grad_in"].tolist() == pytest.approx([r["grad_in"] for r in ref], rel=1e-10)


# ---------------------------------------------------------------------- nested residuals
def _alias_gradients(
    net: nn.Module, names: list[str], x: torch.Tensor, loss_fn
) -> dict[str, dict[str, float]]:
    """Per block (first call): |g_y| and |g_x| through the block only, by plain autograd on views of
    the blocks' inputs."""
    modules = dict(net.named_modules())
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}

    def pre(name, module, args):
        xs[name] = args[0].view_as(args[0])
        return (xs[name], *args[1:])

    def post(name, module, args, out):
        ys[name] = out

    hooks = []
    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(lambda m, a, n=n: pre(n, m, a)))
        hooks.append(modules[n].register_forward_hook(lambda m, a, o, n=n: post(n, m, a, o)))
    loss = loss_fn(net(x.detach().requires_grad_()))
    for h in hooks:
        h.remove()
    g_x = torch.autograd.grad(loss, [xs[n] for n in names], retain_graph=True)
    g_y = torch.autograd.grad(loss, [ys[n] for n in names])
    return {
        n: {"grad_in": float(gx.norm()), "grad_out": float(gy.norm())}
        for n, gx, gy in zip(names, g_x, g_y, strict=True)
    }


class InnerRes(nn.Module):
    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        self.fc = _linear(d, d, gen)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class OuterRes(nn.Module):
    """A residual block whose branch is two residual blocks."""

    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        self.inner = nn.Sequential(InnerRes(d, gen), InnerRes(d, gen))

    def forward(self, x):
        return x + self.inner(x)


def _nested(d: int = 6, depth: int = 3) -> nn.Sequential:
    gen = _gen(7)
    return nn.Sequential(*[OuterRes(d, gen) for _ in range(depth)])


def test_nested_levels_each_get_their_own_stacks_and_cum_gain():
    net, x = _nested(), torch.randn(4, 6, dtype=DT, generator=_gen(8))
    outer = ["0", "1", "2"]
    inner = [f"{i}.inner.{j}" for i in range(3) for j in range(2)]

    def loss(out):
        return out.pow(2).sum()

    frame = gradprobe.analyze(net, x, blocks=outer + inner, jacobian=False, loss_fn=loss).set_index("block")
    ref = _alias_gradients(net, outer + inner, x, loss)
    assert frame.loc[outer, "stack"].nunique() == 1
    assert set(frame.loc[inner, "stack"]) == {"0.inner", "1.inner", "2.inner"}
    for n in outer:
        assert frame.loc[n, "cum_gain"] == pytest.approx(ref[n]["grad_in"] / ref["2"]["grad_out"], rel=1e-10)
    for n in inner:
        last = n.rsplit(".", 1)[0] + ".1"
        assert frame.loc[n, "cum_gain"] == pytest.approx(ref[n]["grad_in"] / ref[last]["grad_out"], rel=1e-10)


def test_paths_with_nested_levels_decompose_each_level_exactly():
    net, x = _nested(), torch.randn(4, 6, dtype=DT, generator=_gen(9))
    frame = gradprobe.paths(net, x, blocks=["0", "1", "2", "*.inner.*"])
    stacks = {tuple(s["blocks"]): s for s in frame.attrs["stacks"]}
    assert ("0", "1", "2") in stacks and ("1.inner.0", "1.inner.1") in stacks
    for s in stacks.values():
        assert s["remainder"] <= 1e-12 * s["grad_norm"]


# ---------------------------------------------------------------------- paths: long skips, shared blocks
class LongSkip(nn.Module):
    """Four residual blocks in one stack, with a U-Net-like skip from enc.0's output to dec.1's
    input that bypasses enc.1 and dec.0."""

    def __init__(self, d: int = 6):
        super().__init__()
        gen = _gen(10)
        self.enc = nn.Sequential(InnerRes(d, gen), InnerRes(d, gen))
        self.dec = nn.Sequential(InnerRes(d, gen), InnerRes(d, gen))
        self.mid = _linear(d, d, gen)

    def forward(self, x):
        h1 = self.enc[0](x)
        d0 = self.dec[0](self.mid(self.enc[1](h1)))
        return self.dec[1](d0 + h1)


def _through_chain(net: LongSkip, x: torch.Tensor, u: torch.Tensor) -> tuple[float, float]:
    """|g| at enc.0's input, and |the part of it that runs through enc.1 and dec.0| (the skip's
    h1 detached where it joins dec.1's input), by plain autograd."""
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad((net(x) * u).sum(), x)
    h1 = net.enc[0](x)
    d0 = net.dec[0](net.mid(net.enc[1](h1)))
    (chain,) = torch.autograd.grad((net.dec[1](d0 + h1.detach()) * u).sum(), x)
    return float(g.norm()), float((g - chain).norm())


def test_paths_reports_a_gradient_that_bypasses_the_blocks():
    net, x = LongSkip(), torch.randn(4, 6, dtype=DT, generator=_gen(11))
    u = torch.randn(4, 6, dtype=DT, generator=_gen(12))
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        frame = gradprobe.paths(net, x, blocks=["enc.*", "dec.*"], loss_fn=lambda out: (out * u).sum())
    caught = [str(w.message) for w in got]
    (stack,) = frame.attrs["stacks"]
    g, bypassed = _through_chain(net, x, u)
    assert stack["bypass"] == pytest.approx(bypassed / g, rel=1e-9)
    assert stack["bypass"] > 0.1
    assert stack["residual"] <= 1e-12 * g  # the lengths themselves are exact: nothing cancels
    assert any("bypasses their blocks" in m for m in caught)
    assert not any("cancel" in m for m in caught)


def test_paths_without_a_bypass_report_none():
    net, x = _nested(), torch.randn(4, 6, dtype=DT, generator=_gen(13))
    frame = gradprobe.paths(net, x, blocks=["0", "1", "2"])
    assert [s["bypass"] for s in frame.attrs["stacks"]] == [0.0]


class SharedLayer(nn.Module):
    """One residual block applied ``times`` times (ALBERT-style weight sharing)."""

    def __init__(self, d: int = 6, times: int = 6):
        super().__init__()
        self.layer, self.times = InnerRes(d, _gen(14)), times

    def forward(self, x):
        for _ in range(self.times):
            x = self.layer(x)
        return x


def test_paths_counts_every_call_of_a_shared_block():
    net, x = SharedLayer(), torch.randn(4, 6, dtype=DT, generator=_gen(15))
    frame = gradprobe.paths(net, x, blocks=["layer"])
    assert frame["length"].tolist() == list(range(7))
    assert frame["n_paths"].tolist() == [float(math.comb(6, k)) for k in range(7)]
    (stack,) = frame.attrs["stacks"]
    assert stack["branching"] == 6 and stack["remainder"] <= 1e-12 * stack["grad_norm"]
    # the same as six separate blocks with the same weights
    copies = nn.Sequential(*[InnerRes(6, _gen(0)) for _ in range(6)])
    copies.load_state_dict({f"{i}.{k}": v for i in range(6) for k, v in net.layer.state_dict().items()})
    ref = gradprobe.paths(copies, x, blocks=[str(i) for i in range(6)])
    assert frame["path_grad"].tolist() == pytest.approx(ref["path_grad"].tolist(), rel=1e-10)


# ---------------------------------------------------------------------- training where a block's input forks
class ForkedStem(nn.Module):
    """The stem's output feeds the blocks and, around them, the head (an outer residual)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.stem = nn.Linear(8, d)
        self.blocks = nn.Sequential(InnerRes32(d), InnerRes32(d))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.blocks(h) + h)


class InnerRes32(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


#: The bound docs/measurements.md states for training where a block's input also feeds a layer
#: outside the block: max |theta_probed - theta_plain| / max |theta_plain| per parameter.
FORK_BOUND = 1e-5


def _sgd(net: nn.Module, seed: int, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(32, 8, generator=gen)).pow(2).mean().backward()
        opt.step()


def test_training_where_a_block_input_forks_stays_within_the_documented_bound():
    import copy

    worst, differing = 0.0, 0
    for seed in range(20):
        torch.manual_seed(seed)
        plain = ForkedStem()
        probed = copy.deepcopy(plain)
        _sgd(plain, seed)
        with gradprobe.attach(probed):
            _sgd(probed, seed)
        pairs = [
            (a.detach(), b.detach()) for a, b in zip(plain.parameters(), probed.parameters(), strict=True)
        ]
        differing += not all(torch.equal(a, b) for a, b in pairs)
        worst = max(worst, *(float((a - b).abs().max() / a.abs().max()) for a, b in pairs))
    # the alias adds a node at the fork: autograd adds the gradients there in another order
    assert worst <= FORK_BOUND, worst
    assert differing > 0  # (if this starts failing, training is bit-identical here: say so in the docs)


def test_training_without_a_fork_is_bit_identical():
    import copy

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), InnerRes32(16), InnerRes32(16), nn.Linear(16, 1))
    probed = copy.deepcopy(plain)
    _sgd(plain, 0)
    with gradprobe.attach(probed):
        _sgd(probed, 0)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), probed.parameters(), strict=True))


# ---------------------------------------------------------------------- auto beside non-residual runs
class ConvAct(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv, self.act = nn.Conv1d(c, c, 3, padding=1), nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x))


class ResConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv, self.act = nn.Conv1d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return x + self.act(self.conv(x))


class FeatureExtractorNet(nn.Module):
    """A wav2vec2-like layout: a run of plain convolutions, then a run of residual blocks."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.feat = nn.ModuleList([ConvAct(c) for _ in range(3)])
        self.blocks = nn.Sequential(*[ResConv(c) for _ in range(3)])

    def forward(self, x):
        for layer in self.feat:
            x = layer(x)
        return self.blocks(x)


def _train_once(net: nn.Module, x: torch.Tensor, **options) -> list[str]:
    def run():
        with gradprobe.attach(net, **options) as probe:
            net(x).sum().backward()
            probe.frame()

    return [m for m in _warnings(run) if "not residual" in m]


def test_auto_beside_residual_blocks_names_the_plain_runs_it_selected():
    net, x = FeatureExtractorNet(), torch.randn(2, 4, 10)
    (message,) = _train_once(net, x)
    assert "['feat.0', 'feat.1', 'feat.2']" in message
    assert "blocks=['blocks.0', 'blocks.1', 'blocks.2']" in message
    assert not _train_once(net, x, blocks="blocks.*")  # an explicit selection is the user's


def test_plain_and_residual_nets_alone_do_not_warn():
    plain = nn.Sequential(*[ConvAct(4) for _ in range(3)])
    residual = nn.Sequential(*[ResConv(4) for _ in range(3)])
    x = torch.randn(2, 4, 10)
    assert not _train_once(plain, x) and not _train_once(residual, x)


class PlainStage(nn.Module):
    """A stage that only routes: its output is its last block's, no skip of its own."""

    def __init__(self, d: int, gen: torch.Generator):
        super().__init__()
        self.inner = nn.Sequential(InnerRes(d, gen), InnerRes(d, gen))

    def forward(self, x):
        return self.inner(x)


def test_auto_inside_nested_residuals_warns_with_the_outer_level():
    net, x = _nested(), torch.randn(4, 6, dtype=DT, generator=_gen(16))
    assert [b.name for b in auto_blocks(net)][:2] == ["0.inner.0", "0.inner.1"]  # the structure is a stage's

    def run():
        with gradprobe.attach(net) as probe:
            net(x).sum().backward()
            probe.frame()

    (message,) = [m for m in _warnings(run) if "nested residuals" in m]
    assert "residual block(s) ['0', '1', '2']" in message and "blocks=['0', '1', '2']" in message


def test_stages_that_only_route_are_not_nested_residuals():
    gen = _gen(17)
    net, x = nn.Sequential(*[PlainStage(6, gen) for _ in range(3)]), torch.randn(4, 6, dtype=DT)

    def run():
        with gradprobe.attach(net) as probe:
            net(x.requires_grad_()).sum().backward()
            probe.frame()

    assert not [m for m in _warnings(run) if "gradprobe" in m]
