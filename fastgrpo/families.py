"""The family table: ``model.family`` -> its adapter (the model glue) and its trainer (the phases it runs).

Every model family is one adapter module (`fastgrpo.diffusion.adapter.FlowAdapter` subclasses under
`fastgrpo.diffusion`, the autoregressive `fastgrpo.ar.janus.JanusPolicy`) and one row here. The config, the
trainer factory (`fastgrpo.train.run.make_trainer`), sharding and the AEGPO collector look a family up here and
call its adapter; nothing else compares the family string. Entries name their classes as ``"module:Class"`` so that
looking a family up imports only that family's code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


def _load(ref):
    if not isinstance(ref, str):  # a class given directly (a family registered from the user's own code)
        return ref
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    name: str  # the model.family string
    adapter: object  # "module:Class" of its adapter (or the class itself)
    trainer: object  # "module:Class" of its trainer, a `fastgrpo.train.loop.GRPOTrainer` subclass (or the class)
    description: str  # one line: the model and the pipeline / model class it loads

    def adapter_class(self):
        return _load(self.adapter)

    def trainer_class(self):
        return _load(self.trainer)

    @property
    def edits_images(self) -> bool:
        """Whether the family edits images: its prompts carry source images (`fastgrpo.train.prompts`)."""
        return bool(getattr(self.adapter_class(), "edits_images", False))

    @property
    def kind(self) -> str:
        """``flow`` (SDE rollouts over latents) or ``ar`` (token-by-token rollouts): what strategies declare they
        train."""
        return self.adapter_class().kind


_FLOW_TRAINER = "fastgrpo.train.flow:FlowTrainer"

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd3", "fastgrpo.diffusion.sd3:SD3Adapter", _FLOW_TRAINER,
           "Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline)"),
    Family("flux", "fastgrpo.diffusion.flux:FluxAdapter", _FLOW_TRAINER,
           "FLUX.1 (FluxPipeline)"),
    Family("qwen_image", "fastgrpo.diffusion.qwen_image:QwenImageAdapter", _FLOW_TRAINER,
           "Qwen-Image (QwenImagePipeline)"),
    Family("wan", "fastgrpo.diffusion.wan:WanAdapter", _FLOW_TRAINER,
           "Wan2.1 text-to-video (WanPipeline)"),
    Family("flux_kontext", "fastgrpo.diffusion.flux_kontext:FluxKontextAdapter", _FLOW_TRAINER,
           "FLUX.1-Kontext image editing (FluxKontextPipeline)"),
    Family("janus", "fastgrpo.ar.janus:JanusPolicy", "fastgrpo.train.ar:ARTrainer",
           "Janus / Janus-Pro (JanusForConditionalGeneration, transformers)"),
)}


def register_family(row: Family, *, replace: bool = False) -> Family:
    """Add a family to the table (a user's own adapter, without editing fastgrpo); an existing name is a
    ValueError unless ``replace``. The adapter's ``family`` must be the row's name."""
    if row.name in FAMILIES and not replace:
        raise ValueError(f"model.family {row.name!r} is already in the family table (replace=True replaces it)")
    adapter = row.adapter_class()
    if getattr(adapter, "family", None) != row.name:
        raise ValueError(f"the adapter {adapter.__name__} says family {getattr(adapter, 'family', None)!r}, "
                         f"the row {row.name!r}")
    FAMILIES[row.name] = row
    return row


def get_family(name: str, key: str = "model.family") -> Family:
    """The table row of ``name``; ValueError naming ``key`` and the known families otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{key} must be one of {', '.join(FAMILIES)}, got {name!r}") from None


def adapter_for_transformer(transformer):
    """The flow adapter class whose transformer ``transformer`` is (peft wrappers looked through), or None."""
    for fam in FAMILIES.values():
        cls = fam.adapter_class()
        if cls.kind == "flow" and cls.owns(transformer):
            return cls
    return None
