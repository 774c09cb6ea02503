"""GenEval-style compositional reward: an open-vocabulary detector (OWLv2 / OWL-ViT in transformers) checks each
image against its prompt's GenEval metadata (object classes, counts, colours, relative positions).

Inputs: images [B, 3, H, W] in [0, 1] (or PIL images) and prompts carrying GenEval metadata: a prompt source that
is a GenEval JSONL file (`fastgrpo.train.prompts.load_prompts` turns each line ``{"prompt": ..., "tag": ...,
"include": [...], "exclude": [...]}`` into a `MetaPrompt`, a ``str`` with ``.meta``), or plain prompt strings
looked up by their text in ``args.metadata`` (the same JSONL format).

Output: by default the fraction of the prompt's requirements the image meets, in [0, 1] (one requirement per
``include`` clause -- its count, colour and position together -- and one per ``exclude`` clause); with
``strict: true`` GenEval's own 0/1 "correct" (every requirement met). The other of the two is logged as the part
``geneval_strict`` (or ``geneval_score``) through ``last_stats``. With ``rule: flow_grpo`` the score is Flow-GRPO's
training reward (below; at most 1, negative when a class is detected more than twice the asked count).

The rules are GenEval's (djghosh13/geneval, ``evaluation/evaluate_images.py``):
* detections per class sorted by confidence, kept above ``threshold`` (0.3 there) or, for tag ``counting``,
  ``counting_threshold`` (0.9 there), at most ``max_objects`` (16) per class, greedy NMS at ``max_overlap``
  (1.0: none) with GenEval's +1-pixel IoU (lines 130-137, 230-244, 286-290);
* ``include``: the ``count`` most confident objects of the class must exist; with ``color``, at least ``count``
  of them must be classified as that colour; with ``position [relation, i]``, every one of them must stand in
  that relation to every object matched by include clause ``i`` (which must itself have matched); ``exclude``:
  fewer than ``count`` objects of the class (lines 160-220);
* relative position: centres' offset shrunk by ``position_threshold`` (0.1) times the boxes' summed sizes per
  axis, then "left of"/"right of"/"above"/"below" when that axis's share of the (unshrunk) offset's norm exceeds
  0.5 (lines 140-157; image y grows downward);
* colour: CLIP zero-shot classification of the object's box crop over GenEval's 10 colours with its three
  templates ("a photo of a {c} {class}", "a photo of a {c}-colored {class}", "a photo of a {c} object"), each
  colour's text embeddings normalised, averaged and normalised again (lines 76, 109-127).

``rule: flow_grpo`` scores by Flow-GRPO's GenEval training reward instead (its reward server:
yifan123/reward-server ``reward_server/gen_eval.py``, ``evaluate_reward``; same detection thresholds): partial
credit for counts and colours, exact counts, excludes unused (`flow_grpo_score`).

How it differs from GenEval: the detector is OWLv2 (or OWL-ViT) queried with "a photo of a {class}" for the
prompt's classes only, instead of Mask2Former over the 80 COCO classes; a box takes the class of its best query
(score = sigmoid of that logit). GenEval's thresholds were set for Mask2Former's confidences; OWL's sigmoid scores
run lower, so the defaults here are ``threshold`` 0.1 and ``counting_threshold`` 0.2 (OWL-ViT's usual detection
threshold and a stricter one for counting: an unvalidated choice, set them for your detector). The colour crop is
the box of the image (GenEval pastes the instance mask on grey #999 first; OWL gives no masks). GenEval's
evaluation also requires a CUDA device; this runs anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .pixel import as_pil_images

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]  # GenEval line 76
COLOR_TEMPLATES = ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"]
RELATIONS = ("left of", "right of", "above", "below")
DETECTOR_TEMPLATE = "a photo of a {cls}"


class MetaPrompt(str):
    """A prompt string that carries its metadata (``.meta``, a dict: e.g. one GenEval JSONL line). It is a ``str``
    everywhere else (tokenizers, logs, equality and hashing by its text)."""

    meta: dict

    def __new__(cls, text: str, meta: dict | None = None):
        obj = super().__new__(cls, text)
        obj.meta = dict(meta or {})
        return obj

    def __reduce__(self):  # pickling keeps the metadata (worker processes, torch.save)
        return (MetaPrompt, (str(self), self.meta))


def _count(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def check_metadata(meta, where: str) -> dict:
    """``meta`` (one GenEval metadata object) validated; ValueError starting with ``where`` otherwise."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if "tag" in meta and not isinstance(meta["tag"], str):
        raise ValueError(f"{where}: tag must be a string, got {meta['tag']!r}")
    include, exclude = meta.get("include", []), meta.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise ValueError(f"{where}: include and exclude must be lists")
    if not include and not exclude:
        raise ValueError(f"{where}: GenEval metadata needs an include (or exclude) list of clauses")
    for i, req in enumerate(include):
        w = f"{where}: include[{i}]"
        if not isinstance(req, dict) or not isinstance(req.get("class"), str) or not req["class"].strip():
            raise ValueError(f"{w} must be an object with a class name, got {req!r}")
        _count(req.get("count"), w, "count")
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"{w}: color {req['color']!r} is not one of GenEval's {', '.join(COLORS)}")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS or isinstance(pos[1], bool)
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                raise ValueError(f"{w}: position must be [relation, index of an earlier include clause] with a "
                                 f"relation in {RELATIONS}, got {pos!r}")
    for i, req in enumerate(exclude):
        w = f"{where}: exclude[{i}]"
        if not isinstance(req, dict) or not isinstance(req.get("class"), str) or not req["class"].strip():
            raise ValueError(f"{w} must be an object with a class name, got {req!r}")
        _count(req.get("count"), w, "count")
    return meta


