"""torchvision models built with ``weights=None``: exact auto blocks, a reference gradient, finite columns.

Marked ``torchvision`` (and ``slow``): CI runs them with ``-m torchvision`` in a second environment that has
torch 2.14.1 and torchvision 0.29.1 (torchvision's wheels do not load beside the CPU build of
torch 2.13 that the main environment uses). Without an importable torchvision they skip.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from reference import block_gradients

import gradprobe
from gradprobe.records import JACOBIAN_COLUMNS, METRIC_COLUMNS

# slow too: with its own 5.5 GB environment this part pushed CI past 20 minutes (README).
pytestmark = [pytest.mark.torchvision, pytest.mark.slow]

try:
    import torchvision
except Exception as exc:  # beside torch 2.13 CPU: RuntimeError "operator torchvision::nms does not exist"
    pytest.skip(f"torchvision does not import here: {type(exc).__name__}: {exc}", allow_module_level=True)

#: NaN by definition on a block whose output shape differs from its input's (glossary).
SHAPE_CHANGE_NAN = {"skip_grad", "branch_grad", "branch_cos", "jac_id"}


def _stages(prefix: str, depths: dict[int, int]) -> list[str]:
    return [f"{prefix}.{s}.{i}" for s, d in depths.items() for i in range(d)]


def _resnet_layers(depths: list[int]) -> list[str]:
    return [f"layer{s + 1}.{i}" for s, d in enumerate(depths) for i in range(d)]


def _random_head(model: torch.nn.Module) -> torch.nn.Module:
    # torchvision zero-initializes ViT's head: no gradient would reach the encoder (0/0 gains).
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


CASES: dict[str, tuple[Callable[[], torch.nn.Module], int, list[str], str, set[str]]] = {
    # name: (factory, image size, expected blocks, block checked against autograd, shape-changing blocks)
    "resnet18": (
        lambda: torchvision.models.resnet18(weights=None),
        64,
        _resnet_layers([2, 2, 2, 2]),
        "layer2.1",
        {"layer2.0", "layer3.0", "layer4.0"},
    ),
    "resnet50": (
        lambda: torchvision.models.resnet50(weights=None),
        64,
        _resnet_layers([3, 4, 6, 3]),
        "layer3.2",
        {"layer1.0", "layer2.0", "layer3.0", "layer4.0"},
    ),
    # features = [stem, stage, downsampling, stage, ...]: stems and downsampling layers are not blocks
    "convnext_tiny": (
        lambda: torchvision.models.convnext_tiny(weights=None),
        64,
        _stages("features", {1: 3, 3: 3, 5: 9, 7: 3}),
        "features.5.4",
        set(),
    ),
    "swin_t": (
        lambda: torchvision.models.swin_t(weights=None),
        64,
        _stages("features", {1: 2, 3: 2, 5: 6, 7: 2}),
        "features.3.1",
        set(),
    ),
    "vit_b_16": (
        lambda: _random_head(torchvision.models.vit_b_16(weights=None, image_size=64)),
        64,
        [f"encoder.layers.encoder_layer_{i}" for i in range(12)],
        "encoder.layers.encoder_layer_6",
        set(),
    ),
}


def test_auto_selection_on_mobile_nets():
    # inverted residuals hold Sequentials of conv-norm-activation units: the blocks are the residuals
    with torch.random.fork_rng():
        selected = {
            name: [n for n, _ in gradprobe.select_blocks(getattr(torchvision.models, name)(weights=None))]
            for name in ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")
        }
    assert selected == {
        "mobilenet_v2": [f"features.{i}" for i in range(1, 18)],
        "mobilenet_v3_small": [f"features.{i}" for i in range(1, 12)],
        "efficientnet_b0": _stages("features", {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 1}),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_torchvision_model_blocks_reference_gradient_and_finite_columns(name, no_leaks):
    factory, size, expected, check, shape_changing = CASES[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = no_leaks(factory())
    assert [n for n, _ in gradprobe.select_blocks(model)] == expected
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])

    def run() -> torch.Tensor:
        with torch.random.fork_rng():  # stochastic depth draws: the same in both passes
            torch.manual_seed(2)
            return torch.nn.functional.cross_entropy(model(x), labels)

    model.train()
    with gradprobe.attach(model, jacobian=True, jacobian_options={"sub_batch": 1, "spec": True}) as probe:
        run().backward()
    frame = probe.frame()
    assert probe.blocks == expected

    model.zero_grad()
    ref = block_gradients(model, check, run)
    row = frame[frame["block"] == check].iloc[0]
    assert row["grad_out"] == pytest.approx(ref["grad_out"], rel=1e-5)
    assert row["grad_in"] == pytest.approx(ref["grad_in"], rel=1e-5)

    # one step: update_ratio needs a previous one
    columns = [c for c in METRIC_COLUMNS + JACOBIAN_COLUMNS if c != "update_ratio"]
    bad = []
    for _, r in frame.iterrows():
        allowed = SHAPE_CHANGE_NAN if r["block"] in shape_changing else set()
        bad += [(r["block"], c) for c in columns if c not in allowed and not np.isfinite(r[c])]
    assert not bad, f"non-finite columns (block, column): {bad}"
