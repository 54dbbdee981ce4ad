"""gradprobe.batching: the signal moments of small block outputs, held until the backward pass
ends and reduced together: the same bits as one at a time, nothing held after a step, and NaN
(with a warning) rather than a wrong number when a held output is changed in place."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
from nets import make, make_input
from test_signal import numpy_signal
from torch import nn

import gradprobe
from gradprobe import batching
from gradprobe.rows import CallStats

SIGNAL = ["chan_mean_sq", "chan_var", "branch_var"]


def train(model, x, steps=3, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradprobe.attach(model, **options) as probe:
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    return probe


@pytest.mark.filterwarnings("ignore:gradprobe. block.s. .'layer2.0'.")  # plain_cnn's projection
@pytest.mark.parametrize("name", ["res_mlp", "res_cnn", "plain_cnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_held_and_batched_moments_equal_the_ones_taken_when_each_block_returns(monkeypatch, name, dtype):
    # The whole frame with every call held (the default for these small nets), with none held, and
    # with a budget so small that every call is reduced at once: batched sums accumulate in float64,
    # the ones taken at once in the tensors' dtype, so they agree to float32 precision, not in bits.
    frames = {}
    for mode, defer, budget in (("held", None, None), ("now", 0, None), ("early", None, 1)):
        monkeypatch.setattr(batching, "DEFER_BYTES", batching.DEFER_BYTES if defer is None else defer)
        monkeypatch.setattr(batching, "BUDGET_BYTES", batching.BUDGET_BYTES if budget is None else budget)
        torch.manual_seed(0)
        model, x = make(name, dtype=dtype), make_input(name, dtype=dtype)
        frames[mode] = train(model, x).frame()
    assert frames["held"][SIGNAL].notna().any().all()
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    pd.testing.assert_frame_equal(frames["held"], frames["now"], check_exact=False, rtol=rtol, atol=0)
    pd.testing.assert_frame_equal(frames["held"], frames["early"], check_exact=False, rtol=rtol, atol=0)


@pytest.mark.filterwarnings("ignore:gradprobe. non-finite")  # the step without a backward pass
def test_nothing_is_held_after_a_backward_pass_or_a_step_without_one():
    model, x = make("res_mlp"), make_input("res_mlp")
    probe = gradprobe.attach(model)
    try:
        out = model(x)
        assert len(probe._taps._signal) > 0  # held during the step
        out.pow(2).mean().backward()
        assert len(probe._taps._signal) == 0
        model(x)  # a forward pass with no backward, then the step closes
        probe.step()
        assert len(probe._taps._signal) == 0
        model(x)
    finally:
        probe.detach()
    assert len(probe._taps._signal) == 0  # detach drops what a step left held
    frame = probe.frame()
    assert frame[frame.step == 1][SIGNAL[:2]].notna().all().all()  # the forward-only step has them


class Wrapped(nn.Module):
    """A residual block ``x + F(x)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class InPlaceAfter(nn.Module):
    """Residual blocks whose outputs the model scales in place after each block returns, from
    step ``start`` on (counted in forward calls)."""

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Wrapped(nn.Sequential(nn.Linear(8, 8), nn.Tanh())) for _ in range(3))
        self.start, self.calls = start, 0

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            if self.calls >= self.start:
                x.mul_(2.0)  # after the block returned: an output the probe may hold changes
        self.calls += 1
        return x


