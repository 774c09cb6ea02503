"""``samples.png``: what training did to the images, for the same prompts and the same seeds.

At the start of a run (step 0, before the first optimizer step) and at every checkpoint the trainer generates one
row of `PREVIEW_PROMPTS` images: the first prompts of the run's prompt list, each from a fixed generator keyed by
(run seed, `STREAM_PREVIEW`, column), sampled deterministically by the family (flow: the ODE, no SDE noise;
autoregressive: the usual token sampling with those fixed generators), so a row differs from the previous one only
through the weights. Each row is stored at its native resolution as ``samples/step_NNNNNN.png`` and
``samples.png`` is redrawn from the rows up to the current step: one row per checkpoint, labelled with its step,
one column per prompt (titled with the prompt). Only rank 0 writes; every rank generates (FSDP gathers weights in
each forward). The preview's forwards are not counted in ``model_forwards`` and draw no randomness of the run.

Videos (a video family's previews, [K, F, 3, H, W]): each cell of a row is a frame strip, up to `STRIP_FRAMES`
evenly spaced frames (first and last included) side by side, so ``samples.png`` shows each prompt's video as a
film strip per checkpoint; every video is also written whole as ``samples/step_NNNNNN_K.gif`` (PIL, always; `FPS`
frames per second, looping) and as ``samples/step_NNNNNN_K.mp4`` when an MP4 writer is importable (``imageio``
with its ``imageio-ffmpeg`` plugin; fastgrpo does not depend on either: without them the MP4s are skipped, with one
warning per process).
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
STRIP_FRAMES = 8  # frames of a video shown in its samples.png cell
FPS = 16  # of the saved GIF / MP4 videos (Wan2.1's: diffusers' example exports at 16 fps)
_warned_mp4 = False


def preview_generators(seed: int, n: int) -> list:
    from .distributed import step_generator

    return [step_generator(seed, 0, STREAM_PREVIEW, j) for j in range(n)]


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def strip_frames(num_frames: int, most: int = STRIP_FRAMES) -> list[int]:
    """At most ``most`` frame indices, evenly spaced, the first and the last included."""
    if num_frames <= most:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (most - 1)) for i in range(most)})


def save_row(run_dir, step: int, images: torch.Tensor, prompts: list[str]) -> Path:
    """Store one preview row (``images`` [K, 3, H, W] in [0, 1], or videos [K, F, 3, H, W]) as
    ``samples/step_NNNNNN.png`` (the K images, or the K videos' frame strips, side by side) and the prompts as
    ``samples/prompts.json``; videos also as GIF (and MP4 when possible), see the module docstring."""
    d = Path(run_dir) / SAMPLES_DIR
    d.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    arr = _uint8(images)
    if arr.ndim == 5:  # videos: each cell a strip of frames [H, n*W, 3]
        save_videos(d, step, arr)
        arr = arr[:, strip_frames(arr.shape[1])]  # [K, n, 3, H, W]
        arr = arr.permute(0, 2, 3, 1, 4).reshape(arr.shape[0], 3, arr.shape[3], -1)  # [K, 3, H, n*W]
    strip = arr.permute(2, 0, 3, 1).reshape(arr.shape[2], -1, 3).numpy()  # [H, K*W, 3]
    path = d / f"step_{step:06d}.png"
    Image.fromarray(strip).save(path)
    (d / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "columns": arr.shape[0]}))
    return path


def save_videos(d: Path, step: int, videos: torch.Tensor) -> list[Path]:
    """``videos`` uint8 [K, F, 3, H, W] as ``step_NNNNNN_K.gif`` (and ``.mp4`` when `mp4_writer` finds one) in
    ``d``; returns the paths written."""
    from PIL import Image

    written = []
    writer = mp4_writer()
    for j, video in enumerate(videos):
        frames = video.permute(0, 2, 3, 1).numpy()  # [F, H, W, 3]
        pil = [Image.fromarray(f) for f in frames]
        gif = d / f"step_{step:06d}_{j}.gif"
        pil[0].save(gif, save_all=True, append_images=pil[1:], duration=gif_frame_ms(), loop=0)
        written.append(gif)
        if writer is not None:
            mp4 = d / f"step_{step:06d}_{j}.mp4"
            writer(mp4, frames)
            written.append(mp4)
    return written


def gif_frame_ms() -> int:
    """A GIF frame's duration: `FPS` rounded to GIF's unit of 10 ms (16 fps -> 60 ms)."""
    return 10 * max(1, round(100 / FPS))


def mp4_writer():
    """A function ``(path, frames uint8 [F, H, W, 3])`` writing an H.264 MP4 through ``imageio`` + ``imageio-ffmpeg``,
    or None (with one warning per process) when they are not installed."""
    global _warned_mp4
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio's FFMPEG plugin uses)
    except ImportError:
        if not _warned_mp4:
            import warnings

            warnings.warn("samples: no MP4 writer (pip install imageio imageio-ffmpeg); preview videos are saved as "
                          "GIF only", RuntimeWarning, stacklevel=3)
            _warned_mp4 = True
        return None

    def write(path, frames):
        # H.264 needs even sizes: ffmpeg's macro_block_size=1 keeps the frames as they are
        imageio.mimsave(str(path), list(frames), fps=FPS, codec="libx264", format="FFMPEG", macro_block_size=1)

    return write


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
