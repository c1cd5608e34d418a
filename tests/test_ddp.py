"""DDP: the distillation modules' gradients are averaged over ranks (2 real gloo processes on CPU)."""

import importlib.util
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
DDP_MODULE = Path(__file__).resolve().parent.parent / "nnunetv2_recokd" / "trainers" / "ddp.py"


def _load_ddp_module():
    """trainers/ddp.py itself, without trainers/__init__ (which imports all of nnU-Net: seconds per spawned rank)."""
    spec = importlib.util.spec_from_file_location("_recokd_ddp_under_test", DDP_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Adapter(nn.Module):
    """A connector like the distiller's: a 1x1x1 conv, plus a parameter only some ranks use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank, as after nnU-Net's broadcast
        self.conv = nn.Conv3d(2, 3, 1)
        self.rank0_only = nn.Parameter(torch.randn(3))


def rank_grads(rank: int) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """Forward/backward on this rank's data; rank 1 never touches `rank0_only` (its grad stays None)."""
    model = Adapter()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 2, 3, 3, 3, generator=g)
    target = torch.randn(2, 3, 3, 3, 3, generator=g)
    y = model.conv(x)
    if rank == 0:
        y = y * model.rank0_only.view(1, 3, 1, 1, 1)
    ((y - target) ** 2).mean().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return model, grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, _ = rank_grads(rank)
        _load_ddp_module().all_reduce_gradients(model.parameters())
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_gradients_gives_every_rank_the_mean(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    per_rank = [rank_grads(r)[1] for r in range(WORLD)]
    assert per_rank[1]["rank0_only"] is None  # the case the zeros are for
    for name in ("conv.weight", "conv.bias", "rank0_only"):
        local = [g[name] if g[name] is not None else torch.zeros_like(per_rank[0][name]) for g in per_rank]
        expected = (local[0] + local[1]) / 2
        assert not torch.allclose(local[0], local[1])  # ranks really had different data
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=0)
        torch.testing.assert_close(results[0][name], expected)
    # the rank that never used the parameter now has half of rank 0's gradient, not None
    torch.testing.assert_close(results[1]["rank0_only"], per_rank[0]["rank0_only"] / 2)


def test_the_spawned_ranks_run_the_package_function():
    from nnunetv2_recokd.trainers import ddp

    assert Path(ddp.__file__).resolve() == DDP_MODULE


def test_all_reduce_gradients_is_a_no_op_without_a_process_group():
    from nnunetv2_recokd.trainers.ddp import all_reduce_gradients

    assert not torch.distributed.is_initialized()
    model, grads = rank_grads(1)
    all_reduce_gradients(model.parameters())
    assert model.rank0_only.grad is None  # untouched: no zeros invented outside DDP
    torch.testing.assert_close(model.conv.weight.grad, grads["conv.weight"], rtol=0, atol=0)
    all_reduce_gradients([])  # nothing to do, no error
