"""Cheap pixel rewards for CPU demos and tests (no model weights)."""
from __future__ import annotations

import io

import numpy as np
import torch


def as_tensor_images(images) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] from a tensor or a list of PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return images.detach().float().cpu()
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def as_pil_images(images):
    from PIL import Image

    if isinstance(images, torch.Tensor):
        arr = (as_tensor_images(images).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]
    return list(images)


def brightness(images, prompts=None) -> torch.Tensor:
    """Mean pixel value in [0, 1]."""
    return as_tensor_images(images).mean(dim=(1, 2, 3))


def colorfulness(images, prompts=None) -> torch.Tensor:
    """Hasler & Suesstrunk (2003) colourfulness on [0, 1] RGB: sigma_rgyb + 0.3 * mu_rgyb."""
    x = as_tensor_images(images)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return std + 0.3 * mean


def jpeg_compressibility(images, prompts=None) -> torch.Tensor:
    """DDPO's reward: minus the JPEG size (quality 95) in kB."""
    sizes = []
    for im in as_pil_images(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32)


def source_similarity(images, prompts) -> torch.Tensor:
    """For image editing: how close each edited image stays to its prompt's source image, ``1 - mean |x - s|`` over
    pixels and channels, in [0, 1] (1: unchanged). ``s`` is the source resized to the image's size as the model saw
    it (`fastgrpo.train.prompts.EditPrompt.source_pixels`). A pixel-level stand-in for Flow-GRPO's ``image_similarity``
    (CLIP image-image cosine, yifan123/flow_grpo flow_grpo/rewards.py ``image_similarity_score``): combined with a
    reward for the edit itself it keeps the edit local. Prompts without a source image are a ValueError."""
    x = as_tensor_images(images)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"source_similarity: {x.shape[0]} images for {len(prompts)} prompts")
    return 1.0 - (x - source_images("source_similarity", prompts, *x.shape[-2:])).abs().mean(dim=(1, 2, 3))


def need_sources(name: str):
    """A ``check_prompts`` for the editing rewards: every prompt must carry a source image."""
    def check(prompts) -> None:
        bare = [p for p in prompts if getattr(p, "source_pixels", None) is None]
        if bare:
            raise ValueError(f"reward {name} needs prompts with source images (image editing: prompts.source a JSONL "
                             f"file, a folder of captioned images or builtin_edit); prompt {str(bare[0])!r} has none")
    return check


def source_images(name: str, prompts, height: int, width: int) -> torch.Tensor:
    """The prompts' source images at ``height`` x ``width`` ([B, 3, H, W] in [0, 1]) for the editing reward
    ``name``; ValueError naming it when a prompt has none."""
    need_sources(name)(prompts)
    return torch.stack([p.source_pixels(height, width) for p in prompts])


source_similarity.check_prompts = need_sources("source_similarity")


class PairwiseBrightness:
    """A group-level reward: the fraction of the group's other images each image beats on brightness (a tie
    counts one half), in [0, 1]; a group of one scores 0.5. Inputs: one group's images [n, 3, H, W] in [0, 1] (or
    PIL images); prompts are ignored.

    A cheap stand-in for a pairwise preference model used the way Pref-GRPO uses one (arXiv 2508.20751: the
    reward of a rollout is its win rate against the other rollouts of the same prompt's group). It is called
    once per group (``group_level = True``) with that group's images and prompts: `WeightedReward` splits the
    batch by the groups' sizes, and the trainer hands it each prompt's rollouts together on any number of
    processes (Pref-GRPO's released trainer compares within each GPU's batch instead)."""

    group_level = True

    def __call__(self, images, prompts=None) -> torch.Tensor:
        b = brightness(images).double()
        n = b.shape[0]
        if n < 2:
            return torch.full((n,), 0.5, dtype=torch.float32)
        wins = (b[:, None] > b[None, :]).double() + 0.5 * (b[:, None] == b[None, :]).double()
        wins.fill_diagonal_(0.0)
        return (wins.sum(1) / (n - 1)).float()
