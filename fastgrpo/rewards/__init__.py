"""Rewards: callables ``(images, prompts) -> Tensor[B]`` and their registry.

``images`` is a float tensor [B, 3, H, W] in [0, 1] or a list of PIL images; ``prompts`` a list of B strings.
`build_reward(specs)` combines several by a weighted sum and also returns each component (for logging).

Videos (a video family's samples: [B, F, 3, H, W] in [0, 1]): `WeightedReward` gives an image reward every frame
as an image -- the B*F frames flattened to [B*F, 3, H, W], each with its video's prompt -- and averages the F
scores per video; a reward that marks itself ``takes_video = True`` (``temporal_consistency``) gets the videos
whole. Where the frame average lives: here, once, so every image reward (pixel, CLIP, a user's own) scores videos
without knowing about them; a video-only reward given images raises ValueError naming it.

Built in:
* cheap pixel rewards for CPU demos: ``brightness``, ``colorfulness``, ``jpeg_compressibility`` (DDPO's);
* for videos: ``temporal_consistency`` (1 - mean absolute difference of consecutive frames, in [0, 1]);
* CLIP-based rewards through transformers: ``clip_score`` and ``pickscore`` (a ``CLIPModel`` + processor from a
  local folder or a hub id; ``hps`` is the same scorer pointed at an HPS-v2 checkpoint converted to the
  transformers CLIP format);
* ``remote``: any of these served over HTTP by ``fastgrpo serve-reward`` (`fastgrpo.rewards.remote`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .clip import ClipPreference
from .pixel import brightness, colorfulness, jpeg_compressibility
from .video import temporal_consistency

# The arguments of each model-based reward that name a model (local folder or hub id), with their defaults
# (None: required; a processor defaults to the model). `model_sources` lists them; the trainer checks every one
# before loading anything (`fastgrpo.paths.check_model_source`).
MODEL_ARGS: dict[str, dict[str, str | None]] = {
    "clip_score": {"model": "openai/clip-vit-large-patch14", "processor": None},
    "pickscore": {"model": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "hps": {"model": None, "processor": None},
}


REWARDS: dict[str, Callable[..., Callable]] = {
    "brightness": lambda: brightness,
    "colorfulness": lambda: colorfulness,
    "jpeg_compressibility": lambda: jpeg_compressibility,
    "temporal_consistency": lambda: temporal_consistency,
    "clip_score": lambda **kw: ClipPreference(**{**_defaults("clip_score"), **kw}),
    "pickscore": lambda **kw: ClipPreference(**{**_defaults("pickscore"), **kw}),
    "hps": lambda **kw: ClipPreference(**kw),
    "remote": lambda **kw: _remote(**kw),
}


def _remote(**kw):
    from .remote import RemoteReward

    return RemoteReward(**kw)


def _defaults(name: str) -> dict:
    return {k: v for k, v in MODEL_ARGS[name].items() if v is not None}


def model_sources(name: str, args: dict) -> dict:
    """{argument: model folder or hub id} that reward ``name`` with ``args`` loads (a processor given no value
    loads from the model); an empty dict for the pixel rewards. A required one missing is a ValueError."""
    if name not in MODEL_ARGS:
        return {}
    out = {**_defaults(name), **{k: v for k, v in args.items() if k in MODEL_ARGS[name] and v}}
    if "model" not in out:
        raise ValueError(f"args.model is required: reward {name!r} needs its model's local folder or hub id")
    out.setdefault("processor", out["model"])
    return out


class WeightedReward:
    """Weighted sum of named rewards; ``__call__`` returns (total [B], {name: component [B]})."""

    def __init__(self, parts: Sequence[tuple[str, float, Callable]]):
        self.parts = list(parts)

    def __call__(self, images, prompts):
        comps = {}
        total = None
        video = isinstance(images, torch.Tensor) and images.ndim == 5
        for name, weight, fn in self.parts:
            whole = getattr(fn, "takes_video", False)
            if whole and not video:
                raise ValueError(f"reward {name!r} scores videos [B, F, 3, H, W]; this model's samples are images")
            if video and not whole:
                r = self._per_frame(name, fn, images, prompts)
            else:
                r = torch.as_tensor(fn(images, prompts), dtype=torch.float32).reshape(-1).cpu()
            if r.shape[0] != len(prompts):
                raise ValueError(f"reward {name!r} returned {r.shape[0]} values for {len(prompts)} "
                                 f"{'videos' if video else 'images'}")
            comps[name] = r
            total = weight * r if total is None else total + weight * r
        return total, comps

    @staticmethod
    def _per_frame(name, fn, videos, prompts):
        """An image reward over videos [B, F, 3, H, W]: every frame scored with its video's prompt, the mean of
        the F scores per video."""
        B, F = videos.shape[:2]
        frames = videos.reshape(B * F, *videos.shape[2:])
        r = torch.as_tensor(fn(frames, [p for p in prompts for _ in range(F)]), dtype=torch.float32).reshape(-1).cpu()
        if r.shape[0] != B * F:
            raise ValueError(f"reward {name!r} returned {r.shape[0]} values for {B * F} frames ({B} videos of {F})")
        return r.view(B, F).mean(dim=1)


def build_reward(specs) -> WeightedReward:
    """``specs``: items with ``name``, ``weight``, ``args`` (RewardSpec or dicts). Unknown names raise ValueError."""
    parts = []
    for spec in specs:
        name, weight, args = (spec["name"], spec.get("weight", 1.0), spec.get("args", {})) if isinstance(
            spec, dict) else (spec.name, spec.weight, spec.args)
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        parts.append((name, float(weight), REWARDS[name](**args)))
    return WeightedReward(parts)


__all__ = ["MODEL_ARGS", "REWARDS", "model_sources", "WeightedReward", "build_reward", "brightness", "colorfulness",
           "jpeg_compressibility", "temporal_consistency", "ClipPreference"]
