"""Our sigma schedules equal what diffusers' scheduler produces for the SD3 and FLUX pipelines."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fastgrpo.diffusion import flux_mu, flux_sigmas, sd3_sigmas, timesteps


@pytest.mark.parametrize("steps", [1, 10, 28, 40])
def test_sd3_matches_diffusers(steps):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift=3.0)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=2e-7)
    torch.testing.assert_close(timesteps(ours), sched.timesteps, rtol=0, atol=2e-4)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and bool((ours[1:] < ours[:-1]).all())


@pytest.mark.parametrize("steps, seq_len", [(1, 256), (16, 1024), (28, 4096), (50, 4096)])
def test_flux_matches_diffusers(steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(seq_len))
    torch.testing.assert_close(flux_sigmas(steps, seq_len), sched.sigmas, rtol=0, atol=2e-7)


def test_flux_mu_endpoints():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_sd35_ten_steps_first_sigma_is_one_and_gives_sigma_max():
    s = sd3_sigmas(10)
    assert s[0].item() == 1.0 and 0.9 < s[1].item() < 1.0


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        sd3_sigmas(bad)
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(bad, 4096)
