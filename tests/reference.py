"""Reference values of every probe metric, computed directly with torch.autograd (float64).

Independent of the probe: block inputs/outputs are captured by plain hooks that
keep references, then gradients come from ``torch.autograd.grad``; g_x through
a block only is the vector-Jacobian product ``autograd.grad(y, x, g_y)``.
The model must not use in-place ops (use the in-place-free twin of a net).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gradprobe.jacobian import BlockCapture, dense_jacobian


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    return next(t for t in out if isinstance(t, torch.Tensor))


def reference_rows(model: nn.Module, names: list[str], x: torch.Tensor, loss_fn, shortcuts=None) -> dict:
    """{block name: {metric: value}} for one forward/backward of ``loss_fn(model(x))``."""
    shortcuts = shortcuts or {}
    modules = dict(model.named_modules())
    xs, ys, order, sc_out = {}, {}, [], {}
    handles = []

    def pre(name):
        def hook(mod, args, kwargs):
            if name not in xs:
                xs[name] = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
                order.append(name)

        return hook

    def post(name):
        def hook(mod, args, out):
            ys.setdefault(name, first_tensor(out))

        return hook

    def sc(name):
        def hook(mod, args, out):
            sc_out.setdefault(name, out)

        return hook

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(pre(n), with_kwargs=True))
        handles.append(modules[n].register_forward_hook(post(n)))
        child = shortcuts.get(n)
        if child is not None:
            handles.append(getattr(modules[n], child).register_forward_hook(sc(n)))
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    try:
        loss = loss_fn(model(x))
    finally:
        for h in handles:
            h.remove()
    params = {n: [p for p in modules[n].parameters()] for n in names}
    g_ys = torch.autograd.grad(loss, [ys[n] for n in order], retain_graph=True)
    rows = {}
    for n, g_y in zip(order, g_ys, strict=False):
        xi, yi = xs[n], ys[n]
        if not xi.requires_grad:  # the reference gets the gradient of a non-differentiable input
            raise ValueError(f"block {n}: input does not require grad; give the reference a float input")
        (g_x,) = torch.autograd.grad(yi, xi, g_y, retain_graph=True)
        pg = torch.autograd.grad(loss, params[n], retain_graph=True, allow_unused=True)
        r = {
            "grad_out": g_y.norm().item(),
            "grad_in": g_x.norm().item(),
            "in_rms": (xi.pow(2).mean().sqrt()).item(),
            "out_rms": (yi.pow(2).mean().sqrt()).item(),
            "param_norm": torch.sqrt(sum(p.pow(2).sum() for p in params[n])).item(),
            "param_grad_norm": torch.sqrt(sum(g.pow(2).sum() for g in pg if g is not None)).item(),
        }
        r["gain"] = r["grad_in"] / r["grad_out"]
        ref = xi if xi.shape == yi.shape else sc_out.get(n)
        if ref is not None:
            r["res_ratio"] = ((yi - ref).norm() / ref.norm()).item()
            r["cos_xy"] = torch.nn.functional.cosine_similarity(ref.flatten(), yi.flatten(), dim=0).item()
        else:
            r["res_ratio"] = r["cos_xy"] = math.nan
        if xi.shape == yi.shape:
            b = g_x - g_y
            r["skip_grad"] = g_y.norm().item()
            r["branch_grad"] = b.norm().item()
            r["branch_cos"] = torch.nn.functional.cosine_similarity(b.flatten(), g_y.flatten(), dim=0).item()
        else:
            r["skip_grad"] = r["branch_grad"] = r["branch_cos"] = math.nan
        rows[n] = r
    last = order[-1]
    for n in order:
        rows[n]["cum_gain"] = rows[n]["grad_in"] / rows[last]["grad_out"]
        rows[n]["index"] = order.index(n)
    return rows


def _first_float(values) -> torch.Tensor | None:
    for v in values:
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            return v
    return None


def block_gradients(model: nn.Module, block: str, run) -> dict:
    """``grad_out`` and ``grad_in`` of one block for the loss ``run()`` returns, from plain hooks and
    ``torch.autograd.grad``, pooled over the block's calls (norm of all calls' gradients together).

    The input is the first floating-point positional argument, else the ``hidden_states`` keyword;
    the output the first floating-point tensor of the output. grad_in is the gradient through this
    block only: the vector-Jacobian product ``autograd.grad(y, x, g_y)``.
    """
    module = dict(model.named_modules())[block]
    xs, ys = [], []

    def pre(mod, args, kwargs):
        x = _first_float(args)
        xs.append(x if x is not None else kwargs["hidden_states"])

    def post(mod, args, out):
        y = (
            out
            if isinstance(out, torch.Tensor)
            else _first_float(out.values() if isinstance(out, dict) else out)
        )
        assert y is not None, f"no tensor in the output of {block}"
        ys.append(y)

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        loss = run()
    finally:
        for h in handles:
            h.remove()
    g_ys = torch.autograd.grad(loss, ys, retain_graph=True)
    g_xs = [torch.autograd.grad(y, x, g, retain_graph=True)[0] for x, y, g in zip(xs, ys, g_ys, strict=True)]
    return {
        "grad_out": math.sqrt(sum(g.abs().pow(2).sum().item() for g in g_ys)),
        "grad_in": math.sqrt(sum(g.abs().pow(2).sum().item() for g in g_xs)),
        "calls": len(xs),
    }


def exact_columns(captures: Sequence[BlockCapture]) -> dict[str, dict[str, float]]:
    """Exact values of the Jacobian columns from dense Jacobians (float64 SVD): the oracle of the
    Jacobian tests and of ``benchmarks/jacobian_accuracy.py``. One VJP per output element per block:
    small nets only."""
    caps = list(captures)
    out: dict[str, dict[str, float]] = {}
    if not caps:
        return out
    last_of = {c.stack: c for c in caps}  # products end at the last capture of each stack
    for c in caps:
        last = last_of[c.stack]
        j = dense_jacobian(c.output, c.input, y_like=c.y, x_like=c.x).double()
        jp = dense_jacobian(last.output, c.input, y_like=last.y, x_like=c.x).double()
        n, n_last = j.shape[0], jp.shape[0]
        eye = torch.eye(n, dtype=torch.float64) if c.same_shape else None
        out[c.name] = {
            "jac_fro": float(torch.linalg.matrix_norm(j)) / math.sqrt(n),
            "jac_spec": float(torch.linalg.svdvals(j)[0]),
            "jac_id": math.nan if eye is None else float(torch.linalg.matrix_norm(j - eye)) / math.sqrt(n),
            "prod_fro": float(torch.linalg.matrix_norm(jp)) / math.sqrt(n_last),
            "prod_spec": float(torch.linalg.svdvals(jp)[0]),
        }
    return out
