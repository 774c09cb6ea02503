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
          "distributed": {"strategy": "fsdp"}}, "distributed.strategy fsdp supports the flow families, not model.family .janus."),
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


def _float_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        if args[0] is float:
            yield prefix + f.name
        elif dataclasses.is_dataclass(args[0]):
            yield from _float_keys(args[0], f"{prefix}{f.name}.")


def test_every_float_key_refuses_non_finite_values():
    """.inf / -.inf / .nan (and the strings YAML leaves them as) never pass validation, for every float key."""
    from fastgrpo.train.config import Config, RewardSpec

    keys = list(_float_keys(Config))
    assert {"train.lr", "train.max_grad_norm", "sample.guidance_scale", "model.lora.alpha", "ar.bonus"} <= set(keys)
    for key in keys:
        for raw in (float("inf"), float("-inf"), float("nan"), "inf", "nan"):
            data = {}
            apply_override(data, f"{key}=0")
            node = data
            for part in key.split(".")[:-1]:
                node = node[part]
            node[key.split(".")[-1]] = raw
            with pytest.raises(ValueError, match=rf"^{key} must be a finite number"):
                config_from_dict(data)
        with pytest.raises(ValueError, match=rf"^{key} must be a finite number"):  # --set parses YAML's .inf
            resolve_config(overrides=[f"{key}=.inf"])
    for key in _float_keys(RewardSpec):
        with pytest.raises(ValueError, match=rf"reward\[0\]\.{key} must be a finite number"):
            resolve_config(preset="tiny-flow-grpo", overrides=[f"reward=[{{name: brightness, {key}: .nan}}]"])


def test_missing_local_model_paths_fail_at_once_naming_the_key(tmp_path, monkeypatch):
    """A path-looking model.path that does not exist is refused when the config is built, a reward model's when
    the trainer is built (before anything loads): no hub request; hub ids pass; ~ is expanded everywhere."""
    import fastgrpo.paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "models").mkdir()
    (tmp_path / "home").mkdir()
    for bad in ("./sd35m", "models/sd35m", "a/b/c", "~/sd35m", "/no/such/pipeline"):
        with pytest.raises(ValueError, match=rf"^model.path '{bad}' does not exist.*reads as a local path"):
            resolve_config(overrides=[f"model.path={bad}"])
    assert resolve_config(overrides=["model.path=stabilityai/stable-diffusion-3.5-medium"]).model.path.startswith(
        "stabilityai/")
    from fastgrpo.train import make_trainer

    cfg = resolve_config(preset="tiny-flow-grpo", overrides=["reward=[{name: pickscore, args: {model: ~/pickscore}}]"])
    with pytest.raises(ValueError, match=r"^reward\[0\].args.model '~/pickscore' does not exist"):
        make_trainer(cfg, tmp_path / "run")  # before any model loads
    assert not (tmp_path / "run").exists()
    # ~ expanded: an existing folder under HOME, a prompt file under HOME
    (tmp_path / "home/pipe").mkdir()
    (tmp_path / "home/prompts.txt").write_text("a cat\n")
    assert fastgrpo.paths.model_location("model.path", "~/pipe") == str(tmp_path / "home/pipe")
    cfg = resolve_config(overrides=["model.path=~/pipe", "prompts.source=~/prompts.txt"])
    from fastgrpo.train.prompts import load_prompts

    assert load_prompts(cfg.prompts.source) == ["a cat"]
    assert make_trainer(resolve_config(preset="tiny-flow-grpo"), "~/run").out == tmp_path / "home/run"
    from fastgrpo.rewards.clip import ClipPreference

    with pytest.raises(ValueError, match="model '~/nothing' does not exist"):
        ClipPreference(model="~/nothing")


def test_num_frames_is_refused_for_an_image_family():
    with pytest.raises(ValueError, match="model.num_frames is for the video families; model.family sd3"):
        resolve_config(preset="tiny-flow-grpo", overrides=["model.num_frames=5"])
