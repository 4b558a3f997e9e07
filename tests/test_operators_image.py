"""Image operators: exact adjoints, shapes and errors, masks carried in y, the classifier likelihood, build/config."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from aps.data import load_mnist, load_mnist_labels
from aps.errors import ApsError
from aps.operators import OPERATORS, build

IMAGE_OPS = ["denoise", "inpaint_box", "inpaint_random", "sr", "deblur", "cs", "classifier"]
# (name, params) of linear operators, over channel counts and sizes
LINEAR = [("denoise", {}), ("inpaint_box", {}), ("inpaint_random", {"p": 0.5}), ("sr", {"factor": 2}),
          ("sr", {"factor": 4}), ("deblur", {}), ("deblur", {"kernel_size": 5, "width": 0.7}), ("cs", {"m": 37})]
SHAPES = [(1, 32, 32), (3, 8, 12)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", LINEAR)
def test_adjoint_is_exact(name, params, shape):
    """<A x, y> == <x, A^T y> in float64, for random x and y."""
    op = build(name, image_shape=shape, **params)
    x = torch.randn(3, *shape, generator=gen(1), dtype=torch.float64)
    y = torch.randn(3, *op.y_shape, generator=gen(2), dtype=torch.float64)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert op(x).shape == y.shape and op.adjoint(y).shape == x.shape
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs) + 1e-10, (lhs, rhs)


def test_adjoint_random_mask_per_measurement():
    """fixed=False: A depends on the item's mask (carried in y); the adjoint reads it from y."""
    op = build("inpaint_random", image_shape=(2, 8, 8), p=0.4, fixed=False)
    x = torch.randn(4, 2, 8, 8, generator=gen(1), dtype=torch.float64)
    m = op.draw_mask(4, gen(3), "cpu").double()
    y = torch.cat([torch.randn(4, 2, 8, 8, generator=gen(2), dtype=torch.float64), m], 1)
    assert torch.isclose((op(x, mask=m) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-10)
    with pytest.raises(ApsError, match="mask changes per measurement"):
        op(x)


@pytest.mark.parametrize("name,params", LINEAR)
def test_matrix_matches_forward(name, params):
    op = build(name, image_shape=(1, 8, 8), **params)
    x = torch.randn(2, 1, 8, 8, generator=gen())
    assert torch.allclose((x.flatten(1) @ op.matrix().T).reshape(2, *op.y_shape), op(x), atol=1e-5)


def test_sr_and_deblur_closed_forms():
    sr = build("sr", image_shape=(1, 32, 32), factor=4)
    y = torch.randn(2, 1, 8, 8, generator=gen())
    assert torch.allclose(sr.adjoint(y), F.interpolate(y, scale_factor=4, mode="nearest") / 16)
    blur = build("deblur", image_shape=(1, 32, 32), kernel_size=9, width=2.0)
    assert torch.isclose(blur.kernel.sum(), torch.tensor(1.0))
    flat = torch.ones(1, 1, 32, 32)
    assert torch.allclose(blur(flat)[..., 4:-4, 4:-4], flat[..., 4:-4, 4:-4], atol=1e-6)  # zero padding only at the rim
    cs, cs2 = build("cs", image_shape=(1, 8, 8), m=20, seed=3), build("cs", image_shape=(1, 8, 8), m=20, seed=3)
    assert torch.equal(cs.A, cs2.A) and not torch.equal(cs.A, build("cs", image_shape=(1, 8, 8), m=20, seed=4).A)


@pytest.mark.parametrize("name", IMAGE_OPS[:-1])
def test_measure_shapes_and_seeding(name):
    op = build(name, image_shape=(1, 32, 32))
    x = load_mnist("test")[:5]
    y = op.measure(x, gen(7))
    assert y.shape == (5, *op.y_shape) and y.dtype == x.dtype
    assert torch.equal(y, op.measure(x, gen(7)))
    assert torch.equal(op.check_y(y), y)
    assert op.log_likelihood(y, x).shape == (5,)


def test_inpaint_box_mask_in_y():
    op = build("inpaint_box", image_shape=(3, 16, 16))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = op.measure(x, gen())
    assert y.shape == (2, 4, 16, 16)
    mask = y[:, 3]
    assert (mask[:, 4:12, 4:12] == 0).all() and mask.sum() == 2 * (256 - 64)  # centered box, half the side
    assert (y[:, :3][:, :, 4:12, 4:12] == 0).all()  # missing values are written as 0
    assert op.config()["box"] == [4, 4, 8, 8]
    with pytest.raises(ApsError, match="0/1 mask"):
        op.check_y(torch.cat([y[:, :3], 0.5 * y[:, 3:]], 1))


def test_inpaint_random_masks():
    x = load_mnist("test")[:64]
    fixed = build("inpaint_random", image_shape=(1, 32, 32), p=0.3)
    y = fixed.measure(x, gen())
    assert (y[:, 1] == y[0, 1]).all()  # one mask for all
    assert abs(y[0, 1].mean().item() - 0.3) < 0.06
    free = build("inpaint_random", image_shape=(1, 32, 32), p=0.3, fixed=False)
    y = free.measure(x, gen())
    assert not torch.equal(y[0, 1], y[1, 1])  # a mask per item
    assert abs(y[:, 1].mean().item() - 0.3) < 0.02
    assert ((y[:, :1] != 0) <= (y[:, 1:] == 1)).all()  # values only where observed


@pytest.mark.parametrize("fixed", [True, False])
def test_masked_log_likelihood_counts_observed_pixels(fixed):
    op = build("inpaint_random", image_shape=(2, 8, 8), p=0.5, fixed=fixed, sigma_y=0.1)
    x = torch.randn(3, 2, 8, 8, generator=gen(1))
    y = op.measure(x, gen(2))
    m = y[:, 2:].bool().expand(-1, 2, -1, -1)
    want = torch.stack([torch.distributions.Normal(x[i][m[i]], 0.1).log_prob(y[i, :2][m[i]]).sum() for i in range(3)])
    assert torch.allclose(op.log_likelihood(y, x), want, rtol=1e-5)
    x2 = torch.where(m, x, torch.randn_like(x) * 100)  # missing pixels do not matter
    assert torch.allclose(op.log_likelihood(y, x2), want, rtol=1e-5)


@pytest.mark.parametrize("name", IMAGE_OPS)
def test_shape_and_nan_errors(name):
    op = build(name, image_shape=(1, 32, 32))
    with pytest.raises(ApsError, match="wrong number of channels"):
        op.measure(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ApsError, match="wrong image size: 28x28"):
        op(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ApsError, match="missing batch dimension"):
        op.measure(torch.zeros(1, 32, 32))
    x = torch.zeros(2, 1, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ApsError, match="NaN"):
        op.measure(x)
    with pytest.raises(ApsError, match=f"^{name}: the measurement y must have shape"):
        op.check_y(torch.zeros(2, 5))
    with pytest.raises(ApsError, match="NaN"):
        op.check_y(torch.full((2, *op.y_shape), float("nan")))


def test_linear_adjoint_shape_error():
    op = build("sr", image_shape=(1, 32, 32), factor=4)
    with pytest.raises(ApsError, match=r"sr: y must have shape \(batch, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        op.adjoint(torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize("name,params,match", [
    ("sr", {"factor": 3}, "positive divisor"), ("deblur", {"kernel_size": 4}, "odd"),
    ("deblur", {"width": 0}, "width"), ("inpaint_random", {"p": 0}, "keep probability"),
    ("inpaint_box", {"box": [20, 20, 16, 16]}, "inside 32x32"), ("cs", {"m": 0}, "positive"),
    ("denoise", {"sigma_y": -1}, "sigma_y must be positive"), ("classifier", {"measure_mode": "max"}, "measure_mode"),
    ("classifier", {"sigma_y": 0.1}, "no meaning"), ("sr", {"nonsense": 1}, "unexpected keyword"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ApsError, match=match):
        build(name, image_shape=(1, 32, 32), **params)


@pytest.mark.parametrize("shape", [(32, 32), (1, 0, 32), "abc"])
def test_bad_image_shape(shape):
    with pytest.raises(ApsError, match="image_shape"):
        build("denoise", image_shape=shape)


def test_every_operator_registered_and_builds_by_name():
    assert set(IMAGE_OPS) <= set(OPERATORS)
    for name in IMAGE_OPS:
        op = build(name)  # default params: a 1x32x32 image
        assert op.x_shape == (1, 32, 32) and op.config()["name"] == name


@pytest.mark.parametrize("name", IMAGE_OPS)
def test_config_round_trip(name):
    params = {"inpaint_random": {"fixed": False, "seed": 5}, "cs": {"m": 50, "seed": 2}, "sr": {"factor": 2}}
    op = build(name, image_shape=(1, 32, 32), **params.get(name, {}))
    cfg = json.loads(json.dumps(op.config()))  # what a checkpoint stores
    op2 = build(**cfg)
    assert op2.config() == op.config() and type(op2) is type(op)
    x = load_mnist("test")[:3]
    y = op.measure(x, gen(1))
    assert torch.equal(y, op2.measure(x, gen(1)))
    assert torch.allclose(op.log_likelihood(y, x), op2.log_likelihood(y, x))


# --- the classifier operator -------------------------------------------------------------------


def test_classifier_likelihood_is_log_softmax():
    op = build("classifier", image_shape=(1, 32, 32))
    x = load_mnist("test")[:8]
    logits = op(x)
    assert logits.shape == (8, 10) and op.y_shape == () and op.sigma_y is None
    y = torch.arange(8) % 10
    want = F.log_softmax(op.net(x), 1)[torch.arange(8), y]
    assert torch.allclose(op.log_likelihood(y, x), want)
    assert torch.allclose(op.log_likelihood(y.float(), x), want)  # float labels work too
    total = sum(op.log_likelihood(torch.full((8,), c), x).exp() for c in range(10))
    assert torch.allclose(total, torch.ones(8))  # a normalised categorical over the 10 labels


def test_classifier_measure_and_accuracy():
    op = build("classifier")
    x, labels = load_mnist("test")[:200], load_mnist_labels("test")[:200]
    y = op.measure(x, gen(3))
    assert y.shape == (200,) and y.dtype == torch.int64 and torch.equal(y, op.measure(x, gen(3)))
    top = build("classifier", measure_mode="argmax").measure(x)
    assert torch.equal(top, op(x).argmax(1))
    assert (top == labels).float().mean() > 0.95  # held-out digits
    assert torch.equal(op.check_y(y.float()), y)
    with pytest.raises(ApsError, match="0..9"):
        op.check_y(torch.tensor([3, 10]))
    with pytest.raises(ApsError, match="whole class indices"):
        op.check_y(torch.tensor([0.5]))


def test_classifier_gradient_reaches_x_not_weights():
    op = build("classifier")
    op.train()  # a parent's .train() must leave the frozen net alone
    assert not op.net.training and not any(p.requires_grad for p in op.parameters())
    x = load_mnist("test")[:4].requires_grad_(True)
    op.log_likelihood(torch.tensor([0, 1, 2, 3]), x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_classifier_missing_checkpoint(tmp_path):
    with pytest.raises(ApsError, match="no config.json"):
        build("classifier", path=tmp_path)
    with pytest.raises(ApsError, match="trained on images"):
        build("classifier", image_shape=(1, 28, 28))


def test_classifier_checkpoint_is_small():
    from aps.operators.classifier import DEFAULT_PATH
    assert (DEFAULT_PATH / "model.safetensors").stat().st_size < 1e6
    assert math.isclose(json.loads((DEFAULT_PATH / "config.json").read_text())["n_classes"], 10)
