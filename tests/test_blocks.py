"""Block selection: the "auto" rule on our nets, torchvision-style and Hugging Face models, names, globs."""

from __future__ import annotations

import pytest
import torch
from nets import BasicBlock, ResCNN, ResMLPBlock, deep_res_mlp, make, python_calls
from torch import nn

from gradprobe.blocks import auto_blocks, select_blocks


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


def test_auto_picks_the_run_of_blocks_in_a_flat_sequential_with_stem_and_head():
    net = nn.Sequential(
        nn.Linear(6, 4),
        nn.LayerNorm(4),
        nn.ReLU(),
        ResMLPBlock(4),
        ResMLPBlock(4),
        ResMLPBlock(4),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    assert names(net) == ["3", "4", "5"]
    assert {b.run for b in auto_blocks(net)} == {"<root>[3..5]"}


def test_auto_picks_the_values_of_a_module_dict_of_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 4)
            self.blocks = nn.ModuleDict({k: ResMLPBlock(4) for k in ("first", "second", "third")})
            self.head = nn.Linear(4, 2)

    assert names(Net()) == ["blocks.first", "blocks.second", "blocks.third"]
    assert auto_blocks(Net())[0].run == "blocks[first..third]"


def test_runs_need_two_consecutive_members_with_parameters():
    # Linear, Tanh, Linear: no two consecutive children of one class -> no run.
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    with pytest.raises(ValueError, match="selected no module"):
        select_blocks(net)
    # two parameter-free children of one class are not a run either
    net = nn.Sequential(nn.ReLU(), nn.ReLU(), ResMLPBlock(4))
    with pytest.raises(ValueError, match="selected no module"):
        select_blocks(net)


class Stage(nn.Module):
    """A stage in the Hugging Face layout: a list of layers plus a downsampling layer."""

    def __init__(self, depth, downsample=True):
        super().__init__()
        self.blocks = nn.ModuleList([ResMLPBlock(8) for _ in range(depth)])
        if downsample:
            self.downsample = nn.Linear(8, 8)


class StagedNet(nn.Module):
    def __init__(self, depths):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.stages = nn.ModuleList([Stage(d, i < len(depths) - 1) for i, d in enumerate(depths)])
        self.head = nn.Linear(8, 2)


def test_stages_are_looked_through_with_one_granularity():
    # Swin's layout: a stage is selected neither beside another stage's layers nor instead of them,
    # and a stage of depth 1 contributes its one layer.
    assert names(StagedNet([2, 1, 3])) == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.blocks.0",
        "stages.2.blocks.0",
        "stages.2.blocks.1",
        "stages.2.blocks.2",
    ]
    runs = {b.name: b.run for b in auto_blocks(StagedNet([2, 1, 3]))}
    assert runs["stages.1.blocks.0"] == "stages.1.blocks[0]"
    assert runs["stages.2.blocks.2"] == "stages.2.blocks[0..2]"


def test_a_residual_block_holding_a_run_of_conv_layers_is_a_block_not_a_stage():
    # Hugging Face ResNet's basic layer: shortcut, a Sequential of two conv layers, an activation.
    class ConvLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Linear(4, 4)
            self.act = nn.ReLU()

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.shortcut = nn.Identity()
            self.layer = nn.Sequential(ConvLayer(), ConvLayer())
            self.activation = nn.ReLU()

    assert names(nn.Sequential(Residual(), Residual())) == ["0", "1"]


class ConvNormAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: a Sequential subclass."""

    def __init__(self):
        super().__init__(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU())


class InvertedResidualV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(ConvNormAct(), ConvNormAct(), nn.Linear(4, 4), nn.LayerNorm(4))


class InvertedResidualV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(ConvNormAct(), ConvNormAct(), ConvNormAct())


@pytest.mark.parametrize("block", [InvertedResidualV2, InvertedResidualV3])
def test_mobilenet_inverted_residuals_are_blocks_not_stages(block):
    # features = [stem, InvertedResidual x N, last conv]: the blocks, not the conv units inside them
    net = nn.Sequential(ConvNormAct(), *[block() for _ in range(3)], ConvNormAct())
    assert names(net) == ["1", "2", "3"]


def test_a_list_of_parallel_heads_inside_a_layer_does_not_make_the_layer_a_stage():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 2) for _ in range(4)])  # 72 weights
            self.mlp = MLP()  # 552 weights: the heads hold less than half of the layer

    assert names(nn.ModuleList([Layer(), Layer()])) == ["0", "1"]


def test_a_shared_layer_alone_in_a_layer_group_is_selected():
    # ALBERT's layout: one layer group holding one layer, called once per depth.
    class Group(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([ResMLPBlock(4)])

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 4)
            self.groups = nn.ModuleList([Group()])

    assert [(b.name, b.run) for b in auto_blocks(Encoder())] == [("groups.0.layers.0", "groups.0.layers[0]")]


def test_a_one_layer_head_is_not_a_block():
    # torchvision's ViT: heads = Sequential(head=Linear) beside the encoder's layers.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(ResMLPBlock(4), ResMLPBlock(4))
            self.heads = nn.Sequential(nn.Linear(4, 2))

    assert names(Net()) == ["layers.0", "layers.1"]


def test_weight_parametrizations_are_not_blocks():
    # wav2vec2's positional conv is weight-normed: conv.parametrizations.weight is a one-entry
    # ModuleDict holding a composite module with parameters, which must not pass for a block.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1))
            self.layers = nn.ModuleList([ResMLPBlock(4), ResMLPBlock(4)])

    assert names(Net()) == ["layers.0", "layers.1"]


def test_auto_selection_calls_grow_linearly_with_the_blocks():
    # blocks="auto" asked of every candidate whether any other one held it, and of every selected
    # block whether an earlier one had its name: calls in the square of the blocks, seconds of
    # attaching at 2,000 blocks. Eight times the blocks now make at most eight times the calls
    # (and a constant).
    small, large = deep_res_mlp(40), deep_res_mlp(320)
    auto_blocks(deep_res_mlp(2))  # (nothing imported on a first call is counted)
    assert [b.name for b in auto_blocks(large)] == [str(i) for i in range(320)]
    ratio = python_calls(lambda: auto_blocks(large)) / python_calls(lambda: auto_blocks(small))
    assert ratio < 9


def test_auto_blocks_agrees_with_select_blocks():
    for net in (TorchvisionLikeResNet(), ResCNN(), make("plain_mlp"), StagedNet([1, 2])):
        assert [b.name for b in auto_blocks(net)] == names(net)
        assert all(b.module is dict(net.named_modules())[b.name] for b in auto_blocks(net))
    with pytest.raises(ValueError, match="selected no module"):
        auto_blocks(nn.Linear(2, 2))


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
