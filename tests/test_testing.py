"""The tolerance rule and the poisoning helper themselves."""
import pytest
import torch

from fastgrpo.testing import FP32_RTOL, assert_close, poisoned_allocations, rel_err, tolerance


def test_fp32_rule_accepts_rounding_and_rejects_real_errors():
    ref = torch.randn(1000, dtype=torch.float64)
    assert_close(ref.float(), ref)
    with pytest.raises(AssertionError, match="normwise relative error"):
        assert_close((ref * (1 + 3 * FP32_RTOL)).float(), ref)


def test_low_precision_rule_is_relative_to_torch_error():
    ref = torch.randn(1000, dtype=torch.float64)
    assert_close(ref.to(torch.bfloat16), ref)  # storing the exact answer passes
    assert tolerance(torch.bfloat16, ref) > tolerance(torch.float16, ref) > FP32_RTOL
    with pytest.raises(AssertionError):
        assert_close((ref * 1.05).to(torch.bfloat16), ref)


def test_nan_fails_and_reference_must_be_float64():
    ref = torch.ones(3, dtype=torch.float64)
    assert rel_err(torch.tensor([1.0, float("nan"), 1.0]), ref) == float("inf")
    with pytest.raises(ValueError, match="float64"):
        assert_close(torch.ones(3), torch.ones(3))


def test_poisoned_allocations_fill_and_restore():
    with poisoned_allocations():
        assert torch.empty(4).isnan().all()
        assert (torch.empty_like(torch.zeros(2, dtype=torch.int32)) == torch.iinfo(torch.int32).min).all()
    assert torch.empty is not None and torch.empty(1).shape == (1,)
