"""Reference plain and residual networks, built in pairs whose blocks line up one to one.

* :func:`resnet_cifar` is the CIFAR ResNet of He et al. 2016 (depth 6n+2; three
  stages of widths w, 2w, 4w; BatchNorm; shortcut option "A" or "B" at stage
  transitions). It is laid out like torchvision's ResNets (``layer1.0``, ...), so
  ``blocks="auto"`` finds its blocks.
* :func:`preact_resnet_cifar` is the pre-activation ("identity mapping") CIFAR ResNet of
  He et al. 2016b: BN-ReLU-conv twice per block, an identity skip with nothing after the
  addition, and a final BN-ReLU before pooling. Same stages and depths as :func:`resnet_cifar`.
* :func:`mlp` is the same pairing for fully connected nets.

``residual=False`` gives the *plain* counterpart: the same block class with the
addition switched off (and no shortcut modules), so the plain and the residual
net have the same block names, the same number of blocks and the same layers
inside each block. Only the identity paths differ, which is the point of the
comparison.

Initialisation follows He et al. 2015 (Kaiming normal, fan-in, ReLU gain) for
every hidden weight, BatchNorm/LayerNorm scales 1 and shifts 0, and PyTorch's
default uniform init for the classifier. All randomness comes from the
``generator`` argument: building a model never reads or advances the global RNG
(layers are created on the meta device and initialised afterwards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "BasicBlock",
    "MLPBlock",
    "PadShortcut",
    "PreActBlock",
    "PreActResNetCIFAR",
    "ResNetCIFAR",
    "mlp",
    "preact_resnet_cifar",
    "resnet_cifar",
]

#: Activations accepted by :func:`mlp`, by name.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

# the gain names that torch.nn.init.calculate_gain understands, per activation
_INIT_NONLINEARITY: dict[str, Literal["relu", "tanh", "linear"]] = {
    "relu": "relu",
    "tanh": "tanh",
    "gelu": "relu",  # GELU/SiLU behave like ReLU for the variance of He init
    "silu": "relu",
    "identity": "linear",
}


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    # no bias: every conv is followed by BatchNorm, whose shift makes a bias redundant
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free shortcut "A" of He et al. 2016: subsample by ``stride``, zero-pad the channels.

    >>> PadShortcut(16, 32, stride=2)(torch.ones(1, 16, 8, 8)).shape
    torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 2):
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"PadShortcut can only add channels, got {in_planes} -> {planes}")
        self.in_planes, self.planes, self.stride = in_planes, planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.planes - self.in_planes
        # pad the channel dimension symmetrically, as in the reference CIFAR implementations
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_planes}->{self.planes}, stride={self.stride}, zero padding"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers; ``y = relu(F(x) + s(x))`` when residual, ``y = relu(F(x))`` when plain.

    ``F(x) = bn2(conv2(relu(bn1(conv1(x)))))``. ``s`` is the identity when the
    shapes agree, otherwise the ``shortcut`` child (projection "B": 1x1 conv +
    BN, or zero padding "A"). Plain blocks have no ``shortcut`` child at all.

    >>> block = BasicBlock(16, 16)
    >>> block(torch.rand(2, 16, 8, 8)).shape
    torch.Size([2, 16, 8, 8])
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        residual: bool = True,
        shortcut: Literal["A", "B"] = "B",
    ):
        super().__init__()
        self.residual = residual
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module | None = None
        if residual and (stride != 1 or in_planes != planes):
            if shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                self.shortcut = PadShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


def _add_stages(
    model: nn.Module,
    block: Callable[..., nn.Module],
    n: int,
    width: int,
    *,
    residual: bool,
    shortcut: Literal["A", "B"],
) -> None:
    """The three stages ``layer1``-``layer3`` of a CIFAR ResNet: n blocks each, widths w, 2w, 4w,
    the first block of stages 2 and 3 with stride 2 (registered on ``model`` in that order)."""
    planes_in = width
    for stage, planes in enumerate((width, 2 * width, 4 * width), start=1):
        blocks = []
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            blocks.append(block(planes_in, planes, stride, residual=residual, shortcut=shortcut))
            planes_in = planes
        model.add_module(f"layer{stage}", nn.Sequential(*blocks))


class ResNetCIFAR(nn.Module):
    """The CIFAR ResNet/plain net of He et al. 2016, Sec. 4.2. Build it with :func:`resnet_cifar`."""

    def __init__(
        self,
        depth: int,
        *,
        residual: bool,
        width: int,
        in_channels: int,
        num_classes: int,
        shortcut: Literal["A", "B"],
    ):
        super().__init__()
        n = (depth - 2) // 6
        self.depth, self.residual, self.width, self.shortcut_type = depth, residual, width, shortcut
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        _add_stages(self, BasicBlock, n, width, residual=residual, shortcut=shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    # typed accessors so that mypy knows the stages exist
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the stem ends in ReLU and so does every block: each block's input is non-negative,
        # which makes a zero-initialised identity block exactly the identity (relu(x + 0) = x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def __repr__(self) -> str:
        n = len(self.layer1)
        w = self.width
        kind = "residual" if self.residual else "plain"
        short = f", shortcut {self.shortcut_type} at stage transitions" if self.residual else ""
        params = sum(p.numel() for p in self.parameters())
        return (
            f"ResNetCIFAR(depth={self.depth}, {kind}, width={w}, {params:,} parameters\n"
            f"  stem:   conv3x3({self.conv1.in_channels}->{w}) + BN + ReLU\n"
            f"  layer1: {n} x BasicBlock({w}->{w})\n"
            f"  layer2: {n} x BasicBlock({2 * w}->{2 * w}), the first {w}->{2 * w} with stride 2{short}\n"
            f"  layer3: {n} x BasicBlock({4 * w}->{4 * w}), the first {2 * w}->{4 * w} with stride 2\n"
            f"  head:   global average pool + fc({4 * w}->{self.fc.out_features})\n"
            f"  blocks: y = relu(bn2(conv2(relu(bn1(conv1(x))))){' + x' if self.residual else ''})\n)"
        )


class PreActBlock(BasicBlock):
    """A pre-activation block: ``y = s(x) + F(x)`` when residual, ``y = F(x)`` when plain.

    ``F(x) = conv2(relu(bn2(conv1(relu(bn1(x))))))`` (He et al. 2016b, "full
    pre-activation"): nothing follows the addition, so with matching shapes the skip is
    the identity. ``s`` is the identity, or the ``shortcut`` child at a stage transition
    (``"B"``: a 1x1 conv; ``"A"``: :class:`PadShortcut`), applied to the block's own
    input. It subclasses :class:`BasicBlock` only so that gradprobe's tools treat its
    plain form (``residual=False``, no shortcut) as shortcut-free by design.

    >>> PreActBlock(16, 32, 2)(torch.rand(2, 16, 8, 8)).shape
    torch.Size([2, 32, 4, 4])
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        residual: bool = True,
        shortcut: Literal["A", "B"] = "B",
    ):
        nn.Module.__init__(self)  # a different layout from BasicBlock's: build it here
        self.residual = residual
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = None
        if residual and (stride != 1 or in_planes != planes):
            if shortcut == "B":
                self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            else:
                self.shortcut = PadShortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out


