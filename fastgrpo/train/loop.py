"""The one GRPO loop, in named phases; model families plug in their sampling and training phases.

Each round (a ``train.steps`` step) runs:

1. **sample**  -- this rank's share of ``prompts_per_step`` groups of ``group_size`` rollouts, in micro-batches of
   ``sample.batch_size``, keeping what the train phase needs (family-specific: `fastgrpo.train.flow`, `fastgrpo.train.ar`);
2. **score**   -- the reward of each micro-batch, computed in a worker thread while the next one samples;
3. **advantages** -- rewards gathered across ranks, then per-prompt statistics (`fastgrpo.ops.group_advantages`
   with the variant's conventions; groups may differ in size), each rank keeping its slice;
4. **select**  -- the variant's filter (none for Flow-GRPO / DanceGRPO);
5. **train**   -- the family's policy-gradient passes over the kept rollouts: ``train.inner_epochs`` passes of
   ``train.minibatches`` optimizer steps each (`GRPOTrainer.update`; default one step per round);
6. **log**     -- one ``metrics.jsonl`` row, tensorboard, progress bar; checkpoints every ``checkpoint.every``
   steps and at the end; ``curves.png`` and ``samples.png`` (the same prompts and seeds at step 0 and at each
   checkpoint: `fastgrpo.train.samples`) at every checkpoint.

`GRPOTrainer` holds everything family-independent (config, strategy, prompts, rewards, the K-repeat sampler,
where the weights live across processes (`fastgrpo.train.sharding`: DDP or FSDP), optimizer, EMA, checkpoints,
logging, the run loop, the update cadence). A family subclass implements ``build_policy`` (returns the policy
object, which counts ``model_forwards``, and its trainable parameters by name), ``sample``, ``train_rows`` (what a
round trains, with each row's group and unit) and ``train`` (one minibatch's gradient).

Randomness is keyed by (seed, step, what is drawn) for every step, so ``--resume`` from a checkpoint replays
exactly the steps a straight run would take (bit-identical weights on CPU). It continues from the newest checkpoint
whose files match their recorded sha256 (`fastgrpo.train.checkpoint.resumable_checkpoint`), warning about newer
broken ones. A flow group's draws come from the generator of its global group index and an autoregressive sample's
from that of its global sample index (`fastgrpo.train.distributed.group_generators`), never from a per-process
stream: 1 and N processes sample the same rollouts and compute the same advantages (bit for bit on CPU when each
process's share is a whole number of sampling micro-batches, so the forwards batch the same rows), and a DDP or
single-process run may be resumed with another number of processes. A run sharded with FSDP resumes only under the
number of processes that wrote it (``state.json`` records ``world_size``; `check_resume_world_size`).

A non-finite reward or loss stops the run with `TrainingDiverged` before the optimizer step, and non-finite weights
after it (a huge learning rate) stop it before the EMA update and before any checkpoint is written, so the newest
checkpoint on disk is the last good state.

A resumed run continues with the config it is given: the CLI's ``--resume`` builds it from the run's own
``config.yaml`` (``--set`` on top; a preset or config file given too is ignored with a notice), and
``train(None, out, resume=True)`` does the same from Python (`resume_config`); a config given to ``train`` is used
as given, with a warning naming each key that differs from ``config.yaml``, which then records it.

Before anything loads, every model the run needs (``model.path``, each reward's model and processor) is checked
(`check_model_sources`): a missing local path, or a hub id neither in the local Hugging Face cache nor (online)
answering one short request, stops the run at once with a ValueError naming the config key; with
``HF_HUB_OFFLINE=1`` the hub is never asked.

The run folder belongs to one run: a folder that already holds one (``metrics.jsonl`` or a checkpoint) is refused
unless ``resume=True`` (continue it) or ``overwrite=True`` (delete that run's files first, `RUN_FILES`); nothing
in the folder is touched when it is refused. A folder that cannot be written (read-only, no permission) is a
ValueError naming it before anything loads, and a write that fails later (a full disk) one naming the folder.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from fastgrpo.rewards import build_reward

from .checkpoint import _STEP_DIR, load_checkpoint, resumable_checkpoint, save_checkpoint
from .config import Config
from .distributed import GroupSampler, all_sum, gathered_advantages, minibatch_split, world
from .metrics import MetricsLogger, plot_curves
from .prompts import load_prompts
from .sharding import full_tensor, is_sharded, parallelism


# What a run writes into its folder: `--overwrite` removes these (and nothing else) before a new run starts.
RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "curves.png", "config.yaml", "samples", "samples.png")


def existing_run(out_dir) -> list[str]:
    """The files of an earlier run in ``out_dir`` (``metrics.jsonl``, checkpoints), empty when it holds none."""
    out = Path(out_dir)
    found = ["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in ckpts.iterdir() if _STEP_DIR.match(p.name))
    return found


def prepare_run_folder(out_dir, *, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse to start a new run over an earlier one (ValueError naming ``--resume`` and ``--overwrite``, folder
    untouched); with ``overwrite`` remove the earlier run's `RUN_FILES` (when ``remove``: the main process)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in the folder, "
                         "--overwrite deletes it")
    if resume:
        return
    found = existing_run(out_dir)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"{out_dir} already holds a run ({shown}): continue it with --resume (resume=True), "
                         f"start over with --overwrite (overwrite=True: deletes that run's files), "
                         f"or give another --out")
    if remove:
        import shutil

        for name in RUN_FILES:
            p = Path(out_dir) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


def check_model_sources(cfg: Config, *, pipeline=None, kind: str = "pipeline folder",
                        check_eval: bool = False) -> None:
    """Every model the run loads -- ``model.path`` (unless ``tiny`` or a ``pipeline`` object is given) and each
    reward's model and processor (their defaults included: ``pickscore`` loads ``yuvalkirstain/PickScore_v1``) --
    is checked before anything loads (`fastgrpo.paths.check_model_source`): a local path must exist, a hub id must be
    in the local Hugging Face cache or, online, answer one short request. Otherwise a ValueError naming the key
    (``model.path``, ``reward[0].args.model``) at once, instead of minutes of hub retries and a traceback. Other
    reward ``args`` that read as local paths must exist too (never sent to the hub). ``eval.reward``'s too when the
    run evaluates (``eval.every``) or ``check_eval``."""
    from fastgrpo.paths import check_model_source, model_location
    from fastgrpo.rewards import model_sources

    specs = [(f"reward[{i}]", s) for i, s in enumerate(cfg.reward)]
    if cfg.eval.reward is not None and (cfg.eval.every or check_eval):
        specs += [(f"eval.reward[{i}]", s) for i, s in enumerate(cfg.eval.reward)]
    for key, spec in specs:
        try:
            sources = model_sources(spec.name, spec.args)
        except ValueError as e:
            raise ValueError(f"{key}.{e}") from None
        for k, v in spec.args.items():
            if isinstance(v, str) and k not in sources:
                model_location(f"{key}.args.{k}", v)
        for k, v in sources.items():
            if isinstance(v, str):
                default = "" if spec.args.get(k) else f" ({spec.name}'s default)"
                try:
                    check_model_source(f"{key}.args.{k}", v)
                except ValueError as e:
                    raise ValueError(f"{e}{default}") from None
    if pipeline is None and cfg.model.path != "tiny":
        check_model_source("model.path", cfg.model.path,
                           kind=kind)


def resume_config(out_dir, overrides=()) -> Config:
    """The config of the run in ``out_dir``: its ``config.yaml`` (written when it started, rewritten by every
    resume) with ``key=value`` overrides applied; ValueError when the folder holds none."""
    from .config import resolve_config

    saved = Path(out_dir).expanduser() / "config.yaml"
    if not saved.is_file():
        raise ValueError(f"{out_dir} holds no run to resume (no config.yaml)")
    return resolve_config(saved, None, overrides)


def _resume_differences(saved_file: Path, cfg: Config) -> list[str]:
    """``key: saved -> new`` for every config key that differs from the run's saved config.yaml."""
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else ()):
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(saved), flat(cfg.to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k != "description" and a.get(k) != b.get(k)]


