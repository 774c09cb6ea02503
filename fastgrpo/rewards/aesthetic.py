"""LAION aesthetic score: a linear head on L2-normalised CLIP image embeddings.

Inputs: images [B, 3, H, W] in [0, 1] (or PIL images); prompts are ignored. Output: the head's score per image,
unbounded (the LAION predictor's ratings run roughly 1-10; higher is better).

The head is LAION's improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor,
``simple_inference.py``; the copy in yifan123/flow_grpo ``flow_grpo/aesthetic_scorer.py`` lines 13-29 and 45-53):
``nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1))`` -- state dict keys ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``,
``layers.7`` (``.weight``/``.bias``), no activations -- applied to CLIP ViT-L/14's image embedding divided by its L2
norm. Any head of that form loads (a chain of linear layers ``<prefix>.<i>.weight`` in index order, or a single
``weight``/``bias`` like LAION's first linear predictor); the first layer's input size must equal the CLIP model's
projection size. Dropout is the identity at inference. The head file is ``.pth``/``.pt`` (a state dict, loaded with
``weights_only=True``) or ``.safetensors``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .clip import ClipPreference
from .pixel import as_pil_images


def load_head(path: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The linear layers (weight [out, in], bias [out] or None) of a head file, in order; ValueError naming the
    file when it does not exist or holds no chain of linear layers."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"head {path!r} does not exist (the aesthetic head: a .pth or .safetensors state dict)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # not a state dict (pickle error, corrupt file)
        raise ValueError(f"head {path!r} could not be read as a state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"head {path!r}: expected a state dict of tensors")
    if set(state) <= {"weight", "bias"} and "weight" in state:
        layers = [(state["weight"], state.get("bias"))]
    else:
        index = {}
        for k in state:
            m = re.fullmatch(r"(?:.*\.)?(\d+)\.(weight|bias)", k)
            if m is None:
                raise ValueError(f"head {path!r}: unexpected key {k!r} (expected linear layers 'layers.<i>.weight')")
            index.setdefault(int(m.group(1)), {})[m.group(2)] = state[k]
        layers = [(index[i]["weight"], index[i].get("bias")) for i in sorted(index) if "weight" in index[i]]
    if not layers or any(w.ndim != 2 for w, _ in layers):
        raise ValueError(f"head {path!r}: expected 2-D linear weights")
    for (a, _), (b, _) in zip(layers, layers[1:]):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"head {path!r}: layer sizes do not chain ({tuple(a.shape)} then {tuple(b.shape)})")
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"head {path!r}: the last layer must give one score, gives {layers[-1][0].shape[0]}")
    return [(w.float(), None if b is None else b.float()) for w, b in layers]


def apply_head(layers, embeds: torch.Tensor) -> torch.Tensor:
    """The head on embeddings [B, d] (already normalised): [B]."""
    x = embeds.float()
    for w, b in layers:
        x = x @ w.to(x.device).T + (0 if b is None else b.to(x.device))
    return x.squeeze(-1)


class AestheticPredictor(ClipPreference):
    """LAION's aesthetic head on CLIP image embeddings (see the module doc). ``model``/``processor``: the CLIP model
    (OpenAI's ViT-L/14 for LAION's heads); ``head``: the head's state dict file (required)."""

    def __init__(self, model: str | None = None, processor: str | None = None, head: str | None = None,
                 device: str | None = None, dtype: str = "float32", batch_size: int = 32):
        if not model:
            raise ValueError("model: give the CLIP model's local folder or hub id")
        if not head:
            raise ValueError("head: give the aesthetic head's .pth or .safetensors file")
        super().__init__(model, processor, device=device, dtype=dtype, batch_size=batch_size)
        self.layers = load_head(head)
        self.head = head

    def _load(self):
        super()._load()
        dim = self._model.config.projection_dim
        if self.layers[0][0].shape[1] != dim:
            raise ValueError(f"head {self.head!r} takes {self.layers[0][0].shape[1]}-d embeddings, the CLIP model "
                             f"{self.model_id!r} gives {dim}-d ones")

    @torch.no_grad()
    def __call__(self, images, prompts=None) -> torch.Tensor:
        return apply_head(self.layers, self.image_embeddings(as_pil_images(images))).cpu()
