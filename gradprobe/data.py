"""Datasets for the reference experiment, held in memory as tensors. Nothing downloads.

* :func:`digits` (the default): scikit-learn's bundled handwritten digits, 1,797
  8x8 images in 10 classes, standardised and split into train and test with a
  fixed seed. Small enough that a 56-layer net trains on 2 CPU cores in a minute.
* :func:`synthetic`: a Gaussian class-prototype task for tests, any shape.
* :func:`cifar10`: CIFAR-10 from a folder the user already has, either the binary
  version (``cifar-10-batches-bin``, read directly) or the Python version
  (``cifar-10-batches-py``, read through torchvision, which is then required).

Every loader returns a :class:`Dataset`; :func:`load` picks one by name.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "cifar10", "digits", "load", "synthetic"]

#: Names accepted by :func:`load` (and ``gradprobe compare --data``).
DATASETS: tuple[str, ...] = ("digits", "synthetic", "cifar10")


@dataclass(frozen=True, repr=False)
class Dataset:
    """Train and test tensors of a classification task.

    ``x_*`` are float32 of shape ``(n, *input_shape)``, ``y_*`` int64 class
    indices in ``[0, num_classes)``.

    >>> ds = synthetic(n_train=8, n_test=4, shape=(1, 2, 2), num_classes=2)
    >>> ds.input_shape, ds.in_channels, ds.in_features, ds.flat().input_shape
    ((1, 2, 2), 1, 4, (4,))
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"train and test inputs differ in shape: {tuple(self.x_train.shape)} vs "
                f"{tuple(self.x_test.shape)}"
            )
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if len(x) != len(y):
                raise ValueError(f"{split}: {len(x)} inputs but {len(y)} labels")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 8, 8)`` for digits images or ``(64,)`` for flat digits."""
        return tuple(self.x_train.shape[1:])

    @property
    def in_channels(self) -> int:
        """Channels of an image input (the first dimension of :attr:`input_shape`)."""
        return self.input_shape[0]

    @property
    def in_features(self) -> int:
        """Number of values in one input: what an MLP's first layer takes."""
        return math.prod(self.input_shape)

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    def flat(self) -> Dataset:
        """The same data with every input flattened to a vector (for MLPs)."""
        return Dataset(
            self.name,
            self.x_train.reshape(self.n_train, -1),
            self.y_train,
            self.x_test.reshape(self.n_test, -1),
            self.y_test,
            self.num_classes,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.n_train}, test={self.n_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _standardise(train: np.ndarray, test: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    # statistics of the training split only, so nothing about the test set leaks into training
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    std[std == 0] = 1.0  # constant inputs (digits' always-blank border pixels) stay 0 instead of NaN
    return (train - mean) / std, (test - mean) / std


def digits(*, flat: bool = False, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits: 1,797 8x8 grey images of 0-9, bundled, no download.

    Each pixel is standardised with the training split's mean and standard
    deviation; the split is stratified and fixed by ``seed`` (1,437 train and
    360 test images by default). Inputs are ``(1, 8, 8)`` images, or 64-vectors
    with ``flat=True``.

    >>> ds = digits()
    >>> ds
    Dataset('digits', train=1437, test=360, input_shape=(1, 8, 8), num_classes=10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_tr, x_te = _standardise(x_tr, x_te, axis=(0,))
    shape = (64,) if flat else (1, 8, 8)
    return Dataset(
        "digits",
        torch.from_numpy(x_tr.astype(np.float32)).reshape(-1, *shape),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te.astype(np.float32)).reshape(-1, *shape),
        torch.from_numpy(y_te),
        10,
    )


def synthetic(
    *,
    n_train: int = 256,
    n_test: int = 64,
    shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 4,
    noise: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """A small learnable task for tests: Gaussian noise around one random prototype per class.

    Classes are balanced (labels cycle through the classes, then are shuffled).
    All randomness comes from a ``torch.Generator`` seeded with ``seed``.

    >>> ds = synthetic(n_train=6, n_test=3, shape=(5,), num_classes=3)
    >>> ds.x_train.shape, sorted(ds.y_train.tolist())
    (torch.Size([6, 5]), [0, 0, 1, 1, 2, 2])
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=gen)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        return prototypes[y] + noise * torch.randn(n, *shape, generator=gen), y

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return Dataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes)


_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 3072 pixel bytes (R, G, B planes)


def _read_cifar_bin(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    if raw.size % _CIFAR_RECORD:
        raise ValueError(f"{files} are not CIFAR-10 binary batches (size not a multiple of {_CIFAR_RECORD})")
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _cifar_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    bin_dir = next(
        (d for d in (folder, folder / "cifar-10-batches-bin") if (d / "test_batch.bin").exists()),
        None,
    )
    if bin_dir is not None:
        train_files = [bin_dir / f"data_batch_{i}.bin" for i in range(1, 6)]
        missing = [f.name for f in train_files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 binary folder {bin_dir} lacks {', '.join(missing)}")
        x_tr, y_tr = _read_cifar_bin(train_files)
        x_te, y_te = _read_cifar_bin([bin_dir / "test_batch.bin"])
        return x_tr, y_tr, x_te, y_te
    py_root = next((d for d in (folder, folder.parent) if (d / "cifar-10-batches-py").is_dir()), None)
    if py_root is None:
        raise FileNotFoundError(
            f"no CIFAR-10 in {folder}: expected cifar-10-batches-bin/ (binary version, read directly) "
            "or cifar-10-batches-py/ (Python version, needs torchvision). gradprobe never downloads; "
            "get it from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there."
        )
    try:
        from torchvision.datasets import CIFAR10  # optional dependency
    except ImportError:
        raise ImportError(
            f"{py_root / 'cifar-10-batches-py'} is the Python (pickle) version of CIFAR-10, which "
            "gradprobe reads through torchvision, and torchvision is not installed. Install it "
            "(`pip install torchvision`) or use the binary version (cifar-10-batches-bin), which needs "
            "nothing extra."
        ) from None
    train = CIFAR10(str(py_root), train=True, download=False)
    test = CIFAR10(str(py_root), train=False, download=False)
    return (
        np.asarray(train.data).transpose(0, 3, 1, 2),
        np.asarray(train.targets, dtype=np.int64),
        np.asarray(test.data).transpose(0, 3, 1, 2),
        np.asarray(test.targets, dtype=np.int64),
    )


def cifar10(root: str | os.PathLike[str], *, flat: bool = False) -> Dataset:
    """CIFAR-10 (50,000 train, 10,000 test 3x32x32 images) from a local folder; never downloads.

    ``root`` holds ``cifar-10-batches-bin/`` (read directly with numpy) or
    ``cifar-10-batches-py/`` (read with torchvision, an optional dependency).
    Pixels are standardised per channel with the training set's statistics.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 folder {folder} does not exist; pass the folder that holds cifar-10-batches-bin/ "
            "or cifar-10-batches-py/ (gradprobe never downloads)"
        )
    x_tr, y_tr, x_te, y_te = _cifar_arrays(folder)
    xf_tr, xf_te = _standardise(x_tr.astype(np.float32) / 255, x_te.astype(np.float32) / 255, axis=(0, 2, 3))
    ds = Dataset(
        "cifar10",
        torch.from_numpy(np.ascontiguousarray(xf_tr, dtype=np.float32)),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(xf_te, dtype=np.float32)),
        torch.from_numpy(y_te),
        10,
    )
    return ds.flat() if flat else ds


def load(
    name: str | Dataset,
    *,
    flat: bool = False,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Dataset:
    """A dataset by name: ``"digits"``, ``"synthetic"``, ``"cifar10"`` (with ``root``) or ``"cifar10:DIR"``.

    A :class:`Dataset` passes through (flattened when ``flat``). ``seed`` fixes
    the train/test split of digits and the draw of synthetic.

    >>> load("digits", flat=True).input_shape
    (64,)
    """
    if isinstance(name, Dataset):
        return name.flat() if flat else name
    if not isinstance(name, str):
        raise TypeError(
            f"data must be a dataset name {DATASETS} or a gradprobe.data.Dataset, got {type(name)}"
        )
    key, _, path = name.partition(":")
    key = key.strip().lower()
    if key == "digits":
        return digits(flat=flat, seed=seed)
    if key == "synthetic":
        ds = synthetic(seed=seed)
        return ds.flat() if flat else ds
    if key in ("cifar10", "cifar-10"):
        folder = path or root
        if not folder:
            raise ValueError("cifar10 needs its folder: load('cifar10', root=DIR) or load('cifar10:DIR')")
        return cifar10(folder, flat=flat)
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (cifar10 as cifar10:FOLDER)"
    )
