"""Rewards of whole videos (``takes_video = True``: they get [B, F, 3, H, W] and are not averaged over frames)."""
from __future__ import annotations

import torch


def as_tensor_videos(videos) -> torch.Tensor:
    """[B, F, 3, H, W] float in [0, 1] (CPU) from a tensor of videos; ValueError for anything else."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be a tensor [B, F, 3, H, W], got {got}")
    return videos.detach().float().cpu()


def temporal_consistency(videos, prompts=None) -> torch.Tensor:
    """1 - the mean absolute difference of consecutive frames (over frame pairs, channels and pixels), per video.

    Range [0, 1] for pixels in [0, 1]: 1 for a still video (and for a single frame: no change), 0 when every pixel
    flips between 0 and 1 from each frame to the next. Rewards smooth, flicker-free motion; alone it prefers a
    static video, so weight it against a content reward.
    """
    v = as_tensor_videos(videos)
    if v.shape[1] < 2:
        return torch.ones(v.shape[0])
    return 1.0 - (v[:, 1:] - v[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


temporal_consistency.takes_video = True