def jsonl_rows(lines: list[str], where: str):
    """(``where:line``, row) of each non-blank line of a JSONL prompt file: a JSON object with a non-empty
    ``prompt`` string, its GenEval clauses (``include`` / ``exclude``) validated (`check_metadata`). A line that does
    not parse: ValueError naming ``where`` and the line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{where}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{at}: each line must be a JSON object with a non-empty \"prompt\" string")
        if "include" in row or "exclude" in row:  # GenEval clauses, read by the geneval reward
            check_metadata(row, at)
        yield at, row


def load_jsonl_prompts(path) -> list[MetaPrompt]:
    """The prompts of a JSONL file (`jsonl_rows`; blank lines skipped), each a `MetaPrompt` carrying its line."""
    path = Path(path).expanduser()
    return [MetaPrompt(row["prompt"].strip(), row) for _, row in jsonl_rows(path.read_text().splitlines(), str(path))]


# ------------------------------------------------------------------------------------------------- the rules
def box_iou(a, b) -> float:
    """GenEval's IoU of two [x1, y1, x2, y2] boxes, with its +1 pixel convention (evaluate_images.py 130-137)."""
    area = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(boxes, scores, labels, classes, *, threshold: float, max_objects: int = 16,
                   max_overlap: float = 1.0) -> dict:
    """{class: [(box [4] list, score), ...] most confident first} from one image's detections (boxes [N, 4] xyxy
    pixels, scores [N], labels [N] indices into ``classes``): GenEval's selection (evaluate_images.py 229-244):
    score > threshold, the ``max_objects`` best per class, greedy NMS dropping IoU >= ``max_overlap`` (1: off)."""
    boxes, scores = (torch.as_tensor(t, dtype=torch.float64).tolist() for t in (boxes, scores))
    labels = torch.as_tensor(labels, dtype=torch.int64).tolist()
    out = {}
    for c, name in enumerate(classes):
        idx = sorted((i for i in range(len(scores)) if labels[i] == c and scores[i] > threshold),
                     key=lambda i: -scores[i])[:max_objects]
        kept = []
        while idx:
            best = idx.pop(0)
            kept.append((boxes[best], scores[best]))
            idx = [i for i in idx if max_overlap == 1 or box_iou(boxes[best], boxes[i]) < max_overlap]
        if kept:
            out.setdefault(name, []).extend(kept)
    return out


