"""A model zoo: every architecture the README lists, built from a tiny config (offline, random weights).

For each model: the exact ``blocks="auto"`` selection; two SGD steps with losses and weights
identical (``torch.equal``) to a run without the probe; ``grad_in``/``grad_out`` of one block
equal to a reference taken with plain torch hooks and ``torch.autograd.grad`` (no gradprobe
code); every column finite where it is defined.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from reference import block_gradients
from torch import nn

import gradprobe
from gradprobe import models
from gradprobe.records import JACOBIAN_COLUMNS, METRIC_COLUMNS

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
transformers.logging.set_verbosity_error()
T = transformers

VOCAB = 64
#: Columns that are NaN by definition on a shape-changing block (the identity path does not
#: exist): skip_grad, branch_grad and branch_cos (glossary), and jac_id (J - I needs a square J).
SHAPE_CHANGE_NAN = {"skip_grad", "branch_grad", "branch_cos", "jac_id"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=_gen(seed))


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=_gen(seed), dtype=torch.float64)


def _labels(n: int = 3) -> torch.Tensor:
    return torch.tensor([0, n - 1])


def _decoder_lm(config_cls: Any, model_cls: Any, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return model_cls(
            config_cls(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=32,
                **extra,
            )
        )

    return build


def _lm_inputs() -> dict[str, Any]:
    ids = _ids()
    return {"input_ids": ids, "labels": ids}


def _loss(out: Any) -> torch.Tensor:
    return out.loss


def _hidden_loss(out: Any) -> torch.Tensor:
    return out.last_hidden_state.pow(2).mean()


def _t5() -> nn.Module:
    return T.T5ForConditionalGeneration(
        T.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )


def _whisper() -> nn.Module:
    return T.WhisperForConditionalGeneration(
        T.WhisperConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=16,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def _whisper_inputs() -> dict[str, Any]:
    # input length = 2 * max_source_positions (the second conv has stride 2)
    features = torch.randn(2, 8, 16, generator=_gen(0), dtype=torch.float64)
    return {"input_features": features, "labels": _ids(length=5, seed=1)}


def _swin() -> nn.Module:
    # depths [2, 1, 2]: the middle stage has a single layer, the first two end in a patch merging.
    return T.SwinForImageClassification(
        T.SwinConfig(
            image_size=32,
            patch_size=2,
            embed_dim=16,
            depths=[2, 1, 2],
            num_heads=[2, 2, 4],
            window_size=4,
            num_labels=3,
        )
    )


def _convnext() -> nn.Module:
    return T.ConvNextForImageClassification(
        T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 1], num_labels=3, patch_size=2)
    )


def _albert() -> nn.Module:
    return T.AlbertModel(
        T.AlbertConfig(
            vocab_size=VOCAB,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )


def _transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)


def _sequence(seed: int = 0) -> dict[str, Any]:
    return {"src": torch.randn(2, 8, 32, generator=_gen(seed), dtype=torch.float64)}


def _gpt2() -> nn.Module:
    cfg = T.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return T.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    return T.BertModel(
        T.BertConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=16,
        )
    )


def _vit() -> nn.Module:
    return T.ViTForImageClassification(
        T.ViTConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_labels=3,
        )
    )


def _hf_resnet() -> nn.Module:
    return T.ResNetForImageClassification(
        T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="bottleneck", num_labels=3
        )
    )


def _images_and_labels(size: int) -> Callable[[], dict[str, Any]]:
    return lambda: {"pixel_values": _images(size), "labels": _labels()}


def _positional(make: Callable[[], torch.Tensor]) -> Callable[[], dict[str, Any]]:
    return lambda: {"": make()}  # "" = the one positional argument


def _ce_loss(out: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, _labels())


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    loss: Callable[[Any], torch.Tensor]
    blocks: list[str]
    check: str  # the block whose grad_in/grad_out are compared with the autograd reference
    calls: int = 1
    dtype: torch.dtype = torch.float64
    #: Blocks whose output shape differs from their input's (SHAPE_CHANGE_NAN applies to them).
    shape_changing: set[str] = field(default_factory=set)


def _layers(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.{i}" for i in range(n)]


ZOO: dict[str, Case] = {
    "llama": Case(
        _decoder_lm(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2),
        _lm_inputs,
        _loss,
        _layers("model.layers", 2),
        "model.layers.1",
    ),
    "mistral": Case(
        _decoder_lm(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2, sliding_window=4),
        _lm_inputs,
        _loss,
        _layers("model.layers", 2),
        "model.layers.1",
    ),
    "qwen2": Case(
        _decoder_lm(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2),
        _lm_inputs,
        _loss,
        _layers("model.layers", 2),
        "model.layers.1",
    ),
    "gpt_neox": Case(
        _decoder_lm(T.GPTNeoXConfig, T.GPTNeoXForCausalLM),
        _lm_inputs,
        _loss,
        _layers("gpt_neox.layers", 2),
        "gpt_neox.layers.1",
    ),
    # Mixtral's experts are one fused module (3-D weights) in transformers 5, never blocks.
    "mixtral": Case(
        _decoder_lm(
            T.MixtralConfig,
            T.MixtralForCausalLM,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        _lm_inputs,
        _loss,
        _layers("model.layers", 2),
        "model.layers.1",
        dtype=torch.float32,  # the fused experts' grouped matmul has no float64 kernel
    ),
    "t5": Case(
        _t5,
        lambda: {"input_ids": _ids(), "labels": _ids(length=5, seed=1)},
        _loss,
        _layers("encoder.block", 2) + _layers("decoder.block", 2),
        "decoder.block.1",
    ),
    "whisper": Case(
        _whisper,
        _whisper_inputs,
        _loss,
        _layers("model.encoder.layers", 2) + _layers("model.decoder.layers", 2),
        "model.encoder.layers.1",
    ),
    "swin": Case(
        _swin,
        _images_and_labels(32),
        _loss,
        [f"swin.encoder.layers.{s}.blocks.{n}" for s, depth in enumerate([2, 1, 2]) for n in range(depth)],
        "swin.encoder.layers.2.blocks.0",
    ),
    "convnext": Case(
        _convnext,
        _images_and_labels(16),
        _loss,
        [*_layers("convnext.encoder.stages.0.layers", 2), "convnext.encoder.stages.1.layers.0"],
        "convnext.encoder.stages.0.layers.1",
    ),
    # ALBERT shares one layer between all depths: one block, called num_hidden_layers times.
    "albert": Case(
        _albert,
        lambda: {"input_ids": _ids()},
        _hidden_loss,
        ["encoder.albert_layer_groups.0.albert_layers.0"],
        "encoder.albert_layer_groups.0.albert_layers.0",
        calls=3,
    ),
    "transformer_encoder": Case(
        _transformer_encoder,
        _sequence,
        lambda out: out.pow(2).mean(),
        _layers("layers", 3),
        "layers.1",
    ),
    "gpt2": Case(_gpt2, _lm_inputs, _loss, _layers("transformer.h", 3), "transformer.h.1"),
    "bert": Case(
        _bert, lambda: {"input_ids": _ids()}, _hidden_loss, _layers("encoder.layer", 2), "encoder.layer.1"
    ),
    "vit": Case(_vit, _images_and_labels(8), _loss, _layers("vit.layers", 2), "vit.layers.1"),
    "hf_resnet": Case(
        _hf_resnet,
        _images_and_labels(32),
        _loss,
        [*_layers("resnet.encoder.stages.0.layers", 2), "resnet.encoder.stages.1.layers.0"],
        "resnet.encoder.stages.0.layers.1",
        # the first layer widens 8 -> 32 channels (bottleneck), the third also halves the resolution
        shape_changing={"resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"},
    ),
    "gradprobe_resnet_cifar": Case(
        lambda: models.resnet_cifar(8, width=4, num_classes=3, generator=_gen(0)),
        _positional(lambda: _images(8)),
        _ce_loss,
        ["layer1.0", "layer2.0", "layer3.0"],
        "layer2.0",
        shape_changing={"layer2.0", "layer3.0"},
    ),
    "gradprobe_mlp": Case(
        lambda: models.mlp(5, in_features=6, num_classes=3, width=16, norm="layer", generator=_gen(0)),
        _positional(lambda: torch.randn(2, 6, generator=_gen(0), dtype=torch.float64)),
        _ce_loss,
        _layers("blocks", 3),
        "blocks.1",
    ),
}


@pytest.fixture(scope="module")
def built() -> Callable[[str], nn.Module]:
    """Each model built once per module (seed 0, float64 unless said); tests work on deep copies."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                cache[name] = ZOO[name].build().to(ZOO[name].dtype)
        return copy.deepcopy(cache[name])

    return get


