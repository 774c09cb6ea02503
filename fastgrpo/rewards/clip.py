"""CLIP-based preference rewards through transformers (PickScore, CLIP score, HPS in CLIP format).

score = logit_scale * cos(image_embed, text_embed), as PickScore's reference inference computes it
(yuvalkirstain/PickScore README); CLIP score uses the same form with the CLIP model's own scale.
The model and processor load with ``from_pretrained`` from a local folder (``~`` expanded; a missing one is a
ValueError, never a hub request: `fastgrpo.paths`) or a hub id, once, lazily.
"""
from __future__ import annotations

import torch

from .pixel import as_pil_images


class ClipPreference:
    def __init__(self, model: str | None = None, processor: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        if not model:
            raise ValueError("model: give the CLIP reward model's local folder or hub id")
        from fastgrpo.paths import model_location

        # a local path is checked (and ~ expanded) now, before transformers could take it for a hub id
        self.model_id = model_location("model", model)
        self.processor_id = model_location("processor", processor or model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self._model = self._processor = None

    def _load(self):
        from transformers import AutoProcessor, CLIPModel

        self._processor = AutoProcessor.from_pretrained(self.processor_id)
        self._model = CLIPModel.from_pretrained(self.model_id, torch_dtype=self.dtype).to(self.device).eval()

    @torch.no_grad()
    def image_embeddings(self, pil: list) -> torch.Tensor:
        """L2-normalised CLIP image embeddings (float32 [n, d]) of PIL images, in batches of ``batch_size``."""
        if self._model is None:
            self._load()
        out = []
        for i in range(0, len(pil), self.batch_size):
            im = self._processor(images=pil[i:i + self.batch_size], return_tensors="pt")
            f = _features(self._model.get_image_features(pixel_values=im["pixel_values"].to(self.device,
                                                                                           self.dtype))).float()
            out.append(f / f.norm(dim=-1, keepdim=True))
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        if self._model is None:
            self._load()
        pil = as_pil_images(images)
        out = []
        for i in range(0, len(pil), self.batch_size):
            im = self._processor(images=pil[i:i + self.batch_size], return_tensors="pt")
            tx = self._processor(text=list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 return_tensors="pt")
            img = self._model.get_image_features(pixel_values=im["pixel_values"].to(self.device, self.dtype))
            txt = self._model.get_text_features(**{k: v.to(self.device) for k, v in tx.items()})
            img = _features(img)
            txt = _features(txt)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append(self._model.logit_scale.exp() * (img * txt).sum(-1))
        return torch.cat(out).float().cpu()


def _features(x):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(x, torch.Tensor):
        return x
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        if getattr(x, attr, None) is not None:
            return getattr(x, attr)
    raise TypeError(f"unexpected feature output {type(x).__name__}")


class ClipImageSimilarity(ClipPreference):
    """For image editing: the cosine between the CLIP image embeddings of each edited image and of its prompt's source
    image, in [-1, 1] -- Flow-GRPO's ``image_similarity`` reward of its Kontext / Qwen-Image-Edit configs
    (yifan123/flow_grpo flow_grpo/rewards.py ``image_similarity_score`` -> ``ClipScorer.image_similarity``,
    flow_grpo/clip_scorer.py: openai/clip-vit-large-patch14, ``get_image_features``, L2-normalised, the diagonal of
    their products). The source is what the model saw (`fastgrpo.train.prompts.EditPrompt.source_pixels` at the
    image's size); both go through the CLIP processor (Flow-GRPO applies its resize/crop/normalise to tensors: the
    same steps, PIL rounding aside). Prompts without a source image are a ValueError."""

    def check_prompts(self, prompts) -> None:
        from .pixel import need_sources

        need_sources("clip_image_similarity")(prompts)

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        from .pixel import as_tensor_images, source_images

        x = as_tensor_images(images)
        sources = source_images("clip_image_similarity", prompts, *x.shape[-2:])
        if not len(x):
            return torch.zeros(0)
        edits, srcs = self.image_embeddings(as_pil_images(x)), self.image_embeddings(as_pil_images(sources))
        return (edits * srcs).sum(-1).cpu()
