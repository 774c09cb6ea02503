"""fastgrpo: fast GRPO training of image generators.

Ops (fused kernels with plain-PyTorch ``*_ref`` twins) are re-exported here::

    from fastgrpo import sde_step, token_logprob_entropy, attention_with_text_entropy

Importing fastgrpo also drops one transformers log line (and only that one): "`SiglipImageProcessor` requires
torchvision (not installed); falling back to `SiglipImageProcessorPil`" (and the same for ``CLIPImageProcessor``),
which diffusers' SD3 / FLUX pipeline modules and the CLIP rewards trigger on every run without torchvision; the
Pil processors they fall back to are the ones fastgrpo uses (`_TorchvisionFallbackFilter`).
"""
import logging as _logging

from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = [*_ops_all, "__version__"]


class _TorchvisionFallbackFilter(_logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision (not installed); falling back to
    `XImageProcessorPil`" warning, nothing else (a filter on that one logger, attached without importing
    transformers: its loggers are the standard ``logging`` ones)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_fallback_logger = _logging.getLogger("transformers.utils.import_utils")
if not any(isinstance(f, _TorchvisionFallbackFilter) for f in _fallback_logger.filters):
    _fallback_logger.addFilter(_TorchvisionFallbackFilter())
