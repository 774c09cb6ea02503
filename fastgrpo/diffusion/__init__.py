"""diffusers glue: sigma schedules, tiny model factories (and, later, samplers and attention processors)."""
from .schedules import flux_mu, flux_sigmas, sd3_sigmas, timesteps
from .attention import AttentionEntropyCollector

__all__ = ["flux_mu", "flux_sigmas", "sd3_sigmas", "timesteps"]
__all__ += ["AttentionEntropyCollector"]
