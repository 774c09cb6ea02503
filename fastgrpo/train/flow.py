"""The flow families' phases (every `fastgrpo.diffusion.adapter.FlowAdapter`): tree-shaped SDE rollouts and the
per-transition update.

**sample** -- the strategy plans this rank's groups (`Strategy.plan_groups`; a variant may return several plans per
prompt, ``GroupPlan.prompt``, each then an advantage group of its own), then they are sampled in waves of
whole groups (as many as fit ``sample.batch_size`` rows at the widest point), each wave scored in a worker thread
while the next one samples. Within a wave every group follows its `GroupPlan`: ``roots`` trajectories from noise
(or, from step ``start`` on, from the given ``x_start``: a prefix sampled elsewhere joins the wave there); at a
split step each active trajectory becomes that many children, each taking the step with its own noise; stochastic
steps call `fastgrpo.sde_step` with the variant's kind, the others ``kind="ode"``; after each velocity evaluation
the strategy may prune rows (Pro-GRPO). Rows stay ordered by group, so a group's leaves are contiguous and its
size is its number of leaves (``MicroBatch.group_sizes``). Forwards run in chunks of at most ``sample.batch_size``
rows. Every stochastic transition is kept (x_t, x_{t-1}, its log-prob, its node of the tree); ODE transitions have
no density and are never trained.

**train** -- the trained transitions (per node: the strategy's steps for trees without splits, every stochastic
transition otherwise) in chunks of ``sample.batch_size``: the transition's new log-prob and the KL to the reference
in one fused ``sde_step(prev_sample=..., v_ref=...)`` call, the clipped surrogate ``max(-A r, -A clip(r, 1-e,
1+e))`` (Flow-GRPO's ``policy_loss``) times the strategy's weight, plus ``beta * kl``, averaged over the
minibatch's trained transitions (the loop cuts a round into ``train.minibatches`` of them, each unit -- a
trajectory, or a transition for ``Strategy.minibatch_unit = "transition"`` -- whole); gradients accumulate over the
chunks. A transition's advantage is its node's (`Strategy.node_advantages`: the leaf's, or BranchGRPO's depth-wise
one).

The first update of a round is taken by the sampling policy, so its importance ratio is 1 (exactly on CPU, where
the tiny transformers' rows do not depend on what they are batched with; ``first_ratio_dev`` in the log).
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fastgrpo.diffusion.graphs import to_device
from fastgrpo.ops import sde_step
from fastgrpo.ops.sde import standard_normal

from .distributed import all_sum, group_generators
from .loop import GRPOTrainer, MicroBatch, TrainingDiverged


@dataclass
class Tree:
    """One wave's rollouts: nodes (trajectory segments between splits) and their stochastic transitions."""

    parent: list = field(default_factory=list)
    depth: list = field(default_factory=list)
    group: list = field(default_factory=list)
    train_steps: dict = field(default_factory=dict)  # node -> set of steps it trains (trees without splits)
    transitions: list = field(default_factory=list)  # dicts: step, node [m], x, x_next, log_prob [m], std [m]
    leaf_nodes: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    def add_nodes(self, parents, depth, groups) -> torch.Tensor:
        start = len(self.parent)
        self.parent += list(parents)
        self.depth += list(depth)
        self.group += list(groups)
        return torch.arange(start, len(self.parent))

    def leaves_of(self, node: int) -> list:
        """Leaf positions (indices into ``leaf_nodes``) below ``node``."""
        out = []
        for pos, leaf in enumerate(self.leaf_nodes.tolist()):
            n = leaf
            while n != -1 and n != node:
                n = self.parent[n]
            if n == node:
                out.append(pos)
        return out


