"""Prompt lists: a small built-in list for demos, a built-in held-out list for evaluation (prompts the training list
does not hold, `fastgrpo.train.evaluate`), or a text file with one prompt per line."""
from __future__ import annotations

from pathlib import Path

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


def load_prompts(source: str) -> list[str]:
    if source == "builtin":
        return list(BUILTIN_PROMPTS)
    if source == "heldout":
        return list(HELDOUT_PROMPTS)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"prompts.source: prompt file {source!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts.source: {source!r} holds no prompts (one per line expected)")
    return prompts