class PreActResNetCIFAR(nn.Module):
    """The pre-activation CIFAR ResNet/plain net of He et al. 2016b; see :func:`preact_resnet_cifar`."""

    def __init__(
        self,
        depth: int,
        *,
        residual: bool,
        width: int,
        in_channels: int,
        num_classes: int,
        shortcut: Literal["A", "B"],
    ):
        super().__init__()
        n = (depth - 2) // 6
        self.depth, self.residual, self.width, self.shortcut_type = depth, residual, width, shortcut
        self.conv1 = _conv3x3(in_channels, width)  # no BN-ReLU here: the first block starts with them
        _add_stages(self, PreActBlock, n, width, residual=residual, shortcut=shortcut)
        self.bn = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))  # the last block's output is a sum: activate it once before pooling
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def __repr__(self) -> str:
        n, w = len(self.layer1), self.width
        kind = "residual" if self.residual else "plain"
        short = f", shortcut {self.shortcut_type} at stage transitions" if self.residual else ""
        params = sum(p.numel() for p in self.parameters())
        return (
            f"PreActResNetCIFAR(depth={self.depth}, {kind}, width={w}, {params:,} parameters\n"
            f"  stem:   conv3x3({self.conv1.in_channels}->{w})\n"
            f"  layer1: {n} x PreActBlock({w}->{w})\n"
            f"  layer2: {n} x PreActBlock({2 * w}->{2 * w}), the first {w}->{2 * w} with stride 2{short}\n"
            f"  layer3: {n} x PreActBlock({4 * w}->{4 * w}), the first {2 * w}->{4 * w} with stride 2\n"
            f"  head:   BN + ReLU + global average pool + fc({4 * w}->{self.fc.out_features})\n"
            f"  blocks: y = {'x + ' if self.residual else ''}conv2(relu(bn2(conv1(relu(bn1(x))))))\n)"
        )


