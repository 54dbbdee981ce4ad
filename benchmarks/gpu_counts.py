"""CUDA kernels per block and device-to-host synchronisations per recorded step, on a GPU.

Counts, not timings: they do not depend on how busy the machine is. For one model
of ``overhead.py`` on a CUDA device it runs ``--steps`` training steps bare and as
many with ``gradprobe.attach(model, **config)``, after 3 warm-up steps each, and
prints the difference (probed minus bare):

* **CUDA kernels per block and recorded step**: the device-side events that
  ``torch.profiler`` records with CUDA activity (kernels, and memcpy/memset,
  printed apart), divided by the recorded steps of the window and the probed blocks;
* **synchronisations per recorded step**, two ways: the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` (one per synchronising CUDA call
  torch makes: ``.item()``, ``.cpu()``, ``.tolist()``, non-blocking-less copies to
  the host, ...), and the CUDA runtime calls in the profile that wait for the
  device (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
  ``cudaEventSynchronize``, synchronous ``cudaMemcpy``) beside the device-to-host
  copies (``Memcpy DtoH``).

``--scaler`` trains under ``torch.autocast`` (float16) with a ``GradScaler``, whose
own step reads ``found_inf`` on the host in bare training too (that cancels).
``--device cpu`` runs the same on the CPU (aten operators only; kernels and
synchronisations are not measured there): a check that the script itself works.

    python benchmarks/gpu_counts.py --model resnet56               # batch 128
    python benchmarks/gpu_counts.py --model gpt2 --config every10 --steps 20
    python benchmarks/gpu_counts.py --model resnet56 --scaler

Benchmarks are never timed tests: nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import CONFIGS, build  # a script beside this one, not a package

import gradprobe

#: CUDA runtime and driver calls that launch a kernel, as the profiler names them.
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
#: CUDA runtime calls that block the host until the device (or a stream, an event) is done.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@contextlib.contextmanager
def sync_warnings(cuda: bool) -> Iterator[list[warnings.WarningMessage]]:
    """The warnings of ``torch.cuda.set_sync_debug_mode("warn")`` while the block runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    caught[:] = [w for w in caught if "synchroniz" in str(w.message).lower()]


def count(work: Any, config: str | None, steps: int, device: torch.device, scaler: bool) -> dict[str, Any]:
    """Counts of ``steps`` training steps, bare (``config`` None) or probed."""
    model = work.model
    cuda = device.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    grad_scaler = torch.amp.GradScaler(device.type) if scaler else None

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        xy = work.batches[i % len(work.batches)]
        if grad_scaler is not None:
            with torch.autocast(device.type, dtype=torch.float16):
                loss = work.loss(model, xy)
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)
            grad_scaler.update()
        else:
            work.loss(model, xy).backward()
            opt.step()

    probe = gradprobe.attach(model, **CONFIGS[config]) if config is not None else None
    try:
        for i in range(3):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
        before = set(probe.frame()["step"]) if probe is not None else set()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(steps):
                step(i)
            if cuda:
                torch.cuda.synchronize(device)
        recorded = len(set(probe.frame()["step"]) - before) if probe is not None else 0
        kernels: Counter[str] = Counter()
        cpu_ops: Counter[str] = Counter()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.key] += e.count
            else:
                cpu_ops[e.key] += e.count
        before = set(probe.frame()["step"]) if probe is not None else set()
        with sync_warnings(cuda) as caught:
            for i in range(steps):
                step(i)
            if cuda:
                torch.cuda.synchronize(device)
        warned = len(caught)
        recorded_warned = len(set(probe.frame()["step"]) - before) if probe is not None else 0
        return {
            "kernels": kernels,
            "ops": cpu_ops,
            "warnings": warned,
            "recorded": (recorded, recorded_warned),
            "blocks": len(probe.blocks) if probe is not None else 0,
        }
    finally:
        if probe is not None:
            probe.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["resnet56", "mlp", "gpt2"], default="resnet56")
    parser.add_argument("--config", choices=list(CONFIGS), default="default")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the model's)")
    parser.add_argument("--steps", type=int, default=10, help="steps counted, bare and probed each")
    parser.add_argument("--scaler", action="store_true", help="float16 autocast with a GradScaler")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to check the script")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_counts.py: no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}): run it on a CUDA machine, or pass --device cpu to check the script"
        )
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    cuda = device.type == "cuda"
    work = build(args.model, args.batch, device)
    bare = count(work, None, args.steps, device, args.scaler)
    probed = count(work, args.config, args.steps, device, args.scaler)
    rec, rec_warned = probed["recorded"]
    if not rec or not rec_warned:
        raise SystemExit(f"the counted windows recorded {probed['recorded']} steps: use more --steps")
    blocks = probed["blocks"]
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    amp = ", float16 + GradScaler" if args.scaler else ""
    print(
        f"{args.model}, batch {work.batch}, config {args.config}{amp}, "
        f"{name}, torch {torch.__version__}; {args.steps} steps counted, {rec} recorded, {blocks} blocks"
    )

    def total(c: Counter[str], pick: Any) -> int:
        return sum(v for k, v in c.items() if pick(k))

    def is_copy(k: str) -> bool:
        return k.startswith(("Memcpy", "Memset"))

    aten = total(probed["ops"], lambda k: k.startswith("aten::")) - total(
        bare["ops"], lambda k: k.startswith("aten::")
    )
    print(f"aten operators per block and recorded step: {aten / (rec * blocks):.1f} more than bare")
    if not cuda:
        print("CUDA kernels and synchronisations: not measured (--device cpu)")
        return
    kernels = total(probed["kernels"], lambda k: not is_copy(k)) - total(
        bare["kernels"], lambda k: not is_copy(k)
    )
    copies = total(probed["kernels"], is_copy) - total(bare["kernels"], is_copy)
    launches = total(probed["ops"], lambda k: k in LAUNCHES) - total(bare["ops"], lambda k: k in LAUNCHES)
    print(
        f"CUDA kernels per block and recorded step: {kernels / (rec * blocks):.1f} more than bare "
        f"(memcpy/memset {copies / (rec * blocks):.2f}; kernel launches on the host "
        f"{launches / (rec * blocks):.1f}; bare step {sum(bare['kernels'].values()) / args.steps:.0f} "
        "device events)"
    )
    sync_calls = {
        k: (probed["ops"][k] - bare["ops"][k]) / rec for k in SYNC_CALLS if probed["ops"][k] != bare["ops"][k]
    }
    dtoh = (
        total(
            probed["kernels"], lambda k: "DtoH" in k or "Device -> Pageable" in k or "Device -> Pinned" in k
        )
        - total(
            bare["kernels"], lambda k: "DtoH" in k or "Device -> Pageable" in k or "Device -> Pinned" in k
        )
    ) / rec
    print(
        f"synchronisations per recorded step: {(probed['warnings'] - bare['warnings']) / rec_warned:g} "
        "(torch.cuda.set_sync_debug_mode warnings, probed minus bare); runtime calls that wait "
        f"{sum(sync_calls.values()):g} ({', '.join(f'{k} {v:g}' for k, v in sync_calls.items()) or 'none'}); "
        f"device-to-host copies {dtoh:g}"
    )


if __name__ == "__main__":
    main()
