"""Building and running a trainer: `make_trainer` picks the trainer class of the config's model family from the
family table (`fastgrpo.families`), `train` runs it. Kept apart from `fastgrpo.train.loop` so that the loop and the
family trainers (`fastgrpo.train.flow`, `fastgrpo.train.ar`), which import the loop, are never imported by it."""
from __future__ import annotations

from pathlib import Path

from fastgrpo.families import get_family

from .config import Config
from .loop import GRPOTrainer, TrainingDiverged, resume_config
from .metrics import plot_curves


def make_trainer(cfg: Config | None, out_dir, *, resume: bool = False, overwrite: bool = False, device=None,
                 pipeline=None) -> GRPOTrainer:
    """The trainer for the config's model family. ``pipeline``: a diffusers pipeline object to train instead of
    loading ``model.path`` (flow families; e.g. one built from configs with random weights).

    ``out_dir`` holding an earlier run (``metrics.jsonl`` or a checkpoint) raises ValueError, the folder untouched,
    unless ``resume`` (continue from its newest checkpoint) or ``overwrite`` (delete its files first).

    Resuming, ``cfg`` is the config the run continues with, used as given (a caller changing ``train.steps`` means
    it); ``cfg=None`` takes the run's saved ``config.yaml`` (`resume_config`, which also applies overrides). A given
    ``cfg`` that differs from ``config.yaml`` is warned about, key by key, and becomes the new ``config.yaml``."""
    if cfg is None:
        if not resume:
            raise ValueError("cfg is required for a new run (cfg=None resumes with the run's config.yaml: resume=True)")
        cfg = resume_config(out_dir)
    family = get_family(cfg.model.family)
    kwargs = {}
    if pipeline is not None:
        if family.kind != "flow":
            raise ValueError(f"pipeline= is for the flow families; model.family {cfg.model.family} loads model.path")
        kwargs["pipeline"] = pipeline
    return family.trainer_class()(cfg, out_dir, resume=resume, overwrite=overwrite, device=device, **kwargs)


def train(cfg: Config | None, out_dir, *, resume: bool = False, overwrite: bool = False, device=None) -> Path:
    """Run (or resume) a training; returns the run folder. ``device``: default accelerate's (CUDA when present).

    A folder that already holds a run is refused (ValueError, nothing touched) unless ``resume`` continues it or
    ``overwrite`` deletes its files (`RUN_FILES`) first. ``train(None, out, resume=True)`` continues with the run's
    saved ``config.yaml``; a given ``cfg`` is used as given (a warning names the keys that differ from
    ``config.yaml``): `make_trainer`. The CLI's ``--resume`` always starts from ``config.yaml`` (``--set`` on top)."""
    trainer = make_trainer(cfg, out_dir, resume=resume, overwrite=overwrite, device=device)
    try:
        return trainer.run()
    except TrainingDiverged:
        if trainer.is_main and (trainer.out / "metrics.jsonl").exists():
            plot_curves(trainer.out)
        raise