class MLPBlock(nn.Module):
    """One fully connected block: ``y = x + F(x)`` when residual, ``y = F(x)`` when plain.

    ``F(x) = norm(fc(act(x)))``: the activation comes first (pre-activation, He
    et al. 2016b), so the identity path carries no nonlinearity and a
    zero-initialised branch makes the block exactly the identity for any
    activation and any sign of ``x``. A chain of plain blocks is the usual
    Linear-norm-activation stack, shifted by half a layer.

    >>> MLPBlock(8, residual=True)(torch.zeros(3, 8)).shape
    torch.Size([3, 8])
    """

    def __init__(
        self,
        width: int,
        *,
        residual: bool = True,
        norm: Literal["batch", "layer"] | None = None,
        activation: str = "relu",
    ):
        super().__init__()
        self.residual = residual
        self.act = ACTIVATIONS[activation]()
        self.fc = nn.Linear(width, width)
        self.norm: nn.Module = _make_norm(norm, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.fc(self.act(x)))
        return x + out if self.residual else out

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


def _make_norm(norm: str | None, width: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm1d(width)
    return nn.LayerNorm(width)


class MLP(nn.Module):
    """Fully connected plain/residual net: ``stem`` -> ``blocks`` -> ``head``. Build it with :func:`mlp`."""

    def __init__(
        self,
        depth: int,
        *,
        width: int,
        in_features: int,
        num_classes: int,
        residual: bool,
        norm: Literal["batch", "layer"] | None,
        activation: str,
    ):
        super().__init__()
        self.depth, self.width, self.residual = depth, width, residual
        self.norm_type, self.activation = norm, activation
        self.stem = nn.Linear(in_features, width)
        self.stem_norm = _make_norm(norm, width)
        self.blocks = nn.Sequential(
            *(MLPBlock(width, residual=residual, norm=norm, activation=activation) for _ in range(depth - 2))
        )
        self.head_act = ACTIVATIONS[activation]()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_norm(self.stem(torch.flatten(x, 1)))
        return self.head(self.head_act(self.blocks(x)))

    def __repr__(self) -> str:
        kind = "residual" if self.residual else "plain"
        norm = {None: "", "batch": "BN", "layer": "LN"}[self.norm_type]
        params = sum(p.numel() for p in self.parameters())
        act = self.activation
        branch = f"{norm}(fc({act}(x)))" if norm else f"fc({act}(x))"
        return (
            f"MLP(depth={self.depth}, {kind}, width={self.width}, {params:,} parameters\n"
            f"  stem:   fc({self.stem.in_features}->{self.width}){' + ' + norm if norm else ''}\n"
            f"  blocks: {len(self.blocks)} x MLPBlock: y = {'x + ' if self.residual else ''}{branch}\n"
            f"  head:   {act} + fc({self.width}->{self.head.out_features})\n)"
        )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(generator).__name__}"
        )
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator; move the model to its device afterwards")
    return generator


