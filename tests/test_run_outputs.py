"""What a run shows a person: samples.png (same prompts and seeds per checkpoint), curves.png's panels, and the
CLI's closing verdict."""
import numpy as np
import pytest
from PIL import Image

from fastgrpo.train import resolve_config, train
from fastgrpo.train.metrics import curve_panels, reward_verdict
from fastgrpo.train.samples import HEADER_H, PAD, PREVIEW_PROMPTS, SCALE, grid_cell, sample_rows

SMALL = ["sample.num_steps=3", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=4",
         "log.progress=false", "log.tensorboard=false"]


def test_samples_png_has_a_row_per_checkpoint_and_the_images_change(tmp_path):
    """6 steps, checkpoints at 3 and 6: rows for steps 0, 3, 6; a large learning rate so the weights move a lot."""
    out = train(resolve_config(preset="tiny-flow-grpo", overrides=[*SMALL, "train.steps=6", "checkpoint.every=3",
                                                                   "train.lr=1e-2"]), tmp_path / "run")
    rows = sample_rows(out)
    assert [step for step, _ in rows] == [0, 3, 6]
    png = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    h, w = rows[0][1].shape[0], rows[0][1].shape[1] // PREVIEW_PROMPTS
    first, last = grid_cell(png, 0, 0, h, w).astype(int), grid_cell(png, 2, 0, h, w).astype(int)
    assert first.shape == last.shape and first.std() > 0  # a real image, not the white background
    assert np.abs(first - last).mean() > 1.0  # trained weights draw other pixels from the same noise
    # the cells are the stored previews scaled up, and samples.png is exactly 3 rows high
    assert np.array_equal(first[::SCALE, ::SCALE], rows[0][1][:, :w].astype(int))
    assert png.shape[0] == HEADER_H + 3 * (h * SCALE + 2 * PAD)


def _rows(rewards, **extra):
    return [{"step": i + 1, "reward_mean": r, "reward_std": 0.01, **extra} for i, r in enumerate(rewards)]


def test_verdict_wording():
    noise = [0.001 * ((i * 7) % 5 - 2) for i in range(40)]
    rising = _rows([0.4 + 0.005 * i + n for i, n in enumerate(noise)])
    falling = _rows([0.6 - 0.005 * i + n for i, n in enumerate(noise)])
    flat = _rows([0.5 + n for n in noise])
    assert reward_verdict(rising).startswith("reward rose by 0.15")
    assert "%" in reward_verdict(rising) and "z = " in reward_verdict(rising)
    assert reward_verdict(falling).startswith("reward did NOT rise (it fell: -0.15")
    assert reward_verdict(flat).startswith("reward did NOT rise (the change is within noise")
    assert "too few steps (3)" in reward_verdict(rising[:3])


def test_uninformative_panels_are_dropped():
    zero_kl = _rows([0.5] * 8, loss=1e-8, kl=0.0)
    assert [k for _, k in curve_panels(zero_kl)] == ["reward_mean"]
    assert [k for _, k in curve_panels(_rows([0.5] * 8, loss=0.3, kl=0.02))] == ["reward_mean", "loss", "kl"]


@pytest.mark.slow
def test_cli_prints_the_verdict_and_both_pictures(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastgrpo", "train", "--preset", "tiny-flow-grpo", "--out",
                           str(tmp_path / "run"), "--set", "train.steps=8", "--set", "checkpoint.every=4",
                           *[a for o in SMALL for a in ("--set", o)]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "reward rose by" in proc.stdout or "reward did NOT rise" in proc.stdout
    assert f"curves: {tmp_path / 'run' / 'curves.png'}" in proc.stdout
    assert f"samples: {tmp_path / 'run' / 'samples.png'}" in proc.stdout