def ensure_writable(out: Path) -> None:
    """Create ``out`` and check that it (and its ``checkpoints/``, ``metrics.jsonl``) can be written: ValueError in one
    line naming the folder otherwise, instead of a PermissionError traceback mid-run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for d in (out, out / "checkpoints"):
            if d.is_dir():
                probe = d / f".fastgrpo-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
        metrics = out / "metrics.jsonl"
        if metrics.exists() and not os.access(metrics, os.W_OK):
            raise PermissionError(13, "Permission denied", str(metrics))
    except OSError as e:
        raise ValueError(f"run folder {out} is not writable ({e.strerror or e}: {e.filename}): fix its permissions "
                         "or give another --out") from None


def pick_threads(cfg: Config, device: torch.device) -> str:
    """Decide torch's CPU thread count for this run, before the model is built (`GRPOTrainer.__init__` calls it);
    returns what was decided, in words.

    In order: the config key ``threads`` wins (``torch.set_num_threads(threads)``); else ``OMP_NUM_THREADS`` in
    the environment wins (torch already took it; nothing is changed); else a tiny model (``model.path == "tiny"``)
    trained on the CPU gets 1 thread: its operations are a few kB, and splitting them over the cores of a small,
    shared machine made a step 15-30x slower (oversubscription) instead of faster. Every other run keeps torch's
    default (one thread per core). The setting is process-wide (``torch.set_num_threads``)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
        return f"{cfg.threads} CPU thread(s) (config key threads)"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return f"{torch.get_num_threads()} CPU thread(s) (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    if cfg.model.path == "tiny" and torch.device(device).type == "cpu":
        torch.set_num_threads(1)
        return "1 CPU thread (a tiny model on the CPU; set threads=N or OMP_NUM_THREADS to change it)"
    return f"{torch.get_num_threads()} CPU thread(s) (torch's default)"


