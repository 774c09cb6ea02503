"""Groups across processes: the K-repeat prompt sampler and advantages computed on gathered rewards.

Each optimizer step draws ``prompts_per_step`` prompts (the same draw on every rank: it is seeded by the run seed
and the step), repeats each ``group_size`` times (Flow-GRPO's K-repeat sampler), and gives rank r the contiguous
slice ``[r * n_local, (r + 1) * n_local)`` of the ``P * G`` samples. Rewards are all-gathered before the
per-prompt statistics, so N processes compute exactly the advantages one process would.

A variant may give its prompts different numbers of rollouts (AEGPO); the group sizes are then gathered with the
rewards, and each rank's rewards may be of a different length (`all_gather_varlen`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Named random streams of a step (`step_generator`): each key (seed, step, stream, index) has its own generator.
STREAM_PROMPTS = 7  # the step's prompt draw (`GroupSampler`), the same on every rank
STREAM_GROUP = 11  # index = global group index: every draw of a flow group (plan, initial noise, SDE noise)
STREAM_SAMPLE = 13  # index = global sample index: every draw of an autoregressive sample's tokens
STREAM_MINIBATCH = 17  # index = global group index (and the pass): the order of a group's units in the minibatches

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rng_seed(*parts: int) -> int:
    """A 63-bit seed mixed from the integers ``parts`` (SplitMix64 over each in turn): distinct keys of the same
    length give unrelated seeds (the old ``(seed * a + step) * b + stream`` arithmetic let stream 1000 + g of step
    s collide with stream g - 9 of step s + 1)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def step_generator(seed: int, step: int, stream: int = 0, index: int = 0) -> torch.Generator:
    """The CPU generator of one (run seed, step, stream, index): resuming at any step replays the same
    randomness, and a key names the same draws whichever process makes them."""
    return torch.Generator().manual_seed(rng_seed(seed, step, stream, index))


def group_generators(seed: int, step: int, groups) -> list:
    """One generator per global group index in ``groups`` (`STREAM_GROUP`): a group's rollouts depend on the run
    seed, the step and the group's index only, not on which process samples it nor on the other groups in its
    wave, so 1 and N processes sample the same rollouts."""
    return [step_generator(seed, step, STREAM_GROUP, g) for g in groups]


