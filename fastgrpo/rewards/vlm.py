"""VLM judge: a vision-language model (Qwen2.5-VL class in transformers) rates each image for its prompt.

Inputs: images [B, 3, H, W] in [0, 1] (or PIL images) and prompts (the captions). Output in [0.2, 1]: the rating
(1-5) the model writes after "Final Score:", divided by 5.

Template and parsing are UnifiedReward's pointwise image-generation assessment as Flow-GRPO queries it
(yifan123/flow_grpo ``flow_grpo/rewards.py``, ``unifiedreward_score_sglang``: the question at line 315, the image
resized to 512x512 and the model's answer decoded greedily (temperature 0), the score parsed with
``Final Score:\\s*([1-5](?:\\.\\d+)?)`` at lines 298-310 and divided by 5 at line 355). Here the model runs in
process through transformers (``Qwen2_5_VLForConditionalGeneration`` + ``AutoProcessor``, the chat template's
image placeholder before the question; default ``CodeGoat24/UnifiedReward-qwen-7b``), greedy, ``max_new_tokens``.

Parsing (`parse_score`): the last "Final Score" in the answer (case-insensitive, optional markdown ``**`` and
colon) followed by a number in [1, 5]; anything else -- no such phrase, a number outside 1-5, an empty answer --
is malformed. Flow-GRPO scores a malformed answer 0.0 (line 307/309), which in GRPO punishes the image for the
judge's failure; here a malformed answer is *missing* and scores ``missing``: ``"mean"`` (default: the mean of the
well-formed scores of the same call -- a sampling micro-batch, whole groups in the flow trainer -- or 0.6, the
scale's midpoint 3/5, when none is well-formed) or a fixed number. NaN never reaches the loss. The count of
malformed answers is kept: ``last_stats["malformed"]`` (0/1 per image: logged by the trainer as
``reward_vlm_judge_malformed``, the fraction per round) and ``malformed_total`` / ``answered_total`` since the
reward was built; the answers of the last call are in ``last_answers``.
"""
from __future__ import annotations

import math
import re

import torch

from .pixel import as_pil_images

# UnifiedReward's pointwise image-generation question (flow_grpo/rewards.py line 315, without its "<image>\n",
# which the chat template's image placeholder replaces).
TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from "
    "1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]")
SCALE = (1.0, 5.0)
_SCORE = re.compile(r"final\s+score\s*\**\s*:?\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_score(answer) -> float | None:
    """The rating in an answer, or None when malformed (see the module doc)."""
    if not isinstance(answer, str):
        return None
    found = _SCORE.findall(answer)
    if not found:
        return None
    value = float(found[-1])
    if not math.isfinite(value) or not SCALE[0] <= value <= SCALE[1]:
        return None
    return value


def fill_missing(scores: list, missing="mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B] in [0.2, 1], malformed [B] 0/1) from parsed ratings (None: malformed): rating / 5, a missing
    one replaced by ``missing`` ("mean": the mean of the well-formed rewards, or 0.6 when there are none)."""
    bad = torch.tensor([s is None for s in scores], dtype=torch.float32)
    ok = [s / SCALE[1] for s in scores if s is not None]
    if missing == "mean":
        fill = sum(ok) / len(ok) if ok else (SCALE[0] + SCALE[1]) / 2 / SCALE[1]
    else:
        fill = float(missing)
    return torch.tensor([fill if s is None else s / SCALE[1] for s in scores], dtype=torch.float32), bad


class VlmJudge:
    """A Qwen2.5-VL-class judge's rating of each image for its prompt (see the module doc).

    ``missing``: "mean" or a number (the reward of a malformed answer); ``image_size``: images are resized to this
    square before the judge sees them (Flow-GRPO: 512; None keeps them); ``template``: the question, with
    ``{prompt}``."""

    def __init__(self, model: str | None = None, processor: str | None = None, device: str | None = None,
                 dtype: str = "bfloat16", batch_size: int = 8, max_new_tokens: int = 64, missing="mean",
                 image_size: int | None = 512, template: str = TEMPLATE):
        from fastgrpo.paths import model_location

        if not model:
            raise ValueError("model: give the judge's (a Qwen2.5-VL-class model) local folder or hub id")
        if missing != "mean":
            try:
                missing = float(missing)
            except (TypeError, ValueError):
                raise ValueError(f"missing must be 'mean' or a number, got {missing!r}") from None
            if not math.isfinite(missing):
                raise ValueError(f"missing must be finite, got {missing!r}")
        if "{prompt}" not in template:
            raise ValueError("template must contain {prompt}")
        self.model_id = model_location("model", model)
        self.processor_id = model_location("processor", processor or model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.missing, self.image_size, self.template = missing, image_size, template
        self._model = None
        self.malformed_total = self.answered_total = 0
        self.last_answers: list[str] = []
        self.last_stats = {}

    def _load(self):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self._processor = AutoProcessor.from_pretrained(self.processor_id)
        self._processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        self._model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_id, torch_dtype=self.dtype)
        self._model = self._model.to(self.device).eval()

    @torch.no_grad()
    def answers(self, images, prompts) -> list[str]:
        """The judge's answer for each (image, prompt)."""
        if self._model is None:
            self._load()
        pil = [im.convert("RGB") for im in as_pil_images(images)]
        if self.image_size:
            pil = [im.resize((self.image_size, self.image_size)) for im in pil]
        out = []
        for i in range(0, len(pil), self.batch_size):
            texts = [self._processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": self.template.format(prompt=str(p))}]}],
                tokenize=False, add_generation_prompt=True) for p in prompts[i:i + self.batch_size]]
            inputs = self._processor(text=texts, images=pil[i:i + self.batch_size], padding=True,
                                     return_tensors="pt")
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            ids = self._model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out += self._processor.batch_decode(new, skip_special_tokens=True)
        return out

    def __call__(self, images, prompts) -> torch.Tensor:
        self.last_answers = self.answers(images, list(prompts))
        rewards, bad = fill_missing([parse_score(a) for a in self.last_answers], self.missing)
        self.malformed_total += int(bad.sum())
        self.answered_total += len(prompts)
        self.last_stats = {"malformed": bad}
        return rewards
