"""OCR reward: how closely the text an OCR model reads in the image matches the text the prompt asks for.

Inputs: images [B, 3, H, W] in [0, 1] (or PIL images) and prompts whose first double-quoted part is the text to
render (``a sign that says "OPEN"``). Output in [0, 1]: 1 - min(d, n) / n, with n the length of the asked text and
d the Levenshtein distance between the read and the asked text, both lower-cased with spaces removed; d = 0 when the
asked text occurs anywhere in the read text.

This is Flow-GRPO's OCR reward (yifan123/flow_grpo ``flow_grpo/ocr.py``): the target is ``prompt.split('"')[1]``
(line 31), the recognised text joined, spaces removed and lower-cased, as is the target (lines 44-47), distance 0
when the target is a substring (lines 48-49), the distance capped at the target's length ("many unrelated
characters" cost at most that, lines 52-54) and the reward ``1 - dist / len(target)`` (line 60; the denominator is
the target's length, not max(len)). Flow-GRPO reads with PaddleOCR (lines 14-19, 42-44: confidence > 0 lines
joined); here the reader is any transformers ``VisionEncoderDecoderModel`` with its processor (TrOCR by default:
``microsoft/trocr-base-printed``; greedy decoding, ``max_new_tokens``), which reads one line per image.
Flow-GRPO's scorer raises IndexError on a prompt without a quote; here a prompt without a quoted part, or whose
quoted text is empty once spaces are removed, is a ValueError naming the prompt (its OCR prompt sets always quote).
"""
from __future__ import annotations

import torch

from .pixel import as_pil_images


def quoted_text(prompt: str) -> str:
    """The text between the prompt's first two double quotes (Flow-GRPO's ``prompt.split('"')[1]``, which also takes
    the rest of the prompt after a lone quote); ValueError without a quote or for an empty target."""
    parts = str(prompt).split('"')
    if len(parts) < 2:
        raise ValueError(f"the ocr reward needs the text to render in double quotes in the prompt: {str(prompt)!r}")
    if not parts[1].replace(" ", ""):
        raise ValueError(f"the ocr reward's prompt asks for empty text: {str(prompt)!r}")
    return parts[1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(read: str, target: str) -> float:
    """Flow-GRPO's OCR reward of the text ``read`` for the asked ``target`` (see the module doc)."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    dist = 0 if target in read else min(edit_distance(read, target), len(target))
    return 1.0 - dist / len(target)


class OcrReward:
    """OCR reward through a transformers ``VisionEncoderDecoderModel`` (TrOCR) and its processor (see the module
    doc)."""

    def __init__(self, model: str | None = None, processor: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 16, max_new_tokens: int = 32):
        from fastgrpo.paths import model_location

        if not model:
            raise ValueError("model: give the OCR model's local folder or hub id")
        self.model_id = model_location("model", model)
        self.processor_id = model_location("processor", processor or model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._model = None
        self.last_read: list[str] = []

    def _load(self):
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        self._processor = AutoProcessor.from_pretrained(self.processor_id)
        self._model = VisionEncoderDecoderModel.from_pretrained(self.model_id, torch_dtype=self.dtype)
        self._model = self._model.to(self.device).eval()

    @torch.no_grad()
    def read(self, images) -> list[str]:
        """The text the model reads in each image."""
        if self._model is None:
            self._load()
        pil = [im.convert("RGB") for im in as_pil_images(images)]
        out = []
        for i in range(0, len(pil), self.batch_size):
            px = self._processor(images=pil[i:i + self.batch_size], return_tensors="pt").pixel_values
            ids = self._model.generate(pixel_values=px.to(self.device, self.dtype), do_sample=False, num_beams=1,
                                       max_new_tokens=self.max_new_tokens)
            out += self._processor.batch_decode(ids, skip_special_tokens=True)
        return out

    def __call__(self, images, prompts) -> torch.Tensor:
        targets = [quoted_text(p) for p in prompts]  # before reading: a prompt without quotes fails at once
        self.last_read = self.read(images)
        return torch.tensor([ocr_score(r, t) for r, t in zip(self.last_read, targets)], dtype=torch.float32)