class GroupSampler:
    """K-repeat sampler over a prompt list."""

    def __init__(self, num_prompts: int, prompts_per_step: int, group_size: int, seed: int):
        if num_prompts < 1:
            raise ValueError("the prompt list is empty")
        self.num_prompts, self.per_step, self.group_size, self.seed = num_prompts, prompts_per_step, group_size, seed

    def groups(self, step: int) -> torch.Tensor:
        """Prompt indices of this step's P groups (without replacement within a step when possible)."""
        g = step_generator(self.seed, step, STREAM_PROMPTS)
        reps = -(-self.per_step // self.num_prompts)
        order = torch.cat([torch.randperm(self.num_prompts, generator=g) for _ in range(reps)])
        return order[: self.per_step]

    def local(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt index, group index) of every sample this rank handles."""
        total = self.per_step * self.group_size
        if total % world_size:
            raise ValueError(f"prompts_per_step * group_size ({total}) must be divisible by the number of "
                             f"processes ({world_size})")
        n = total // world_size
        group = torch.arange(total) // self.group_size
        prompt = self.groups(step)[group]
        sl = slice(rank * n, (rank + 1) * n)
        return prompt[sl], group[sl]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors from every rank in rank order (identity in one process)."""
    rank, ws = world()
    if ws == 1:
        return t
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    src = t.contiguous().to(backend_device)
    out = [torch.empty_like(src) for _ in range(ws)]
    dist.all_gather(out, src)
    return torch.cat(out).to(t.device)


def all_gather_varlen(t: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Concatenate tensors whose first dimension differs between ranks, in rank order; also returns each rank's
    length (identity in one process)."""
    rank, ws = world()
    if ws == 1:
        return t, [t.shape[0]]
    lengths = all_gather_cat(torch.tensor([t.shape[0]], dtype=torch.int64)).tolist()
    padded = t.new_zeros((max(lengths), *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = all_gather_cat(padded).split(max(lengths))
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]), lengths


def all_sum(x):
    """The sum of a number over ranks (identity in one process): counters that differ between ranks."""
    rank, ws = world()
    if ws == 1:
        return x
    total = all_gather_cat(torch.tensor([x], dtype=torch.float64)).sum().item()
    return int(total) if isinstance(x, int) else total


def minibatch_split(seed: int, step: int, epoch: int, groups: torch.Tensor, minibatches: int) -> torch.Tensor:
    """The minibatch (in ``[0, minibatches)``) of each training unit of a round's pass ``epoch``.

    ``groups`` [n] (CPU int64): each unit's global group index; a group's units are listed in a canonical order
    (the same whichever process holds them). Each group's units are put in a random order drawn from the
    generator of (seed, step, `STREAM_MINIBATCH`, epoch, group) and dealt into ``minibatches`` contiguous parts
    as evenly as possible (sizes differ by at most one): every minibatch holds an equal share of every group.

    Decision: the released trainers shuffle the whole batch of a process (Flow-GRPO ``torch.randperm`` over the
    process's samples); spreading each group evenly instead makes the minibatches independent of the number of
    processes (groups never span processes) and gives every process the same number of units per minibatch when
    its groups are of equal size (FSDP runs the same forwards on every process)."""
    part = torch.empty(groups.shape[0], dtype=torch.int64)
    for g in torch.unique(groups).tolist():
        idx = (groups == g).nonzero().flatten()
        k = idx.numel()
        gen = torch.Generator().manual_seed(rng_seed(seed, step, STREAM_MINIBATCH, epoch, g))
        pos = torch.empty(k, dtype=torch.int64)
        pos[torch.randperm(k, generator=gen)] = torch.arange(k)  # each unit's place in the shuffled order
        part[idx] = pos * minibatches // k
    return part


def pooled_sizes(sizes: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the groups that share a key (``group_by: prompt``): returns (order, pooled sizes), where ``order``
    [N] lists the rollouts with each key's groups made contiguous (keys in order of first appearance, groups in
    their order) and ``pooled sizes`` the rollouts per key in that order."""
    starts = torch.cumsum(sizes, 0) - sizes
    first = {}
    for i, k in enumerate(keys.tolist()):
        first.setdefault(k, []).append(i)
    order = torch.cat([torch.arange(int(starts[i]), int(starts[i] + sizes[i])) for gs in first.values() for i in gs])
    pooled = torch.tensor([int(sizes[gs].sum()) for gs in map(torch.tensor, first.values())], dtype=torch.int64)
    return order, pooled


def gathered_advantages(local_rewards: torch.Tensor, group_sizes, *, std: str, ddof: int, eps: float,
                        clip: float | None, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of this rank's samples from the rewards of all ranks; also returns all rewards.

    ``group_sizes``: an int (every group has that many rollouts, the K-repeat sampler's G) or this rank's group
    sizes [p_local] (groups of different sizes, laid out one after another in ``local_rewards``).

    ``keys``: one int per local group, or None. Groups of all ranks with the same key are normalised as one group
    (``train.group_by: prompt``: the key identifies the prompt text, so a prompt drawn twice in a round has its
    rollouts pooled, as Flow-GRPO's ``PerPromptStatTracker`` does by prompt string)."""
    from fastgrpo.ops import group_advantages

    rank, ws = world()
    if keys is not None:
        local_sizes = ([group_sizes] * (local_rewards.shape[0] // group_sizes) if isinstance(group_sizes, int)
                       else list(group_sizes))
        rewards, lengths = all_gather_varlen(local_rewards.float())
        sizes, _ = all_gather_varlen(torch.as_tensor(local_sizes, dtype=torch.int64))
        all_keys, _ = all_gather_varlen(torch.as_tensor(list(keys), dtype=torch.int64))
        order, pooled = pooled_sizes(sizes, all_keys)
        adv = torch.empty_like(rewards)
        adv[order] = group_advantages(rewards[order], std=std, ddof=ddof, eps=eps, clip=clip, group_sizes=pooled)
        start = sum(lengths[:rank])
        return adv[start:start + lengths[rank]], rewards
    if isinstance(group_sizes, int):
        rewards = all_gather_cat(local_rewards.float())
        adv = group_advantages(rewards.view(-1, group_sizes), std=std, ddof=ddof, eps=eps, clip=clip).reshape(-1)
        n = local_rewards.shape[0]
        return adv[rank * n:(rank + 1) * n], rewards
    rewards, lengths = all_gather_varlen(local_rewards.float())
    sizes, _ = all_gather_varlen(torch.as_tensor(group_sizes, dtype=torch.int64))
    adv = group_advantages(rewards, std=std, ddof=ddof, eps=eps, clip=clip, group_sizes=sizes)
    start = sum(lengths[:rank])
    return adv[start:start + lengths[rank]], rewards


def average_gradients(params) -> None:
    """Mean of the gradients over ranks (what DDP does), after local accumulation."""
    rank, ws = world()
    if ws == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= ws
