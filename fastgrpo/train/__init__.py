"""The GRPO training loop (phases: sample -> score -> advantages -> select -> train -> log), configs, checkpoints."""
from .config import Config, config_from_dict, preset_paths, resolve_config
from .loop import GRPOTrainer, TrainingDiverged, resume_config
from .run import make_trainer, train

__all__ = ["Config", "GRPOTrainer", "TrainingDiverged", "config_from_dict", "make_trainer", "preset_paths",
           "resolve_config", "resume_config", "train"]
