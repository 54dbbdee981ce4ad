"""Models we did not write: Hugging Face transformers built from small configs (random weights, offline),
torchvision and timm when they import."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from reference import reference_rows

import gradprobe

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
transformers.logging.set_verbosity_error()


# Dropout off: the reference run must see the same function as the probed one.
NO_DROPOUT_GPT2 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _build(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory().double()


def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=16, **NO_DROPOUT_GPT2
    )
    cfg.bos_token_id = cfg.eos_token_id = 0
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    return transformers.BertModel(
        transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=64,
            max_position_embeddings=16,
            **NO_DROPOUT,
        )
    )


def vit():
    return transformers.ViTModel(
        transformers.ViTConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_channels=3,
            **NO_DROPOUT,
        )
    )


def hf_resnet():
    return transformers.ResNetModel(
        transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="bottleneck"
        )
    )


def _ids(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


def _images(seed=0, size=8):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = {
    # name: (factory, input, loss on the output, expected blocks)
    "gpt2": (gpt2, _ids, lambda out: out.logits.pow(2).mean(), [f"transformer.h.{i}" for i in range(3)]),
    "bert": (
        bert,
        _ids,
        lambda out: out.last_hidden_state.pow(2).mean(),
        [f"encoder.layer.{i}" for i in range(2)],
    ),
    "vit": (vit, _images, lambda out: out.last_hidden_state.pow(2).mean(), None),
    "resnet": (
        hf_resnet,
        lambda: _images(size=32),
        lambda out: out.pooler_output.pow(2).mean(),
        ["encoder.stages.0.layers.0", "encoder.stages.0.layers.1", "encoder.stages.1.layers.0"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hugging_face_models_blocks_metrics_and_reference(name, no_leaks):
    factory, make_input, loss_fn, expected = CASES[name]
    model = no_leaks(_build(factory))
    x = make_input()
    # Jacobian columns, spectral ones included, from a second pass on one of the two samples: it
    # must not disturb the gradients compared with autograd below.
    with gradprobe.attach(model, jacobian=True, jacobian_options={"sub_batch": 1, "spec": True}) as probe:
        loss_fn(model(x)).backward()
    f = probe.frame()
    assert (f["jac_batch"] == 1).all()
    assert np.isfinite(f[["jac_fro", "prod_fro", "jac_spec", "prod_spec"]].to_numpy(dtype=float)).all()
    if expected is not None:
        assert probe.blocks == expected
    assert len(probe.blocks) >= 2
    core = [
        "grad_out",
        "grad_in",
        "gain",
        "cum_gain",
        "res_ratio",
        "cos_xy",
        "in_rms",
        "out_rms",
        "param_norm",
    ]
    assert np.isfinite(f[core].to_numpy(dtype=float)).all()
    # grad_in of every block against autograd on the same hidden states
    model.zero_grad()
    ref = reference_rows(model, probe.blocks, x, loss_fn)
    for _, row in f.iterrows():
        assert row["grad_in"] == pytest.approx(ref[row["block"]]["grad_in"], rel=1e-6)
        assert row["grad_out"] == pytest.approx(ref[row["block"]]["grad_out"], rel=1e-6)


def _with_cache(model, cache):
    """The keyword argument that passes a key/value cache to ``model``: ``cache`` where its forward
    takes one (transformers 5.x, where ``past_key_values`` is deprecated), else ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _out_cache(out):
    """The cache an output returns (``out.cache`` where it has one, else ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_tensors(cache):
    out = []
    for layer in getattr(cache, "layers", []):
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t.detach().clone())
    if not out and hasattr(cache, "to_legacy_cache"):
        for k, v in cache.to_legacy_cache():
            out += [k.detach().clone(), v.detach().clone()]
    return out


def test_gpt2_key_value_cache_is_left_unchanged_by_the_probe():
    model = _build(gpt2)
    ids = _ids()

    def run(probed):
        cache = transformers.DynamicCache()
        model.zero_grad()
        if probed:
            with gradprobe.attach(model) as probe:
                model(ids, use_cache=True, **_with_cache(model, cache)).logits.pow(2).mean().backward()
            assert len(probe.frame()) == 3
        else:
            model(ids, use_cache=True, **_with_cache(model, cache)).logits.pow(2).mean().backward()
        return _cache_tensors(cache)

    bare, probed = run(False), run(True)
    assert len(bare) == 6 and len(bare) == len(probed)
    for a, b in zip(bare, probed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_spectral_columns_through_fused_attention_in_analyze_and_spectrum():
    # The CPU flash-attention kernel has no double backward; the passes gradprobe runs itself
    # (analyze, spectrum, the sub-batch pass) route attention through the math kernel instead.
    model = _build(gpt2)
    f = gradprobe.analyze(model, _ids(), probes=2, power_iters=4)
    assert np.isfinite(f[["jac_spec", "prod_spec"]].to_numpy(dtype=float)).all()
    emb = model.transformer.wte(_ids()).detach()
    blocks = model.transformer.h
    top = gradprobe.spectrum(torch.nn.Sequential(*blocks), (emb,), blocks=["0", "1"], k=2)
    assert np.isfinite(top).all() and top[0] >= top[1] > 0


@pytest.mark.parametrize("pass_cache", [True, False], ids=["user_cache", "internal_cache"])
def test_gpt2_dropout_and_key_value_cache_are_untouched_by_jacobian_columns(pass_cache):
    # Dropout on (the GPT-2 default, 0.1), training mode, use_cache=True. A cache object the user
    # passes in makes the call unsafe to re-run: the Jacobian columns then come from the
    # training graph (jac_batch 4). Without one, the model makes its own cache and the columns
    # come from a second forward pass on a sub-batch of 2, which must leave no trace either.
    cfg = transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    model = _build(lambda: transformers.GPT2LMHeadModel(cfg)).train()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))

    def run(probed):
        net = copy.deepcopy(model)
        cache = None
        torch.manual_seed(1)  # dropout masks: the same global RNG stream for both runs
        if pass_cache:
            cache = transformers.DynamicCache()
            with torch.no_grad():
                net(ids[:, :6], use_cache=True, **_with_cache(net, cache))
        opts = {"sub_batch": 2, "spec": True}
        probe = gradprobe.attach(net, jacobian=True, jacobian_options=opts) if probed else None
        try:
            out = net(ids[:, 6:] if pass_cache else ids, use_cache=True, **_with_cache(net, cache))
            loss = out.logits.pow(2).mean()
            loss.backward()
        finally:
            if probe is not None:
                probe.detach()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        return loss.item(), _cache_tensors(_out_cache(out)), grads, torch.get_rng_state(), probe

    with torch.random.fork_rng():
        bare, probed = run(False), run(True)
    assert bare[0] == probed[0]
    assert len(bare[1]) == 6 and all(torch.equal(a, b) for a, b in zip(bare[1], probed[1], strict=True))
    assert len(bare[2]) > 0 and all(torch.equal(a, b) for a, b in zip(bare[2], probed[2], strict=True))
    assert torch.equal(bare[3], probed[3])
    f = probed[4].frame()
    assert len(f) == 3 and np.isfinite(f[["jac_fro", "jac_id", "prod_fro"]].to_numpy(dtype=float)).all()
    assert (f["jac_batch"] == (4 if pass_cache else 2)).all()


def test_torchvision_resnets():
    try:
        import torchvision
    except Exception as exc:  # it fails to import beside the CPU build of torch 2.13 (operator nms missing)
        pytest.skip(f"torchvision does not import here: {type(exc).__name__}: {exc}")
    for factory, n_blocks in ((torchvision.models.resnet18, 8), (torchvision.models.resnet50, 16)):
        model = factory(weights=None)
        with gradprobe.attach(model) as probe:
            model(torch.randn(2, 3, 64, 64)).pow(2).mean().backward()
        assert len(probe.blocks) == n_blocks and probe.blocks[0] == "layer1.0"
        assert probe.frame()["grad_in"].map(math.isfinite).all()


def test_timm_resnet():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = timm.create_model("resnet18", pretrained=False)
    with gradprobe.attach(model) as probe:
        model(torch.randn(2, 3, 64, 64)).pow(2).mean().backward()
    assert probe.blocks[0] == "layer1.0" and len(probe.blocks) == 8
