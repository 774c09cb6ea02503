"""Thread count for the work (`fastgrpo.train.loop.pick_threads`): 1 for a tiny model on the CPU unless the user
set OMP_NUM_THREADS or the config key ``threads``."""
import pytest
import torch

from fastgrpo.train import resolve_config
from fastgrpo.train.loop import pick_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tiny_model_on_cpu_gets_one_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    said = pick_threads(resolve_config(preset="tiny-flow-grpo"), torch.device("cpu"))
    assert torch.get_num_threads() == 1 and said.startswith("1 CPU thread")


def test_the_user_setting_wins(monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert "OMP_NUM_THREADS" in pick_threads(resolve_config(preset="tiny-flow-grpo"), "cpu")
    assert torch.get_num_threads() == 2  # untouched
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "threads" in pick_threads(resolve_config(preset="tiny-flow-grpo", overrides=["threads=3"]), "cpu")
    assert torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="threads"):
        resolve_config(preset="tiny-flow-grpo", overrides=["threads=0"])


def test_real_models_and_gpus_keep_torchs_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    cfg = resolve_config(preset="tiny-flow-grpo")
    pick_threads(cfg, "cuda")  # a tiny model on a GPU: the CPU threads are not the bottleneck
    assert torch.get_num_threads() == 2
    cfg.model.path = "some/hub-model"  # not validated again: only the decision is under test
    pick_threads(cfg, "cpu")
    assert torch.get_num_threads() == 2
