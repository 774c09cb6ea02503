"""The GRPO training loop (phases: sample -> score -> advantages -> select -> train -> log), configs, checkpoints."""
from .config import Config, config_from_dict, preset_paths, resolve_config
from .loop import Trainer, TrainingDiverged, train

__all__ = ["Config", "Trainer", "TrainingDiverged", "config_from_dict", "preset_paths", "resolve_config", "train"]
