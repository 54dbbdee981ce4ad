"""Block selection: the "auto" rule on our nets, torchvision-style and Hugging Face models, names, globs."""

from __future__ import annotations

import pytest
import torch
from conftest import BasicBlock, ResCNN, ResMLPBlock, make
from torch import nn

from gradprobe.blocks import select_blocks


def names(model, blocks="auto"):
    return [n for n, _ in select_blocks(model, blocks)]


class TorchvisionLikeResNet(nn.Module):
    """torchvision's layout: layerN = Sequential of blocks whose projection child is ``downsample``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, 2), BasicBlock(8, 8))
        self.fc = nn.Linear(8, 10)


def test_auto_picks_residual_blocks_not_their_convs_nor_stages():
    assert names(TorchvisionLikeResNet()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert names(ResCNN()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_auto_on_a_sequential_of_identical_blocks():
    assert names(make("plain_mlp")) == ["0", "1", "2", "3"]
    assert names(nn.Sequential(*[ResMLPBlock(4) for _ in range(3)])) == ["0", "1", "2"]


def test_auto_looks_through_stages_that_are_sequentials_of_blocks():
    net = nn.Sequential(
        nn.Sequential(ResMLPBlock(4), ResMLPBlock(4)),
        nn.Sequential(ResMLPBlock(4), ResMLPBlock(4)),
    )
    assert names(net) == ["0.0", "0.1", "1.0", "1.1"]


def test_auto_finds_nothing_in_a_flat_sequential_and_lists_candidates():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"Candidate module names: 0, 2") as info:
        select_blocks(net)
    assert "blocks='auto'" in str(info.value)


def test_candidate_list_is_capped_at_twenty():
    net = nn.ModuleDict(
        {f"m{i}": nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)) for i in range(30)}
    )
    with pytest.raises(ValueError) as info:
        select_blocks(net, "zzz")
    listed = str(info.value).split("Candidate module names: ")[1].split(". Pass")[0].split(", ")
    assert len(listed) == 20


def test_names_globs_classes_and_predicates():
    net = TorchvisionLikeResNet()
    assert names(net, ["layer2.1", "layer1.0"]) == ["layer1.0", "layer2.1"]  # module order
    assert names(net, "layer*.*") == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert names(net, "layer1.**") == [n for n, _ in net.named_modules() if n.startswith("layer1.")]
    assert names(net, BasicBlock) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert names(net, (nn.Linear, nn.BatchNorm2d))[0] == "bn1"
    assert names(net, lambda n, m: n.endswith(".conv2")) == [
        f"layer{i}.{j}.conv2" for i in (1, 2) for j in (0, 1)
    ]


def test_bad_block_specs():
    net = make("res_mlp")
    with pytest.raises(ValueError, match="empty list"):
        select_blocks(net, [])
    with pytest.raises(TypeError, match="blocks= must be"):
        select_blocks(net, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        select_blocks(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer9"):
        select_blocks(net, ["0", "layer9"])


transformers = pytest.importorskip("transformers")


def _quiet(factory):
    transformers.logging.set_verbosity_error()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory()


def test_auto_on_hugging_face_gpt2_bert_vit():
    gpt2 = _quiet(
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
        )
    )
    assert names(gpt2) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    bert = _quiet(
        lambda: transformers.BertModel(
            transformers.BertConfig(
                num_hidden_layers=2,
                hidden_size=16,
                num_attention_heads=2,
                intermediate_size=32,
                vocab_size=50,
            )
        )
    )
    assert names(bert) == ["encoder.layer.0", "encoder.layer.1"]
    vit = _quiet(
        lambda: transformers.ViTModel(
            transformers.ViTConfig(
                num_hidden_layers=2,
                hidden_size=16,
                num_attention_heads=2,
                intermediate_size=32,
                image_size=8,
                patch_size=4,
            )
        )
    )
    assert names(vit) == ["encoder.layer.0", "encoder.layer.1"] or names(vit) == ["layers.0", "layers.1"]


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_auto_on_hugging_face_resnet_picks_its_layers(layer_type):
    net = _quiet(
        lambda: transformers.ResNetModel(
            transformers.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type=layer_type
            )
        )
    )
    assert names(net) == [
        "encoder.stages.0.layers.0",
        "encoder.stages.0.layers.1",
        "encoder.stages.1.layers.0",
    ]
