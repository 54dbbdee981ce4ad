"""Distributed training on gloo processes (CPU): FSDP2, tensor parallelism, per-rank sinks, pooled ranks.

Each test spawns its ranks with ``torch.multiprocessing`` on 127.0.0.1 (a free port); the
workers write what they saw to ``tmp_path`` and the test compares it with a single-process
reference of the same model on the same global batch, built here in the test process.
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.pooling import NOT_POOLED
from tests.nets import ResMLPBlock

pytestmark = pytest.mark.slow

WIDTH, BATCH, STEPS, LR = 6, 8, 3, 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, _free_port(), *args), nprocs=world, join=True)


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _net() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(*[ResMLPBlock(WIDTH) for _ in range(3)]).double()


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _train(net: nn.Module, x: torch.Tensor, probe_options: dict | None, after_forward=None):
    """STEPS SGD steps on the mean loss over ``x``; with ``probe_options``: probed (returns the probe)."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)

    def loop() -> None:
        for _ in range(STEPS):
            opt.zero_grad()
            y = net(x)
            if after_forward is not None:
                after_forward()
            (y**2).mean().backward()
            opt.step()

    if probe_options is None:
        loop()
        return None
    with gradprobe.attach(net, **probe_options) as probe:
        loop()
    return probe


def _reference() -> pd.DataFrame:
    """One process, the whole global batch, the mean loss over it."""
    net = _net()
    return _train(net, _batch(), {}).frame()


