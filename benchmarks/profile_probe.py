"""Where the probe's fixed cost per block goes, in counts that do not depend on the machine's load.

On the 20-block residual MLP of ``overhead.py`` (width 64, batch 32), or on
ResNet-56 (``--model resnet56``, batch 16 unless ``--batch``), it prints, per
probed block and recorded step, what a probed step does beyond a bare one:

* **aten operator calls**: every ``aten::`` event ``torch.profiler`` records on the
  CPU, nested ones included (``aten::linear`` and the ``aten::t`` and
  ``aten::addmm`` it calls count three times) and views included (``aten::view``,
  ``aten::as_strided``, ``aten::detach``, ...); on a GPU each non-view operator
  launches at least one kernel;
* **Python function calls** (``cProfile``: every function and builtin called);
* **host reads** per recorded step (not per block): the calls of
  ``Tensor.item``, ``.tolist``, ``.numpy``, ``.cpu``, ``.to`` with the host as
  target, ``__bool__``, ``__float__``, ``__int__`` and ``__index__`` (each counted
  once, not again for the calls it makes, nor for reads of what a counted ``.cpu()``
  returned), patched on ``torch.Tensor`` during the counted steps only. On a GPU
  each of them on a device tensor waits for the device: a synchronisation point.
  The count is that of a probed step minus that of a bare one, so calls of the
  training loop itself cancel. On the CPU the probe may take host-only branches
  (reading a CPU scalar costs no synchronisation) that it does not take on a GPU:
  this count is of the run on the CPU; ``gpu_counts.py`` counts the
  synchronisations on a GPU. Beside it the
  ``aten::_local_scalar_dense`` events (the operator under item, bool, float and
  int) of the profiled steps, the same difference;
* the extra CPU time of the step (10th percentile of thread time, which a loaded
  machine still inflates), and with ``--top N`` the functions and operators that
  account for the difference.

Beside the aten count it prints the **launching operators**: the aten operators
called from Python (not from inside another aten operator: a ``_foreach_norm``
counts once, as the one fused kernel it is on a GPU, not as the per-tensor loop
it runs on the CPU), without views, allocations and host reads, which launch no
kernel. That is the count closest to a GPU's kernel launches that a CPU can give.

With ``--as-accelerator`` the probe takes the path it takes on an accelerator
while it runs on the CPU (``gradprobe.metrics.reads_host`` answers False: no
float32 reduction checked on the host, batches up to 1 MiB widened to float64,
parameters by fused ``_foreach_norm``): its operators and host reads are those of
a GPU run, its time is not.

With ``--floor`` it counts the floor of ``floor.py`` the same way (one norm per
x, y, g_y, g_x of each block, one ``.tolist()`` a step): the least a probe that
reads those tensors can do.

    python benchmarks/profile_probe.py
    python benchmarks/profile_probe.py --top 25 --config every10
    python benchmarks/profile_probe.py --model resnet56 --batch 8 --steps 10
    python benchmarks/profile_probe.py --floor
    python benchmarks/profile_probe.py --as-accelerator
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import CONFIGS, Tool, build  # a script beside this one, not a package

import gradprobe

#: Tensor methods that read a tensor's values to the host (a device-to-host sync on a GPU).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _to_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` targets the host."""
    for value in (*args, kwargs.get("device")):
        if isinstance(value, str) and value.split(":")[0] == "cpu":
            return True
        if isinstance(value, torch.device) and value.type == "cpu":
            return True
    return False


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter[str]]:
    """Count the calls of :data:`HOST_READS` (and ``.to`` the host) while the block runs.

    Calls made inside a counted call (``__format__`` calling ``item``, say) are not counted
    again, nor reads of a tensor that a counted ``.cpu()`` or ``.to(host)`` returned (on a GPU
    that is a host copy: the copy was the synchronisation; on the CPU ``.cpu()`` returns the
    tensor itself, which is then taken for the copy). ``torch.Tensor`` gets its own attributes
    for the time of the block; they are removed after it, so the methods of
    ``torch._C.TensorBase`` show through again.
    """
    counts: Counter[str] = Counter()
    depth = 0
    # what .cpu() / .to(host) returned, by id (a WeakSet would compare tensors with ==)
    copies: dict[int, weakref.ref[torch.Tensor]] = {}

    def is_copy(t: torch.Tensor) -> bool:
        ref = copies.get(id(t))
        return ref is not None and ref() is t

    patched: list[str] = []

    def wrap(name: str, fn: Callable[..., Any], when: Callable[..., bool] | None) -> Callable[..., Any]:
        def counting(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            host = when is not None and when(args, kwargs)
            counted = depth == 0 and not is_copy(self) and (when is None or host)
            if counted:
                counts[name] += 1
            depth += 1
            try:
                out = fn(self, *args, **kwargs)
            finally:
                depth -= 1
            if counted and (name == "cpu" or host) and isinstance(out, torch.Tensor):
                copies[id(out)] = weakref.ref(out)  # on a GPU a host copy: reading it waits for nothing
            return out

        return counting

    names: list[tuple[str, Callable[..., bool] | None]] = [(n, None) for n in HOST_READS]
    names.append(("to", _to_host))
    try:
        for name, when in names:
            assert name not in torch.Tensor.__dict__, name  # only TensorBase's: nothing to restore
            setattr(
                torch.Tensor,
                name,
                wrap(name if name != "to" else "to(host)", getattr(torch.Tensor, name), when),
            )
            patched.append(name)
        yield counts
    finally:
        for name in patched:
            delattr(torch.Tensor, name)


#: aten operators that launch no kernel: views and metadata, allocations, host reads.
NO_KERNEL = frozenset(
    "aten::" + name
    for name in [
        *("view", "as_strided", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "select", "slice"),
        *("narrow", "detach", "detach_", "alias", "expand", "t", "transpose", "permute", "view_as"),
        *("unbind", "split", "chunk", "resolve_conj", "resolve_neg", "lift_fresh", "empty"),
        *("empty_strided", "empty_like", "item", "_local_scalar_dense", "is_nonzero", "result_type"),
        *("promote_types", "to"),
    ]
)


def launching(prof: Any) -> int:
    """The aten operators of a profile that Python called (not nested in another aten operator) and
    that launch a kernel (not in :data:`NO_KERNEL`)."""
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in NO_KERNEL:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def report(label: str, probed: dict[str, Any], bare: dict[str, Any], steps: int) -> int:
    """Print the counts of ``probed`` over ``bare``; return the recorded block-steps they are per."""
    recorded = probed["recorded"]
    if len(set(recorded)) != 1 or not recorded[0]:
        raise SystemExit(f"the counted windows recorded {recorded} steps: use more --steps")
    rec = recorded[0]
    per = rec * probed["blocks"]

    def aten(ops: Counter[str]) -> int:
        return sum(v for k, v in ops.items() if k.startswith("aten::"))

    extra_aten = aten(probed["ops"]) - aten(bare["ops"])
    py = sum(probed["calls"].values()) - sum(bare["calls"].values())
    reads = sum(probed["reads"].values()) - sum(bare["reads"].values())
    scalar = probed["ops"]["aten::_local_scalar_dense"] - bare["ops"]["aten::_local_scalar_dense"]
    print(f"{label}: windows of {steps} steps, {rec} of them recorded, {probed['blocks']} blocks")
    print(
        f"  per block and recorded step: {extra_aten / per:.1f} aten operator calls (all aten events of "
        f"torch.profiler, nested ones and views included), {py / per:.1f} Python calls (cProfile) more "
        "than bare"
    )
    print(
        f"  launching operators per block and recorded step: "
        f"{(probed['launching'] - bare['launching']) / per:.1f} (called from Python, no views, "
        "allocations or host reads; a _foreach_* once)"
    )
    kinds = ", ".join(
        f"{k} {(probed['reads'][k] - bare['reads'][k]) / rec:g}"
        for k in sorted(set(probed["reads"]) | set(bare["reads"]))
        if probed["reads"][k] != bare["reads"][k]
    )
    print(
        f"  host reads per recorded step: {reads / rec:g} (calls of Tensor.{', .'.join(HOST_READS)} and "
        f".to(host), minus bare{': ' + kinds if kinds else ''}); "
        f"aten::_local_scalar_dense {scalar / rec:g} per recorded step"
    )
    print(
        f"  extra CPU time: {1e6 * (probed['time'] - bare['time']) * steps / per:.0f} µs per block and "
        f"recorded step (bare step {1e6 * bare['time']:.0f} µs; a loaded machine inflates this)"
    )
    return per


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["mlp", "resnet56"], default="mlp")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: mlp 32, resnet56 16)")
    parser.add_argument("--config", choices=list(CONFIGS), default="default")
    parser.add_argument("--steps", type=int, default=20, help="steps of each counted window")
    parser.add_argument("--top", type=int, default=0, help="show the N largest differences")
    parser.add_argument(
        "--floor", action="store_true", help="also count floor.py's floor (every step, the same way)"
    )
    parser.add_argument(
        "--as-accelerator",
        action="store_true",
        help="run the probe's accelerator path on the CPU (its counts, not its time)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(1)
    batch = args.batch or (16 if args.model == "resnet56" else None)
    work = build(args.model, batch, torch.device("cpu"))
    model = work.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    timed_steps = 10 * args.steps if args.model == "mlp" else args.steps

    tool = Tool()  # plain loss.backward(); floor.py's FloorTool reads its values after it

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        info: dict[str, Any] = {}
        tool.backward(tool.loss(work, work.batches[i % len(work.batches)], info), i, info)
        opt.step()

    def measure(kind: str) -> dict[str, Any]:
        nonlocal tool
        probe = gradprobe.attach(model, **CONFIGS[args.config]) if kind == "probe" else None
        tool = Tool()
        if kind == "floor":
            from floor import FloorTool  # a script beside this one

            tool = FloorTool()
            tool.attach(model)
        recorded: list[int] = []  # recorded steps of each counted window

        def window(n: int) -> Iterator[int]:
            # The recorded steps among those the window closes: a step closes when the next one
            # begins, so the window closes the step pending before it and its own but the last.
            # Read from the probe's schedule: frame() would close a step itself, and run pandas
            # inside the counted steps.
            start = probe.current_step if probe is not None else 0
            yield from range(n)
            if probe is not None:
                recorded.append(sum(bool(probe._schedule(s)) for s in range(start, start + n)))
            elif kind == "floor":
                recorded.append(n)  # the floor reads every step

        try:
            for i in range(3):
                step(i)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for i in window(args.steps):
                    step(i)
            ops: Counter[str] = Counter({e.key: e.count for e in prof.key_averages()})
            launches = launching(prof)
            with count_host_reads() as reads:
                for i in window(args.steps):
                    step(i)
            profiler = cProfile.Profile()
            profiler.enable()
            for i in window(args.steps):
                step(i)
            profiler.disable()
            stats: Any = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            calls: Counter[str] = Counter(
                {f"{Path(k[0]).name}:{k[1]}({k[2]})": v[1] for k, v in stats.items()}
            )
            times = []
            for i in range(timed_steps):
                start = time.thread_time()
                step(i)
                times.append(time.thread_time() - start)
            blocks = len(probe.blocks) if probe is not None else tool.blocks
            return {
                "ops": ops,
                "launching": launches,
                "reads": Counter(reads),
                "calls": calls,
                "time": statistics.quantiles(times, n=10)[0] if len(times) > 1 else times[0],
                "recorded": recorded,
                "blocks": blocks,
            }
        finally:
            if probe is not None:
                probe.detach()
            tool.detach(model, args.steps)

    bare = measure("bare")
    if args.as_accelerator:
        reads_host = gradprobe.metrics.reads_host
        gradprobe.metrics.reads_host = lambda t: False  # type: ignore[assignment]
    try:
        probed = measure("probe")
    finally:
        if args.as_accelerator:
            gradprobe.metrics.reads_host = reads_host  # type: ignore[assignment]
    floor = measure("floor") if args.floor else None
    blocks = probed["blocks"]
    what = "20-block MLP, width 64" if args.model == "mlp" else f"ResNet-56 ({blocks} blocks), 32x32 inputs"
    path = ", the accelerator path (--as-accelerator)" if args.as_accelerator else ""
    print(f"{what}, batch {work.batch}, config {args.config}, torch {torch.__version__}, 1 thread{path}")
    per = report("gradprobe", probed, bare, args.steps)
    if floor is not None:
        report("floor (floor.py)", floor, bare, args.steps)
    if args.top:
        for title, key in (("aten operators", "ops"), ("Python functions", "calls")):
            new, old = probed[key], bare[key]
            diff = {k: (new[k] - old.get(k, 0)) / per for k in new if new[k] != old.get(k, 0)}
            print(f"\n{title}, extra calls per block and recorded step:")
            for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {v:7.2f}  {k}")


if __name__ == "__main__":
    main()
