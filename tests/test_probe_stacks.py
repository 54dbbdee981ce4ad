"""Stacks (the chains that cum_gain and the product columns run along) and shortcuts that are
shortcuts: float64 autograd references on hand-made nets, and Hugging Face T5, Whisper and Swin."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from nets import python_calls
from reference import exact_columns
from test_capture import _norm, chain_reference
from torch import nn

import gradprobe
from gradprobe.jacobian import capture_blocks
from gradprobe.stacking import StackTracker, nesting

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- shortcuts
class EndsWithDownsample(nn.Module):
    """A stage-like block whose last op is its ``downsample``: not a shortcut."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.downsample = nn.Linear(6, 3)

    def forward(self, x):
        return self.downsample(x + torch.tanh(self.fc(x)))


class IsItsDownsample(nn.Module):
    """``downsample`` applied to the block input, and its output *is* the block output."""

    def __init__(self):
        super().__init__()
        self.downsample = nn.Linear(6, 3)

    def forward(self, x):
        return self.downsample(x)


class TrueShortcut(nn.Module):
    """y = s(x) + F(x): a projection shortcut."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.shortcut = nn.Linear(6, 3)

    def forward(self, x):
        return self.shortcut(x) + torch.tanh(self.fc(x))


@pytest.mark.parametrize("block", [EndsWithDownsample, IsItsDownsample])
def test_a_downsample_that_makes_the_block_output_is_no_shortcut(block):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(block(), nn.Linear(3, 3)).double()
    probe = gradprobe.attach(net, blocks=["0", "1"])
    with pytest.warns(RuntimeWarning, match=r"\['0'\] change the shape") as caught, probe:
        for _ in range(3):
            net(torch.randn(4, 6, dtype=F64)).pow(2).sum().backward()
    assert sum("change the shape" in str(w.message) for w in caught) == 1  # named once
    row = probe.frame().query("block == '0'")
    assert row["res_ratio"].isna().all() and row["cos_xy"].isna().all()  # never a false 0 / 1
    assert row["grad_in"].notna().all()


def test_a_projection_shortcut_applied_to_the_input_is_compared_with():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(TrueShortcut(), nn.Linear(3, 3)).double()
    x = torch.randn(4, 6, generator=_gen(1), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradprobe.attach(net, blocks=["0"]) as probe:
            net(x).pow(2).sum().backward()
    row = probe.frame().iloc[0]
    block = net[0]
    s, y = block.shortcut(x), block(x)
    assert row["res_ratio"] == pytest.approx(_norm(y - s) / _norm(s), rel=1e-12)
    assert row["cos_xy"] == pytest.approx(float((s * y).sum().detach()) / (_norm(s) * _norm(y)), rel=1e-12)


transformers = pytest.importorskip("transformers", reason="transformers is not installed")
transformers.logging.set_verbosity_error()


def _build(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().double()


def swin():
    cfg = transformers.SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    return transformers.SwinModel(cfg)


def test_swin_stage_with_its_downsample_reads_nan_not_the_identity():
    model = _build(swin)
    pixels = torch.randn(2, 3, 16, 16, generator=_gen(0), dtype=F64)
    probe = gradprobe.attach(model, blocks=["encoder.layers.0", "encoder.layers.1"])
    with pytest.warns(RuntimeWarning, match=r"\['encoder.layers.0'\] change the shape"), probe:
        model(pixel_values=pixels).last_hidden_state.pow(2).sum().backward()
    frame = probe.frame().set_index("block")
    stage0 = frame.loc["encoder.layers.0"]
    assert math.isnan(stage0["res_ratio"]) and math.isnan(stage0["cos_xy"])
    # the last stage has no downsample: same shape, measured against its input
    assert 0 < frame.loc["encoder.layers.1", "res_ratio"] < math.inf
    assert frame["stack"].nunique() == 1  # Swin stages are one chain


# ---------------------------------------------------------------------- stacks
class Block(nn.Module):
    def __init__(self, width: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.cross = nn.Linear(width, width)

    def forward(self, h, memory=None):
        out = h + torch.tanh(self.fc(h))
        if memory is not None:  # cross-attention stand-in: reads the encoder through a keyword
            out = out + torch.tanh(self.cross(memory)).mean(1, keepdim=True)
        return out


class EncDec(nn.Module):
    """Encoder blocks on x, decoder blocks on z reading the encoder only through ``memory=``."""

    def __init__(self, n_enc: int = 3, n_dec: int = 2):
        super().__init__()
        self.encoder = nn.ModuleList([Block() for _ in range(n_enc)])
        self.decoder = nn.ModuleList([Block() for _ in range(n_dec)])
        self.head = nn.Linear(5, 5)

    def forward(self, x, z):
        for b in self.encoder:
            x = b(x)
        memory = 3.0 * x  # something between the stacks, as a final norm
        for b in self.decoder:
            z = b(z, memory=memory)
        return self.head(z)


def _encdec_reference(net: EncDec, x, z, loss_fn):
    """Per block (grad_in, grad_out) and cum_gain within each stack, by autograd on held tensors."""
    xs, ys = {}, {}
    h = x.clone().requires_grad_(True)
    for i, b in enumerate(net.encoder):
        xs[f"encoder.{i}"] = h
        h = b(h)
        ys[f"encoder.{i}"] = h
    memory = 3.0 * h
    g = z.clone().requires_grad_(True)
    for i, b in enumerate(net.decoder):
        xs[f"decoder.{i}"] = g
        g = b(g, memory=memory)
        ys[f"decoder.{i}"] = g
    loss = loss_fn(net.head(g))
    names = list(xs)
    g_ys = dict(zip(names, torch.autograd.grad(loss, [ys[n] for n in names], retain_graph=True), strict=True))
    ref = {}
    for n in names:
        (g_x,) = torch.autograd.grad(ys[n], xs[n], g_ys[n], retain_graph=True)
        ref[n] = {"grad_in": _norm(g_x), "grad_out": _norm(g_ys[n])}
    for prefix, last in (
        ("encoder", f"encoder.{len(net.encoder) - 1}"),
        ("decoder", f"decoder.{len(net.decoder) - 1}"),
    ):
        for n in names:
            if n.startswith(prefix):
                ref[n]["cum_gain"] = ref[n]["grad_in"] / ref[last]["grad_out"]
    return ref


def _loss(y):
    return (y.sin() * y).sum()


def test_encoder_and_decoder_are_two_stacks_with_their_own_products(no_leaks):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = no_leaks(EncDec().double())
    x = torch.randn(4, 3, 5, generator=_gen(1), dtype=F64)
    z = torch.randn(4, 2, 5, generator=_gen(2), dtype=F64)
    ref = _encdec_reference(net, x, z, _loss)
    with gradprobe.attach(net, blocks=["encoder.*", "decoder.*"], jacobian=True, probes=2) as probe:
        _loss(net(x, z)).backward()
    frame = probe.frame().set_index("block")
    assert frame["stack"].to_dict() == {
        "encoder.0": "encoder",
        "encoder.1": "encoder",
        "encoder.2": "encoder",
        "decoder.0": "decoder",
        "decoder.1": "decoder",
    }
    for name, r in ref.items():
        for c in ("grad_in", "grad_out", "cum_gain"):
            assert frame.loc[name, c] == pytest.approx(r[c], rel=1e-10), (name, c)
    # the encoder's cum_gain runs to the encoder's own last block (directly chained: the product of its gains)
    enc = frame.loc[["encoder.0", "encoder.1", "encoder.2"]]
    assert enc["cum_gain"].iloc[0] == pytest.approx(enc["gain"].prod(), rel=1e-10)
    # each stack's product ends at its own last block, where it is the block itself
    for last in ("encoder.2", "decoder.1"):
        assert frame.loc[last, "prod_fro"] == frame.loc[last, "jac_fro"]


def test_stack_products_match_exact_dense_jacobians():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = EncDec().double()
    x = torch.randn(2, 3, 5, generator=_gen(1), dtype=F64)
    z = torch.randn(2, 2, 5, generator=_gen(2), dtype=F64)
    _, caps = capture_blocks(net, (x, z), blocks=["encoder.*", "decoder.*"])
    assert [c.stack for c in caps] == ["encoder"] * 3 + ["decoder"] * 2  # detected as the probe does
    exact = exact_columns(caps)
    frame = gradprobe.analyze(net, (x, z), blocks=["encoder.*", "decoder.*"], probes=256, loss_fn=_loss)
    frame = frame.set_index("block")
    for name, cols in exact.items():
        assert frame.loc[name, "prod_fro"] == pytest.approx(cols["prod_fro"], rel=0.05), name
        assert frame.loc[name, "prod_spec"] == pytest.approx(cols["prod_spec"], rel=0.02), name
    # the exact encoder product runs to the encoder's last block, not to the decoder
    enc_y = caps[2].y
    dense = torch.autograd.functional.jacobian(
        lambda h: net.encoder[2](net.encoder[1](h)), caps[1].x.detach()
    )
    n = enc_y.numel()
    assert exact["encoder.1"]["prod_fro"] == pytest.approx(float(dense.reshape(n, -1).norm()) / math.sqrt(n))


def test_stacks_argument_overrides_the_grouping():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = EncDec().double()
    x = torch.randn(4, 3, 5, generator=_gen(1), dtype=F64)
    z = torch.randn(4, 2, 5, generator=_gen(2), dtype=F64)
    with gradprobe.attach(net, blocks=["encoder.*", "decoder.*"], stacks={"all": "**"}) as probe:
        _loss(net(x, z)).backward()
    one = probe.frame()
    assert set(one["stack"]) == {"all"}
    last_out = one.iloc[-1]["grad_out"]
    assert one["cum_gain"].tolist() == pytest.approx((one["grad_in"] / last_out).tolist())
    with gradprobe.attach(
        net, blocks=["encoder.*", "decoder.*"], stacks=[["encoder.*"], ["decoder.*"]]
    ) as probe:
        _loss(net(x, z)).backward()
    assert probe.frame()["stack"].tolist() == ["encoder"] * 3 + ["decoder"] * 2
    with pytest.raises(ValueError, match="in no stack"):
        gradprobe.attach(net, blocks=["encoder.*", "decoder.*"], stacks=[["encoder.*"]])
    with pytest.raises(ValueError, match="two stacks"):
        gradprobe.attach(net, blocks=["encoder.*", "decoder.*"], stacks=[["encoder.*"], ["**"]])


def test_single_stack_models_have_one_stack_and_unchanged_cum_gain():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(*[Block() for _ in range(3)]).double()
    x = torch.randn(4, 5, generator=_gen(1), dtype=F64)
    reference = chain_reference(list(net), x, _loss)
    with gradprobe.attach(net) as probe:
        _loss(net(x)).backward()
    frame = probe.frame()
    assert frame["stack"].tolist() == ["0", "0", "0"]  # the blocks share no name prefix
    assert frame["cum_gain"].tolist() == pytest.approx([r["cum_gain"] for r in reference], rel=1e-12)


def t5():
    cfg = transformers.T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def whisper():
    cfg = transformers.WhisperConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        dropout=0.0,
    )
    return transformers.WhisperForConditionalGeneration(cfg)


def _seq2seq_reference(model, blocks, call):
    """{block: (grad_out, grad_in)} by autograd on the tensors that plain hooks hold (float64)."""
    modules = dict(model.named_modules())
    xs, ys, handles = {}, {}, []
    for n in blocks:

        def post(mod, args, kwargs, out, n=n):
            xs[n] = args[0] if args else kwargs["hidden_states"]
            ys[n] = out[0] if isinstance(out, tuple) else out

        handles.append(modules[n].register_forward_hook(post, with_kwargs=True))
    try:
        loss = call(model)
    finally:
        for h in handles:
            h.remove()
    g_ys = torch.autograd.grad(loss, [ys[n] for n in blocks], retain_graph=True)
    out = {}
    for n, g_y in zip(blocks, g_ys, strict=True):
        (g_x,) = torch.autograd.grad(ys[n], xs[n], g_y, retain_graph=True)
        out[n] = (_norm(g_y), _norm(g_x))
    return out


@pytest.mark.parametrize(
    ("factory", "blocks", "stacks"),
    [
        (t5, ["encoder.block.*", "decoder.block.*"], ("encoder.block", "decoder.block")),
        (
            whisper,
            ["model.encoder.layers.*", "model.decoder.layers.*"],
            ("model.encoder.layers", "model.decoder.layers"),
        ),
    ],
    ids=["t5", "whisper"],
)
def test_seq2seq_encoder_cum_gain_is_the_product_of_the_encoders_own_gains(factory, blocks, stacks):
    model = _build(factory)
    if factory is t5:
        kwargs = {"input_ids": torch.randint(1, 40, (2, 6), generator=_gen(0))}
    else:
        kwargs = {"input_features": torch.randn(2, 8, 16, generator=_gen(0), dtype=F64)}
    labels = torch.randint(3, 40, (2, 5), generator=_gen(1))
    with gradprobe.attach(
        model, blocks=blocks, jacobian=True, probes=2, jacobian_options={"spec": False}
    ) as probe:
        model(**kwargs, labels=labels).loss.backward()
    frame = probe.frame()
    assert tuple(dict.fromkeys(frame["stack"])) == stacks
    for label, part in frame.groupby("stack", sort=False):
        part = part.sort_values("index")
        # within a stack each block's output feeds the next block only: cum_gain = product of gains
        prods = part["gain"][::-1].cumprod()[::-1]
        assert part["cum_gain"].tolist() == pytest.approx(prods.tolist(), rel=1e-6), label
        assert part["cum_gain"].iloc[-1] == pytest.approx(part["gain"].iloc[-1], rel=1e-12)
        assert part["prod_fro"].iloc[-1] == part["jac_fro"].iloc[-1]
    # and the gradients themselves are autograd's
    names = frame["block"].tolist()
    ref = _seq2seq_reference(model, names, lambda m: m(**kwargs, labels=labels).loss)
    rows = frame.set_index("block")
    for name, (grad_out, grad_in) in ref.items():
        assert rows.loc[name, "grad_out"] == pytest.approx(grad_out, rel=1e-8), name
        assert rows.loc[name, "grad_in"] == pytest.approx(grad_in, rel=1e-8), name
    for label in stacks:
        part = [n for n in names if rows.loc[n, "stack"] == label]
        last_out = ref[part[-1]][0]
        for n in part:
            assert rows.loc[n, "cum_gain"] == pytest.approx(ref[n][1] / last_out, rel=1e-8), n


def test_figures_draw_each_stack_as_its_own_line_and_old_frames_as_one():
    import pandas as pd

    from gradprobe import plot

    frame = pd.DataFrame(
        {
            "step": 0,
            "block": ["e.0", "e.1", "d.0", "d.1"],
            "index": [0, 1, 2, 3],
            "stack": ["e", "e", "d", "d"],
            "cum_gain": [0.5, 1.0, 0.8, 1.0],
            "prod_fro": [1.2, 1.0, 1.1, 1.0],
            "prod_spec": [2.0, 1.5, 1.8, 1.4],
        }
    )

    def data_lines(ax):  # the drawn series, not the reference line at 1
        return [tuple(float(v) for v in ln.get_xdata()) for ln in ax.get_lines() if ln.get_marker() != "None"]

    drawn = data_lines(plot.plot_highway(frame))
    assert sorted(drawn) == [(0.0, 1.0), (2.0, 3.0)]
    drawn = data_lines(plot.plot_jacobian(frame, columns=("prod_fro", "prod_spec")))
    assert sorted(drawn) == [(0.0, 1.0), (0.0, 1.0), (2.0, 3.0), (2.0, 3.0)]
    old = frame.drop(columns="stack")  # a run saved before the stack column: one chain
    assert data_lines(plot.plot_highway(old)) == [(0.0, 1.0, 2.0, 3.0)]


def _detect_chain(names: list[str]) -> dict[str, str]:
    """A StackTracker deciding each block of a chain as the probe's hooks do (forward order)."""
    tracker, index = StackTracker(names), {}
    x = torch.ones(2, requires_grad=True)
    for name in names:
        index.setdefault(name, len(index))
        tracker.link(name, x, index)
        x = x * 2
        tracker.output(name, x.grad_fn)
    return tracker.names(names)