# ---------------------------------------------------------------------------------------- FSDP2
def _fsdp_worker(rank: int, world: int, port: int, out: str, hsdp: bool = False) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _init(rank, world, port)
    try:
        # HSDP: replicated over the first mesh dimension, sharded over the second
        shape, names = ((2, world // 2), ("replicate", "shard")) if hsdp else ((world,), ("shard",))
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        nets = []
        for _ in range(2):  # probed, and its twin trained without a probe
            net = _net()
            for block in net:
                fully_shard(block, mesh=mesh)  # per-layer wrapping
            fully_shard(net, mesh=mesh)
            for a, b in itertools.pairwise(net):  # explicit prefetching, both ways
                a.set_modules_to_forward_prefetch([b])
                b.set_modules_to_backward_prefetch([a])
            nets.append(net)
        x = _batch().chunk(world)[rank]  # the global batch split over the ranks
        resharded: list[bool] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe = _train(
                nets[0],
                x,
                {"sink": f"{out}/sink"},
                after_forward=lambda: resharded.append(isinstance(nets[0][0].fc1.weight, DTensor)),
            )
            gathered = probe.frame(gather=True)
        _train(nets[1], x, None)
        same = [
            torch.equal(a.full_tensor(), b.full_tensor())
            for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True)
        ]
        result = {
            "probe_warnings": [str(w.message) for w in caught if "gradprobe" in str(w.message)],
            "same": same,
            "resharded": resharded,
            "blocks": probe.blocks,
            "placements": [type(pl).__name__ for pl in nets[0][0].fc1.weight.placements],
            "local": probe.frame(),
        }
        if rank == 0:
            result["gathered"] = gathered
        with open(f"{out}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(_fsdp_worker, 2, str(out))
    results = {}
    for rank in range(2):
        with open(out / f"rank{rank}.pkl", "rb") as fh:
            results[rank] = pickle.load(fh)
    return out, results, _reference()


PARAM_COLUMNS = ["param_norm", "param_grad_norm", "update_ratio"]


def _check_parameter_columns(results: dict, ref: pd.DataFrame) -> None:
    for rank in results:
        local = results[rank]["local"]
        assert not results[rank]["probe_warnings"], results[rank]["probe_warnings"]
        assert (local["rank"] == rank).all()
        np.testing.assert_allclose(local[PARAM_COLUMNS[:2]], ref[PARAM_COLUMNS[:2]], rtol=1e-6)
        # update_ratio from the second recorded step on (the first has nothing to compare with)
        later = local["step"] > 0
        assert local.loc[~later, "update_ratio"].isna().all()
        np.testing.assert_allclose(
            local.loc[later, "update_ratio"], ref.loc[later, "update_ratio"], rtol=1e-6
        )


def test_fsdp2_parameter_columns_equal_the_single_process_reference(fsdp_run):
    _, results, ref = fsdp_run
    _check_parameter_columns(results, ref)


def _check_pooled(gathered: pd.DataFrame, ref: pd.DataFrame, world: int) -> None:
    assert sorted(gathered["rank"].unique()) == list(range(world)) and len(gathered) == world * STEPS * 3
    pooled = gradprobe.pool_ranks(gathered)
    assert "rank" not in pooled and len(pooled) == STEPS * 3
    assert pooled[["step", "block"]].equals(ref[["step", "block"]])
    exact = ["grad_out", "grad_in", "gain", "cum_gain", "skip_grad", "branch_grad", "branch_cos"]
    exact += ["in_rms", "out_rms", *PARAM_COLUMNS]
    np.testing.assert_allclose(pooled[exact], ref[exact], rtol=1e-9)
    assert pooled[list(NOT_POOLED)].isna().all().all()
    # with loss="sum" the pooled gradient norms are those of the sum of the ranks' mean losses
    summed = gradprobe.pool_ranks(gathered, loss="sum")
    np.testing.assert_allclose(summed["grad_out"], world * ref["grad_out"], rtol=1e-9)


def test_fsdp2_keeps_block_names_reshards_and_trains_bit_identically(fsdp_run):
    _, results, _ = fsdp_run
    for rank in range(2):
        r = results[rank]
        assert r["blocks"] == ["0", "1", "2"]  # auto selects the fully_shard-wrapped blocks by their names
        assert r["resharded"] == [True] * STEPS  # parameters are sharded again after each forward
        assert all(r["same"])  # with and without the probe: the same parameters, bit for bit


def test_fsdp2_activation_columns_are_per_rank_and_pool_to_the_single_process_values(fsdp_run):
    _, results, ref = fsdp_run
    gathered = results[0]["gathered"]
    r0, r1 = (gathered[gathered["rank"] == r].reset_index(drop=True) for r in (0, 1))
    assert not np.allclose(r0["grad_out"], r1["grad_out"])  # each rank's own half of the batch
    _check_pooled(gathered, ref, 2)


def test_hsdp_on_four_ranks_counts_replicated_shards_once(tmp_path):
    _spawn(_fsdp_worker, 4, str(tmp_path), True)
    results = {}
    for rank in range(4):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as fh:
            results[rank] = pickle.load(fh)
        assert all(results[rank]["same"]) and results[rank]["blocks"] == ["0", "1", "2"]
        assert results[rank]["placements"] == ["Replicate", "Shard"]
    ref = _reference()
    _check_parameter_columns(results, ref)
    _check_pooled(results[0]["gathered"], ref, 4)


def test_fsdp2_each_rank_streams_to_its_own_sink_and_load_reads_them_as_one_run(fsdp_run):
    out, results, _ = fsdp_run
    assert sorted(p.name for p in (out / "sink").iterdir()) == ["rank-0", "rank-1"]
    run = gradprobe.load(out / "sink")
    frame = run.frame()
    assert sorted(frame["rank"].unique()) == [0, 1] and len(frame) == 2 * STEPS * 3
    assert run.meta["ranks"] == [0, 1]
    gathered = results[0]["gathered"]
    cols = ["rank", "step", "block", "grad_out", "param_norm"]
    pd.testing.assert_frame_equal(
        frame[cols].sort_values(["rank", "step", "block"]).reset_index(drop=True),
        gathered[cols].sort_values(["rank", "step", "block"]).reset_index(drop=True),
        check_dtype=False,
    )


# ------------------------------------------------------------------------------ tensor parallel
def _tp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        net = _net()
        for block in net:
            parallelize_module(block, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        probe = _train(net, _batch(), {})  # every rank the whole batch, the weights split
        with open(f"{out}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(probe.frame(), fh)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_parameter_columns_equal_the_single_process_reference(tmp_path):
    _spawn(_tp_worker, 2, str(tmp_path))
    ref = _reference()
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as fh:
            local = pickle.load(fh)
        np.testing.assert_allclose(local[PARAM_COLUMNS[:2]], ref[PARAM_COLUMNS[:2]], rtol=1e-6)
        later = local["step"] > 0
        np.testing.assert_allclose(
            local.loc[later, "update_ratio"], ref.loc[later, "update_ratio"], rtol=1e-6
        )
        np.testing.assert_allclose(
            local["grad_out"], ref["grad_out"], rtol=1e-9
        )  # the whole batch on each rank


# ------------------------------------------------------------- ranks with different numbers of rows
def _uneven_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    _init(rank, world, port)
    try:
        net = _net()
        x = _batch()
        with gradprobe.attach(net, sink=f"{out}/sink") as probe:
            for _ in range(rank + 1):  # rank r records r + 1 steps
                (net(x) ** 2).mean().backward()
        gathered = probe.frame(gather=True)
        if rank == 0:
            gathered.to_pickle(f"{out}/gathered.pkl")
    finally:
        dist.destroy_process_group()


def test_ranks_recording_different_numbers_of_rows_gather_and_load_without_deadlock(tmp_path):
    _spawn(_uneven_worker, 2, str(tmp_path))
    gathered = pd.read_pickle(tmp_path / "gathered.pkl")
    assert gathered.groupby("rank").size().to_dict() == {0: 3, 1: 6}
    frame = gradprobe.load(tmp_path / "sink").frame()
    assert frame.groupby("rank").size().to_dict() == {0: 3, 1: 6}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fsdp1_is_refused_in_one_line():
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 needs an accelerator to wrap a model: an instance of the real class, not initialised
    # as FSDP (the probe refuses it by its type, before looking at its parameters)
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper._fsdp_wrapped_module = _net()  # where FSDP1 keeps the wrapped model
    with pytest.raises(ValueError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard") as info:
        gradprobe.attach(nn.Sequential(wrapper))
    assert "\n" not in str(info.value)


# -------------------------------------------------------------------------- a GPT-2-like model
def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).double()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))


def _train_gpt2(model, ids, probe_options):
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def loop() -> None:
        for _ in range(STEPS):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()  # the mean over the rank's tokens
            opt.step()

    if probe_options is None:
        loop()
        return None
    with gradprobe.attach(model, **probe_options) as probe:
        loop()
    return probe


def _gpt2_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, port)
    try:
        models = []
        for _ in range(2):
            model = _gpt2()
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
            models.append(model)
        ids = _tokens().chunk(world)[rank]
        probe = _train_gpt2(models[0], ids, {})
        _train_gpt2(models[1], ids, None)
        same = [
            torch.equal(a.full_tensor(), b.full_tensor())
            for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True)
        ]
        gathered = probe.frame(gather=True)
        if rank == 0:
            with open(f"{out}/result.pkl", "wb") as fh:
                pickle.dump({"same": same, "gathered": gathered}, fh)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_gpt2_blocks_keep_their_names_and_match_one_process(tmp_path):
    _gpt2()  # skips without transformers
    _spawn(_gpt2_worker, 2, str(tmp_path))
    with open(tmp_path / "result.pkl", "rb") as fh:
        result = pickle.load(fh)
    assert all(result["same"])
    ref = _train_gpt2(_gpt2(), _tokens(), {}).frame()
    gathered = result["gathered"]
    assert sorted(gathered["block"].unique()) == sorted(ref["block"].unique())
    assert set(ref["block"]) >= {"transformer.h.0", "transformer.h.1"}
    rank0 = gathered[gathered["rank"] == 0].reset_index(drop=True)
    np.testing.assert_allclose(rank0[PARAM_COLUMNS[:2]], ref[PARAM_COLUMNS[:2]], rtol=1e-6)
    later = rank0["step"] > 0
    np.testing.assert_allclose(rank0.loc[later, "update_ratio"], ref.loc[later, "update_ratio"], rtol=1e-6)
    pooled = gradprobe.pool_ranks(gathered)
    np.testing.assert_allclose(pooled[["grad_out", "grad_in"]], ref[["grad_out", "grad_in"]], rtol=1e-9)


# ------------------------------------------------------------------ a mesh smaller than the world
def _submesh_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    _init(rank, world, port)
    try:
        tp = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))["tp"]  # one rank each
        net = _net()
        for block in net:
            parallelize_module(block, tp, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probe = _train(net, _batch(), {})
        frame = probe.frame()
        if rank == 0:
            messages = [str(w.message) for w in caught if "gradprobe" in str(w.message)]
            with open(f"{out}/result.pkl", "wb") as fh:
                pickle.dump({"frame": frame, "messages": messages}, fh)
    finally:
        dist.destroy_process_group()


def test_parameters_on_a_mesh_smaller_than_the_world_are_nan_after_a_warning(tmp_path):
    _spawn(_submesh_worker, 2, str(tmp_path))
    with open(tmp_path / "result.pkl", "rb") as fh:
        result = pickle.load(fh)
    assert result["frame"][PARAM_COLUMNS].isna().all().all()
    assert result["frame"]["grad_out"].notna().all()  # the rest of the row is recorded
    assert any("device mesh of 1 ranks in a world of 2" in m for m in result["messages"]), result["messages"]
