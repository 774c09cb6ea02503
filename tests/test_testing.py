"""The tolerance rule, the poisoning helper and the host-cost helpers (kernel stubs, aten op count) themselves."""
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


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the kernels' NaN, interpreted
def test_stubbed_kernels_record_launches_and_restore_the_kernels():
    """Within the block the sde_step launchers call stubs (names and grids recorded, outputs never written); after
    it -- also when the block raises -- the real kernels are back and compute again."""
    import fastgrpo.kernels.sde_step as mod
    from fastgrpo import sde_step
    from fastgrpo.testing import aten_ops, stubbed_kernels

    real = mod.sde_step_fwd_kernel
    x = torch.randn(3, 2, 2500)  # N = 5000: two chunks of 1024 x 4 per sample
    with pytest.raises(RuntimeError, match="inside"):
        with stubbed_kernels("fastgrpo.kernels.sde_step") as log:
            assert mod.sde_step_fwd_kernel is not real
            with torch.no_grad(), poisoned_allocations():
                out = sde_step(x, x, 0.8, 0.7, noise=x, impl="triton")
            assert log == ["sde_step_fwd_kernel", "sde_step_finish_kernel"]
            assert log.grids == [(2, 3), (3,)]
            assert torch.isnan(out.log_prob).all()  # nothing ran
            log.clear()
            assert (log, log.grids) == ([], [])
            raise RuntimeError("inside")
    assert mod.sde_step_fwd_kernel is real
    out = sde_step(x, x, 0.8, 0.7, noise=x, impl="triton")
    assert torch.isfinite(out.log_prob).all()
    ops = aten_ops(lambda: torch.zeros(3).add_(1).sum())
    assert ops == ["aten.zeros.default", "aten.add_.Tensor", "aten.sum.default"]