def _call(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model(inputs[""]) if "" in inputs else model(**inputs)


def _train(model: nn.Module, case: Case, steps: int = 2) -> list[torch.Tensor]:
    """SGD steps in training mode (dropout on), one seed for the whole run."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        for _ in range(steps):
            opt.zero_grad()
            loss = case.loss(_call(model, case.inputs()))
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
    return losses


def _reference(model: nn.Module, case: Case) -> dict[str, float]:
    """The reference on the forward pass of step 0: the first seed of ``_train``, the same inputs."""

    def run() -> torch.Tensor:
        model.train()
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return case.loss(_call(model, case.inputs()))

    return block_gradients(model, case.check, run)


def test_auto_selects_the_expected_blocks(built):
    # one test for the whole zoo (a dict diff names every model that differs)
    selected = {name: [n for n, _ in gradprobe.select_blocks(built(name))] for name in ZOO}
    assert selected == {name: case.blocks for name, case in ZOO.items()}


@pytest.mark.parametrize("name", list(ZOO))
def test_training_unchanged_reference_gradient_and_finite_columns(name, built, no_leaks):
    case = ZOO[name]
    plain = built(name)
    probed = no_leaks(built(name))
    expected = _train(plain, case)
    with gradprobe.attach(probed, jacobian=True, jacobian_options={"sub_batch": 1, "spec": True}) as probe:
        losses = _train(probed, case)
    # observational: the same losses and weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(expected, losses, strict=True)), (expected, losses)
    for (pname, p), q in zip(plain.named_parameters(), probed.parameters(), strict=True):
        assert torch.equal(p, q), pname
    assert probe.blocks == case.blocks
    frame = probe.frame()
    assert sorted(frame["step"].unique()) == [0, 1]

    # grad_in/grad_out of one block against plain autograd on step 0's forward pass
    ref = _reference(built(name), case)
    row = frame[(frame["step"] == 0) & (frame["block"] == case.check)].iloc[0]
    assert ref["calls"] == case.calls == row["calls"]
    assert row["grad_out"] == pytest.approx(ref["grad_out"], rel=1e-5)
    assert row["grad_in"] == pytest.approx(ref["grad_in"], rel=1e-5)

    # every column finite where it is defined: update_ratio needs a previous step
    columns = [c for c in METRIC_COLUMNS + JACOBIAN_COLUMNS if c != "update_ratio"]
    bad = []
    for _, r in frame.iterrows():
        allowed = SHAPE_CHANGE_NAN if r["block"] in case.shape_changing else set()
        bad += [(r["step"], r["block"], c) for c in columns if c not in allowed and not np.isfinite(r[c])]
    later = frame[frame["step"] == 1]
    pairs = zip(later["block"], later["update_ratio"], strict=True)
    bad += [(1, b, "update_ratio") for b, u in pairs if not np.isfinite(u)]
    assert not bad, f"non-finite columns (step, block, column): {bad}"