def _materialise(model: nn.Module) -> nn.Module:
    """Give a meta-device model real (uninitialised) CPU storage; every tensor is then set by ``_init``."""
    return model.to_empty(device="cpu")


@torch.no_grad()
def _init(
    model: nn.Module, generator: torch.Generator, nonlinearity: Literal["relu", "tanh", "linear"]
) -> None:
    classifier = (
        getattr(model, "fc", None)
        if isinstance(model, (ResNetCIFAR, PreActResNetCIFAR))
        else getattr(model, "head", None)
    )
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module is not classifier:
            # He et al. 2015: N(0, 2/fan_in) keeps the forward variance of ReLU nets constant
            nn.init.kaiming_normal_(
                module.weight, mode="fan_in", nonlinearity=nonlinearity, generator=generator
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # the classifier keeps PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / module.in_features**0.5
            nn.init.uniform_(module.weight, -bound, bound, generator=generator)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.reset_parameters()  # weight 1, bias 0, running stats reset: no randomness
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False)):
            raise AssertionError(f"no init rule for {type(module).__name__}")  # pragma: no cover


_Net = TypeVar("_Net", bound=nn.Module)


def _cifar_net(
    cls: Callable[..., _Net],
    who: str,
    depth: int,
    residual: bool,
    width: int,
    in_channels: int,
    num_classes: int,
    shortcut: str,
    generator: torch.Generator | None,
) -> _Net:
    """A CIFAR ResNet of class ``cls`` with its arguments checked (``who`` names the function in
    the messages), built on the meta device and initialised from ``generator`` (He init)."""
    _check_int("depth", depth, 8)
    if (depth - 2) % 6:
        n = max(1, round((depth - 2) / 6))
        raise ValueError(
            f"{who} needs depth = 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}; "
            f"the nearest valid depths are {6 * n + 2} and {6 * (n + 1) + 2}"
        )
    _check_int("width", width, 1)
    _check_int("in_channels", in_channels, 1)
    _check_int("num_classes", num_classes, 1)
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' (zero padding) or 'B' (1x1 projection), got {shortcut!r}")
    gen = _generator(generator)
    with torch.device("meta"):
        model = cls(
            depth,
            residual=bool(residual),
            width=width,
            in_channels=in_channels,
            num_classes=num_classes,
            shortcut=shortcut,
        )
    _materialise(model)
    _init(model, gen, "relu")
    return model


def resnet_cifar(
    depth: int,
    *,
    residual: bool = True,
    width: int = 16,
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: Literal["A", "B"] = "B",
    zero_init_residual: bool = False,
    generator: torch.Generator | None = None,
) -> ResNetCIFAR:
    """The CIFAR ResNet of He et al. 2016 (``residual=True``) or its plain counterpart.

    ``depth`` = 6n+2 weighted layers (20, 32, 44, 56, 110): a 3x3 conv stem, three
    stages ``layer1``-``layer3`` of n :class:`BasicBlock` each (widths w, 2w, 4w;
    the first block of stages 2 and 3 halves the resolution), global average
    pooling and a linear classifier. Stage transitions use shortcut ``"B"``
    (1x1 conv + BN projection) or ``"A"`` (parameter-free zero padding); plain
    nets have no shortcuts at all. ``zero_init_residual=True`` zeroes the last
    BN scale of every residual branch, so every residual block with matching
    shapes is exactly the identity at initialisation. Weights are drawn from
    ``generator`` (default: ``torch.Generator().manual_seed(0)``); the global RNG
    is never used.

    >>> import torch
    >>> net = resnet_cifar(20, generator=torch.Generator().manual_seed(0))
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> [name for name, _ in net.named_children()][:4]
    ['conv1', 'bn1', 'relu', 'layer1']
    """
    model = _cifar_net(
        ResNetCIFAR, "resnet_cifar", depth, residual, width, in_channels, num_classes, shortcut, generator
    )
    if zero_init_residual and residual:
        with torch.no_grad():
            for block in model.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)
    return model


