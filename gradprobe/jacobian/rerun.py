"""The side-effect-free second forward pass: the training call on a slice of its batch.

The probe takes its Jacobian columns (and ``attach(paths=N)`` its decomposition) on the
first k samples of the batch, re-run with BatchNorm buffers swapped for clones
(``torch.func.functional_call``), the global RNG forked and seeded, and DataParallel or
``torch.compile`` wrappers unwrapped, so the training run sees nothing of it. A call that
cannot be re-run safely (an argument that is not a tensor, a plain value or a container
of those) gets ``None``: the caller then uses the training graph itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..capture import BlockCapture, Rule, run_capturing

Tensor = torch.Tensor


@contextmanager
def _seeded_rng(cuda: Sequence[int], seed: int) -> Iterator[None]:
    """Seed the global CPU RNG and these CUDA devices' RNGs inside; restore every one of them after."""
    with torch.random.fork_rng(devices=list(cuda)):
        # Not torch.manual_seed: it would also reseed CUDA devices that fork_rng does not restore.
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


@contextmanager
def differentiable_twice() -> Iterator[None]:
    """Scaled-dot-product attention through its plain math kernel inside this block.

    The fused kernels (flash, memory-efficient, and the CPU flash kernel) have no double
    backward, which the Jacobian-vector products of the spectral columns need; the math
    kernel is made of ordinary differentiable ops. Use it around forward passes that this
    module runs itself (never around the user's training forward).

    >>> with differentiable_twice():
    ...     q = torch.randn(1, 1, 3, 4, requires_grad=True)
    ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    >>> (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    >>> torch.autograd.grad(g.pow(2).sum(), q)[0].shape
    torch.Size([1, 1, 3, 4])
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _cuda_devices(tensors: Iterator[Tensor] | Sequence[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


# ---------------------------------------------------------------------- sub-batch pass
# Values that a forward call's arguments may hold besides tensors and plain containers of
# them. Anything else (a key/value cache object, a user's stateful helper) may be mutated by
# the forward pass, so a call that carries one is never re-run.
_PLAIN_VALUES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


class _Unsliceable(Exception):
    pass


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any], dim: int = 0) -> int | None:
    """The size of axis ``dim`` (the batch axis) of the first tensor argument that has it
    (positional first), or None.

    >>> batch_size((None, torch.zeros(8, 3)), {"mask": torch.ones(8)})
    8
    >>> batch_size((torch.zeros(40, 8, 3),), {}, dim=1)  # sequence first: (T, N, C)
    8
    """
    return _leading_size((args, kwargs), dim)


def _leading_size(obj: Any, dim: int = 0) -> int | None:
    """The size of axis ``dim`` of the first tensor with one, searching args/kwargs depth-first."""
    if isinstance(obj, Tensor):
        return int(obj.shape[dim]) if obj.dim() > dim else None
    if isinstance(obj, (tuple, list)):
        items: Any = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for item in items:
        size = _leading_size(item, dim)
        if size is not None:
            return size
    return None


def _slice_batch(obj: Any, batch: int, k: int, dim: int = 0) -> Any:
    """``obj`` with every tensor whose axis ``dim`` is ``batch`` long cut to its first ``k`` rows
    along it.

    Sliced tensors are detached copies, so that a forward pass that modifies its input in place
    cannot reach the caller's tensor. Raises ``_Unsliceable`` on a value that is neither a
    tensor, a plain value nor a tuple/list/dict of them.
    """
    if isinstance(obj, Tensor):
        if obj.dim() > dim and obj.shape[dim] == batch:
            return obj.narrow(dim, 0, k).detach().clone()
        return obj
    if isinstance(obj, _PLAIN_VALUES):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_slice_batch(o, batch, k, dim) for o in obj))
    if type(obj) in (tuple, list):
        return type(obj)(_slice_batch(o, batch, k, dim) for o in obj)
    if type(obj) is dict:
        return {key: _slice_batch(v, batch, k, dim) for key, v in obj.items()}
    raise _Unsliceable(f"an argument of type {type(obj).__name__}")


def model_batch_dim(model: nn.Module) -> int | None:
    """The batch axis of a model's tensors as its submodules declare it: 1 where every submodule
    with a boolean ``batch_first`` attribute (``nn.RNN``, ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``, ...) has it False, 0 where all have it True or none has
    one, None where they disagree (the caller must be told).

    >>> model_batch_dim(torch.nn.LSTM(4, 4)), model_batch_dim(torch.nn.LSTM(4, 4, batch_first=True))
    (1, 0)
    """
    flags = {m.batch_first for m in model.modules() if isinstance(getattr(m, "batch_first", None), bool)}
    if len(flags) > 1:
        return None
    return 1 if flags == {False} else 0


def sub_batch_forward(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], k: int, dim: int = 0
) -> tuple[Callable[[], Any], list[int]] | None:
    """The training call ``model(*args, **kwargs)`` on its first ``k`` samples, as a thunk that
    leaves the model untouched (``functional_call`` with cloned buffers: BatchNorm running
    statistics stay as they are), and the CUDA devices whose RNG its dropout draws from.
    None when an argument is neither a tensor, a plain value nor a tuple/list/dict of those.
    Shared by the Jacobian sub-batch (:func:`sub_batch_captures`) and ``attach(paths=N)``.
    ``dim``: the batch axis (1 for sequence-first models).

    >>> net = torch.nn.Linear(3, 2)
    >>> forward, cuda = sub_batch_forward(net, (torch.randn(8, 3),), {}, 2)
    >>> tuple(forward().shape), cuda
    ((2, 2), [])
    """
    from torch.func import functional_call

    batch = batch_size(args, kwargs, dim)
    if batch is None:
        return None
    try:
        s_args, s_kwargs = _slice_batch(args, batch, k, dim), _slice_batch(kwargs, batch, k, dim)
    except _Unsliceable:
        return None
    # Never re-enter a (Distributed)DataParallel wrapper: its forward drives the gradient
    # reducer and collectives. Nor torch.compile's wrapper: a compiled graph's backward frees
    # ("donates") its buffers, so it cannot be differentiated with retain_graph. The wrapped
    # module computes the same function, eagerly.
    target = model
    while True:
        inner = getattr(target, "_orig_mod", None)  # torch.compile(module)
        if isinstance(target, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = target.module
        if not isinstance(inner, nn.Module):
            break
        target = inner
    buffers = {name: b.detach().clone() for name, b in target.named_buffers()}
    cuda = _cuda_devices([*target.parameters(), *target.buffers()])

    def forward() -> Any:
        return functional_call(target, buffers, s_args, s_kwargs, tie_weights=True, strict=False)

    return forward, cuda


def sub_batch_captures(
    model: nn.Module,
    named: Sequence[tuple[str, nn.Module]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    k: int,
    seed: int,
    twice: bool = False,
    rules: Mapping[str, Rule] | None = None,
    dim: int = 0,
) -> list[BlockCapture] | None:
    """Re-run ``model(*args, **kwargs)`` on the first ``k`` samples and capture the named blocks.

    The sub-batch route of the probe's Jacobian columns: a second forward pass on a slice
    of the batch, so that the Jacobian passes cost about k/batch of the full-batch graph
    route. It changes nothing the training run can see: BatchNorm running statistics are
    updated on clones (``torch.func.functional_call``), dropout draws from the global RNG
    inside ``fork_rng`` seeded with ``seed`` (fresh masks, not the training ones), and
    no ``.grad`` is written. Returns the captures in forward order, or ``None`` when the
    call cannot be re-run safely: no tensor argument, or an argument that is neither a
    tensor, a plain value nor a tuple/list/dict of those (a key/value cache object, say,
    which a second forward pass would extend). The caller then uses the training graph
    itself. The batch size is the leading dimension of the first tensor argument; with
    ``k`` at least that, the whole batch runs again (for a training graph that cannot be
    differentiated twice, such as a compiled one). ``twice``: the graph will be differentiated
    twice (spectral columns), so attention runs through :func:`differentiable_twice`. ``dim``:
    the batch axis (1 for sequence-first models).

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    >>> caps = sub_batch_captures(net, [("0", net[0]), ("2", net[2])], (torch.randn(8, 3),), {}, 2, 0)
    >>> [(c.name, tuple(c.x.shape)) for c in caps]
    [('0', (2, 3)), ('2', (2, 3))]
    """
    rerun = sub_batch_forward(model, args, kwargs, k, dim)
    if rerun is None:
        return None
    forward, cuda = rerun
    kernels = differentiable_twice() if twice else nullcontext()
    with _seeded_rng(cuda, seed), torch.enable_grad(), kernels:
        _, caps = run_capturing(forward, named, rules=rules)
    return caps


@contextmanager
def _untouched(model: nn.Module, inputs: Any, seed: int) -> Iterator[None]:
    """Restore every buffer (BatchNorm running stats, counters) and the global RNG afterwards."""
    saved = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in (inputs if isinstance(inputs, tuple) else (inputs,)) if isinstance(t, Tensor)]
    cuda = _cuda_devices(tensors)
    try:
        # dropout masks (train mode) come from the seed, so the spectrum is reproducible
        with _seeded_rng(cuda, seed):
            yield
    finally:
        with torch.no_grad():
            for m, name, b, copy in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                b.copy_(copy)
