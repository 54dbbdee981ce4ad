"""The Jacobian passes on captured blocks: spectrum between any modules, and real models under
non-reentrant activation checkpointing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.jacobian import dense_jacobian

F64 = torch.float64


def _net() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        return nn.Sequential(nn.Linear(3, 4), inner, nn.Tanh(), nn.Linear(4, 2)).double()


def test_spectrum_between_any_modules_not_only_selected_blocks():
    net = _net()
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    # "1.0" and "3" are no blocks of blocks=["0", "1"]: blocks= only sets the defaults
    got = gradprobe.spectrum(net, x, start="1.0", end="3", blocks=["0", "1"])
    h = net[0](x).detach().requires_grad_(True)
    y = net[3](net[2](net[1](h)))
    exact = torch.linalg.svdvals(dense_jacobian(y, h).double()).numpy()
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)
    # a nested module as start, the default end (the last selected block called)
    got = gradprobe.spectrum(net, x, start="1.2", blocks=["0", "1"])
    h2 = net[1][1](net[1][0](net[0](x))).detach().requires_grad_(True)
    exact = torch.linalg.svdvals(dense_jacobian(net[1][2](h2), h2).double()).numpy()
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not a module of the model"):
        gradprobe.spectrum(net, x, start="9")


transformers = pytest.importorskip("transformers", reason="transformers is not installed")
transformers.logging.set_verbosity_error()


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _train(model, probe_kwargs=None, steps=3):
    ids = torch.randint(0, 64, (6, 6), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, probe = [], None
    if probe_kwargs is not None:
        probe = gradprobe.attach(model, blocks=["model.layers.*"], **probe_kwargs)
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        if probe is not None:
            probe.detach()
    return losses, probe


@pytest.mark.parametrize("sub_batch", [4, None], ids=["sub_batch", "training_graph"])
def test_llama_checkpointing_gives_finite_jacobian_columns_on_every_jacobian_step(sub_batch):
    """Regression: on spectral steps the sub-batch pass ran attention through the math kernel, the
    Jacobian passes' recomputation through the fused one: CheckpointError, every column NaN."""
    bare, _ = _train(_llama())
    options = {"sub_batch": sub_batch, "spec": 2}
    with pytest.warns() as caught:  # the training-graph route warns that its fused attention has no JVP
        losses, probe = _train(_llama(), {"jacobian": True, "probes": 2, "jacobian_options": options})
    assert not any("CheckpointError" in str(w.message) for w in caught)
    assert losses == bare  # bit-identical training
    frame = probe.frame()
    assert len(frame) == 6
    assert set(frame["stack"]) == {"model.layers"}  # checkpointed layers are still one chain
    assert frame["jac_fro"].map(math.isfinite).all(), frame[["step", "block", "jac_fro"]]
    assert frame["prod_fro"].map(math.isfinite).all()
    spectral = frame[frame["step"] == 1]  # spec=2: the second Jacobian step of every two
    if sub_batch is not None:  # our own pass runs the math kernel: the spectral columns exist too
        assert spectral["jac_spec"].map(math.isfinite).all()
        assert (frame["jac_batch"] == 4).all()
    assert frame.loc[frame["step"].isin([0, 2]), "jac_spec"].isna().all()  # not spectral steps