def preact_resnet_cifar(
    depth: int,
    *,
    residual: bool = True,
    width: int = 16,
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: Literal["A", "B"] = "B",
    zero_init_residual: bool = False,
    generator: torch.Generator | None = None,
) -> PreActResNetCIFAR:
    """The pre-activation CIFAR ResNet of He et al. 2016b (``residual=True``) or its plain counterpart.

    The layout of :func:`resnet_cifar` (depth 6n+2; a 3x3 conv stem, stages ``layer1``-``layer3``
    of n :class:`PreActBlock` each, widths w, 2w, 4w), with every block
    ``y = x + conv2(relu(bn2(conv1(relu(bn1(x))))))``: no ReLU after the addition, so the skips
    are identities and the net is a sum over paths. A final BN + ReLU precedes the global
    average pool and the linear classifier. Stage transitions use shortcut ``"B"`` (a 1x1
    conv) or ``"A"`` (zero padding); the plain net (``residual=False``) has none.
    ``zero_init_residual=True`` zeroes the last conv of every residual branch, so every
    residual block with matching shapes is exactly the identity at initialisation. Weights
    come from ``generator`` (default: ``torch.Generator().manual_seed(0)``), never the global RNG.

    >>> import torch
    >>> net = preact_resnet_cifar(20)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in preact_resnet_cifar(110).parameters())
    1730522
    """
    model = _cifar_net(
        PreActResNetCIFAR,
        "preact_resnet_cifar",
        depth,
        residual,
        width,
        in_channels,
        num_classes,
        shortcut,
        generator,
    )
    if zero_init_residual and residual:
        with torch.no_grad():
            for block in model.modules():
                if isinstance(block, PreActBlock):
                    nn.init.zeros_(block.conv2.weight)
    return model


def mlp(
    depth: int,
    *,
    in_features: int,
    num_classes: int,
    width: int = 128,
    residual: bool = True,
    norm: Literal["batch", "layer"] | None = "batch",
    activation: str = "relu",
    zero_init_residual: bool = False,
    generator: torch.Generator | None = None,
) -> MLP:
    """A fully connected residual net (``residual=True``) or its plain counterpart.

    ``depth`` counts the linear layers: a stem ``fc(in_features -> width)`` (+ norm),
    ``depth - 2`` :class:`MLPBlock` in the ``nn.Sequential`` ``blocks`` (each
    ``y = x + norm(fc(act(x)))``, or ``y = norm(fc(act(x)))`` when plain), and a
    head ``fc(act(x))`` to ``num_classes``. ``norm`` is ``"batch"`` (default,
    like the CNN), ``"layer"`` or ``None``. Without a norm a residual net's
    activations double in variance per block at He init, so deep ones need
    ``zero_init_residual=True``, which zeroes the branch's last scale (the norm's
    weight, or the linear weight when there is no norm) so that every block is
    exactly the identity at initialisation. ``activation`` is one of
    :data:`ACTIVATIONS`.

    >>> import torch
    >>> net = mlp(10, in_features=64, num_classes=10, generator=torch.Generator().manual_seed(0))
    >>> net(torch.randn(4, 64)).shape
    torch.Size([4, 10])
    >>> len(net.blocks)
    8
    """
    _check_int("depth", depth, 3)
    _check_int("width", width, 1)
    _check_int("in_features", in_features, 1)
    _check_int("num_classes", num_classes, 1)
    if norm not in (None, "batch", "layer"):
        raise ValueError(f"norm must be None, 'batch' or 'layer', got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    gen = _generator(generator)
    with torch.device("meta"):
        model = MLP(
            depth,
            width=width,
            in_features=in_features,
            num_classes=num_classes,
            residual=bool(residual),
            norm=norm,
            activation=activation,
        )
    _materialise(model)
    _init(model, gen, _INIT_NONLINEARITY[activation])
    if zero_init_residual and residual:
        with torch.no_grad():
            for block in model.blocks:
                assert isinstance(block, MLPBlock)
                last = block.norm if norm is not None else block.fc
                weight = last.weight
                assert isinstance(weight, torch.Tensor)
                nn.init.zeros_(weight)
    return model