def train_watching(model, x, steps):
    """Train with the probe; each block's (input, output) as it returned them, and the warnings."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = [
        b.register_forward_hook(
            lambda m, a, o, i=i: seen.setdefault(i, []).append((a[0].detach().clone(), o.detach().clone()))
        )
        for i, b in enumerate(model.blocks)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = train(model, x, steps=steps)
    for h in hooks:
        h.remove()
    return probe.frame(), seen, [str(w.message) for w in caught if "changed in place" in str(w.message)]


def assert_moments_of_the_returned_outputs(frame, seen, step):
    rows = frame[frame.step == step]
    assert len(rows) == 3
    for i, row in enumerate(rows.itertuples()):
        x_in, y = seen[i][step]  # the output as the block returned it, not as scaled afterwards
        expected = numpy_signal(y.double().numpy(), x_in.double().numpy(), 1)
        for column in SIGNAL:
            assert getattr(row, column) == pytest.approx(expected[column], rel=1e-5), (step, i, column)


def test_block_outputs_changed_in_place_by_the_model_are_reduced_when_the_block_returns():
    # The first recorded step watches the outputs: they change, so they are never held.
    frame, seen, messages = train_watching(InPlaceAfter(), torch.randn(16, 8), steps=3)
    assert messages == []
    for step in range(3):
        assert_moments_of_the_returned_outputs(frame, seen, step)


def test_a_held_output_changed_in_place_is_nan_with_one_warning_then_reduced_when_the_block_returns():
    # Left alone in step 0 (so held in step 1), changed in place from step 1 on.
    frame, seen, messages = train_watching(InPlaceAfter(start=1), torch.randn(16, 8), steps=3)
    assert len(messages) == 3 and all("are NaN in this step" in m for m in messages)  # once per block
    assert_moments_of_the_returned_outputs(frame, seen, 0)
    second = frame[frame.step == 1]
    assert second[SIGNAL].isna().all().all()
    # the forward statistics were held with the output: NaN too; the gradient columns are recorded
    assert second[["res_ratio", "in_rms", "out_rms"]].isna().all().all()
    assert second[["grad_out", "gain", "grad_in", "branch_grad"]].notna().all().all()
    assert_moments_of_the_returned_outputs(frame, seen, 2)


def test_large_outputs_are_reduced_when_the_block_returns(monkeypatch):
    monkeypatch.setattr(batching, "DEFER_BYTES", 64)  # every output of this net is larger
    model, x = make("res_cnn"), make_input("res_cnn")
    probe = gradprobe.attach(model)
    try:
        model(x)
        assert len(probe._taps._signal) == 0
    finally:
        probe.detach()


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Wrapped(nn.Sequential(nn.Linear(8, 8), nn.Tanh())) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unrecorded_steps_are_counted_by_one_hook_per_model_call_and_blocks_called_alone_still_count():
    model, x = Chain(), torch.randn(5, 8)
    with gradprobe.attach(model, every=3) as probe:
        for _ in range(7):
            model(x).pow(2).mean().backward()
        assert probe.current_step == 6
        for _ in range(2):  # a block called outside the model's forward: its own hook
            model.blocks[1](torch.randn(5, 8, requires_grad=True)).sum().backward()
        assert probe.current_step == 8
        model.blocks[1](torch.randn(5, 8, requires_grad=True)).sum().backward()  # step 9: recorded
    assert sorted(probe.frame().step.unique()) == [0, 3, 6, 9]


@pytest.mark.filterwarnings("ignore:gradprobe. non-finite")  # blocks 1 and 2 get no gradient
def test_a_loss_on_the_model_output_alone_is_noticed_when_the_last_block_is_not_in_it():
    # The model returns (head output, last block output); the loss uses the head, which reads an
    # earlier block only: the model's output hook notices the backward pass.
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            early = self.blocks[0](x)
            h = early
            for block in self.blocks[1:]:
                h = block(h.detach())
            return self.head(early), h

    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(5, 4)
    with gradprobe.attach(model, blocks=["blocks.0", "blocks.1", "blocks.2"], every=2) as probe:
        for _ in range(4):
            model(x)[0].sum().backward()
        assert probe.current_step == 3  # the fourth step, done (it closes at the next forward)
    assert not math.isnan(probe.frame().grad_out.iloc[0])


def probe_hooks_on(module: nn.Module) -> int:
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


@pytest.mark.parametrize("explicit", [False, True])
def test_unrecorded_steps_run_without_block_hooks_and_record_the_same_rows(no_leaks, explicit):
    # every=3: steps 1, 2, 4, 5 run with the block hooks off; the recorded steps are the rows
    # of a probe on every step (the probe is observational: training is the same).
    def run(every):
        model = no_leaks(Chain())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        hooked = []
        with gradprobe.attach(model, every=every) as probe:
            for _ in range(7):
                opt.zero_grad()
                model(torch.ones(5, 8)).pow(2).mean().backward()
                hooked.append(probe_hooks_on(model.blocks[1]))
                opt.step()
                if explicit:
                    probe.step()
        return probe.frame(), hooked

    sparse, hooked = run(3)
    dense, _ = run(1)
    # during each step's backward pass: the probe's pre- and post-hook on recorded steps, and on the
    # first recorded step also the one-off check of blocks="auto" (does the block add its input?)
    assert hooked == [3, 0, 0, 2, 0, 0, 2]
    assert sorted(sparse.step.unique()) == [0, 3, 6]
    same = dense[dense.step.isin([0, 3, 6])].reset_index(drop=True).drop(columns="update_ratio")
    pd.testing.assert_frame_equal(sparse.drop(columns="update_ratio"), same, check_exact=True)


def test_block_hooks_stay_on_when_a_recorded_step_called_a_block_outside_the_model():
    model, x = Chain(), torch.randn(5, 8)
    with gradprobe.attach(model, every=2) as probe:
        model(x).sum().backward()
        model.blocks[0](x).sum().backward()  # same step (0): outside the model's forward
        for _ in range(2):  # steps 1 and 2 (the recorded step 2 decides again for steps 3 on)
            model(x).sum().backward()
            assert probe_hooks_on(model.blocks[1]) == 2
    assert sorted(probe.frame().step.unique()) == [0, 2]


@pytest.mark.filterwarnings("ignore:gradprobe. non-finite")  # blocks 2 and 3 get no gradient
def test_block_hooks_stay_on_when_the_loss_does_not_come_from_the_model_output():
    # The loss reads block 1's output through a user hook; the model's output is not in it, so
    # only block hooks notice the backward pass: they stay on, and every step is counted.
    model, x = Chain(), torch.randn(5, 8)
    feats: list[torch.Tensor] = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, o: feats.append(o))
    with gradprobe.attach(model, every=2) as probe:
        for i in range(5):
            model(x)
            feats.pop().pow(2).sum().backward()
            # ours and the user's; on the first step also the one-off residual check of blocks="auto"
            assert probe_hooks_on(model.blocks[1]) == (4 if i == 0 else 3)
        assert probe.current_step == 4  # every backward pass counted
    handle.remove()
    assert sorted(probe.frame().step.unique()) == [0, 2, 4]


def test_past_the_budget_outputs_are_reduced_at_once_and_nothing_more_is_held():
    y = torch.ones(2, 4)  # 32 bytes
    queue = batching.SignalQueue(budget=80)
    queue.add(CallStats("h"), y.clone(), None, 1)
    assert queue.flush() == []  # block h left its output alone: held from now on
    calls = [CallStats("h") for _ in range(4)]
    for call in calls:
        queue.add(call, y.clone(), None, 1)
    assert [call.sig is None for call in calls] == [True, True, False, False]  # 2 x 32 <= 80
    assert len(queue) == 2
    assert queue.flush() == [] and all(call.sig is not None for call in calls)
