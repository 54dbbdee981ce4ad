"""Datasets: digits split and standardisation, synthetic task, CIFAR-10 from a local folder, load()."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gradprobe import data
from gradprobe.data import Dataset, cifar10, digits, load, synthetic


def test_digits_shapes_split_and_types():
    ds = digits()
    assert (ds.n_train, ds.n_test) == (1437, 360)
    assert ds.input_shape == (1, 8, 8) and ds.in_channels == 1 and ds.in_features == 64
    assert ds.num_classes == 10 and ds.name == "digits"
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())


def test_digits_are_standardised_with_training_statistics():
    from sklearn.datasets import load_digits

    ds = digits(flat=True)
    x = ds.x_train.double()
    std = x.std(0, unbiased=False)
    varying = std > 0
    torch.testing.assert_close(x.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        std[varying], torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-5, rtol=0
    )
    # pixels that are blank in every training image stay exactly 0 (no NaN from 0/0)
    assert not x[:, ~varying].any() and torch.isfinite(ds.x_test).all()
    # the split is scikit-learn's stratified split with the seed; the test split uses the train statistics
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw_tr, raw_te, y_tr, y_te = train_test_split(
        bunch.data, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    mean, sd = raw_tr.mean(0), raw_tr.std(0)
    sd[sd == 0] = 1
    np.testing.assert_allclose(ds.x_test.numpy(), (raw_te - mean) / sd, rtol=1e-5, atol=1e-5)
    assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()


def test_digits_split_is_fixed_by_the_seed_and_stratified():
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    counts = torch.bincount(a.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # ~36 per class out of 360


def test_digits_flat_is_the_image_data_reshaped():
    img, flat = digits(), digits(flat=True)
    assert flat.input_shape == (64,)
    assert torch.equal(img.x_train.reshape(-1, 64), flat.x_train)
    assert torch.equal(img.flat().x_test, flat.x_test)


def test_synthetic_is_balanced_seeded_and_learnable():
    ds = synthetic(n_train=300, n_test=90, shape=(2, 4, 4), num_classes=3, seed=4)
    assert ds.input_shape == (2, 4, 4) and ds.num_classes == 3
    assert torch.bincount(ds.y_train).tolist() == [100, 100, 100]
    again = synthetic(n_train=300, n_test=90, shape=(2, 4, 4), num_classes=3, seed=4)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    assert not torch.equal(
        ds.x_train, synthetic(n_train=300, n_test=90, shape=(2, 4, 4), num_classes=3).x_train
    )
    # nearest class mean of the training split classifies the test split well: the task is learnable
    flat = ds.flat()
    means = torch.stack([flat.x_train[flat.y_train == k].mean(0) for k in range(3)])
    pred = torch.cdist(flat.x_test, means).argmin(1)
    assert float((pred == flat.y_test).float().mean()) > 0.9


def test_synthetic_does_not_touch_the_global_rng():
    state = torch.random.get_rng_state()
    synthetic()
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_train": 0}, "n_train"), ({"num_classes": 0}, "num_classes"), ({"shape": ()}, "shape")],
)
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic(**kwargs)


def test_dataset_validates_and_prints():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        Dataset(
            "d", x, torch.zeros(4, dtype=torch.long), torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), 2
        )
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        Dataset("d", x, torch.zeros(3, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 2)
    assert repr(synthetic(n_train=8, n_test=4, shape=(5,))) == (
        "Dataset('synthetic', train=8, test=4, input_shape=(5,), num_classes=4)"
    )


# ----------------------------------------------------------------------------- CIFAR-10


def _write_cifar_bin(folder, n_per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Fake CIFAR-10 binary batches: label byte + 3072 pixel bytes per record."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        y = rng.integers(0, 10, n_per_batch, dtype=np.uint8)
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        np.concatenate([y[:, None], x], axis=1).tofile(folder / name)
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def test_cifar10_binary_version_is_read_and_standardised_per_channel(tmp_path):
    images, labels = _write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    ds = cifar10(tmp_path)
    assert (ds.n_train, ds.n_test, ds.input_shape, ds.num_classes) == (30, 6, (3, 32, 32), 10)
    assert ds.y_train.tolist() == labels[:30].tolist() and ds.y_test.tolist() == labels[30:].tolist()
    raw = images[:30].astype(np.float64) / 255
    mean = raw.mean(axis=(0, 2, 3), keepdims=True)
    std = raw.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(ds.x_train.numpy(), (raw - mean) / std, rtol=1e-4, atol=1e-4)
    test_raw = images[30:].astype(np.float64) / 255  # the test split uses the training statistics
    np.testing.assert_allclose(ds.x_test.numpy(), (test_raw - mean) / std, rtol=1e-4, atol=1e-4)
    # the folder itself may be given, and load() accepts "cifar10:FOLDER"
    assert torch.equal(cifar10(tmp_path / "cifar-10-batches-bin").x_test, ds.x_test)
    assert load(f"cifar10:{tmp_path}", flat=True).input_shape == (3072,)


def test_cifar10_missing_folder_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*never downloads"):
        cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-10 in.*cifar-10-batches-bin"):
        cifar10(tmp_path)
    _write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3.bin"):
        cifar10(tmp_path)
    with pytest.raises(ValueError, match="needs its folder"):
        load("cifar10")


def test_cifar10_python_version_without_torchvision_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"torchvision is not installed.*pip install torchvision"):
        cifar10(tmp_path)


def test_cifar10_rejects_files_of_the_wrong_size(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar_bin(folder)
    (folder / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not CIFAR-10 binary batches"):
        cifar10(tmp_path)


# ----------------------------------------------------------------------------- load


def test_load_by_name_and_passthrough():
    assert load("digits").input_shape == (1, 8, 8)
    assert load("DIGITS", flat=True).input_shape == (64,)
    syn = load("synthetic", seed=3)
    assert torch.equal(syn.x_train, synthetic(seed=3).x_train)
    assert load(syn) is syn and load(syn, flat=True).input_shape == (64,)
    assert set(data.DATASETS) == {"digits", "synthetic", "cifar10"}


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*digits"):
        load("mnist")
    with pytest.raises(TypeError, match="dataset name"):
        load(3)  # type: ignore[arg-type]
