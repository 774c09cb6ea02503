"""Prompt lists: text prompts (a built-in list, or a text file with one prompt per line) and image-editing prompts
(an instruction with a source image: a JSONL file, a folder of images with captions, or a built-in set).

``prompts.source`` is one of:

* ``builtin``: `BUILTIN_PROMPTS` (text);
* ``heldout`` (``eval.prompts`` only): for evaluation (`fastgrpo.train.evaluate`), prompts the built-in training
  list does not hold: `HELDOUT_PROMPTS` (text), or for an image-editing family `HELDOUT_EDITS` (other instructions
  over other drawn images than ``builtin_edit``'s);
* a text file, one prompt per line (blank lines skipped);
* a ``.jsonl`` file, one JSON object per line: ``{"prompt": "...", "image": "path"}``, the image path relative to
  the JSONL file's folder (or absolute, ``~`` expanded); rows without ``"image"`` are text prompts
  (`fastgrpo.rewards.geneval.MetaPrompt`, e.g. GenEval's ``evaluation_metadata.jsonl``). Every prompt keeps its row
  as ``.meta`` (GenEval's ``include`` / ``exclude`` clauses are validated, for the ``geneval`` reward), so
  Flow-GRPO's ``counting_edit/*_metadata.jsonl`` files load as they are;
* a folder of images (``.png .jpg .jpeg .webp .bmp``, sorted by name), each with a caption file of the same stem
  (``cat.png`` + ``cat.txt``: the whole file, stripped, is the instruction);
* ``builtin_edit``: `BUILTIN_EDITS`, a few editing instructions over small images drawn in code (deterministic,
  no files), for the tiny image-editing preset.

An editing prompt is an `EditPrompt`: a ``str`` (the instruction, so everything that handles prompts -- the
embedding cache, ``group_by: prompt``, previews, logs -- keeps working) that also carries its source image
(``.image``). The adapter of an image-editing family (`fastgrpo.diffusion.flux_kontext`) encodes the image with the
text, and rewards reach it through the prompts (`EditPrompt.source_pixels`; `fastgrpo.rewards.source_similarity`).

Whether a run takes editing prompts is its family's (``edits_images`` of the family's adapter): an editing family
given text prompts, or a text-to-image family given prompts with images, is a ValueError naming ``prompts.source``,
the file and the line. So is a JSONL row that is not an object or lacks a non-empty ``"prompt"``, an image that
does not exist or cannot be read, an image without its caption file, and a folder without images. Every image is
opened (header and data checked with PIL's ``verify``) when the list loads, so a bad file stops the run before
any model loads, not in the middle of training.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

BUILTIN_PROMPTS = [
    "a red apple on a table", "a cat sleeping in the sun", "a lighthouse at night", "a bowl of blue berries",
    "a snowy mountain", "a yellow taxi in the rain", "a green forest path", "an orange sunset over the sea",
    "a white horse in a field", "a purple flower", "a black and white photo of a city", "a bright desert",
    "a dog playing with a ball", "a cup of coffee", "a sailing boat", "a field of sunflowers",
]

# Evaluation prompts none of which is in BUILTIN_PROMPTS (tests/test_evaluate.py checks it): the same kinds of
# subjects, other objects, colours and scenes.
HELDOUT_PROMPTS = [
    "a blue vase on a shelf", "a fox in the snow", "a windmill at dawn", "a plate of red strawberries",
    "a frozen lake", "a green bus on a bridge", "a brown owl on a branch", "a pink sky over the hills",
    "a grey wolf in a forest", "a white teapot", "a neon street at night", "a dark cave entrance",
    "a child flying a kite", "a glass of orange juice", "a red canoe on a river", "a field of lavender",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN_EDIT_SIZE = 64  # the built-in source images are drawn at 64x64 px (resized to model.height x model.width)


class EditPrompt(str):
    """An image-editing prompt: the instruction (the string itself) and its source image (``image``).

    ``image`` names the source image: the resolved path of its file, or ``builtin:<name>`` for the drawn images of
    `BUILTIN_EDITS`; ``meta`` is its JSONL row (as `fastgrpo.rewards.geneval.MetaPrompt`'s: rewards such as
    ``geneval`` read their clauses there; equality ignores it). Decisions:

    * Equality and hash take the text *and* the image: the same instruction over another image is another prompt
      (its own cache entry in the adapter, its own statistics under ``train.group_by: prompt``: Flow-GRPO keys edit
      groups by ``f"{prompt}_{image_path}"``, yifan123/flow_grpo scripts/train_flux_kontext.py,
      ``prompt_with_image_path``). An EditPrompt never equals a plain ``str``. Ordering is the text's.
    * String operations (slicing, ``+``, ``.strip()``, f-strings) give plain ``str``: the text.
    * It pickles as (text, image, meta) (``copy``, ``torch.save``; `fastgrpo.train.checkpoint.load_pt` allows it);
      the pixels are read from the file (or drawn) when needed (`load`).
    """

    def __new__(cls, text: str, image: str, meta: dict | None = None):
        obj = super().__new__(cls, text)
        obj.image = str(image)
        obj.meta = dict(meta or {})
        obj._pil = None
        return obj

    def __reduce__(self):
        return (EditPrompt, (str(self), self.image, self.meta))

    def __eq__(self, other):
        return isinstance(other, EditPrompt) and str.__eq__(self, other) and self.image == other.image

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((str(self), self.image))

    def __repr__(self):
        return f"EditPrompt({str.__repr__(self)}, image={self.image!r})"

    @property
    def text(self) -> str:
        return str(self)

    def load(self):
        """The source image as an RGB ``PIL.Image`` (ValueError naming the file when it cannot be read; do not modify
        it: it may be shared). A file is read again when needed (the last 64 read are kept: a large dataset is not
        held in memory; the adapter encodes each prompt's image once and caches the latents); a built-in image is
        drawn once and kept in the prompt."""
        if self.image.startswith("builtin:"):
            if self._pil is None:
                self._pil = builtin_edit_image(self.image.removeprefix("builtin:"))
            return self._pil
        return _open_rgb(self.image)

    def source_pixels(self, height: int, width: int) -> torch.Tensor:
        """The source image resized to ``height`` x ``width`` (Lanczos, as diffusers' ``VaeImageProcessor.resize``,
        which the editing pipelines use) as float32 [3, H, W] in [0, 1]: what the model was shown, in pixels."""
        from PIL import Image

        img = self.load()
        if img.size != (width, height):
            img = img.resize((width, height), resample=Image.LANCZOS)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@functools.lru_cache(maxsize=64)
def _open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"source image {str(path)!r} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"source image {str(path)!r} cannot be read as an image ({type(e).__name__}: {e})") from None


def _check_image(path: Path) -> str | None:
    """None when ``path`` is a readable image file, else why not (PIL opens it and verifies its data)."""
    from PIL import Image

    if not path.is_file():
        return "does not exist"
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    return None


# ------------------------------------------------------------------------------------- built-in editing set
# Instructions over four small drawn images; the tiny preset's reward (brightness + source_similarity) asks for a
# brighter image that keeps the source's layout, which these instructions say in words.
BUILTIN_EDITS = [
    ("make the picture brighter", "stripes"),
    ("brighten the sky", "horizon"),
    ("turn on the lights", "checker"),
    ("make the disc glow", "disc"),
]


# Held-out edits for evaluation (``heldout`` for an image-editing family): instructions and images none of which
# is in BUILTIN_EDITS.
HELDOUT_EDITS = [
    ("lighten the whole scene", "rings"),
    ("make the square shine", "square"),
    ("add daylight", "diagonal"),
    ("brighten the dots", "dots"),
]


def builtin_edit_image(name: str):
    """One of the built-in source images (64x64 RGB ``PIL.Image``), drawn in code: the same pixels every time."""
    from PIL import Image

    n = BUILTIN_EDIT_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)
    if name == "stripes":  # vertical red / blue stripes on a dark ground
        band = (np.floor(xx * 6) % 2 == 0)
        rgb = np.stack([0.15 + 0.55 * band, 0.1 + 0.0 * xx, 0.55 - 0.4 * band], -1)
    elif name == "horizon":  # dark blue sky over a green field
        sky = yy < 0.5
        rgb = np.stack([0.05 + 0.1 * ~sky, 0.1 + 0.45 * ~sky, 0.35 * sky + 0.05 + 0.1 * xx], -1)
    elif name == "checker":  # a gray checkerboard of 8 px squares
        c = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2).astype(np.float32)
        rgb = np.stack([0.2 + 0.3 * c] * 3, -1)
    elif name == "disc":  # an orange disc on purple
        d = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.09
        rgb = np.stack([0.3 + 0.5 * d, 0.05 + 0.35 * d, 0.35 - 0.3 * d], -1)
    elif name == "rings":  # concentric teal rings
        r = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        ring = (np.floor(r * 10) % 2 == 0)
        rgb = np.stack([0.05 + 0.0 * r, 0.2 + 0.3 * ring, 0.25 + 0.3 * ring], -1)
    elif name == "square":  # a yellow square on dark green
        sq = (np.abs(xx - 0.5) < 0.25) & (np.abs(yy - 0.5) < 0.25)
        rgb = np.stack([0.1 + 0.6 * sq, 0.25 + 0.45 * sq, 0.1 + 0.0 * xx], -1)
    elif name == "diagonal":  # a dark blue / brown diagonal split
        upper = xx > yy
        rgb = np.stack([0.1 + 0.3 * ~upper, 0.1 + 0.15 * ~upper, 0.4 * upper + 0.05], -1)
    elif name == "dots":  # a grid of pale dots on black
        d = ((xx * 4 % 1 - 0.5) ** 2 + (yy * 4 % 1 - 0.5) ** 2) < 0.06
        rgb = np.stack([0.6 * d, 0.55 * d, 0.5 * d], -1)
    else:
        known = ", ".join(n for _, n in BUILTIN_EDITS + HELDOUT_EDITS)
        raise ValueError(f"unknown built-in edit image {name!r} (known: {known})")
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


def builtin_edits(held_out: bool = False) -> list:
    return [EditPrompt(text, f"builtin:{name}") for text, name in (HELDOUT_EDITS if held_out else BUILTIN_EDITS)]


# ----------------------------------------------------------------------------------------------- loading
def load_prompts(source: str, *, edit: bool | None = None, family: str | None = None) -> list:
    """The prompt list of ``prompts.source`` (module docstring). ``edit``: whether the run's family edits images:
    True, every prompt must carry a source image (`EditPrompt`); False, none may; None (the default), the list is
    what the source holds (``heldout`` then the text one), as long as its prompts agree. ``family`` names the
    family in messages."""
    who = f"model.family {family!r}" if family else "this model family"
    if source == "heldout":
        return builtin_edits(held_out=True) if edit else list(HELDOUT_PROMPTS)
    if source in ("builtin", "builtin_edit"):
        if edit is None:
            edit = source == "builtin_edit"
        if (source == "builtin_edit") != edit:
            raise ValueError(_mismatch(f"prompts.source {source!r}", has_image=not edit, who=who))
        return builtin_edits() if edit else list(BUILTIN_PROMPTS)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, source, True if edit is None else edit, who)
    if not path.is_file():
        raise ValueError(f"prompts.source: prompt file {source!r} does not exist")
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, source, edit, who)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts.source: {source!r} cannot be read as text ({type(e).__name__}: {e})") from None
    prompts = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompts.source: {source!r} holds no prompts (one per line expected)")
    if edit:
        raise ValueError(_mismatch(f"prompts.source: {path}:{prompts[0][0]}", has_image=False, who=who))
    return [p for _, p in prompts]


def _mixed(where: str) -> str:
    return (f"{where}: a prompt without a source image after prompts with one (or the other way round): a prompt "
            "list is either image-editing prompts or text prompts")


def _mismatch(where: str, *, has_image: bool, who: str) -> str:
    if has_image:
        return (f"{where}: a prompt with a source image, but {who} generates from text alone; prompts with images "
                "are for an image-editing family (model.family flux_kontext)")
    return (f"{where}: a prompt without a source image, but {who} edits images: give prompts.source a JSONL file "
            "of {\"prompt\": ..., \"image\": path} rows, a folder of images with same-named .txt captions, or "
            "builtin_edit")


def _load_jsonl(path: Path, source: str, edit: bool | None, who: str) -> list:
    """Each row a `fastgrpo.rewards.geneval.MetaPrompt` (text) or an `EditPrompt` (with ``"image"``), both carrying
    the row as ``.meta`` (GenEval clauses checked: the geneval reward reads them, e.g. Flow-GRPO's counting edits)."""
    from fastgrpo.rewards.geneval import MetaPrompt, jsonl_rows

    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompts.source: {source!r} cannot be read as text ({type(e).__name__}: {e})") from None
    out, inferred = [], edit is None
    for where, row in jsonl_rows(lines, f"prompts.source: {path}"):
        text, image = row["prompt"], row.get("image")
        if edit is None and not out:
            edit = image is not None  # the first row says which kind of list this is
        if (image is not None) != edit:
            if inferred:
                raise ValueError(_mixed(where))
            raise ValueError(_mismatch(where, has_image=image is not None, who=who))
        if image is None:
            out.append(MetaPrompt(text.strip(), row))
            continue
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: \"image\" must be a path (a non-empty string), got {image!r}")
        img_path = Path(image).expanduser()
        if not img_path.is_absolute():
            img_path = path.parent / img_path
        img_path = img_path.resolve()
        problem = _check_image(img_path)
        if problem:
            raise ValueError(f"{where}: image {image!r} ({img_path}) {problem}")
        out.append(EditPrompt(text.strip(), str(img_path), meta=row))
    if not out:
        raise ValueError(f"prompts.source: {source!r} holds no prompts (one JSON object per line expected)")
    return out


def _load_folder(path: Path, source: str, edit: bool, who: str) -> list:
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"prompts.source: the folder {source!r} holds no images ({' '.join(IMAGE_SUFFIXES)}), each "
                         "with a same-named .txt caption")
    if not edit:
        raise ValueError(_mismatch(f"prompts.source {source!r} (a folder of images, e.g. {images[0].name})",
                                   has_image=True, who=who))
    out = []
    for img in images:
        caption = img.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"prompts.source {source!r}: image {img.name} has no caption file {caption.name}")
        try:
            text = caption.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"prompts.source {source!r}: caption {caption.name} cannot be read "
                             f"({type(e).__name__}: {e})") from None
        if not text:
            raise ValueError(f"prompts.source: {caption}:1: the caption is empty")
        problem = _check_image(img)
        if problem:
            raise ValueError(f"prompts.source {source!r}: image {img.name} {problem}")
        out.append(EditPrompt(text, str(img.resolve())))
    return out