def relative_position(box_a, box_b, threshold: float = 0.1) -> set:
    """The relations of box A to box B (GenEval's ``relative_position``, evaluate_images.py 140-157)."""
    a, b = torch.tensor(box_a[:4], dtype=torch.float64), torch.tensor(box_b[:4], dtype=torch.float64)
    center_a, center_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = (a[2:] - a[:2]).abs(), (b[2:] - b[:2]).abs()
    offset = center_a - center_b
    revised = torch.clamp(offset.abs() - threshold * (dim_a + dim_b), min=0) * offset.sign()
    if bool((revised.abs() < 1e-3).all()):
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate(meta: dict, objects: dict, colors_of=None, position_threshold: float = 0.1) -> list[bool]:
    """One bool per requirement (each include clause, then each exclude clause), GenEval's ``evaluate``
    (evaluate_images.py 160-220). ``objects``: `select_objects`'s dict; ``colors_of(class, objects) -> [colour]``
    classifies the given objects' colours (needed only when a clause has a colour)."""
    met, matched = [], []
    for req in meta.get("include", []):
        found = objects.get(req["class"], [])[:req["count"]]
        ok = len(found) >= req["count"]
        if ok and "color" in req:
            ok = colors_of(req["class"], found).count(req["color"]) >= req["count"]
        if ok and "position" in req:
            relation, target = req["position"]
            if matched[target] is None:
                ok = False
            else:
                ok = all(relation in relative_position(o[0], t[0], position_threshold)
                         for o in found for t in matched[target])
        matched.append(found if ok else None)
        met.append(ok)
    for req in meta.get("exclude", []):
        met.append(len(objects.get(req["class"], [])) < req["count"])
    return met


def flow_grpo_score(meta: dict, objects: dict, colors_of=None, position_threshold: float = 0.1) -> tuple:
    """(score, strict) by Flow-GRPO's training rule (yifan123/reward-server ``reward_server/gen_eval.py``,
    ``evaluate_reward``), kept as released: per include clause a count credit ``1 - |count - found| / count`` over
    *all* detections of the class (negative past twice the count) and an exact count required; if the count is
    off, one 0 for the clause's colour and/or position; else a colour credit ``1 - |count - n_colour| / count``
    (exactly ``count`` of that colour required) and, for a position, 0 when its target clause failed, else 0 on the
    first failing pair and then 1 (the released code appends the 1 after the loop even when a pair failed); the
    score is the mean of the credits (0 without any). ``exclude`` clauses are not used; strict: every include
    clause matched."""
    credits, matched_groups, strict = [], [], True
    for req in meta.get("include", []):
        found, n = objects.get(req["class"], []), req["count"]
        credits.append(1 - abs(n - len(found)) / n)
        ok = len(found) == n
        if not ok:
            if "color" in req or "position" in req:
                credits.append(0.0)
        else:
            if "color" in req:
                k = colors_of(req["class"], found).count(req["color"])
                credits.append(1 - abs(n - k) / n)
                ok = k == n
            if "position" in req and ok:
                relation, target = req["position"]
                if matched_groups[target] is None:
                    ok = False
                    credits.append(0.0)
                else:
                    if not all(relation in relative_position(o[0], t[0], position_threshold)
                               for o in found for t in matched_groups[target]):
                        ok = False
                        credits.append(0.0)
                    credits.append(1.0)
        strict = strict and ok
        matched_groups.append(found if ok else None)
    return (sum(credits) / len(credits) if credits else 0.0), strict


