"""Training configuration: dataclasses validated when built, YAML presets, ``--set key=value`` overrides.

A config is built from a nested dict (a YAML preset, a config file, overrides); an unknown key or a bad value
raises ``ValueError`` naming the dotted key (``train.lr must be > 0, got -1``); a ``model.path`` that reads as
a local path but does not exist is refused at once (`fastgrpo.paths`; reward ``args`` paths when the trainer is
built, since presets may name reward folders downloaded later; hub ids too, offline-aware:
`fastgrpo.train.loop.check_model_sources`), ``~`` being expanded in every path; every float key must be a finite
number (``.inf`` / ``.nan`` / ``"inf"`` are refused, naming the key); a YAML syntax error names the file and line. Presets are YAML files in the
repository's ``configs/`` folder (shipped inside the package as ``fastgrpo/configs``); ``fastgrpo presets`` lists
them with the first line of their ``description``.

Variant defaults (SDE kind, noise level, which steps are trained, advantage conventions) live in the variant's
strategy module in ``fastgrpo.algos``; a preset only sets what differs.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PRESET_DIRS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parents[2] / "configs")


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 64.0
    # Module names (suffixes) that get adapters. None: the family's own (its adapter's ``lora_targets``; for SD3 and
    # FLUX Flow-GRPO's, config/grpo.py: the joint-attention projections of every block).
    targets: Optional[list] = None

    def validate(self, p):
        _positive(p, "rank", self.rank)
        _positive(p, "alpha", self.alpha)
        if self.targets is not None and not self.targets:
            raise ValueError(f"{p}targets must list at least one module name (or be null: the family's default)")


@dataclass
class ModelConfig:
    family: str = "sd3"  # a row of the family table, fastgrpo.families.FAMILIES (sd3 | flux | ... | janus)
    path: str = "tiny"  # "tiny" (random, built in code), a local pipeline/checkpoint folder, or a hub id
    dtype: str = "float32"  # weights of the frozen parts: float32 | bfloat16 | float16
    height: int = 32
    width: int = 32
    max_sequence_length: int = 32  # T5 tokens (SD3: 256, FLUX: 512 in the papers)
    # Video families (wan) only: frames per sample; null: the family's default (Wan: 81), checked by the family
    # (Wan: 1 + a multiple of 4). An image family given it refuses it (ValueError).
    num_frames: Optional[int] = None
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)  # None: full fine-tuning
    # path "tiny" (flow families) only: scale of the tiny VAE decoder's output; 1 decodes every latent to nearly
    # the same gray, 4 lets a pixel reward show in the images (`fastgrpo.diffusion.tiny`)
    tiny_vae_gain: float = 1.0
    # Regional torch.compile: each repeated transformer block is compiled (once per block variant, reused by the
    # other blocks), for sampling and training. Flow families only; the first step pays the compilation.
    compile: bool = False
    # Backend of fastgrpo's fused ops in the loop (sde_step): auto | triton | cpp | torch. "torch" is the eager
    # path the public trainers run (the baseline of bench/test_bench_round.py).
    impl: str = "auto"

    def validate(self, p):
        from fastgrpo.families import get_family

        get_family(self.family, f"{p}family")
        _choice(p, "impl", self.impl, ("auto", "triton", "cpp", "torch"))
        _choice(p, "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _positive(p, "height", self.height)
        _positive(p, "width", self.width)
        _positive(p, "max_sequence_length", self.max_sequence_length)
        if self.num_frames is not None:
            _positive(p, "num_frames", self.num_frames)
        _positive(p, "tiny_vae_gain", self.tiny_vae_gain)
        if not self.path:
            raise ValueError(f"{p}path must be 'tiny', a local pipeline folder or a hub id")
        if self.path != "tiny":  # a local path that does not exist fails here, never goes to the hub
            from fastgrpo.paths import model_location

            model_location(f"{p}path", self.path)


@dataclass
class SampleConfig:
    num_steps: int = 10
    guidance_scale: float = 4.5  # SD3: classifier-free guidance; FLUX: the guidance embedding
    noise_level: Optional[float] = None  # None: the variant's default (Flow-GRPO a=0.7, DanceGRPO eta=0.3)
    prompts_per_step: int = 2
    group_size: int = 8
    batch_size: int = 8  # rows per transformer forward (sampling and training chunks)
    same_noise_per_group: bool = False  # DanceGRPO's option: one initial noise for a prompt's group
    # CUDA graphs for the sampling forwards (one graph per chunk size, captured on first use, replayed after).
    # Needs a CUDA device (elsewhere: a warning, and sampling runs eagerly); not with distributed.strategy fsdp.
    cuda_graphs: bool = False

    def validate(self, p):
        for k in ("num_steps", "prompts_per_step", "group_size", "batch_size"):
            _positive(p, k, getattr(self, k))
        if self.guidance_scale < 0:
            raise ValueError(f"{p}guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.noise_level is not None and not self.noise_level > 0:
            raise ValueError(f"{p}noise_level must be > 0, got {self.noise_level}")


@dataclass
class TrainConfig:
    steps: int = 20  # sampling rounds (each takes minibatches * inner_epochs optimizer steps)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    beta: Optional[float] = None  # KL weight; None: the variant's default
    clip_range: float = 1e-4
    adv_clip: Optional[float] = 5.0
    timestep_fraction: Optional[float] = None  # None: the variant's default
    cfg: bool = True  # classifier-free guidance in the training forward (SD3; must match sampling for ratio 1)
    ema_decay: Optional[float] = 0.9  # EMA of the trainable weights; null: no EMA (no fp32 copy, none in checkpoints)
    adv_std: Optional[str] = None  # "global" | "group"; None: the variant's default
    adv_ddof: Optional[int] = None
    adv_eps: Optional[float] = None
    # Update cadence (`fastgrpo.train.loop`): each round's rollouts are shuffled (each group's spread evenly over the
    # minibatches) and split into ``minibatches`` optimizer steps, ``inner_epochs`` passes; every update after the
    # first sees ratios away from 1 against the stored rollout log-probs, and the PPO clip (clip_range) binds.
    minibatches: int = 1
    inner_epochs: int = 1
    # Advantage groups: "group" (each sampled group alone) or "prompt" (the groups of one prompt text within a round
    # pooled into one, Flow-GRPO's PerPromptStatTracker).
    group_by: str = "group"
    # The KL term's variance: "flow_grpo" (Flow-GRPO's ``|mu - mu_ref|^2 / (2 sd_t^2)``, no dt) or "exact" (the
    # Gaussian KL between the two transitions, ``/ (2 std_t^2)`` with ``std_t = sd_t sqrt(|dt|)``: TempFlow-GRPO's
    # released code). See `fastgrpo.sde_step`.
    kl_convention: str = "flow_grpo"

    def validate(self, p):
        _positive(p, "steps", self.steps)
        _positive(p, "minibatches", self.minibatches)
        _positive(p, "inner_epochs", self.inner_epochs)
        _choice(p, "group_by", self.group_by, ("group", "prompt"))
        _positive(p, "lr", self.lr)
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError(f"{p}weight_decay must be >= 0 and {p}max_grad_norm > 0")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"{p}beta must be >= 0, got {self.beta}")
        _positive(p, "clip_range", self.clip_range)
        if self.adv_clip is not None:
            _positive(p, "adv_clip", self.adv_clip)
        if self.timestep_fraction is not None and not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"{p}timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"{p}ema_decay must be in [0, 1), or null for no EMA, got {self.ema_decay}")
        if self.adv_std is not None:
            _choice(p, "adv_std", self.adv_std, ("global", "group"))
        if self.adv_ddof is not None:
            _choice(p, "adv_ddof", self.adv_ddof, (0, 1))
        if self.adv_eps is not None:
            _positive(p, "adv_eps", self.adv_eps)
        _choice(p, "kl_convention", self.kl_convention, ("flow_grpo", "exact"))


@dataclass
class ARConfig:
    """Autoregressive families (model.family janus): two-stage rollouts and EG-GRPO's token shaping.

    The CFG weight is ``sample.guidance_scale`` (> 1 for Janus), the KL weight ``train.beta``, the PPO clip
    ``train.clip_range`` (used only when a round takes several updates: ``train.minibatches`` or
    ``train.inner_epochs`` > 1). Shaping defaults: EG-GRPO (minebetter/EG-GRPO).

    ``inner_epochs`` is the old name of ``train.inner_epochs`` (which now owns the cadence for both families): a
    value other than null is moved there with a DeprecationWarning (a config.yaml of an earlier run still loads)."""

    image_tokens: int = 576  # must equal the model's VQ grid (24x24 for Janus-Pro at 384 px)
    cot_max_tokens: int = 256  # textual chain of thought, cut here when no EOS came
    temperature: float = 1.0  # sampling temperature of both stages (T2I-R1: 1)
    cot_template: str = ("<|User|>: Describe the image to generate for this prompt, precisely and briefly: every "
                         "object with its colour, shape, texture and position.\nPrompt: {prompt}\n\n<|Assistant|>:")
    image_template: str = "<|User|>: {prompt}\n{cot}\n\n<|Assistant|>:"  # <begin_of_image> is appended
    shape_text: Optional[bool] = None  # entropy shaping of the CoT tokens; None: the variant's default
    shape_image: Optional[bool] = None  # entropy shaping of the image tokens; None: the variant's default
    low_frac: float = 0.2
    high_frac: float = 0.5
    bonus: float = 0.3
    rule: str = "released"  # released | quantile (fastgrpo.ops.eg_token_masks)
    calibrate: bool = False  # the paper's batch-calibrated bonus (reconstructed) instead of the released one
    inner_epochs: Optional[int] = None  # deprecated: train.inner_epochs
    impl: str = "auto"  # backend of the token ops: auto | triton | torch

    def validate(self, p):
        for k in ("image_tokens", "cot_max_tokens"):
            _positive(p, k, getattr(self, k))
        if self.inner_epochs is not None:
            _positive(p, "inner_epochs", self.inner_epochs)
        _positive(p, "temperature", self.temperature)
        for k in ("low_frac", "high_frac"):
            if not 0 < getattr(self, k) < 1:
                raise ValueError(f"{p}{k} must be in (0, 1), got {getattr(self, k)}")
        if self.bonus < 0:
            raise ValueError(f"{p}bonus must be >= 0, got {self.bonus}")
        _choice(p, "rule", self.rule, ("released", "quantile"))
        _choice(p, "impl", self.impl, ("auto", "triton", "torch"))
        for key, fields in (("cot_template", ("{prompt}",)), ("image_template", ("{prompt}", "{cot}"))):
            missing = [f for f in fields if f not in getattr(self, key)]
            if missing:
                raise ValueError(f"{p}{key} must contain {' and '.join(fields)}, missing {', '.join(missing)}")


@dataclass
class RewardSpec:
    name: str = "brightness"
    weight: float = 1.0
    args: dict = field(default_factory=dict)  # passed to the reward's factory (e.g. model path)

    def validate(self, p):
        from fastgrpo.rewards import REWARDS

        _choice(p, "name", self.name, tuple(sorted(REWARDS)))


@dataclass
class PromptConfig:
    # "builtin", a text file with one prompt per line, a .jsonl file ({"prompt": ...} rows, GenEval metadata kept),
    # or for image-editing families (flux_kontext) a .jsonl file of {"prompt": ..., "image": path} rows, a folder of
    # images with same-named .txt captions, or "builtin_edit" (`fastgrpo.train.prompts`)
    source: str = "builtin"

    def validate(self, p):
        if self.source in ("builtin", "builtin_edit"):
            return
        where = Path(self.source).expanduser()
        if not (where.is_file() or where.is_dir()):
            raise ValueError(f"{p}source: prompt file {self.source!r} does not exist "
                             "(give 'builtin', a text file with one prompt per line, or for an image-editing family "
                             "a JSONL file, a folder of captioned images, or 'builtin_edit')")


@dataclass
class EvalConfig:
    """Evaluation (`fastgrpo.train.evaluate`): a fixed prompt set with fixed seeds, sampled deterministically (the
    flow families' ODE; Janus's token sampling from fixed generators), every reward of a list reported apart.
    ``fastgrpo eval RUN`` evaluates the base model and each checkpoint; ``every`` evaluates during training too."""

    every: Optional[int] = None  # evaluate every N optimizer steps during training (logged as eval_*); None: off
    # "heldout": built-in prompts the training list does not hold (`fastgrpo.train.prompts.HELDOUT_PROMPTS`; for an
    # image-editing family HELDOUT_EDITS), "builtin": the training list's, or a prompt file (as prompts.source)
    prompts: str = "heldout"
    num_prompts: int = 8  # the first N prompts of the source (fewer when it holds fewer)
    samples_per_prompt: int = 2  # images per prompt, each from its own fixed seed
    seed: int = 0  # the evaluation's generators: keyed by (seed, prompt, sample), never by the run's seed
    reward: Optional[list] = None  # {name, weight, args} items like `reward`; None: the training reward's items

    def validate(self, p):
        if self.every is not None:
            _positive(p, "every", self.every)
        _positive(p, "num_prompts", self.num_prompts)
        _positive(p, "samples_per_prompt", self.samples_per_prompt)
        where = Path(self.prompts).expanduser()
        if self.prompts not in ("heldout", "builtin", "builtin_edit") and not (where.is_file() or where.is_dir()):
            raise ValueError(f"{p}prompts: prompt file {self.prompts!r} does not exist (give 'heldout', 'builtin' "
                             "or a prompt file; for an image-editing family also a JSONL file, a folder of "
                             "captioned images or 'builtin_edit')")


@dataclass
class CheckpointConfig:
    every: int = 10

    def validate(self, p):
        _positive(p, "every", self.every)


@dataclass
class DistributedConfig:
    """How the trainable weights are spread over processes (`fastgrpo.train.sharding`)."""

    # auto: fsdp when `accelerate launch` was given an FSDP config (distributed_type: FSDP), ddp otherwise;
    # ddp: every process holds all weights, gradients averaged; fsdp: FSDP2, weights, gradients and optimizer state
    # sharded per transformer block (full fine-tuning of the flow families only).
    strategy: str = "auto"

    def validate(self, p):
        _choice(p, "strategy", self.strategy, ("auto", "ddp", "fsdp"))


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    algo: str = "flow_grpo"
    algo_args: dict = field(default_factory=dict)  # variant settings, validated by the variant's strategy
    description: str = ""
    seed: int = 0
    # CPU threads for torch (torch.set_num_threads). None: OMP_NUM_THREADS when set, else 1 for a tiny model on
    # the CPU and torch's default otherwise (`fastgrpo.train.loop.pick_threads`).
    threads: Optional[int] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: list = field(default_factory=lambda: [RewardSpec()])
    prompts: PromptConfig = field(default_factory=PromptConfig)
    ar: ARConfig = field(default_factory=ARConfig)  # autoregressive families only
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, p=""):
        from fastgrpo.algos import STRATEGIES

        _choice(p, "algo", self.algo, tuple(sorted(STRATEGIES)))
        if self.threads is not None:
            _positive(p, "threads", self.threads)
        STRATEGIES[self.algo].check_args(self)
        from fastgrpo.families import FAMILIES, get_family

        family = get_family(self.model.family)
        kinds = STRATEGIES[self.algo].kinds
        if family.kind not in kinds:
            fits = [f for f, row in FAMILIES.items() if row.kind in kinds]
            raise ValueError(f"model.family {self.model.family!r} does not fit algo {self.algo!r} "
                             f"(it trains {' / '.join(fits)})")
        adapter = family.adapter_class()
        if self.model.num_frames is not None and getattr(adapter, "modality", "image") != "video":
            raise ValueError(f"model.num_frames is for the video families; model.family {self.model.family} samples "
                             "images (remove the key)")
        adapter.check_config(self)
        if self.ar.inner_epochs is not None:
            self._fold_ar_inner_epochs()
        updates = self.train.minibatches * self.train.inner_epochs
        token_rollouts = family.kind == "ar"
        if token_rollouts and updates > 1 and not 0 < self.train.clip_range < 1:
            raise ValueError(f"train.clip_range must be in (0, 1) for PPO clipping with several updates per round "
                             f"(train.minibatches * train.inner_epochs = {updates}), got {self.train.clip_range}")
        rollouts = self.sample.prompts_per_step * self.sample.group_size
        if self.train.minibatches > rollouts and token_rollouts:
            raise ValueError(f"train.minibatches ({self.train.minibatches}) must be at most the rollouts of a round "
                             f"(sample.prompts_per_step * sample.group_size = {rollouts})")
        if not self.reward:
            raise ValueError("reward must list at least one reward")
        flow_only = [k for k, on in (("model.compile", self.model.compile),
                                     ("sample.cuda_graphs", self.sample.cuda_graphs)) if on]
        if flow_only and token_rollouts:
            raise ValueError(f"{' and '.join(flow_only)} {'is' if len(flow_only) == 1 else 'are'} for the flow "
                             f"families; model.family {self.model.family} samples token by token")
        if self.sample.cuda_graphs and self.distributed.strategy == "fsdp":
            raise ValueError("sample.cuda_graphs cannot be used with distributed.strategy fsdp (FSDP gathers the "
                             "weights in every forward); use ddp")
        if self.distributed.strategy == "fsdp":
            from .sharding import check_fsdp_fits

            check_fsdp_fits(self, "distributed.strategy fsdp")

    def _fold_ar_inner_epochs(self) -> None:
        """Move the deprecated ``ar.inner_epochs`` into ``train.inner_epochs``."""
        import warnings

        old, new = self.ar.inner_epochs, self.train.inner_epochs
        if new != 1 and old != new:
            raise ValueError(f"ar.inner_epochs ({old}) and train.inner_epochs ({new}) disagree; ar.inner_epochs is "
                             "the deprecated name of train.inner_epochs: set only train.inner_epochs")
        if old != 1:
            warnings.warn(f"ar.inner_epochs is deprecated: use train.inner_epochs (taken as train.inner_epochs={old})",
                          DeprecationWarning, stacklevel=2)
        self.train.inner_epochs, self.ar.inner_epochs = old, None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- building


def _positive(p, key, value):
    if not value > 0:
        raise ValueError(f"{p}{key} must be > 0, got {value}")


def _choice(p, key, value, options):
    if value not in options:
        raise ValueError(f"{p}{key} must be one of {list(options)}, got {value!r}")


def _convert(key: str, tp, value):
    """Coerce a YAML / --set value to the field's type, or raise naming the key (floats must be finite)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(key, args[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise ValueError(f"{key} must be a {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        if cls in (Config, EvalConfig) and name == "reward" and not (cls is EvalConfig and value is None):
            if isinstance(value, dict):
                value = [value]
            if not isinstance(value, list) or not value:
                raise ValueError(f"{key} must be a non-empty list of {{name, weight, args}} mappings, got {value!r}")
            kwargs[name] = [_build(RewardSpec, r, f"{key}[{i}].") if isinstance(r, dict) else
                            _fail(f"{key}[{i}] must be a mapping, got {r!r}") for i, r in enumerate(value)]
            continue
        kwargs[name] = _convert(key, hints[name], value)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _fail(msg):
    raise ValueError(msg)


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested dict (unknown keys and bad values raise ValueError)."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping, got {type(data).__name__}")
    return _build(Config, data)  # validates every section as it is built


def preset_paths() -> dict:
    """Preset name -> YAML path, from the packaged configs and the checkout's configs/ folder."""
    out = {}
    for d in PRESET_DIRS:
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out.setdefault(p.stem, p)
    return out


def load_yaml(path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r}: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: ``line L, column C: problem (context)`` (YAML's own message names
    ``<unicode string>`` instead of the file)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"YAML syntax error at {where}{problem}" + (f" ({context})" if context else "")


def load_preset(name: str) -> dict:
    presets = preset_paths()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; `fastgrpo presets` lists them: {', '.join(sorted(presets))}")
    return load_yaml(presets[name])


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``key.sub=value`` (value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"--set: bad key {key!r}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part} is not a mapping")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: the value {raw!r} is not valid YAML ({_yaml_problem(e)})") from None


def resolve_config(config_path=None, preset=None, overrides=()) -> Config:
    """The config a run uses: a preset and/or a YAML file (file keys win), then ``--set`` overrides."""
    data: dict[str, Any] = {}
    if preset:
        data = load_preset(preset)
    if config_path:
        _merge(data, load_yaml(config_path))
    for o in overrides:
        apply_override(data, o)
    return config_from_dict(data)


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