class TrainingDiverged(RuntimeError):
    """A reward, the loss or the gradient norm became NaN/inf (the run stopped before updating the weights), or the
    updated weights did (stopped before the EMA update and before saving them: the newest checkpoint is the last
    good state; the trainer's in-memory weights are then not to be saved)."""


@dataclass
class MicroBatch:
    """One sampling micro-batch: its prompts, what the family's train phase needs (``data``), and what the loop
    adds (rewards, their parts, advantages)."""

    prompts: list
    data: dict
    group_sizes: list | None = None  # rollouts of each group, in order; None: every group has sample.group_size
    group_labels: list | None = None  # an int per group: groups of one prompt pool (group_by: prompt) only if equal
    rewards: torch.Tensor | None = None
    reward_parts: dict = field(default_factory=dict)
    advantages: torch.Tensor | None = None


class EMA:
    """Exponential moving average of the trainable weights: ``s = d*s + (1-d)*p`` after every optimizer step, in
    float32. Under FSDP the weights are shards (DTensors), so each process averages its own shard: the EMA is
    sharded like the weights and gathered whole only into checkpoints."""

    def __init__(self, named_params: dict, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict) -> None:
        for k, p in named_params.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)


class GRPOTrainer:
    """The family-independent loop; subclasses implement `build_policy`, `sample` and `train`."""

    MODEL_KIND = "pipeline folder"  # what ``model.path`` names, in errors (the family subclass says)

    def __init__(self, cfg: Config, out_dir, *, resume: bool = False, overwrite: bool = False,
                 device: str | None = None, pipeline=None):
        from fastgrpo.algos import STRATEGIES

        self.cfg = cfg
        # A pipeline object built by the caller (flow families): used instead of loading ``model.path``.
        self.pipeline = pipeline
        self.out = Path(out_dir).expanduser()
        if device is None:
            # accelerate sets up the process group under `accelerate launch` (gloo on CPU, NCCL on GPU) and picks
            # this process's device; in a single process it only picks the device.
            from accelerate import PartialState

            device = PartialState().device
        self.device = torch.device(device)
        self.threads = pick_threads(cfg, self.device)  # before anything is built
        self.rank, self.world_size = world()  # after accelerate set up the process group
        # Before anything is loaded or written: a folder holding another run is refused untouched.
        prepare_run_folder(self.out, resume=resume, overwrite=overwrite, remove=self.rank == 0)
        check_model_sources(cfg, pipeline=pipeline, kind=self.MODEL_KIND)
        if self.rank == 0:
            ensure_writable(self.out)
        self.strategy = STRATEGIES[cfg.algo].from_config(cfg)
        self.strategy_log = {}  # the fields the strategy recorded in this round's sample phase (`round`)
        from fastgrpo.families import get_family

        self.prompts = load_prompts(cfg.prompts.source, edit=get_family(cfg.model.family).edits_images,
                                    family=cfg.model.family)
        self.reward_fn = build_reward(cfg.reward)
        self.reward_fn.check_prompts(self.prompts)  # before any model loads (GenEval metadata, source images)
        if cfg.sample.prompts_per_step % self.world_size:
            raise ValueError(f"sample.prompts_per_step ({cfg.sample.prompts_per_step}) must be a multiple of the "
                             f"number of processes ({self.world_size}): each process samples whole groups")
        self.sampler = GroupSampler(len(self.prompts), cfg.sample.prompts_per_step, cfg.sample.group_size, cfg.seed)

        self.parallel = parallelism(cfg, self.world_size)

        torch.manual_seed(cfg.seed)
        self.policy, self.named = self.build_policy()  # sharded already under FSDP
        self.params = list(self.named.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, betas=(0.9, 0.999),
                                           weight_decay=cfg.train.weight_decay, eps=1e-8)
        self.ema = EMA(self.named, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self.step, self.samples, self.elapsed = 0, 0, 0.0
        self.model_forwards, self._forwards_seen = 0, 0  # all ranks' total; this rank's counter when last summed
        self.ckpt_dir = self.out / "checkpoints"

        self.is_main = self.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        if resume:
            ckpt = resumable_checkpoint(self.ckpt_dir)  # the newest that verifies against its manifest
            check_resume_world_size(ckpt, self.world_size, self.parallel.name)
            state = load_checkpoint(ckpt, trainable=self.named, ema=self.ema.shadow if self.ema else None,
                                    optimizer=self.optimizer, strategy=self.strategy)
            self.step, self.samples, self.elapsed = state["step"], state["samples"], state["elapsed_s"]
            self.model_forwards = state["model_forwards"]
            resumed_from = self.step
        if self.is_main and resume:
            changed = _resume_differences(self.out / "config.yaml", cfg)
            if changed:
                warnings.warn(f"resuming {self.out} with a config that differs from its config.yaml in "
                              f"{len(changed)} key(s): {'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''}",
                              stacklevel=2)
        if self.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.logger = MetricsLogger(self.out, tensorboard=cfg.log.tensorboard, resume_step=resumed_from)

    # ------------------------------------------------------------------------------------------------ phases
    def build_policy(self):
        """Load the model, set up what trains (sharded with ``self.parallel.shard`` where it supports FSDP); return
        (policy with a ``model_forwards`` counter, {name: trainable param})."""
        raise NotImplementedError

    def sample(self, step: int, pool: ThreadPoolExecutor) -> list:
        """This rank's rollouts as `MicroBatch` es; submit each micro-batch's scoring with `submit_score`. Draw
        randomness from generators keyed by global group or sample index (`fastgrpo.train.distributed`), so that
        the rollouts do not depend on the number of processes."""
        raise NotImplementedError

    row_name = "rollout"  # what a row of `train_rows` is (the log's trained_<row>s)

    @staticmethod
    def unit_name(strategy) -> str:
        """What the family trains together in one minibatch, in words (for messages)."""
        return "rollout"

    def train_rows(self, batches: list) -> dict:
        """What this process trains in the round, one row per trained item: a dict of tensors with a first
        dimension n, including ``group`` (CPU int64: the row's global group index) and ``unit`` (CPU int64: rows of
        one unit go to the same minibatch; within a group, units listed in the same order on any number of
        processes). The loop selects minibatches with `take_rows`."""
        raise NotImplementedError

    def train(self, batches: list, rows: dict | None = None, *, n_all: int | None = None, first: bool = True,
              several: bool = False) -> dict:
        """Accumulate the policy gradient of one minibatch (``rows``: a selection of `train_rows`; ``n_all``: its
        rows over all processes, the loss being their mean) with the weights unchanged; return stats for the log
        (means over the rows, ``ratio_dev_max``). ``first``: the round's first update; ``several``: the round
        takes more than one update (the AR family clips only then). Without ``rows``: the whole round as one
        minibatch (`whole_round`)."""
        raise NotImplementedError

    def whole_round(self, batches: list, rows: dict | None, n_all: int | None) -> tuple[dict, int]:
        """``(rows, n_all)`` as given, or every row of `train_rows` and their count over all processes."""
        if rows is None:
            rows = self.train_rows(batches)
            rows.pop("group")
        if n_all is None:
            n_all = all_sum(int(next(iter(rows.values())).shape[0]))
        return rows, n_all

    def preview(self, prompts: list, gens: list) -> torch.Tensor:
        """Images [K, 3, H, W] in [0, 1] for ``prompts``, one per generator in ``gens``, sampled deterministically
        from the current weights (`fastgrpo.train.samples`)."""
        raise NotImplementedError

    def write_samples(self) -> None:
        """Generate this step's preview row (every process: FSDP gathers weights in each forward); rank 0 stores
        it and redraws ``samples.png``. Its forwards are left out of ``model_forwards``."""
        from .samples import PREVIEW_PROMPTS, draw_samples, preview_generators, save_row

        prompts = [self.prompts[j % len(self.prompts)] for j in range(min(PREVIEW_PROMPTS, len(self.prompts)))]
        before = self.policy.model_forwards
        with self.parallel.sampling():
            images = self.preview(prompts, preview_generators(self.cfg.seed, len(prompts)))
        self._forwards_seen += self.policy.model_forwards - before
        if self.is_main:
            save_row(self.out, self.step, images, prompts)
            draw_samples(self.out, upto=self.step)

    def evaluate(self) -> dict:
        """The held-out evaluation of the current weights (``eval.every``; `fastgrpo.train.evaluate.Evaluator`):
        its ``eval_*`` metrics fields. Every process runs it; its forwards are not counted in ``model_forwards``."""
        from .evaluate import Evaluator

        if getattr(self, "_evaluator", None) is None:
            self._evaluator = Evaluator(self)
        return self._evaluator()

    def submit_score(self, pool: ThreadPoolExecutor, images, prompts):
        """Score one micro-batch's per-image rewards in the worker thread; a group-level reward's images are kept
        (on the CPU) until `collect_scores` holds the process's whole groups."""
        return pool.submit(self._score, images, prompts)

    def collect_scores(self, batches: list, futures: list) -> None:
        """Each micro-batch's rewards and parts, once its scoring is done. Group-level rewards
        (`fastgrpo.rewards.is_group_level`) are then called once per group with all of that group's rollouts: the
        process's micro-batches are concatenated and cut at the group boundaries (a micro-batch's
        ``group_sizes``, else groups of ``sample.group_size`` in sampling order, which may span micro-batches).
        A group never spans processes (`GroupSampler.local` gives each process whole groups: the trainer requires
        ``prompts_per_step`` to be a multiple of the number of processes), so 1 and N processes score the same
        groups. A "group" is an advantage group; with ``train.group_by: prompt`` two groups of one prompt text are
        still scored apart."""
        held = []
        for mb, fut in zip(batches, futures):
            mb.rewards, mb.reward_parts, images = fut.result()
            held.append(images)
        if not getattr(self.reward_fn, "has_group_level", False) or not batches:
            return
        G = self.cfg.sample.group_size
        if all(mb.group_sizes is not None for mb in batches):
            sizes = [n for mb in batches for n in mb.group_sizes]
        else:
            rows = sum(len(mb.prompts) for mb in batches)
            if rows % G:
                raise ValueError(f"a group-level reward needs whole groups: this process holds {rows} rollouts, "
                                 f"not a multiple of sample.group_size {G}")
            sizes = [G] * (rows // G)
        images = torch.cat(held) if isinstance(held[0], torch.Tensor) else [im for h in held for im in h]
        prompts = [p for mb in batches for p in mb.prompts]
        total, parts = self.reward_fn.group_level(images, prompts, sizes)
        self._check_finite(total, prompts, parts)
        n = 0
        for mb in batches:
            sl = slice(n, n + len(mb.prompts))
            mb.rewards = mb.rewards + total[sl]
            mb.reward_parts.update({k: v[sl] for k, v in parts.items()})
            n += len(mb.prompts)

    def _score(self, images, prompts):
        """(per-image total [B], parts, the images kept for group-level rewards or None)."""
        # ``reward_fn`` may be any callable (images, prompts) -> (total, parts); a `WeightedReward` with
        # group-level parts scores only its per-image parts here
        total, parts = getattr(self.reward_fn, "sample_level", self.reward_fn)(images, prompts)
        self._check_finite(total, prompts, parts)
        keep = None
        if getattr(self.reward_fn, "has_group_level", False):
            keep = images.detach().cpu() if isinstance(images, torch.Tensor) else list(images)
        return total, parts, keep

    @staticmethod
    def _check_finite(total, prompts, parts):
        if not torch.isfinite(total).all():
            bad = [prompts[i] for i in torch.nonzero(~torch.isfinite(total)).flatten().tolist()]
            raise TrainingDiverged(f"a reward returned NaN/inf for prompts {bad[:3]}; parts: "
                                   f"{ {k: v.tolist()[:4] for k, v in parts.items()} }")

    def advantages(self, batches: list) -> torch.Tensor:
        """Per-group statistics over the rewards of all ranks. Groups may differ in size (a micro-batch's
        ``group_sizes``, AEGPO): then each group is normalised by its own mean (and std), and a global std pools
        every rollout of the batch. With ``train.group_by: prompt`` the groups of one prompt text (a prompt drawn
        twice in a round) are normalised as one (Flow-GRPO's ``PerPromptStatTracker`` keys its statistics by the
        prompt string); a micro-batch's ``group_labels`` (one per group) keep groups of one prompt apart when they
        stand for different things (TempFlow-GRPO's branch steps)."""
        local = torch.cat([mb.rewards for mb in batches])
        s, tc, G = self.strategy, self.cfg.train, self.cfg.sample.group_size
        sizes = [n for mb in batches for n in (mb.group_sizes or [G] * (len(mb.prompts) // G))]
        keys = self.group_keys(batches) if tc.group_by == "prompt" else None
        adv, all_rewards = gathered_advantages(local, sizes, std=s.adv_std, ddof=s.adv_ddof, eps=s.adv_eps,
                                               clip=tc.adv_clip, keys=keys)
        n = 0
        for mb in batches:
            mb.advantages = adv[n:n + len(mb.prompts)].to(self.device)
            n += len(mb.prompts)
        return all_rewards

    def group_keys(self, batches: list) -> list:
        """One int per group of ``batches``: equal for groups of the same prompt text (and the same
        ``group_labels`` entry), whichever process holds them."""
        if not hasattr(self, "_text_ids"):
            self._text_ids = {}
            for p in self.prompts:
                self._text_ids.setdefault(p, len(self._text_ids))
        G, n_texts, keys = self.cfg.sample.group_size, len(self._text_ids), []
        for mb in batches:
            sizes = mb.group_sizes or [G] * (len(mb.prompts) // G)
            labels = mb.group_labels or [0] * len(sizes)
            start = 0
            for size, label in zip(sizes, labels):
                keys.append(int(label) * n_texts + self._text_ids[mb.prompts[start]])
                start += size
        return keys

    def select(self, batches: list) -> list:
        return batches

    def optimizer_step(self) -> float:
        """Average gradients over ranks (DDP; FSDP did it in backward), clip, step, check the updated weights are
        finite (else `TrainingDiverged`, before the EMA update and any checkpoint), update the EMA; returns the
        gradient norm."""
        self.parallel.reduce_gradients(self.params)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm))
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"the gradient norm became {grad_norm.item()}; weights not updated")
        self.optimizer.step()
        finite = torch.stack([torch.isfinite(p.to_local() if is_sharded(p) else p).all() for p in self.params])
        n_bad = all_sum(int((~finite).sum()))  # one sync; every rank agrees (FSDP: each checked its shards)
        if n_bad:
            bad = [k for (k, _), ok in zip(self.named.items(), finite.tolist()) if not ok]
            raise TrainingDiverged(f"the optimizer step made {n_bad} weight tensor(s) NaN/inf (e.g. {bad[:3]}; "
                                   f"train.lr {self.cfg.train.lr} too large?); not saved: the newest checkpoint is "
                                   "the last good state")
        if self.ema is not None:
            self.ema.update(self.named)
        return grad_norm.item()

    # --------------------------------------------------------------------------------------------------- run
    def round(self, step: int, pool: ThreadPoolExecutor, *, phase_times: dict | None = None) -> dict:
        """One sampling round (sample, score, advantages, select, then ``train.inner_epochs`` passes of
        ``train.minibatches`` optimizer steps each); returns its log row.

        ``phase_times``: a dict that receives each phase's wall time in seconds (``sample`` includes the scoring
        that overlaps it; on CUDA the device is synchronised at each phase boundary, which a normal run does not
        do). `bench/test_bench_round.py` times rounds through this."""
        cfg = self.cfg
        clock = _PhaseClock(self.device, phase_times)
        self.strategy.take_log()  # not this round's: records of hooks called outside a round
        with self.parallel.sampling():
            batches = self.sample(step, pool)
        self.strategy_log = self.strategy.take_log()  # what the variant recorded while sampling (`Strategy.record`)
        clock("sample")
        all_rewards = self.advantages(batches)
        batches = self.select(batches)
        clock("advantages")
        stats = self.update(step, batches, clock)
        # Ranks may run different numbers of forwards (groups of different sizes): sum them.
        self.model_forwards += all_sum(self.policy.model_forwards - self._forwards_seen)
        self._forwards_seen = self.policy.model_forwards
        self.step = step + 1
        row = {"step": self.step, "reward_mean": all_rewards.mean().item(),
               "reward_std": all_rewards.std(unbiased=False).item(), **stats, "time_s": None,
               "samples": self.samples, "model_forwards": self.model_forwards,
               "lr": self.optimizer.param_groups[0]["lr"]}
        parts = {}
        for mb in batches:
            for k, v in mb.reward_parts.items():
                parts.setdefault(k, []).append(v)
        if len(parts) > 1:
            row.update({f"reward_{k}": torch.cat(v).mean().item() for k, v in parts.items()})
        return row

    def update(self, step: int, batches: list, clock=None) -> dict:
        """The round's optimizer steps: ``train.inner_epochs`` passes over the kept rollouts, each split into
        ``train.minibatches`` minibatches (`fastgrpo.train.distributed.minibatch_split`: each group's units in a
        random order keyed by (seed, step, pass, group), spread evenly), one optimizer step per minibatch. A unit
        is what the family trains together (`train_rows`): a trajectory's trained transitions (Flow-GRPO: a sample
        and all its timesteps go to one minibatch), a single transition (BranchGRPO's tree edges) or an
        autoregressive rollout. Every update after the first is taken by a policy that moved since sampling, so
        its ratios against the stored rollout log-probs leave 1 and the PPO clip binds.

        Logged per round: ``optimizer_steps``; ``ratio_mean``, ``clip_frac``, ``approx_kl`` (Flow-GRPO's
        ``0.5 * mean((logp - logp_old)^2)``), ``policy_loss``, ``kl``, ``loss`` and ``grad_norm`` averaged over the
        updates; ``ratio_dev_max`` (max |ratio - 1| over every update) and ``first_ratio_dev`` (the first update's,
        taken by the sampling policy: 0 up to float rounding); the fields the strategy recorded while sampling
        (``strategy_log``, from `fastgrpo.algos.base.Strategy.take_log`), added to every update's stats."""
        tc = self.cfg.train
        clock = clock or (lambda name: None)
        rows = self.train_rows(batches)
        groups = rows.pop("group")
        unit_ids, unit_of_row = torch.unique(rows["unit"], return_inverse=True)
        unit_group = torch.zeros(unit_ids.numel(), dtype=torch.int64).scatter_(0, unit_of_row, groups.long())
        n_units_all = all_sum(int(unit_ids.numel()))
        if n_units_all == 0:
            raise ValueError(f"{self.strategy.name}: no rollout is trained (check train.timestep_fraction and the "
                             "variant's plan)")
        if tc.minibatches > n_units_all:
            raise ValueError(f"train.minibatches ({tc.minibatches}) exceeds the {n_units_all} training units of this "
                             f"round ({self.strategy.name}'s unit: one {self.unit_name(self.strategy)}): lower it")
        updates, trained = [], 0
        for epoch in range(tc.inner_epochs):
            part = minibatch_split(self.cfg.seed, step, epoch, unit_group, tc.minibatches)[unit_of_row]
            for m in range(tc.minibatches):
                idx = (part == m).nonzero().flatten()
                n_all = all_sum(int(idx.numel()))
                if n_all == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                with self.parallel.training():
                    st = self.train(batches, take_rows(rows, idx), n_all=n_all, first=not updates,
                                    several=tc.minibatches * tc.inner_epochs > 1)
                st.update(self.strategy_log)
                clock("train")
                for p in self.params:  # a process that trained nothing still joins the gradient average
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                st["grad_norm"] = self.optimizer_step()
                clock("optimizer")
                updates.append(st)
                trained += n_all if epoch == 0 else 0
        out = {"optimizer_steps": len(updates)}
        for k, first in updates[0].items():
            vals = [u[k] for u in updates if k in u]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                out[k] = first  # the round's records (Pro-GRPO's survivors, AEGPO's entropies): the same each update
            else:
                out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
        out["first_ratio_dev"] = updates[0].get("ratio_dev_max", 0.0)
        out[f"trained_{self.row_name}s"] = trained
        return out

    def run(self) -> Path:
        cfg = self.cfg
        t0 = time.time() - self.elapsed
        outer = tqdm(range(self.step, cfg.train.steps), desc=f"{cfg.algo} train", initial=self.step,
                     total=cfg.train.steps, disable=not (cfg.log.progress and self.is_main))
        if self.step == 0:
            self._writing(self.write_samples)  # the "before" row of samples.png
        with ThreadPoolExecutor(max_workers=1) as pool:
            for step in outer:
                row = self.round(step, pool)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    row.update(self.evaluate())
                self.elapsed = time.time() - t0
                row["time_s"] = self.elapsed
                if self.is_main:
                    self._writing(self.logger.log, row)
                    outer.set_postfix(reward=f"{row['reward_mean']:.4f}", kl=f"{row['kl']:.2e}")
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps:
                    self._writing(self.save)
        if self.is_main:
            self.logger.close()
        return self.out

    def _writing(self, fn, *args):
        """``fn(*args)``; an OSError writing the run folder (disk full, permissions changed) becomes a one-line
        ValueError naming the folder."""
        try:
            return fn(*args)
        except OSError as e:
            raise ValueError(f"cannot write to run folder {self.out} ({e.strerror or e}: {e.filename}); the newest "
                             "checkpoint is the last good state") from None

    def save(self) -> None:
        """Every process calls it (FSDP gathers the shards); rank 0 writes."""
        save_checkpoint(self.ckpt_dir, self.step, trainable=self.named, ema=self.ema.shadow if self.ema else None,
                        optimizer=self.optimizer, write=self.is_main,
                        state={"samples": self.samples, "model_forwards": self.model_forwards,
                               "elapsed_s": self.elapsed, "world_size": self.world_size,
                               "distributed": self.parallel.name, "config": self.cfg.to_dict()},
                        strategy_state=self.strategy.state_dict())
        self.write_samples()
        if self.is_main:
            plot_curves(self.out)


class _PhaseClock:
    """Records the wall time since the previous call under a phase name (synchronising CUDA first), when given a
    dict; does nothing otherwise."""

    def __init__(self, device: torch.device, times: dict | None):
        self.device, self.times = device, times
        self.last = time.perf_counter() if times is not None else None
        if times is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
            self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.times is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


def take_rows(rows: dict, idx: torch.Tensor) -> dict:
    """The rows ``idx`` (CPU int64) of every tensor in ``rows`` (each indexed on its own device); the whole dict
    when every row is taken in order."""
    n = next(iter(rows.values())).shape[0] if rows else 0
    if idx.numel() == n and bool((idx == torch.arange(n)).all()):
        return dict(rows)
    from fastgrpo.diffusion.graphs import to_device

    on = {}
    return {k: v.index_select(0, on.setdefault(v.device, to_device(idx, v.device))) for k, v in rows.items()}


def check_resume_world_size(ckpt: Path, world_size: int, distributed: str) -> None:
    """Refuse to resume ``ckpt`` under another number of processes than wrote it when either run shards with FSDP
    (``distributed`` is this run's `fastgrpo.train.sharding` name; ``world_size`` and ``distributed`` come from the
    checkpoint's state.json; a checkpoint without them is accepted). DDP and single-process runs may change it:
    their rollouts do not depend on the process count (`fastgrpo.train.distributed.group_generators`) and the
    checkpoint holds whole tensors. Decision: FSDP keeps the refusal because resuming a sharded run elsewhere is
    not tested."""
    state_file = Path(ckpt) / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return  # load_checkpoint reports a missing or broken checkpoint
    saved, saved_dist = state.get("world_size"), state.get("distributed")
    if saved is None or int(saved) == world_size or "fsdp" not in (saved_dist, distributed):
        return
    raise ValueError(f"--resume: checkpoint {ckpt} was written by a run with world_size={saved} processes "
                     f"(distributed.strategy={saved_dist}) and this run has world_size={world_size} "
                     f"({distributed}); a run sharded with FSDP resumes only under the number of processes that wrote "
                     f"it. Resume with {saved} process(es) (accelerate launch --num_processes {saved}), or start a "
                     "new run")
