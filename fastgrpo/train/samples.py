"""``samples.png``: what training did to the images, for the same prompts and the same seeds.

At the start of a run (step 0, before the first optimizer step) and at every checkpoint the trainer generates one
row of `PREVIEW_PROMPTS` images: the first prompts of the run's prompt list, each from a fixed generator keyed by
(run seed, `STREAM_PREVIEW`, column), sampled deterministically by the family (flow: the ODE, no SDE noise;
autoregressive: the usual token sampling with those fixed generators), so a row differs from the previous one only
through the weights. Each row is stored at its native resolution as ``samples/step_NNNNNN.png`` and
``samples.png`` is redrawn from the rows up to the current step: one row per checkpoint, labelled with its step,
one column per prompt (titled with the prompt). Only rank 0 writes; every rank generates (FSDP gathers weights in
each forward). The preview's forwards are not counted in ``model_forwards`` and draw no randomness of the run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

PREVIEW_PROMPTS = 4  # columns: a handful of images per row keeps a checkpoint cheap
STREAM_PREVIEW = 17  # the generator stream of the preview (`fastgrpo.train.distributed.step_generator`)
SAMPLES_DIR = "samples"
MAX_ROWS = 16  # more checkpoints than this: step 0, the newest, and evenly spaced ones between

# samples.png layout (pixels): a label column, a header row, each image scaled up by SCALE with PAD around it.
SCALE, PAD, LABEL_W, HEADER_H = 4, 4, 72, 28
_ROW_FILE = re.compile(r"^step_(\d+)\.png$")


def preview_generators(seed: int, n: int) -> list:
    from .distributed import step_generator

    return [step_generator(seed, 0, STREAM_PREVIEW, j) for j in range(n)]


def save_row(run_dir, step: int, images: torch.Tensor, prompts: list[str]) -> Path:
    """Store one preview row (``images`` [K, 3, H, W] in [0, 1]) as ``samples/step_NNNNNN.png`` (the K images side
    by side) and the prompts as ``samples/prompts.json``."""
    d = Path(run_dir) / SAMPLES_DIR
    d.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # [K, 3, H, W]
    strip = arr.permute(2, 0, 3, 1).reshape(arr.shape[2], -1, 3).numpy()  # [H, K*W, 3]
    path = d / f"step_{step:06d}.png"
    Image.fromarray(strip).save(path)
    (d / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "columns": arr.shape[0]}))
    return path


def sample_rows(run_dir, upto: int | None = None) -> list[tuple[int, np.ndarray]]:
    """(step, uint8 [H, K*W, 3]) of each stored row, by step; ``upto``: only rows of steps <= it (a resumed run's
    later rows are from the run it replaces)."""
    from PIL import Image

    d = Path(run_dir) / SAMPLES_DIR
    rows = []
    for p in sorted(d.glob("step_*.png")) if d.is_dir() else []:
        m = _ROW_FILE.match(p.name)
        if m and (upto is None or int(m.group(1)) <= upto):
            rows.append((int(m.group(1)), np.asarray(Image.open(p).convert("RGB"))))
    return sorted(rows, key=lambda r: r[0])


def shown_rows(rows: list) -> list:
    """At most `MAX_ROWS`: the first, the last and evenly spaced ones between."""
    if len(rows) <= MAX_ROWS:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (MAX_ROWS - 1)) for i in range(MAX_ROWS)})
    return [rows[i] for i in idx]


def draw_samples(run_dir, upto: int | None = None) -> Path | None:
    """(Re)draw ``run_dir/samples.png`` from the stored rows (steps <= ``upto``); None when there are none."""
    from PIL import Image, ImageDraw

    run_dir = Path(run_dir)
    rows = shown_rows(sample_rows(run_dir, upto))
    if not rows:
        return None
    meta = json.loads((run_dir / SAMPLES_DIR / "prompts.json").read_text())
    k = meta["columns"]
    h, w = rows[0][1].shape[0], rows[0][1].shape[1] // k
    cw, ch = w * SCALE + 2 * PAD, h * SCALE + 2 * PAD
    canvas = Image.new("RGB", (LABEL_W + k * cw, HEADER_H + len(rows) * ch), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(meta["prompts"][:k]):
        text = prompt if len(prompt) <= cw // 6 else prompt[:cw // 6 - 1] + "…"
        draw.text((LABEL_W + j * cw + PAD, 8), text, fill="black")
    draw.text((4, 8), "prompt:", fill="black")
    for r, (step, strip) in enumerate(rows):
        y = HEADER_H + r * ch
        draw.text((4, y + ch // 2 - 6), f"step {step}", fill="black")
        for j in range(k):
            cell = Image.fromarray(strip[:, j * w:(j + 1) * w]).resize((w * SCALE, h * SCALE), Image.NEAREST)
            canvas.paste(cell, (LABEL_W + j * cw + PAD, y + PAD))
    out = run_dir / "samples.png"
    canvas.save(out)
    return out


def grid_cell(png: np.ndarray, row: int, col: int, h: int, w: int) -> np.ndarray:
    """The image at (row, col) of a ``samples.png`` array (for tests and tools): ``h`` x ``w`` the native size."""
    cw, ch = w * SCALE + 2 * PAD, h * SCALE + 2 * PAD
    y, x = HEADER_H + row * ch + PAD, LABEL_W + col * cw + PAD
    return png[y:y + h * SCALE, x:x + w * SCALE]
