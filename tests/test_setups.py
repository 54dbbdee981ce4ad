"""Real training setups: mixed precision, loss scaling, checkpointing, torch.compile, DDP, long runs."""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
from nets import ResMLPBlock, make, make_input
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe

COLS = ["grad_out", "grad_in", "gain", "cum_gain", "res_ratio", "branch_grad", "param_grad_norm"]


def _frame(net, x, **kwargs):
    with gradprobe.attach(net, **kwargs) as probe:
        (net(x) ** 2).sum().backward()
    return probe.frame()


def test_bfloat16_autocast_on_cpu_records_finite_values_close_to_float32():
    net = make("res_cnn", dtype=torch.float32)
    x = make_input("res_cnn", dtype=torch.float32)
    ref = _frame(copy.deepcopy(net), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = _frame(net, x)
    cols = [c for c in COLS if c != "branch_grad"]  # NaN by definition on the projection block
    assert np.isfinite(f[cols].to_numpy(dtype=float)).all()
    np.testing.assert_allclose(f["gain"], ref["gain"], rtol=0.1)


def test_grad_scaler_norms_are_unscaled():
    net = make("res_mlp", dtype=torch.float32)
    x = make_input("res_mlp", dtype=torch.float32)
    ref = _frame(copy.deepcopy(net), x)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with gradprobe.attach(net, scaler=scaler) as probe:
        scaler.scale((net(x) ** 2).sum()).backward()
    f = probe.frame()
    for col in ["grad_out", "grad_in", "branch_grad", "gain", "cum_gain"]:
        np.testing.assert_allclose(f[col], ref[col], rtol=1e-6)
    # parameter gradients are read as they are in .grad (scaled) unless unscaled: documented
    assert f["param_grad_norm"].iloc[0] == pytest.approx(ref["param_grad_norm"].iloc[0] * 2.0**12, rel=1e-6)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh)")


@CUDA
def test_float16_autocast_with_grad_scaler_on_cuda_records_unscaled_norms_close_to_float32():
    net = make("res_cnn", dtype=torch.float32).cuda()
    x = make_input("res_cnn", dtype=torch.float32).cuda()
    ref = _frame(copy.deepcopy(net), x)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    with gradprobe.attach(net, scaler=scaler) as probe:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = (net(x).float() ** 2).sum()
        scaler.scale(loss).backward()
    f = probe.frame()
    cols = [c for c in COLS if c not in ("branch_grad", "param_grad_norm")]
    assert np.isfinite(f[cols].to_numpy(dtype=float)).all()
    for col in ["grad_out", "grad_in", "gain"]:
        np.testing.assert_allclose(f[col], ref[col], rtol=2e-2)


@CUDA
@pytest.mark.parametrize("with_scaler", [False, True])
def test_a_recorded_step_synchronises_with_the_host_once_on_cuda(with_scaler):
    import warnings

    net = make("res_cnn", dtype=torch.float32).cuda()
    x = make_input("res_cnn", dtype=torch.float32).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if with_scaler else None

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (net(x) ** 2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def syncs(n):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(n):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in record)

    for _ in range(2):
        step()
    bare = syncs(3)
    with gradprobe.attach(net, scaler=scaler):
        for _ in range(2):  # the first recorded steps copy their index tensors to the device
            step()
        probed = syncs(3)  # each forward pass closes the previous step: three closes
    assert probed - bare == 3, f"{probed - bare} host syncs in 3 recorded steps (bare steps: {bare})"


