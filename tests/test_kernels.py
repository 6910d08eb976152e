"""The Rust kernels against the pure-PyTorch reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

import wandapp
from wandapp import kernels

import reference
from conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 13), (64, 128), (16, 4096), (4, 11008)]


def fresh(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_unstructured_mask_matches_reference_and_counts(shape, dtype, sparsity, device):
    scores = fresh(shape, dtype, device, seed=hash((shape, sparsity)) % 1000).abs()
    mask = kernels.unstructured_mask(scores, sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == scores.device
    assert torch.equal(mask.cpu(), reference.unstructured_mask(scores.cpu(), sparsity))
    pruned = (~mask).sum(dim=1)
    assert torch.all(pruned == reference.pruned_per_row(shape[1], sparsity))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 8), (64, 128), (16, 4096)])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_reference_and_every_group_is_valid(shape, dtype, nm, device):
    n, m = nm
    scores = fresh(shape, dtype, device, seed=shape[1] + n)
    mask = kernels.nm_mask(scores, n, m)
    assert torch.equal(mask.cpu(), reference.nm_mask(scores.cpu(), n, m))
    assert torch.all(mask.view(shape[0], -1, m).sum(dim=2) == n)


def test_ties_follow_the_documented_rule():
    ties = torch.ones(2, 8)
    assert torch.equal(kernels.unstructured_mask(ties, 0.5)[0], torch.tensor([False] * 4 + [True] * 4))
    assert torch.equal(kernels.nm_mask(ties, 2, 4)[0], torch.tensor([False, False, True, True] * 2))
    # -0.0 and 0.0 are the same score
    signed = torch.tensor([[0.0, -0.0, 0.0, -0.0]])
    assert torch.equal(kernels.unstructured_mask(signed, 0.5), torch.tensor([[False, False, True, True]]))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = fresh((256, 96), torch.float32, device, seed=5)
    scores = base.t()  # [96, 256], not contiguous
    assert not scores.is_contiguous()
    assert torch.equal(kernels.unstructured_mask(scores, 0.5).cpu(), reference.unstructured_mask(scores.cpu(), 0.5))
    assert torch.equal(kernels.nm_mask(scores, 2, 4).cpu(), reference.nm_mask(scores.cpu(), 2, 4))
    w, a = base.t(), fresh((256,), torch.float32, device, seed=6).abs()
    assert torch.equal(kernels.wanda_score(w, a), w.abs() * a[None, :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_match_reference(dtype, device):
    w = fresh((48, 80), dtype, device, seed=1)
    g = fresh((48, 80), dtype, device, seed=2).abs()
    a = fresh((80,), torch.float32, device, seed=3).abs()
    wanda = kernels.wanda_score(w, a)
    assert wanda.dtype == torch.float32
    torch.testing.assert_close(wanda, w.float().abs() * a[None, :], rtol=0, atol=0)
    rgs = kernels.rgs_score(w, g, a, alpha=100.0)
    torch.testing.assert_close(rgs, (100.0 * g.float() + a[None, :]) * w.float().abs(), rtol=1e-6, atol=0)
    torch.testing.assert_close(kernels.magnitude_score(w), w.float().abs(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mask_is_in_place_and_keeps_autograd(dtype, device):
    w = torch.nn.Parameter(fresh((32, 64), dtype, device, seed=4))
    before = w.detach().clone()
    ptr = w.data_ptr()
    mask = kernels.unstructured_mask(w.detach().float().abs(), 0.5)
    kernels.apply_mask_(w, mask)
    assert w.data_ptr() == ptr
    assert torch.equal(w.detach(), before * mask)
    assert w.requires_grad and w.grad is None
    x = torch.ones(64, dtype=dtype, device=device)
    (w @ x).float().sum().backward()
    assert w.grad is not None and torch.all(w.grad == 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_stats_match_float64_reference(dtype, device):
    stats = kernels.ActivationStats(24)
    xs, masks = [], []
    for b in range(3):
        x = fresh((2, 10 + b, 24), dtype, device, seed=10 + b)
        m = torch.ones(2, 10 + b, dtype=torch.bool, device=device)
        m[1, -3:] = False
        stats.update(x, m)
        xs.append(x.cpu())
        masks.append(m.cpu())
    assert stats.nsamples == 6
    norm = stats.norm()
    assert norm.dtype == torch.float32 and norm.device.type == device
    torch.testing.assert_close(norm.cpu().double(), reference.act_norm(xs, masks), rtol=1e-6, atol=0)


def test_padding_never_counts():
    x = torch.randn(1, 6, 8)
    padded = torch.cat([x, torch.full((1, 4, 8), 1e6)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    a, b = kernels.ActivationStats(8), kernels.ActivationStats(8)
    a.update(x)
    b.update(padded, mask)
    assert torch.equal(a.norm(), b.norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_stats_rms(dtype, device):
    stats = kernels.GradientStats([5, 7])
    grads = [fresh((5, 7), dtype, device, seed=s) for s in range(4)]
    for g in grads:
        stats.update(g)
    expected = torch.sqrt(sum(g.double() ** 2 for g in grads) / 4)
    torch.testing.assert_close(stats.rms().double(), expected, rtol=1e-6, atol=0)
    assert stats.nsamples == 4 and stats.shape == [5, 7]


def test_mask_hash_depends_on_bits_and_shape():
    m = kernels.nm_mask(torch.randn(8, 16), 2, 4)
    assert kernels.mask_hash(m) == kernels.mask_hash(m.clone())
    flipped = m.clone()
    flipped[0, 0] = ~flipped[0, 0]
    assert kernels.mask_hash(flipped) != kernels.mask_hash(m)
    assert kernels.mask_hash(m.reshape(16, 8)) != kernels.mask_hash(m)


# --- errors: typed, named, raised before anything changes -----------------------------


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(wandapp.SparsityError, match="sparsity"):
        kernels.unstructured_mask(torch.rand(4, 4), sparsity)


@pytest.mark.parametrize("n,m,match", [(4, 4, "smaller than m"), (5, 4, "smaller than m"), (0, 4, "at least 1"), (2, 3, "divisible")])
def test_bad_nm(n, m, match):
    with pytest.raises(wandapp.SparsityError, match=match):
        kernels.nm_mask(torch.rand(4, 8), n, m)


def test_scores_must_be_2d():
    with pytest.raises(wandapp.ShapeError, match="scores.*2-D"):
        kernels.unstructured_mask(torch.rand(2, 3, 4), 0.5)
    with pytest.raises(wandapp.ShapeError):
        kernels.nm_mask(torch.rand(8), 2, 4)


def test_shape_mismatches():
    w = torch.rand(4, 8)
    with pytest.raises(wandapp.ShapeError, match="act_norm"):
        kernels.wanda_score(w, torch.rand(7))
    with pytest.raises(wandapp.ShapeError, match="grad_rms"):
        kernels.rgs_score(w, torch.rand(8, 4), torch.rand(8))
    with pytest.raises(wandapp.ShapeError, match="mask"):
        kernels.apply_mask_(w, torch.ones(8, 4, dtype=torch.bool))
    with pytest.raises(wandapp.ShapeError, match="x"):
        kernels.ActivationStats(8).update(torch.rand(1, 2, 9))
    with pytest.raises(wandapp.ShapeError, match="grad"):
        kernels.GradientStats([4, 8]).update(torch.rand(8, 4))


def test_device_mismatch():
    # `meta` is a second device every machine has.
    w = torch.rand(4, 8)
    with pytest.raises(wandapp.DeviceMismatchError, match="act_norm"):
        kernels.wanda_score(w, torch.rand(8, device="meta"))
    with pytest.raises(wandapp.DeviceMismatchError, match="mask"):
        kernels.apply_mask_(w, torch.ones(4, 8, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_weights(dtype):
    w = torch.ones(4, 8, dtype=dtype)
    with pytest.raises(wandapp.DtypeError, match="weight"):
        kernels.wanda_score(w, torch.rand(8))
    with pytest.raises(wandapp.DtypeError, match="weight"):
        kernels.apply_mask_(w, torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(TypeError):  # DtypeError is also a TypeError
        kernels.magnitude_score(w)


def test_mask_must_be_bool():
    with pytest.raises(wandapp.DtypeError, match="mask"):
        kernels.apply_mask_(torch.rand(4, 8), torch.ones(4, 8))


def test_nan_scores():
    s = torch.rand(4, 8)
    s[2, 3] = float("nan")
    with pytest.raises(wandapp.NonFiniteError, match="NaN"):
        kernels.unstructured_mask(s, 0.5)
    with pytest.raises(wandapp.NonFiniteError, match="NaN"):
        kernels.nm_mask(s, 2, 4)


def test_not_a_tensor():
    with pytest.raises(wandapp.DtypeError, match="scores.*torch.Tensor"):
        kernels.unstructured_mask([[1.0, 2.0]], 0.5)


def test_error_hierarchy():
    assert issubclass(wandapp.SparsityError, ValueError)
    assert issubclass(wandapp.DtypeError, TypeError)
    for cls in (wandapp.SparsityError, wandapp.ShapeError, wandapp.DeviceMismatchError, wandapp.DtypeError, wandapp.NonFiniteError):
        assert issubclass(cls, wandapp.WandappError)