def classes_of(meta: dict) -> list[str]:
    """The class names a prompt's metadata mentions, in order of first mention."""
    out = []
    for req in [*meta.get("include", []), *meta.get("exclude", [])]:
        if req["class"] not in out:
            out.append(req["class"])
    return out


# ------------------------------------------------------------------------------------------------- the reward
class GenEvalReward:
    """GenEval's rules over OWLv2 / OWL-ViT detections and CLIP colour classification (see the module doc).

    ``model``/``processor``: the detector (``Owlv2ForObjectDetection`` or ``OwlViTForObjectDetection``, chosen by
    its config's ``model_type``); ``color_model``/``color_processor``: the CLIP model for colours (GenEval uses
    OpenAI's ViT-L/14; null: no colour clauses allowed); ``metadata``: an optional GenEval JSONL file for prompts
    that carry none; ``strict``: return the 0/1 "all correct" instead of the score; ``rule``: ``geneval`` (the
    fraction of requirements met; strict = GenEval's "correct") or ``flow_grpo`` (`flow_grpo_score`)."""

    def __init__(self, model: str | None = None, processor: str | None = None, color_model: str | None = None,
                 color_processor: str | None = None, metadata: str | None = None, strict: bool = False,
                 threshold: float = 0.1, counting_threshold: float = 0.2, max_objects: int = 16,
                 max_overlap: float = 1.0, position_threshold: float = 0.1, rule: str = "geneval",
                 device: str | None = None, dtype: str = "float32"):
        from fastgrpo.paths import model_location

        if not model:
            raise ValueError("model: give the detector's (OWLv2 / OWL-ViT) local folder or hub id")
        self.model_id = model_location("model", model)
        self.processor_id = model_location("processor", processor or model)
        self.color_id = model_location("color_model", color_model) if color_model else None
        self.color_processor_id = model_location("color_processor", color_processor or color_model) \
            if color_model else None
        self.by_text = {}
        if metadata:
            if not Path(metadata).expanduser().is_file():
                raise ValueError(f"metadata {metadata!r} does not exist (a GenEval JSONL file)")
            self.by_text = {str(p): p.meta for p in load_jsonl_prompts(metadata)}
        if rule not in ("geneval", "flow_grpo"):
            raise ValueError(f"rule must be 'geneval' or 'flow_grpo', got {rule!r}")
        self.rule, self.strict = rule, bool(strict)
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.max_overlap = int(max_objects), float(max_overlap)
        self.position_threshold = float(position_threshold)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self._model = None
        self._color_embeds = {}
        self.last_stats = {}

    # -- loading
    def _load(self):
        from transformers import AutoConfig, AutoProcessor

        kind = AutoConfig.from_pretrained(self.model_id).model_type
        if kind == "owlv2":
            from transformers import Owlv2ForObjectDetection as Detector
        elif kind == "owlvit":
            from transformers import OwlViTForObjectDetection as Detector
        else:
            raise ValueError(f"model {self.model_id!r} is a {kind!r} model; geneval needs OWLv2 or OWL-ViT")
        self._kind = kind
        self._processor = AutoProcessor.from_pretrained(self.processor_id)
        self._model = Detector.from_pretrained(self.model_id, torch_dtype=self.dtype).to(self.device).eval()
        if self.color_id is not None:
            from transformers import CLIPModel

            self._clip_processor = AutoProcessor.from_pretrained(self.color_processor_id)
            self._clip = CLIPModel.from_pretrained(self.color_id, torch_dtype=self.dtype).to(self.device).eval()

    # -- metadata
    def check_prompts(self, prompts) -> None:
        """Every prompt has GenEval metadata (checked when the run starts, before any model loads)."""
        for p in prompts:
            self.metadata(p)

    def metadata(self, prompt) -> dict:
        meta = getattr(prompt, "meta", None)
        if meta and ("include" in meta or "exclude" in meta):
            return meta
        if str(prompt) in self.by_text:
            return self.by_text[str(prompt)]
        raise ValueError(f"prompt {str(prompt)[:80]!r} has no GenEval metadata: use a GenEval JSONL file as "
                         "prompts.source, or give the geneval reward args.metadata (a GenEval JSONL file)")

    # -- detection and colours
    @torch.no_grad()
    def detect(self, image, classes: list[str], threshold: float) -> dict:
        """`select_objects` of one PIL image for ``classes``."""
        if not classes:
            return {}
        queries = [DETECTOR_TEMPLATE.format(cls=c) for c in classes]
        inputs = self._processor(text=[queries], images=[image], return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        out = self._model(**inputs)
        logits = out.logits[0].float()  # [patches, queries]
        best = logits.max(-1)
        scores, labels = torch.sigmoid(best.values), best.indices
        cx, cy, w, h = out.pred_boxes[0].float().unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        W, H = image.size
        # OWLv2 pads the image to a square (bottom/right): its boxes are relative to the longer side.
        scale = torch.tensor([max(W, H)] * 4 if self._kind == "owlv2" else [W, H, W, H], dtype=torch.float32)
        return select_objects((xyxy * scale).cpu(), scores.cpu(), labels.cpu(), classes, threshold=threshold,
                              max_objects=self.max_objects, max_overlap=self.max_overlap)

    @torch.no_grad()
    def _color_classifier(self, cls: str) -> torch.Tensor:
        if cls not in self._color_embeds:
            from .clip import _features

            texts = [t.format(c=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            tx = self._clip_processor(text=texts, padding=True, truncation=True, return_tensors="pt")
            emb = _features(self._clip.get_text_features(**{k: v.to(self.device) for k, v in tx.items()})).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._color_embeds[cls] = emb / emb.norm(dim=-1, keepdim=True)  # [colours, d]
        return self._color_embeds[cls]

    @torch.no_grad()
    def colors(self, image, cls: str, objects) -> list[str]:
        """The colour of each object (its box crop), CLIP zero-shot over `COLORS`."""
        if self.color_id is None:
            raise ValueError("a prompt asks for a colour: give the geneval reward args.color_model (a CLIP model)")
        from .clip import _features

        crops = [image.crop(tuple(float(v) for v in box[:4])) for box, _ in objects]
        im = self._clip_processor(images=crops, return_tensors="pt")
        feats = _features(self._clip.get_image_features(
            pixel_values=im["pixel_values"].to(self.device, self.dtype))).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        pred = (feats @ self._color_classifier(cls).T).argmax(-1)
        return [COLORS[i] for i in pred.tolist()]

    def requirements(self, image, meta: dict) -> list[bool]:
        """One bool per requirement of ``meta`` for one PIL image."""
        threshold = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
        objects = self.detect(image, classes_of(meta), threshold)
        return evaluate(meta, objects, lambda cls, objs: self.colors(image, cls, objs), self.position_threshold)

    def score_image(self, image, meta: dict) -> tuple[float, float]:
        """(score, strict) of one PIL image under ``rule``."""
        if self.rule == "flow_grpo":
            threshold = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
            objects = self.detect(image, classes_of(meta), threshold)
            score, strict = flow_grpo_score(meta, objects, lambda cls, objs: self.colors(image, cls, objs),
                                            self.position_threshold)
            return score, float(strict)
        met = self.requirements(image, meta)
        return sum(met) / len(met), float(all(met))

    def __call__(self, images, prompts) -> torch.Tensor:
        metas = [self.metadata(p) for p in prompts]  # before loading: a prompt without metadata fails at once
        if self._model is None:
            self._load()
        score, strict = [], []
        for image, meta in zip(as_pil_images(images), metas):
            a, b = self.score_image(image.convert("RGB"), meta)
            score.append(a)
            strict.append(b)
        score, strict = torch.tensor(score), torch.tensor(strict)
        self.last_stats = {"score": score} if self.strict else {"strict": strict}
        return strict if self.strict else score