class Checkpointed(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.blocks = nn.ModuleList([ResMLPBlock(6) for _ in range(3)])
        self.mode = mode

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.mode is None else checkpoint(block, x, use_reentrant=self.mode)
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_records_each_block_once_with_the_same_values(reentrant):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = Checkpointed(None).double()
    x = make_input("res_mlp")
    ref = _frame(copy.deepcopy(base), x)
    net = copy.deepcopy(base)
    net.mode = reentrant
    # reentrant checkpointing only builds a graph when an input requires grad
    f = _frame(net, x.clone().requires_grad_(reentrant))
    assert (f["calls"] == 1).all()
    assert f["block"].tolist() == ref["block"].tolist()
    for col in [*COLS, "in_rms", "out_rms", "cos_xy"]:
        np.testing.assert_allclose(f[col], ref[col], rtol=1e-9)


@pytest.mark.parametrize("sub_batch", [2, None])
def test_jacobian_columns_through_non_reentrant_checkpointing_equal_those_without(sub_batch):
    # Regression: the probe's own Jacobian passes recompute checkpointed blocks too; with the
    # probe muted there, the recomputation lacked the input alias of the first run and
    # torch.utils.checkpoint refused it (a different number of saved tensors): all NaN.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = Checkpointed(None).double()
    x = make_input("res_mlp", batch=6)
    jac = {"jacobian": True, "jacobian_options": {"sub_batch": sub_batch, "spec": True, "power_iters": 4}}
    ref = _frame(copy.deepcopy(base), x, **jac)
    net = copy.deepcopy(base)
    net.mode = False
    f = _frame(net, x, **jac)
    cols = ["jac_fro", "jac_id", "prod_fro", "jac_spec", "prod_spec", "jac_batch"]
    assert np.isfinite(f[cols].to_numpy(dtype=float)).all()
    np.testing.assert_allclose(f[cols], ref[cols], rtol=1e-9)


def test_spectrum_through_non_reentrant_checkpointing_equals_the_one_without():
    # Regression: spectrum's capture hooks were gone when the Jacobian passes recomputed the
    # checkpointed blocks, and torch.utils.checkpoint refused the different graph.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = Checkpointed(None).double()
    x = make_input("res_mlp", batch=4)
    net = copy.deepcopy(base)
    net.mode = False
    ref = gradprobe.spectrum(base, x)
    np.testing.assert_allclose(gradprobe.spectrum(net, x), ref, rtol=1e-9)
    np.testing.assert_allclose(gradprobe.spectrum(net, x, k=3), ref[:3], rtol=1e-6)
    later = gradprobe.spectrum(net, x, start="blocks.1", k=2)
    np.testing.assert_allclose(later, gradprobe.spectrum(base, x, start="blocks.1", k=2), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sub_batch", [2, None])
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_torch_compile_records_the_eager_values(order, sub_batch):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = nn.Sequential(*[ResMLPBlock(6) for _ in range(3)])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    ref = _frame(copy.deepcopy(base), x)
    net = copy.deepcopy(base)
    # Jacobian columns: a second pass runs the original module eagerly, on a sub-batch of 2, and
    # on the whole batch too when no sub-batch is asked for, because a compiled graph frees its
    # buffers in backward and cannot be differentiated twice.
    jac = {"jacobian": True, "jacobian_options": {"sub_batch": sub_batch}}
    if order == "attach_then_compile":
        probe = gradprobe.attach(net, **jac)
        compiled = torch.compile(net)
    else:
        compiled = torch.compile(net)
        probe = gradprobe.attach(compiled, **jac)
    try:
        for _ in range(2):
            (compiled(x) ** 2).sum().backward()
            net.zero_grad()
    finally:
        probe.detach()
    f = probe.frame()
    assert f["block"].unique().tolist() == ["0", "1", "2"]  # names of the original modules
    first = f[f["step"] == 0].reset_index(drop=True)
    for col in ["grad_out", "grad_in", "res_ratio", "branch_grad"]:
        np.testing.assert_allclose(first[col], ref[col], rtol=1e-5)
    assert (f["jac_batch"] == (sub_batch or 4)).all() and (f["jac_fro"] > 0).all()
    torch._dynamo.reset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = nn.Sequential(*[ResMLPBlock(6) for _ in range(3)])
        ddp = nn.parallel.DistributedDataParallel(net)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own shard
        # Jacobian columns on a sub-batch re-run the wrapped module, never the DDP wrapper
        # (whose forward would drive the gradient reducer a second time).
        with gradprobe.attach(ddp, jacobian=True, jacobian_options={"sub_batch": 2}) as probe:
            for _ in range(2):
                ddp.zero_grad()
                (ddp(x) ** 2).sum().backward()
        gathered = probe.frame(gather=True)
        local = probe.frame()
        # the local reference: same net, same shard, no DDP
        with torch.random.fork_rng():
            torch.manual_seed(0)
            twin = nn.Sequential(*[ResMLPBlock(6) for _ in range(3)])
        with gradprobe.attach(twin) as ref_probe:
            (twin(x) ** 2).sum().backward()
        ref = ref_probe.frame()
        step0 = local[local["step"] == 0].reset_index(drop=True)
        np.testing.assert_allclose(step0["grad_in"], ref["grad_in"], rtol=1e-6)  # local activation grads
        local.to_csv(f"{out_dir}/local{rank}.csv", index=False)
        if rank == 0:
            gathered.to_csv(f"{out_dir}/gathered.csv", index=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_each_rank_records_its_rows_and_gather_collects_them(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    gathered = pd.read_csv(tmp_path / "gathered.csv")
    assert sorted(gathered["rank"].unique()) == [0, 1]
    assert len(gathered) == 2 * 2 * 3  # ranks x steps x blocks
    assert gathered["block"].str.startswith("module.").all()
    local0, local1 = pd.read_csv(tmp_path / "local0.csv"), pd.read_csv(tmp_path / "local1.csv")
    assert (local0["rank"] == 0).all() and (local1["rank"] == 1).all()
    # activation gradients are local to each shard; parameter gradients are all-reduced (equal)
    assert not np.allclose(local0["grad_out"], local1["grad_out"])
    np.testing.assert_allclose(local0["param_grad_norm"], local1["param_grad_norm"], rtol=1e-6)
    assert (local0["jac_batch"] == 2).all() and (local0["jac_fro"] > 0).all()