class FlowTrainer(GRPOTrainer):
    def build_policy(self):
        from fastgrpo.diffusion.adapter import DTYPES
        from fastgrpo.families import get_family

        cfg = self.cfg
        adapter = get_family(cfg.model.family).adapter_class()
        pipe = self.pipeline if self.pipeline is not None else adapter.load_pipeline(
            cfg.model.path, DTYPES[cfg.model.dtype], seed=cfg.seed, tiny_vae_gain=cfg.model.tiny_vae_gain)
        model = adapter(pipe, height=cfg.model.height, width=cfg.model.width, guidance_scale=cfg.sample.guidance_scale,
                        max_sequence_length=cfg.model.max_sequence_length, device=self.device,
                        **adapter.options_from_config(cfg))
        if cfg.model.lora is not None:
            model.add_lora(cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets or model.lora_targets)
        else:
            model.full_finetune(keep_reference=self.strategy.beta > 0 or self.strategy.needs_reference)
            self.parallel.shard(model.transformer, reference=model.frozen_reference,
                                block_classes=model.fsdp_block_classes())
        if cfg.model.compile:
            model.compile_blocks()
        self.graphed = None
        if cfg.sample.cuda_graphs:
            if self.device.type != "cuda":
                warnings.warn(f"sample.cuda_graphs needs a CUDA device; this run is on {self.device}, so sampling "
                              "runs eagerly", RuntimeWarning, stacklevel=2)
            elif self.parallel.name == "fsdp":
                raise ValueError("sample.cuda_graphs cannot be used with FSDP (it gathers the weights in every "
                                 "forward); use distributed.strategy=ddp")
            else:
                from fastgrpo.diffusion.graphs import GraphedVelocity

                self.graphed = GraphedVelocity(model)
        self.sigmas = model.sigmas(cfg.sample.num_steps)
        self.sigmas_dev = self.sigmas.to(self.device, torch.float32)  # once: no host->device copy per step
        return model, model.trainable_state()

    # ------------------------------------------------------------------------------------------------ sample
    def velocity(self, x, step_idx, emb, rows_group, *, cfg=True, transformer=None, graphs=False):
        """v for rows ``x`` at steps ``step_idx`` (an int for all rows, or [n] ints), prompt embeddings per group
        (``rows_group`` [n]: each row's group, best on x's device), in ``sample.batch_size`` chunks. ``graphs``: the
        policy's no-grad forwards may replay CUDA graphs (``sample.cuda_graphs``; the rollout only)."""
        bs = self.cfg.sample.batch_size
        n = x.shape[0]
        if isinstance(step_idx, int):  # one step for every row: a view of the device schedule, no copy
            sigma = self.sigmas_dev[step_idx:step_idx + 1].expand(n)
        else:
            sigma = to_device(self.sigmas[step_idx].float(), x.device)
        rows_group = to_device(rows_group, x.device)
        run = self.graphed if (graphs and self.graphed is not None and transformer is None
                               and not torch.is_grad_enabled()) else None
        out = []
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            e = {k: v.index_select(0, rows_group[sl]) for k, v in emb.items()}
            if run is not None:
                out.append(run(x[sl], sigma[sl], e, cfg=cfg))
            else:
                out.append(self.policy.velocity(x[sl], sigma[sl], e, cfg=cfg, transformer=transformer))
        return torch.cat(out) if out else x.new_empty(x.shape)

    @torch.no_grad()
    def sample(self, step: int, pool: ThreadPoolExecutor) -> list:
        cfg, strat = self.cfg, self.strategy
        prompt_idx, _ = self.sampler.local(step, self.rank, self.world_size)
        group_idx = prompt_idx[::cfg.sample.group_size].tolist()
        group_prompts = [self.prompts[i] for i in group_idx]
        self.wave_log = {}
        # One generator per global group: its plan, initial noise, trained steps and SDE noise, in that order.
        first = self.rank * len(group_idx)
        gens = group_generators(cfg.seed, step, range(first, first + len(group_idx)))
        plans = strat.plan_groups(self, step, group_idx, gens)
        owners, plan_gens = plan_owners(plans, group_prompts, gens, strat.name)
        plan_prompts = [group_prompts[g] for g in owners]
        # Each plan's global id (its prompt's global group, then its place among that prompt's plans) keys its
        # minibatch order; the place is its label for ``train.group_by: prompt`` (the same spine and branch step
        # of a prompt drawn twice pool, other plans of one prompt stay apart).
        ordinal, seen = [], {}
        for g in owners:
            ordinal.append(seen.get(g, 0))
            seen[g] = ordinal[-1] + 1
        plan_ids = [(first + g) * 2 ** 20 + o for g, o in zip(owners, ordinal)]
        widest = max(max(p.roots, p.leaves()) for p in plans)
        per_wave = max(1, cfg.sample.batch_size // widest)
        batches, futures = [], []
        waves = range(0, len(plans), per_wave)
        for w in tqdm(waves, desc="sample", leave=False, disable=not (cfg.log.progress and self.is_main)):
            prompts, wave_plans = plan_prompts[w:w + per_wave], plans[w:w + per_wave]
            tree, x_final = self._rollout(prompts, wave_plans, plan_gens[w:w + per_wave])
            leaf_groups = tree_groups(tree)
            leaf_prompts = [prompts[g] for g in leaf_groups]
            sizes = torch.bincount(torch.tensor(leaf_groups), minlength=len(prompts)).tolist()
            batches.append(MicroBatch(leaf_prompts, {"tree": tree, "prompts": prompts,
                                                     "groups": plan_ids[w:w + per_wave],
                                                     "emb": self.policy.encode_prompts(prompts)}, group_sizes=sizes,
                                      group_labels=ordinal[w:w + per_wave]))
            futures.append(self.submit_score(pool, self.policy.decode(x_final), leaf_prompts))
        self.collect_scores(batches, futures)
        self.samples += all_sum(sum(max(p.roots, p.leaves()) for p in plans))
        return batches

    def _rollout(self, prompts, plans, gens):
        """One wave's trees (``gens``: each group's generator). Nothing here waits for the device per denoising
        step: schedule values are views of a device copy, row indices go to the device from pinned memory, each
        group's noise is drawn on its CPU generator and the wave's copied at once without blocking (`group_noise`);
        only splits and pruning touch the host."""
        cfg, strat, model = self.cfg, self.strategy, self.policy
        T = cfg.sample.num_steps
        emb = model.encode_prompts(prompts)
        tree = Tree()
        for g, plan in enumerate(plans):
            if not 0 <= plan.start < T or (plan.start > 0 and plan.x_start is None):
                raise ValueError(f"{strat.name}: a group plan starts at step {plan.start} "
                                 f"{'without x_start' if 0 < plan.start < T else f'outside [0, {T})'}")
        x = torch.empty(model.latent_shape(0), device=self.device)
        group = node = torch.empty(0, dtype=torch.long)
        group_dev = to_device(group, self.device)
        sigma_max = self.sigmas[1].item()
        for i in range(T):
            joining = [g for g, plan in enumerate(plans) if plan.start == i]
            if joining:
                x, group, node = self._add_roots(tree, joining, plans, (x, group, node), gens)
                group_dev = to_device(group, self.device)
            if x.shape[0] == 0:
                continue
            factors = torch.tensor([plans[g].splits.get(i, 1) for g in group.tolist()])
            if bool((factors > 1).any()):
                x = x.repeat_interleave(to_device(factors, x.device), 0, output_size=int(factors.sum()))
                group, parent = group.repeat_interleave(factors), node.repeat_interleave(factors)
                node = tree.add_nodes(parent.tolist(), [tree.depth[p] + 1 for p in parent.tolist()], group.tolist())
                group_dev = to_device(group, self.device)
            v = self.velocity(x, i, emb, group_dev, graphs=True)
            keep = strat.prune(self, i, {"x": x, "v": v, "group": group, "prompts": prompts, "emb": emb})
            if keep is not None:
                x, v, group, node = x[keep], v[keep], group[keep], node[keep]
                group_dev = to_device(group, self.device)
            sde = torch.tensor([bool(plans[g].sde[i]) for g in group.tolist()], dtype=torch.bool)
            s, sn = self.sigmas[i].item(), self.sigmas[i + 1].item()
            n_sde = int(sde.sum())
            if n_sde == x.shape[0]:  # every row stochastic (plain GRPO): no indexing
                rows, x_s, v_s = None, x, v
            elif n_sde:
                rows = to_device(sde.nonzero().flatten(), x.device)
                x_s, v_s = x.index_select(0, rows), v.index_select(0, rows)
            x_next = None
            if n_sde:
                scale = strat.noise_scale(i, plans[int(group[sde][0])])
                noise = group_noise(x_s.shape, group[sde], gens, x.device)
                if scale != 1.0:
                    noise = scale * noise
                out = sde_step(x_s, v_s, s, sn, kind=strat.sde_kind, noise_level=strat.noise_level,
                               sigma_max=sigma_max, noise=noise, impl=self.cfg.model.impl)
                tree.transitions.append({"step": i, "node": node[sde], "x": x_s, "x_next": out.prev_sample,
                                         "log_prob": out.log_prob, "std": out.std})
                x_next = out.prev_sample if rows is None else torch.empty_like(x).index_copy_(0, rows,
                                                                                             out.prev_sample)
            if n_sde < x.shape[0]:
                det = to_device((~sde).nonzero().flatten(), x.device) if n_sde else None
                x_d = x if det is None else x.index_select(0, det)
                v_d = v if det is None else v.index_select(0, det)
                step_d = sde_step(x_d, v_d, s, sn, kind="ode", impl=self.cfg.model.impl).prev_sample
                x_next = step_d if det is None else x_next.index_copy_(0, det, step_d)
            x = x_next
        tree.leaf_nodes = node
        return tree, x

    def _add_roots(self, tree, joining, plans, rows, gens):
        """Start the roots of the groups ``joining`` (from initial noise, or their plan's ``x_start``) and add them
        to the active ``rows`` (x, group, node), which stay ordered by group."""
        model, T = self.policy, self.cfg.sample.num_steps
        xs, groups = [], []
        for g in joining:
            plan = plans[g]
            if plan.x_start is not None:
                x0 = plan.x_start.to(self.device, torch.float32)
                xs.append(x0.expand(plan.roots, *x0.shape[1:]).clone())
            elif plan.same_noise:
                x0 = model.initial_latents(1, gens[g])
                xs.append(x0.expand(plan.roots, *x0.shape[1:]).clone())
            else:
                xs.append(model.initial_latents(plan.roots, gens[g]))
            groups += [g] * plan.roots
        new_group = torch.tensor(groups)
        new_node = tree.add_nodes([-1] * len(groups), [0] * len(groups), groups)
        for g in joining:  # trees without splits train the strategy's steps per trajectory
            if not plans[g].splits:
                roots = new_node[new_group == g]
                for n, s in zip(roots.tolist(), self.strategy.train_steps(T, len(roots), gens[g]).tolist()):
                    tree.train_steps[n] = set(s)
        x, group, node = rows
        x, group, node = torch.cat([x, *xs]), torch.cat([group, new_group]), torch.cat([node, new_node])
        order = torch.sort(group, stable=True).indices
        return x.index_select(0, to_device(order, x.device)), group[order], node[order]

    @torch.no_grad()
    def preview(self, prompts, gens):
        """One image per prompt from a fixed initial noise (``gens``), sampled with the ODE (no SDE noise)."""
        model = self.policy
        x = torch.cat([model.initial_latents(1, g) for g in gens])
        emb = model.encode_prompts(prompts)
        rows_group = torch.arange(len(prompts))
        for i in range(self.cfg.sample.num_steps):
            v = self.velocity(x, i, emb, rows_group)
            x = sde_step(x, v, self.sigmas[i].item(), self.sigmas[i + 1].item(), kind="ode",
                         impl=self.cfg.model.impl).prev_sample
        return model.decode(x)

    # ------------------------------------------------------------------------------------------------- train
    row_name = "transition"

    @staticmethod
    def unit_name(strategy) -> str:
        return "trajectory's trained transitions" if strategy.minibatch_unit == "trajectory" else "transition"

    def train_rows(self, batches):
        """All trained transitions of the round: x, x_next, old log-prob (on the device), step, advantage, weight,
        wave, the group within its wave (``local``), the global ``group`` and the ``unit`` (on the CPU). A unit is a
        node of the tree (a trajectory segment: all its trained steps train in one minibatch, Flow-GRPO's sample)
        or, for a strategy whose ``minibatch_unit`` is ``"transition"``, each transition alone (BranchGRPO's
        edges). Selecting rows uses device index tensors: no sync per transition."""
        strat = self.strategy
        cols = {k: [] for k in ("x", "x_next", "step", "old", "adv", "weight", "local", "group", "wave", "unit")}
        node_base = 0
        for w, mb in enumerate(batches):
            tree = mb.data["tree"]
            node_adv = strat.node_advantages(tree, mb.rewards, mb.advantages.cpu())
            global_group = torch.tensor(mb.data["groups"])
            for tr in tree.transitions:
                nodes = tr["node"].tolist()
                # Trained: the node's planned steps (trees without splits) or every stochastic transition; never a
                # node without an advantage (a trajectory pruned before the end).
                mask = torch.tensor([(tr["step"] in tree.train_steps[n] if n in tree.train_steps else True)
                                     and not bool(torch.isnan(node_adv[n])) for n in nodes], dtype=torch.bool)
                if not bool(mask.any()):
                    continue
                take = _row_selector(mask, tr["x"].device)
                steps = torch.full((int(mask.sum()),), tr["step"])
                weights = strat.step_weights(take(tr["std"]), steps, self.sigmas)
                local = torch.tensor([tree.group[n] for n in tr["node"][mask].tolist()], dtype=torch.int64)
                cols["x"].append(take(tr["x"]))
                cols["x_next"].append(take(tr["x_next"]))
                cols["step"].append(steps)
                cols["old"].append(take(tr["log_prob"]))
                cols["adv"].append(node_adv[tr["node"][mask]])
                cols["weight"].append(weights.cpu() if weights is not None else torch.ones(len(steps)))
                cols["local"].append(local)
                cols["group"].append(global_group[local])
                cols["wave"].append(torch.full((len(steps),), w))
                cols["unit"].append(node_base + tr["node"][mask].cpu())
            node_base += tree.num_nodes
        rows = {k: torch.cat(v) if v else torch.empty(0) for k, v in cols.items()}
        if strat.minibatch_unit == "transition" and rows["unit"].numel():
            rows["unit"] = torch.arange(rows["unit"].numel())
        return rows

    def train(self, batches: list, rows: dict | None = None, *, n_all: int | None = None, first: bool = True,
              several: bool = False) -> dict:
        """One minibatch's policy gradient. Per chunk nothing waits for the device: the chunk's rows, advantages,
        weights and sigmas go to the device once for the whole minibatch (pinned, non-blocking), the statistics and
        the finiteness of every chunk's loss accumulate on the device and are read once at the end (a non-finite
        loss still stops the run before the optimizer step, naming the chunk's denoising steps)."""
        rows, n_all = self.whole_round(batches, rows, n_all)
        cfg, model, strat = self.cfg, self.policy, self.strategy
        beta, clip = strat.beta, cfg.train.clip_range
        sigma_max = self.sigmas[1].item()
        n = rows["step"].shape[0]
        # The loss is the mean over every process's trained transitions of the minibatch: the processes average
        # their gradients, so each divides its sum by n_all / world_size (processes may train different numbers).
        norm = n_all / self.world_size
        bs = cfg.sample.batch_size
        self.parallel.check_same_forwards(-(-n // bs))
        dev = self.device
        # Each row's prompt embedding: the waves' embeddings stacked, indexed by (wave offset + group) on the device.
        keys = list(batches[0].data["emb"])
        offsets = torch.tensor([0] + [mb.data["emb"][keys[0]].shape[0] for mb in batches]).cumsum(0)
        emb_all = {k: torch.cat([mb.data["emb"][k] for mb in batches]) for k in keys}
        emb_row = to_device(offsets[rows["wave"]] + rows["local"], dev)
        s_cpu, sn_cpu = self.sigmas[rows["step"]].double(), self.sigmas[rows["step"] + 1].double()
        s_dev = to_device(s_cpu.float(), dev)
        adv_all, weight_all = to_device(rows["adv"].float(), dev), to_device(rows["weight"].float(), dev)
        model.transformer.train()
        zero = torch.zeros((), device=dev)
        acc = {k: zero.clone() for k in ("policy_loss", "kl", "ratio_mean", "clip_frac", "approx_kl")}
        ratio_dev_max = zero.clone()
        losses = []
        for start in tqdm(range(0, n, bs), desc="train", leave=False,
                          disable=not (cfg.log.progress and self.is_main)):
            sl = slice(start, start + bs)
            x_t, x_next = rows["x"][sl], rows["x_next"][sl]
            emb = {k: v.index_select(0, emb_row[sl]) for k, v in emb_all.items()}
            v = model.velocity(x_t, s_dev[sl], emb, cfg=cfg.train.cfg)
            v_ref = None
            if beta > 0:
                with torch.no_grad(), model.reference() as ref_net:
                    v_ref = model.velocity(x_t, s_dev[sl], emb, cfg=cfg.train.cfg, transformer=ref_net)
            # CPU float64 sigmas: checked on the host and copied without a sync (sde_step's contract).
            out = sde_step(x_t, v, s_cpu[sl], sn_cpu[sl], kind=strat.sde_kind, noise_level=strat.noise_level,
                           sigma_max=sigma_max, prev_sample=x_next, v_ref=v_ref, impl=cfg.model.impl,
                           kl_convention=cfg.train.kl_convention)
            log_ratio = out.log_prob - rows["old"][sl]
            ratio = torch.exp(log_ratio)
            adv = adv_all[sl]
            surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
            policy = (weight_all[sl] * surrogate).sum()
            kl = out.kl.sum() if out.kl is not None else zero
            loss = (policy + beta * kl) / norm
            losses.append(loss.detach())
            loss.backward()
            r = ratio.detach()
            acc["policy_loss"] += policy.detach() / n
            acc["kl"] += kl.detach() / n
            acc["ratio_mean"] += r.sum() / n
            acc["clip_frac"] += ((r - 1).abs() > clip).float().sum() / n
            acc["approx_kl"] += 0.5 * (log_ratio.detach() ** 2).sum() / n
            ratio_dev_max = torch.maximum(ratio_dev_max, (r - 1).abs().max())
        model.transformer.eval()
        names = list(acc)
        values = torch.stack([acc[k] for k in names] + [ratio_dev_max] + losses).tolist() if n else \
            [0.0] * (len(names) + 1)  # one sync
        values, chunk_losses = values[:len(names) + 1], values[len(names) + 1:]
        bad = next((i for i, v in enumerate(chunk_losses) if not math.isfinite(v)), None)
        if bad is not None:
            steps = rows["step"][bad * bs:(bad + 1) * bs].tolist()
            raise TrainingDiverged(f"the loss became {chunk_losses[bad]} at denoising steps {steps}; "
                                   "weights not updated")
        stats = {"loss": sum(chunk_losses), **dict(zip(names, values[:-1])), "ratio_dev_max": values[-1],
                 "trained_transitions": n_all}
        stats.update(getattr(self, "wave_log", {}))
        return stats


def plan_owners(plans: list, group_prompts: list, gens: list, name: str) -> tuple:
    """Each plan's group (``GroupPlan.prompt``, or its position when None, which needs one plan per group) and
    generator (its own ``GroupPlan.generator`` when it has one, else its group's)."""
    owners, out_gens = [], []
    for n, plan in enumerate(plans):
        g = n if plan.prompt is None else plan.prompt
        if plan.prompt is None and len(plans) != len(group_prompts):
            raise ValueError(f"{name}: {len(plans)} plans for {len(group_prompts)} groups; a plan that is not one "
                             "per group must name its prompt (GroupPlan.prompt)")
        if not 0 <= g < len(group_prompts):
            raise ValueError(f"{name}: a plan names prompt {g}, outside the {len(group_prompts)} groups")
        owners.append(g)
        out_gens.append(plan.generator if plan.generator is not None else gens[g])
    return owners, out_gens


def group_noise(shape, rows_group: torch.Tensor, gens: list, device) -> torch.Tensor:
    """float32 N(0, 1) noise of ``shape`` for rows ordered by group (``rows_group`` [n], CPU): each run of a group's
    rows is drawn from that group's generator ``gens[g]``, so a row's noise does not depend on which other groups
    share its wave (or its process); drawn on the CPU and copied once without blocking."""
    groups, counts = torch.unique_consecutive(rows_group, return_counts=True)
    if len(groups) == 1:
        return standard_normal((shape[0], *shape[1:]), gens[int(groups[0])], device)
    noise = torch.cat([torch.randn((c, *shape[1:]), generator=gens[g], dtype=torch.float32)
                       for g, c in zip(groups.tolist(), counts.tolist())])
    return to_device(noise, device)


def _row_selector(mask: torch.Tensor, device):
    """A function taking the rows ``mask`` (CPU bool [n]) of a tensor on ``device``: identity when every row is
    taken, else ``index_select`` with the indices copied to the device without a sync."""
    if bool(mask.all()):
        return lambda t: t
    idx = to_device(mask.nonzero().flatten(), device)
    return lambda t: t.index_select(0, idx)


def tree_groups(tree: Tree) -> list:
    """The group of each leaf, in leaf order."""
    return [tree.group[n] for n in tree.leaf_nodes.tolist()]
