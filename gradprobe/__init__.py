"""gradprobe: measure gradient propagation and identity behaviour of the blocks of deep PyTorch nets.

>>> import torch, torch.nn as nn, gradprobe
>>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
>>> with gradprobe.attach(net) as probe:
...     net(torch.randn(4, 8)).sum().backward()
>>> probe.blocks
['0', '1', '2']
"""

from ._version import __version__
from .analysis import analyze
from .blocks import select_blocks
from .probe import Probe, attach, every_n
from .records import Run, load

__all__ = ["Probe", "Run", "__version__", "analyze", "attach", "every_n", "load", "select_blocks"]
