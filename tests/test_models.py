"""Reference models: architecture, closed-form parameter counts, init, identity at zero init, RNG hygiene."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradprobe.models import (
    ACTIVATIONS,
    MLP,
    BasicBlock,
    MLPBlock,
    PadShortcut,
    ResNetCIFAR,
    mlp,
    resnet_cifar,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def resnet_params(
    depth: int, *, width: int = 16, in_channels: int = 3, classes: int = 10, shortcut: str
) -> int:
    """Closed-form parameter count of the CIFAR ResNet (convs without bias, BN = 2 per channel)."""
    n = (depth - 2) // 6
    total = 9 * in_channels * width + 2 * width
    c_in = width
    for c in (width, 2 * width, 4 * width):
        for i in range(n):
            first_in = c_in if i == 0 else c
            total += 9 * first_in * c + 9 * c * c + 4 * c
            if i == 0 and first_in != c and shortcut == "B":
                total += first_in * c + 2 * c
        c_in = c
    return total + 4 * width * classes + classes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- resnet_cifar


def test_resnet20_option_a_has_the_papers_parameter_count():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (269,722 with option A)
    assert n_params(resnet_cifar(20, shortcut="A")) == 269_722


@pytest.mark.parametrize("depth", [8, 20, 56])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_parameter_count_matches_closed_form(depth, shortcut):
    net = resnet_cifar(depth, shortcut=shortcut, in_channels=1, width=8, num_classes=7)
    assert n_params(net) == resnet_params(depth, width=8, in_channels=1, classes=7, shortcut=shortcut)


def test_plain_net_is_the_residual_net_minus_the_shortcuts():
    res = resnet_cifar(20, residual=True, shortcut="B")
    plain = resnet_cifar(20, residual=False)
    res_names = {n for n, _ in res.named_parameters() if ".shortcut." not in n}
    assert res_names == {n for n, _ in plain.named_parameters()}
    # exactly two projection shortcuts (the stage transitions), none in the plain net
    assert sum(isinstance(m, BasicBlock) and m.shortcut is not None for m in res.modules()) == 2
    assert all(m.shortcut is None for m in plain.modules() if isinstance(m, BasicBlock))
    assert n_params(res) - n_params(plain) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_resnet_layout_is_torchvision_style():
    net = resnet_cifar(32)
    assert [n for n, _ in net.named_children()] == [
        "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"
    ]  # fmt: skip
    for stage in (net.layer1, net.layer2, net.layer3):
        assert isinstance(stage, nn.Sequential) and len(stage) == 5
        assert all(type(b) is BasicBlock for b in stage)
    block = net.layer2[0]
    assert [n for n, _ in block.named_children()] == ["conv1", "bn1", "relu", "conv2", "bn2", "shortcut"]
    assert block.conv1.stride == (2, 2) and net.layer2[1].conv1.stride == (1, 1)


def test_shortcut_a_is_parameter_free_zero_padding():
    net = resnet_cifar(20, shortcut="A")
    pad = net.layer3[0].shortcut
    assert isinstance(pad, PadShortcut) and n_params(pad) == 0
    x = torch.randn(2, 32, 8, 8, generator=gen())
    out = pad(x)
    assert out.shape == (2, 64, 4, 4)
    assert torch.equal(out[:, 16:48], x[:, :, ::2, ::2])
    assert not out[:, :16].any() and not out[:, 48:].any()


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (3, 3, 8, 8)])
def test_resnet_forward_shapes(shape):
    net = resnet_cifar(20, num_classes=5)
    assert net(torch.randn(*shape, generator=gen())).shape == (shape[0], 5)


@pytest.mark.parametrize("residual", [True, False])
def test_basic_block_matches_its_formula_in_float64(residual):
    block = resnet_cifar(8, residual=residual, width=4, shortcut="B").layer2[0].double()
    x = torch.randn(3, 4, 6, 6, generator=gen(), dtype=torch.float64)
    branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    if residual:
        branch = branch + block.shortcut(x)
    torch.testing.assert_close(block(x), torch.relu(branch), rtol=0, atol=0)


def test_plain_and_residual_blocks_line_up():
    from gradprobe.blocks import select_blocks

    for depth in (20, 56):
        res = [n for n, _ in select_blocks(resnet_cifar(depth), "auto")]
        plain = [n for n, _ in select_blocks(resnet_cifar(depth, residual=False), "auto")]
        assert res == plain
        assert len(res) == 3 * (depth - 2) // 6
        assert res[0] == "layer1.0" and res[-1] == f"layer3.{(depth - 2) // 6 - 1}"


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_zero_init_residual_makes_every_identity_block_exactly_the_identity(shortcut):
    net = resnet_cifar(20, shortcut=shortcut, in_channels=1, zero_init_residual=True, generator=gen(3))
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    blocks = {n: m for n, m in net.named_modules() if isinstance(m, BasicBlock)}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out.detach()

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in blocks.items()]
    net(torch.randn(16, 1, 8, 8, generator=gen()))  # training mode: batch statistics
    for h in hooks:
        h.remove()
    identity = [n for n in blocks if inputs[n].shape == outputs[n].shape]
    assert len(identity) == 7  # 9 blocks minus the two stage transitions
    for n in identity:
        assert torch.equal(outputs[n], inputs[n]), n
    for n in set(blocks) - set(identity):
        # a transition block is its shortcut alone (then ReLU): option A passes the non-negative input on
        sc = blocks[n].shortcut
        assert sc is not None
        assert torch.equal(outputs[n], torch.relu(sc(inputs[n])))
    assert all(not m.bn2.weight.detach().any() for m in blocks.values())


def test_zero_init_leaves_plain_nets_alone():
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            resnet_cifar(20, residual=False, zero_init_residual=True).state_dict().values(),
            resnet_cifar(20, residual=False).state_dict().values(),
            strict=True,
        )
    )


def test_he_init_statistics():
    net = resnet_cifar(20, width=32, generator=gen(1))
    w = net.layer3[1].conv1.weight.detach()  # 128 x 128 x 3 x 3 = 147,456 draws
    fan_in = w.shape[1] * 9
    assert float(w.mean()) == pytest.approx(0.0, abs=4 * math.sqrt(2 / fan_in) / math.sqrt(w.numel()))
    assert float(w.std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
            assert not m.running_mean.any() and torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert int(m.num_batches_tracked) == 0
    bound = 1 / math.sqrt(net.fc.in_features)
    fc = net.fc.weight.detach()
    assert float(fc.abs().max()) <= bound and float(fc.std()) > bound / 3


def test_models_are_seeded_by_the_generator_and_never_touch_the_global_rng():
    state = torch.random.get_rng_state()
    a = resnet_cifar(20, generator=gen(5))
    b = resnet_cifar(20, generator=gen(5))
    c = resnet_cifar(20, generator=gen(6))
    d = mlp(6, in_features=10, num_classes=3, generator=gen(5))
    default = resnet_cifar(20)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.layer1[0].conv1.weight, c.layer1[0].conv1.weight)
    assert torch.equal(default.conv1.weight, resnet_cifar(20, generator=gen(0)).conv1.weight)
    assert all(
        torch.isfinite(p).all() for p in [*a.parameters(), *a.buffers(), *d.parameters(), *d.buffers()]
    )


def test_resnet_repr_is_short_and_says_what_it_is():
    text = repr(resnet_cifar(56, residual=False, in_channels=1))
    assert text.startswith("ResNetCIFAR(depth=56, plain, width=16")
    assert "9 x BasicBlock" in text and "conv3x3(1->16)" in text and "+ x" not in text
    assert len(text.splitlines()) < 12
    assert "+ x" in repr(resnet_cifar(20))
    assert "residual=True" in repr(resnet_cifar(20).layer1[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"depth": 21}, ValueError, "6n\\+2.*20 and 26"),
        ({"depth": 2}, ValueError, "at least 8"),
        ({"depth": 20.0}, TypeError, "int"),
        ({"depth": True}, TypeError, "int"),
        ({"depth": 20, "shortcut": "C"}, ValueError, "'A'.*'B'"),
        ({"depth": 20, "width": 0}, ValueError, "width"),
        ({"depth": 20, "generator": 0}, TypeError, "torch.Generator"),
    ],
)
def test_resnet_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        resnet_cifar(**kwargs)


# ----------------------------------------------------------------------------- mlp


def test_mlp_layout_and_depth():
    net = mlp(7, in_features=12, num_classes=4, width=16)
    assert isinstance(net, MLP) and len(net.blocks) == 5
    assert all(type(b) is MLPBlock for b in net.blocks)
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 7  # depth counts the linear layers
    assert net(torch.randn(3, 12, generator=gen())).shape == (3, 4)
    assert net(torch.randn(3, 3, 2, 2, generator=gen())).shape == (3, 4)  # inputs are flattened


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("residual", [True, False])
def test_mlp_block_matches_its_formula(norm, residual):
    net = mlp(
        4, in_features=5, num_classes=2, width=6, norm=norm, residual=residual, activation="tanh"
    ).double()
    block = net.blocks[0]
    x = torch.randn(4, 6, generator=gen(), dtype=torch.float64)
    branch = block.fc(torch.tanh(x))
    if norm == "batch":
        mean, var = branch.mean(0), branch.var(0, unbiased=False)
        branch = (branch - mean) / torch.sqrt(var + 1e-5)
    elif norm == "layer":
        mean, var = branch.mean(1, keepdim=True), branch.var(1, unbiased=False, keepdim=True)
        branch = (branch - mean) / torch.sqrt(var + 1e-5)
    expected = x + branch if residual else branch
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_plain_and_residual_mlps_have_identical_parameters_and_blocks():
    a = mlp(6, in_features=8, num_classes=3, residual=True, generator=gen(2))
    b = mlp(6, in_features=8, num_classes=3, residual=False, generator=gen(2))
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_zero_init_blocks_are_exactly_the_identity(norm, activation):
    net = mlp(6, in_features=8, num_classes=3, norm=norm, activation=activation, zero_init_residual=True)
    x = torch.randn(10, 128, generator=gen()) * 3  # any sign: the identity path has no nonlinearity
    for block in net.blocks:
        assert torch.equal(block(x), x)
    zeroed = [b.norm.weight if norm else b.fc.weight for b in net.blocks]
    assert all(not w.any() for w in zeroed)
    # the stem and head keep their init
    assert net.stem.weight.abs().sum() > 0 and net.head.weight.abs().sum() > 0


def test_mlp_repr():
    text = repr(mlp(30, in_features=64, num_classes=10, residual=False, norm="layer"))
    assert text.startswith("MLP(depth=30, plain, width=128")
    assert "28 x MLPBlock: y = LN(fc(relu(x)))" in text
    assert "y = x + fc(relu(x))" in repr(mlp(5, in_features=4, num_classes=2, norm=None))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"depth": 2}, ValueError, "at least 3"),
        ({"depth": 5, "norm": "group"}, ValueError, "norm"),
        ({"depth": 5, "activation": "swish"}, ValueError, "activation must be one of"),
        ({"depth": 5, "in_features": 0}, ValueError, "in_features"),
    ],
)
def test_mlp_rejects_bad_arguments(kwargs, error, match):
    base = {"in_features": 4, "num_classes": 2}
    with pytest.raises(error, match=match):
        mlp(**{**base, **kwargs})


def test_model_types_are_exported():
    assert issubclass(ResNetCIFAR, nn.Module) and issubclass(MLP, nn.Module)


# ---------------------------------------------------------------------- pre-activation ResNet
def preact_params(
    depth: int, *, width: int = 16, in_channels: int = 3, classes: int = 10, shortcut: str
) -> int:
    """Closed-form parameter count of the pre-activation CIFAR ResNet: per block BN(in) + conv(in->out)
    + BN(out) + conv(out->out), a 1x1 conv shortcut ("B") at the two transitions, a final BN."""
    n = (depth - 2) // 6
    total = 9 * in_channels * width  # stem conv, no BN of its own
    planes_in = width
    for planes in (width, 2 * width, 4 * width):
        for _ in range(n):
            total += 2 * planes_in + 9 * planes_in * planes + 2 * planes + 9 * planes * planes
            if planes_in != planes and shortcut == "B":
                total += planes_in * planes
            planes_in = planes
    return total + 2 * 4 * width + 4 * width * classes + classes


@pytest.mark.parametrize("depth", [8, 20, 56, 110])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_preact_parameter_count_matches_closed_form(depth, shortcut):
    from gradprobe.models import preact_resnet_cifar

    net = preact_resnet_cifar(depth, shortcut=shortcut, generator=gen())
    assert sum(p.numel() for p in net.parameters()) == preact_params(depth, shortcut=shortcut)


def test_preact_110_and_resnet_56_have_the_papers_sizes():
    from gradprobe.models import preact_resnet_cifar

    # He et al. 2016a Table 6 / 2016b Table 3: ResNet-56 0.85M, ResNet-110 1.7M parameters
    assert sum(p.numel() for p in preact_resnet_cifar(110).parameters()) / 1e6 == pytest.approx(1.7, abs=0.05)
    assert sum(p.numel() for p in resnet_cifar(56).parameters()) / 1e6 == pytest.approx(0.85, abs=0.01)


@pytest.mark.parametrize("residual", [True, False])
def test_preact_block_matches_its_formula_in_float64(residual):
    from gradprobe.models import PreActBlock

    block = PreActBlock(8, 8, residual=residual).double().eval()
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    branch = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
    torch.testing.assert_close(block(x), branch + x if residual else branch, rtol=0, atol=1e-12)


def test_preact_layout_plain_twin_and_zero_init():
    from gradprobe.blocks import select_blocks, shortcut_modules, without_shortcut
    from gradprobe.models import PreActBlock, PreActResNetCIFAR, preact_resnet_cifar

    res = preact_resnet_cifar(20, zero_init_residual=True, generator=gen())
    plain = preact_resnet_cifar(20, residual=False, zero_init_residual=True, generator=gen())
    assert isinstance(res, PreActResNetCIFAR)
    names = [n for n, _ in select_blocks(res)]
    assert names == [n for n, _ in select_blocks(plain)]
    assert names == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert sorted(shortcut_modules(select_blocks(res))) == ["layer2.0", "layer3.0"]
    assert not shortcut_modules(select_blocks(plain))
    # the plain twin's shape-changing blocks have no shortcut by design: no warning for them
    assert without_shortcut(select_blocks(plain)) == set(names)
    assert not any(torch.all(b.conv2.weight == 0) for b in plain.modules() if isinstance(b, PreActBlock))
    x = torch.randn(3, 16, 8, 8)
    res.eval()
    assert torch.equal(res.layer1[1](x), x)  # zero init: an identity block is exactly the identity


def test_preact_plain_twin_probes_without_the_shortcut_warning():
    import warnings

    import gradprobe
    from gradprobe.models import preact_resnet_cifar

    net = preact_resnet_cifar(8, residual=False, in_channels=1, generator=gen())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradprobe.attach(net) as probe:
            net(torch.randn(4, 1, 8, 8)).sum().backward()
    assert probe.blocks == ["layer1.0", "layer2.0", "layer3.0"]


def test_preact_is_seeded_and_rejects_bad_depths():
    from gradprobe.models import preact_resnet_cifar

    state = torch.random.get_rng_state()
    a, b = preact_resnet_cifar(8, generator=gen(3)), preact_resnet_cifar(8, generator=gen(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="6n\\+2"):
        preact_resnet_cifar(21)
    assert "PreActResNetCIFAR(depth=8, plain" in repr(preact_resnet_cifar(8, residual=False))
