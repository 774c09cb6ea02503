"""The main job until the training loop lands: a few stochastic SDE steps on a tiny SD3 transformer.

Samples ``batch`` latents through ``steps`` Flow-GRPO SDE steps of the SD3 sigma schedule (shift 3) with
`fastgrpo.sde_step` at every step, then recomputes each transition's log-prob from the stored samples (as the
training phase does) and checks the importance ratio is 1. Prints the per-sample log-probs.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fastgrpo import sde_step
from fastgrpo.diffusion import sd3_sigmas, timesteps
from fastgrpo.diffusion.tiny import tiny_sd3_transformer


@torch.no_grad()
def run_demo(batch: int = 4, steps: int = 10, seed: int = 0, noise_level: float = 0.7, impl: str = "auto",
             prompt_tokens: int = 7, device: str | torch.device | None = None) -> dict:
    """Run the demo on ``device`` (default: CUDA when present, else CPU); the draws come from one CPU generator,
    so the noise is the same on either device."""
    if batch < 1 or steps < 2:  # one step would have no sigma strictly between 0 and 1 to scale the noise
        raise ValueError(f"batch must be >= 1 and steps >= 2, got batch={batch}, steps={steps}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    from fastgrpo.ops._backend import resolve_impl

    resolve_impl(impl, device, has_cpp=True)  # before building anything: impl='triton' on CPU needs TRITON_INTERPRET=1
    gen = torch.Generator().manual_seed(seed)
    model = tiny_sd3_transformer(seed).to(device)
    cfg = model.config
    prompt = torch.randn(batch, prompt_tokens, cfg.joint_attention_dim, generator=gen).to(device)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen).to(device)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen).to(device)
    sigmas = sd3_sigmas(steps)
    ts = timesteps(sigmas).to(device)
    sigma_max = sigmas[1].item()
    transitions = []
    for i in tqdm(range(steps), desc="sampling", leave=False):
        v = model(hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled,
                  timestep=ts[i].expand(batch)).sample
        out = sde_step(x, v, sigmas[i].item(), sigmas[i + 1].item(), noise_level=noise_level, sigma_max=sigma_max,
                       generator=gen, impl=impl)
        transitions.append((x, v, out))
        x = out.prev_sample
    # Training recomputes log-probs of the stored samples: the ratio must be exactly 1.
    max_dev = 0.0
    for i, (x_t, v, out) in enumerate(transitions):
        again = sde_step(x_t, v, sigmas[i].item(), sigmas[i + 1].item(), noise_level=noise_level,
                         sigma_max=sigma_max, prev_sample=out.prev_sample, impl=impl)
        max_dev = max(max_dev, (again.log_prob - out.log_prob).exp().sub(1).abs().max().item())
    log_probs = torch.stack([out.log_prob for _, _, out in transitions], dim=1)  # [B, steps]
    return {"sigmas": sigmas, "log_probs": log_probs, "ratio_max_dev": max_dev, "final": x}


def main(batch: int = 4, steps: int = 10, seed: int = 0, impl: str = "auto") -> int:
    res = run_demo(batch=batch, steps=steps, seed=seed, impl=impl)
    lp = res["log_probs"]
    print(f"fastgrpo demo: {batch} samples x {steps} Flow-GRPO SDE steps on a tiny random SD3 transformer")
    print("sigmas: " + " ".join(f"{s:.3f}" for s in res["sigmas"].tolist()))
    print("per-step log-prob (mean over latent elements), one row per sample:")
    for b in range(lp.shape[0]):
        print(f"  sample {b}: " + " ".join(f"{v:+.3f}" for v in lp[b].tolist()) + f"   sum {lp[b].sum():+.3f}")
    print(f"recomputed log-probs of the stored samples: max |ratio - 1| = {res['ratio_max_dev']:.1e}")
    return 0
