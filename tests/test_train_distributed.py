"""Two CPU processes (gloo) compute exactly the advantages one process computes on the same rewards, also with
groups of different sizes (AEGPO) and a different number of rollouts on each rank."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgrpo import group_advantages_ref
from fastgrpo.testing import assert_close
from fastgrpo.train.distributed import GroupSampler, gathered_advantages

P, G = 3, 4
RAGGED = [5, 3, 4, 6]  # two groups per rank: 8 rollouts on rank 0, 10 on rank 1
CONVENTIONS = [dict(std="global", ddof=0, eps=1e-4, clip=5.0), dict(std="group", ddof=1, eps=1e-8, clip=None)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, rewards, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        n = rewards.numel() // world_size
        local = rewards[rank * n:(rank + 1) * n]
        results = [gathered_advantages(local, G, **conv)[0] for conv in CONVENTIONS]
        prompts, groups = GroupSampler(10, P, G, seed=0).local(step=3, rank=rank, world_size=world_size)
        ragged = torch.arange(sum(RAGGED), dtype=torch.float32).sin()
        mine = RAGGED[2 * rank:2 * rank + 2]
        start = sum(RAGGED[:2 * rank])
        uneven = [gathered_advantages(ragged[start:start + sum(mine)], mine, **conv) for conv in CONVENTIONS]
        torch.save({"adv": results, "prompts": prompts, "groups": groups, "ragged": uneven},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    rewards = torch.randn(P * G, generator=torch.Generator().manual_seed(0))
    mp.start_processes(_worker, args=(2, _free_port(), rewards, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for i, conv in enumerate(CONVENTIONS):
        single, _ = gathered_advantages(rewards, G, **conv)
        assert torch.equal(torch.cat([p["adv"][i] for p in parts]), single)
    ragged = torch.arange(sum(RAGGED), dtype=torch.float32).sin()
    for i, conv in enumerate(CONVENTIONS):
        single, _ = gathered_advantages(ragged, RAGGED, **conv)
        assert torch.equal(torch.cat([p["ragged"][i][0] for p in parts]), single)
        assert all(torch.equal(p["ragged"][i][1], ragged) for p in parts)  # every rank sees all rewards
        assert_close(single, group_advantages_ref(ragged.double(), group_sizes=RAGGED, **conv))
    one = GroupSampler(10, P, G, seed=0).local(step=3, rank=0, world_size=1)
    assert torch.equal(torch.cat([p["prompts"] for p in parts]), one[0])
    assert torch.equal(torch.cat([p["groups"] for p in parts]), one[1])


def test_sampler_rejects_indivisible_world():
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        GroupSampler(10, 3, 3, seed=0).local(0, 0, 2)
