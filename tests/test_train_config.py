"""Config building, presets and overrides: bad values raise ValueError naming the key."""
import pytest

from fastgrpo.train.config import apply_override, config_from_dict, load_preset, preset_paths, resolve_config


def test_every_preset_builds():
    names = preset_paths()
    for required in ("tiny-flow-grpo", "tiny-dance-grpo", "sd35m-flow-grpo-pickscore", "flux-dance-grpo-hps"):
        assert required in names
    for name in names:
        cfg = config_from_dict(load_preset(name))
        assert cfg.description, f"preset {name} has no description"


@pytest.mark.parametrize(
    "data, match",
    [
        ({"trian": {}}, "unknown config key trian"),
        ({"train": {"stepz": 3}}, "unknown config key train.stepz"),
        ({"train": {"lr": -1.0}}, "train.lr must be > 0"),
        ({"train": {"steps": "many"}}, "train.steps must be an integer"),
        ({"model": {"family": "sdxl"}}, "model.family must be one of"),
        ({"algo": "ppo"}, "algo must be one of"),
        ({"reward": [{"name": "beauty"}]}, r"reward\[0\].name must be one of"),
        ({"prompts": {"source": "/nonexistent/prompts.txt"}}, "prompts.source: prompt file"),
        ({"sample": {"batch_size": 0}}, "batch_size must be > 0"),
        ({"model": {"lora": {"rank": 0}}}, "model.lora.rank must be > 0"),
        ({"train": {"adv_std": "batch"}}, "train.adv_std must be one of"),
        ({"checkpoint": {"every": 0}}, "checkpoint.every must be > 0"),
        ({"train": {"ema_decay": 1.0}}, r"train.ema_decay must be in \[0, 1\), or null"),
        ({"train": {"ema_decay": "off"}}, "train.ema_decay must be a number"),
        ({"distributed": {"strategy": "zero3"}}, "distributed.strategy must be one of"),
        ({"distributed": {"strategy": "fsdp"}}, "distributed.strategy fsdp shards full fine-tuning only: set "
                                                "model.lora=null"),
        ({"algo": "eg_grpo", "model": {"family": "janus", "lora": None}, "sample": {"guidance_scale": 5.0},
          "distributed": {"strategy": "fsdp"}}, "distributed.strategy fsdp supports model.family sd3 and flux"),
    ],
)
def test_bad_config_raises_naming_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)


def test_overrides_parse_yaml_values():
    cfg = resolve_config(preset="tiny-flow-grpo", overrides=["train.steps=7", "seed=3", "model.lora=null",
                                                              "train.lr=1e-3", "log.tensorboard=false"])
    assert cfg.train.steps == 7 and cfg.seed == 3 and cfg.model.lora is None
    assert cfg.train.lr == 1e-3 and cfg.log.tensorboard is False
    with pytest.raises(ValueError, match="key=value"):
        apply_override({}, "train.steps")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny-flow-grpo"):
        resolve_config(preset="nope")


def test_config_file_overrides_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\n")
    cfg = resolve_config(p, preset="tiny-dance-grpo")
    assert cfg.train.steps == 5 and cfg.algo == "dance_grpo"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")
