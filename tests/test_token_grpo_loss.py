"""grpo_token_loss against an independent float64 numpy implementation and closed-form gradients."""
import numpy as np
import pytest
import torch

from fastgrpo import grpo_token_loss, grpo_token_loss_ref
from fastgrpo.testing import assert_close


def _inputs(seed, B=4, L=13):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g) * 5
    old = logp + torch.randn(B, L, generator=g) * 0.3  # ratios well outside 1 +- 0.2 for some tokens
    ref = logp + torch.randn(B, L, generator=g) * 0.5
    adv = torch.randn(B, L, generator=g)
    adv[0, :5] = 0.0  # low-entropy tokens of EG-GRPO: KL only
    mask = torch.rand(B, L, generator=g) > 0.25
    return logp, old, ref, adv, mask


def np_loss(logp, old, ref, adv, mask, clip_eps, beta):
    lp, old, ref, A = (t.double().numpy() for t in (logp, old, ref, adv))
    m = mask.double().numpy()
    ratio = np.exp(lp - old) if clip_eps is not None else np.ones_like(lp)
    if clip_eps is None:
        surr = -ratio * A
        clipped = np.zeros_like(lp)
    else:
        surr = -np.minimum(ratio * A, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
        clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))
    kl = np.exp(ref - lp) - (ref - lp) - 1
    d = max(m.sum(), 1)
    loss = ((surr + beta * kl) * m).sum() / d
    return loss, (clipped * m).sum() / d, (kl * m).sum() / d, (ratio * m).sum() / d


@pytest.mark.parametrize("op", [grpo_token_loss, grpo_token_loss_ref], ids=["op", "ref"])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_stats_match_numpy(op, clip_eps, dtype):
    logp, old, ref, adv, mask = (t.to(dtype) if t.is_floating_point() else t for t in _inputs(1))
    lp = logp.clone().requires_grad_(True)
    loss, stats = op(lp, old, ref, adv, mask, clip_eps=clip_eps, beta=0.04)
    want, clip_frac, kl, ratio = np_loss(logp, old, ref, adv, mask, clip_eps, 0.04)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss.detach().reshape(1), torch.tensor([want], dtype=torch.float64), name="loss")
    assert_close(stats["kl"].reshape(1), torch.tensor([kl], dtype=torch.float64), name="kl")
    assert_close(stats["ratio"].reshape(1), torch.tensor([ratio], dtype=torch.float64), name="ratio")
    assert abs(stats["clip_fraction"].item() - clip_frac) < 1e-6
    if clip_eps is not None:
        assert 0 < stats["clip_fraction"].item() < 1  # the inputs do exercise clipping
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_gradient_closed_form(clip_eps):
    """dloss/dlogp = mask * (-A * ratio * [unclipped] + beta * (1 - exp(ref - logp))) / sum(mask)."""
    logp, old, ref, adv, mask = _inputs(2)
    beta = 0.01
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_token_loss(lp, old, ref, adv, mask, clip_eps=clip_eps, beta=beta)
    (grad,) = torch.autograd.grad(loss, lp)
    lp64, old64, ref64, A, m = logp.double(), old.double(), ref.double(), adv.double(), mask.double()
    if clip_eps is None:
        pg = -A
    else:
        ratio = torch.exp(lp64 - old64)
        active = ~(((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0)))
        pg = -A * ratio * active
    want = m * (pg + beta * (1 - torch.exp(ref64 - lp64))) / m.sum()
    assert_close(grad, want, name="grad logp")
    # Low-entropy tokens (A = 0) keep their KL gradient; masked-out tokens get none.
    kl_only = (adv == 0) & mask
    assert kl_only.any() and (grad[kl_only] != 0).all()
    assert torch.count_nonzero(grad[~mask]) == 0


def test_no_reference_and_empty_mask():
    logp, _, _, adv, mask = _inputs(3)
    loss, stats = grpo_token_loss(logp, None, None, adv, mask)
    want, *_ = np_loss(logp, logp, logp, adv, mask, None, 0.0)
    assert abs(loss.item() - want) < 1e-5 and stats["kl"].item() == 0
    loss, stats = grpo_token_loss(logp, None, None, adv, torch.zeros_like(mask))
    assert loss.item() == 0 and stats["ratio"].item() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logp=torch.zeros(2, 3, dtype=torch.long)), "logp must be a floating tensor"),
        (dict(old_logp=torch.zeros(2, 4)), "old_logp must have the shape of logp"),
        (dict(ref_logp=torch.zeros(3)), "ref_logp must have the shape of logp"),
        (dict(token_adv=torch.zeros(2)), "token_adv must have the shape of logp"),
        (dict(token_adv=None), "token_adv must be a torch.Tensor"),
        (dict(mask=torch.ones(2, 4)), "mask must be a bool or float tensor of the shape of logp"),
        (dict(clip_eps=0.0), "clip_eps must be None or a float in"),
        (dict(clip_eps=1.5), "clip_eps must be None or a float in"),
        (dict(clip_eps=0.2, old_logp=None), "old_logp is required"),
        (dict(beta=-0.1), "beta must be"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(kwargs, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3),
                token_adv=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        grpo_token_loss(args.pop("logp"), args.pop("old_logp"), args.pop("ref_logp"), args.pop("token_adv"),
                        args.pop("mask"), **args)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("float_mask", [False, True])
def test_masked_out_non_finite_tokens_do_not_leak(clip_eps, float_mask):
    """Issue 14: NaN / -inf on masked-out tokens made the loss NaN (0 * inf in the masked sum)."""
    logp, old, ref, adv, mask = _inputs(7)
    mask_arg = mask.float() if float_mask else mask
    want, want_stats = grpo_token_loss(logp, old, ref, adv, mask_arg, clip_eps=clip_eps, beta=0.04)
    bad = [t.clone() for t in (logp, old, ref, adv)]
    for i, t in enumerate(bad):
        t[~mask] = (float("nan"), float("-inf"), float("inf"), float("nan"))[i]
    lp = bad[0].requires_grad_(True)
    loss, stats = grpo_token_loss(lp, bad[1], bad[2], bad[3], mask_arg, clip_eps=clip_eps, beta=0.04)
    assert torch.isfinite(loss) and torch.equal(loss, want)
    for k in stats:
        assert torch.equal(stats[k], want_stats[k]), k
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[~mask]) == 0


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[1.0, float("nan"), 0.0], [1.0, 1.0, 1.0]]), "mask must hold weights in"),
    (torch.tensor([[1.0, -0.5, 0.0], [1.0, 1.0, 1.0]]), "mask must hold weights in"),
    (torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]), "mask must hold weights in"),
    (torch.ones(2, 3, dtype=torch.long), "mask must be a bool or float tensor"),
])
def test_bad_mask_values_raise_value_error(mask, match):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        grpo_token_loss(z, z, z, z, mask)


def test_fractional_float_mask_weights():
    logp, old, ref, adv, mask = _inputs(8)
    w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(9)) * mask
    loss, _ = grpo_token_loss(logp, None, ref, adv, w, beta=0.04)
    want, *_ = np_loss(logp, logp, ref, adv, w, None, 0.04)
    assert abs(loss.item() - want) < 1e-5 * max(1.0, abs(want))