def test_stack_detection_calls_grow_linearly_with_the_blocks():
    # Each block's decision scanned every block seen before it for the one before it, and the
    # nesting of the names compared every name with every other: calls in the square of the
    # blocks, seconds of the first recorded step at 2,000 blocks.
    small = [f"layers.{i}" for i in range(40)]
    large = [f"layers.{i}" for i in range(320)] + [f"layers.0.inner.{i}" for i in range(4)]
    assert set(_detect_chain(large[:320]).values()) == {"layers"}
    assert nesting(large)["layers.0.inner.3"] == "layers.0" and nesting(large)["layers.5"] == ""
    for fn in (_detect_chain, nesting):
        ratio = python_calls(lambda fn=fn: fn(large)) / python_calls(lambda fn=fn: fn(small))
        assert ratio < 9, fn.__name__


def test_stack_detection_finds_the_block_before_at_its_own_level():
    # blocks nested in block "a" chain among themselves; "b" continues after "a", not after "a.i.1"
    names = ["a", "a.i.0", "a.i.1", "b"]
    tracker, index = StackTracker(names), {}
    x = torch.ones(2, requires_grad=True)
    h = x * 1
    index["a"] = 0
    tracker.link("a", h, index)
    inner = h * 2
    for k, name in enumerate(["a.i.0", "a.i.1"]):
        index[name] = k + 1
        tracker.link(name, inner, index)
        inner = inner * 3
        tracker.output(name, inner.grad_fn)
    tracker.output("a", inner.grad_fn)
    index["b"] = 3
    tracker.link("b", torch.ones(2), index)  # no graph: a new stack
    assert tracker.names(names) == {"a": "a", "a.i.0": "a.i", "a.i.1": "a.i", "b": "b"}
