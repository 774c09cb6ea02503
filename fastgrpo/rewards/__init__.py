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
* for image editing: ``source_similarity`` (1 - mean absolute pixel difference to the prompt's source image; the
  source reaches a reward through the prompts: `fastgrpo.train.prompts.EditPrompt`) and ``clip_image_similarity``
  (cosine of the CLIP image embeddings of the edit and its source: Flow-GRPO's ``image_similarity``);
* for videos: ``temporal_consistency`` (1 - mean absolute difference of consecutive frames, in [0, 1]);
* CLIP-based rewards through transformers: ``clip_score`` and ``pickscore`` (a ``CLIPModel`` + processor from a
  local folder or a hub id; ``hps`` is the same scorer pointed at an HPS-v2 checkpoint converted to the
  transformers CLIP format);
* ``aesthetic`` (LAION's MLP head on CLIP image embeddings: `fastgrpo.rewards.aesthetic`), ``geneval`` (GenEval's
  compositional rules over an open-vocabulary detector: `fastgrpo.rewards.geneval`), ``ocr`` (1 - normalised edit
  distance to the prompt's quoted text: `fastgrpo.rewards.ocr`), ``vlm_judge`` (a vision-language model's 1-5 rating
  in UnifiedReward's template: `fastgrpo.rewards.vlm`);
* group-level rewards (a class attribute ``group_level = True``): called once per group with that group's images
  and prompts together (one prompt's rollouts), e.g. ``pairwise_brightness``. `WeightedReward` takes the groups'
  sizes; the trainer scores a group where it lives (a group never spans processes: `fastgrpo.train.loop`);
* ``remote``: any of these served over HTTP by ``fastgrpo serve-reward`` (`fastgrpo.rewards.remote`).

A reward may also expose ``last_stats`` ({name: Tensor[B]}) after a call: per-image diagnostics (e.g. the judge's
malformed answers) that `WeightedReward` returns among the parts as ``<reward>_<name>``, logged, never summed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .aesthetic import AestheticPredictor
from .clip import ClipImageSimilarity, ClipPreference
from .geneval import GenEvalReward
from .ocr import OcrReward
from .pixel import PairwiseBrightness, brightness, colorfulness, jpeg_compressibility, source_similarity
from .video import temporal_consistency
from .vlm import VlmJudge

# The arguments of each model-based reward that name a model (local folder or hub id), with their defaults
# (None: required; a processor defaults to the model). `model_sources` lists them; the trainer checks every one
# before loading anything (`fastgrpo.paths.check_model_source`).
MODEL_ARGS: dict[str, dict[str, str | None]] = {
    "clip_score": {"model": "openai/clip-vit-large-patch14", "processor": None},
    "pickscore": {"model": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "hps": {"model": None, "processor": None},
    "aesthetic": {"model": "openai/clip-vit-large-patch14", "processor": None},
    "geneval": {"model": "google/owlv2-base-patch16-ensemble", "processor": None,
                "color_model": "openai/clip-vit-large-patch14", "color_processor": None},
    "ocr": {"model": "microsoft/trocr-base-printed", "processor": None},
    "vlm_judge": {"model": "CodeGoat24/UnifiedReward-qwen-7b", "processor": None},
    "clip_image_similarity": {"model": "openai/clip-vit-large-patch14", "processor": None},
}

# Arguments naming a local file a reward reads (not a model: never a hub id), required unless listed in
# OPTIONAL_FILES. `model_sources` checks each exists, so a missing one stops the run before anything loads.
FILE_ARGS: dict[str, tuple[str, ...]] = {
    "aesthetic": ("head",),
    "geneval": ("metadata",),
}
OPTIONAL_FILES = {("geneval", "metadata")}


REWARDS: dict[str, Callable[..., Callable]] = {
    "brightness": lambda: brightness,
    "colorfulness": lambda: colorfulness,
    "jpeg_compressibility": lambda: jpeg_compressibility,
    "source_similarity": lambda: source_similarity,
    "temporal_consistency": lambda: temporal_consistency,
    "clip_score": lambda **kw: ClipPreference(**{**_defaults("clip_score"), **kw}),
    "pickscore": lambda **kw: ClipPreference(**{**_defaults("pickscore"), **kw}),
    "hps": lambda **kw: ClipPreference(**kw),
    "aesthetic": lambda **kw: AestheticPredictor(**{**_defaults("aesthetic"), **kw}),
    "geneval": lambda **kw: GenEvalReward(**{**_defaults("geneval"), **kw}),
    "ocr": lambda **kw: OcrReward(**{**_defaults("ocr"), **kw}),
    "vlm_judge": lambda **kw: VlmJudge(**{**_defaults("vlm_judge"), **kw}),
    "pairwise_brightness": lambda: PairwiseBrightness(),
    "clip_image_similarity": lambda **kw: ClipImageSimilarity(**{**_defaults("clip_image_similarity"), **kw}),
    "remote": lambda **kw: _remote(**kw),
}


def _remote(**kw):
    from .remote import RemoteReward

    return RemoteReward(**kw)


def _defaults(name: str) -> dict:
    return {k: v for k, v in MODEL_ARGS[name].items() if v is not None}


def model_sources(name: str, args: dict) -> dict:
    """{argument: model folder or hub id} that reward ``name`` with ``args`` loads (a processor given no value
    loads from the model; another argument given as null loads nothing, e.g. geneval's ``color_model: null``); an
    empty dict for the pixel rewards. A required one missing, or a file argument
    (`FILE_ARGS`) missing or naming no file, is a ValueError starting ``args.<key>``."""
    check_files(name, args)
    if name not in MODEL_ARGS:
        return {}
    out = _defaults(name)
    for k in MODEL_ARGS[name]:
        if k in args:  # given: that value; given empty (null): none, as the reward's constructor takes it
            if args[k]:
                out[k] = args[k]
            else:
                out.pop(k, None)
    if "model" not in out:
        raise ValueError(f"args.model is required: reward {name!r} needs its model's local folder or hub id")
    out.setdefault("processor", out["model"])
    return out


def check_files(name: str, args: dict) -> None:
    """Each file argument of reward ``name`` (`FILE_ARGS`) is given (unless optional) and names an existing file
    (``~`` expanded); ValueError ``args.<key> ...`` otherwise (the trainer prefixes ``reward[i].``)."""
    from pathlib import Path

    for key in FILE_ARGS.get(name, ()):
        value = args.get(key)
        if not value:
            if (name, key) in OPTIONAL_FILES:
                continue
            raise ValueError(f"args.{key} is required: reward {name!r} needs a local file")
        if not Path(str(value)).expanduser().is_file():
            raise ValueError(f"args.{key} {value!r} does not exist (reward {name!r} reads it as a local file)")


def is_group_level(fn) -> bool:
    """Whether reward ``fn`` scores a whole group at once (class attribute ``group_level = True``)."""
    return bool(getattr(fn, "group_level", False))


def _groups(group_sizes, n: int) -> list[tuple[int, int]]:
    sizes = [int(s) for s in group_sizes]
    if any(s < 0 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"group_sizes {sizes} must be non-negative and sum to the {n} images")
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def _take(images, a: int, b: int):
    return images[a:b] if isinstance(images, torch.Tensor) else list(images)[a:b]


class WeightedReward:
    """Weighted sum of named rewards; ``__call__`` returns (total [B], {name: component [B]}).

    ``group_sizes`` (ints summing to B: consecutive images of one group, i.e. one prompt's rollouts) is needed
    when a part is group-level (`is_group_level`): it is called once per group. `sample_level` / `group_level`
    compute only the parts of one kind (the trainer scores the per-image parts of each micro-batch as it is
    sampled, the group-level parts once the process holds its whole groups)."""

    def __init__(self, parts: Sequence[tuple[str, float, Callable]]):
        self.parts = list(parts)

    def check_prompts(self, prompts, key: str = "prompts.source") -> None:
        """Refuse, before anything loads, prompts a part cannot score (a part's own ``check_prompts``: GenEval
        metadata, editing source images); ValueError naming the reward and ``key``."""
        for name, _, fn in self.parts:
            check = getattr(fn, "check_prompts", None)
            if check is not None:
                try:
                    check(prompts)
                except ValueError as e:
                    raise ValueError(f"{key}: reward {name!r} cannot score these prompts: {e}") from None

    @property
    def has_group_level(self) -> bool:
        return any(is_group_level(fn) for _, _, fn in self.parts)

    def __call__(self, images, prompts, group_sizes=None):
        return self._score(images, prompts, group_sizes, kinds=(False, True))

    def sample_level(self, images, prompts):
        """(total [B], parts) of the per-image parts only (total zeros when there are none)."""
        return self._score(images, prompts, None, kinds=(False,))

    def group_level(self, images, prompts, group_sizes):
        """(total [B], parts) of the group-level parts only, each called once per group."""
        return self._score(images, prompts, group_sizes, kinds=(True,))

    def _score(self, images, prompts, group_sizes, kinds):
        comps = {}
        total = torch.zeros(len(prompts), dtype=torch.float32)
        video = isinstance(images, torch.Tensor) and images.ndim == 5
        unit = "videos" if video else "images"
        for name, weight, fn in self.parts:
            grouped = is_group_level(fn)
            if grouped not in kinds:
                continue
            whole = getattr(fn, "takes_video", False)
            if whole and not video:
                raise ValueError(f"reward {name!r} scores videos [B, F, 3, H, W]; this model's samples are images")
            if grouped:  # the group's samples as they are (a video family's: videos)
                if group_sizes is None:
                    raise ValueError(f"reward {name!r} is group-level: give the groups' sizes (group_sizes)")
                pieces, stats = [], {}
                for a, b in _groups(group_sizes, len(prompts)):
                    pieces.append(self._check(name, fn(_take(images, a, b), list(prompts[a:b])), b - a, unit))
                    for k, v in (getattr(fn, "last_stats", None) or {}).items():
                        stats.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32).reshape(-1))
                r = torch.cat(pieces) if pieces else total.clone()
                stats = {k: torch.cat(v) for k, v in stats.items()}
            elif video and not whole:
                r = self._per_frame(name, fn, images, prompts)
                stats = {}
            else:
                r = self._check(name, fn(images, prompts), len(prompts), unit)
                stats = getattr(fn, "last_stats", None) or {}
            comps[name] = r
            for k, v in stats.items():
                comps[f"{name}_{k}"] = torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu()
            total = total + weight * r
        return total, comps

    @staticmethod
    def _check(name, r, n, unit="images"):
        r = torch.as_tensor(r, dtype=torch.float32).reshape(-1).cpu()
        if r.shape[0] != n:
            raise ValueError(f"reward {name!r} returned {r.shape[0]} values for {n} {unit}")
        return r

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
        try:
            fn = REWARDS[name](**args)
        except TypeError as e:  # an argument the reward does not take: name it, as a config error
            if "argument" not in str(e):
                raise
            raise ValueError(f"reward {name!r}: {e} (check its args)") from None
        parts.append((name, float(weight), fn))
    return WeightedReward(parts)


__all__ = ["MODEL_ARGS", "FILE_ARGS", "REWARDS", "model_sources", "check_files", "is_group_level", "WeightedReward",
           "build_reward", "brightness", "colorfulness", "jpeg_compressibility", "source_similarity",
           "temporal_consistency", "ClipPreference", "ClipImageSimilarity", "AestheticPredictor", "GenEvalReward",
           "OcrReward", "VlmJudge", "PairwiseBrightness"]
