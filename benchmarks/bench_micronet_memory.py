"""Peak CPU memory (RSS) of one Micro-Net training step, with and without activation checkpointing.

Each configuration runs in its own subprocess, so that ``ru_maxrss`` (the process's peak
resident set size) belongs to that configuration alone. A step is what
:func:`glas_seg.backend.training.train` does per iteration: forward in training mode, the
shared loss (main + auxiliary outputs), backward, AdamW step.

Usage::

    python benchmarks/bench_micronet_memory.py                 # print a Markdown table
    python benchmarks/bench_micronet_memory.py --write-docs    # also update docs/benchmarks.md
    python benchmarks/bench_micronet_memory.py --amp           # add CPU bfloat16 autocast rows
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Micro-Net training memory"


def child(args: argparse.Namespace) -> None:
    import torch

    from glas_seg.backend.models import build_architecture
    from glas_seg.backend.training import TrainSettings, training_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"checkpointing": bool(args.checkpointing)}
    if args.width:
        kwargs["width"] = args.width
    network = build_architecture("micronet", **kwargs).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = torch.randint(0, 3, (args.batch, args.size, args.size))
    settings = TrainSettings()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.amp)):
        loss = training_loss(network(images), targets, settings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "before_mib": before / 1024, "peak_mib": peak / 1024,  # ru_maxrss is in KiB on Linux
        "cpu_s": cpu, "wall_s": wall, "loss": loss.item(),
        "params": sum(p.numel() for p in network.parameters()),
    }))


def run_config(args: argparse.Namespace, checkpointing: bool, amp: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--checkpointing", str(int(checkpointing)), "--amp", str(int(amp)),
               "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
    if args.width:
        command += ["--width", str(args.width)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def wrap(line: str) -> str:
    """Wrap prose at 100 columns like the rest of docs/; table rows and headings stay on one line."""
    return line if line.startswith(("|", "#")) else textwrap.fill(line, 100, break_on_hyphens=False)


def table(args: argparse.Namespace, rows: list[tuple[str, dict]]) -> str:
    import inspect

    import torch

    from glas_seg.backend.models.micronet import micronet

    width = args.width or inspect.signature(micronet).parameters["width"].default
    lines = [
        SECTION,
        "",
        f"One training step (forward in training mode, main + auxiliary loss, backward, AdamW step) of "
        f"`micronet(width={width})` ({rows[0][1]['params'] / 1e6:.2f} M parameters) at batch {args.batch}, "
        f"{args.size}x{args.size} px, on the CPU with {args.threads} thread(s). Peak resident memory from "
        "`resource.getrusage(RUSAGE_SELF).ru_maxrss`, one subprocess per configuration; *before step* is the "
        "peak after importing torch, building the network and the batch, so *step* (the difference) is what "
        "the training step itself adds. CPU seconds are process time (all threads), not wall time.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}, "
        "`python benchmarks/bench_micronet_memory.py" + (" --amp" if args.amp else "") + "`.",
        "",
        "| configuration | peak RSS (MiB) | before step (MiB) | step (MiB) | CPU s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['peak_mib']:.0f} | {r['before_mib']:.0f} | "
                     f"{r['peak_mib'] - r['before_mib']:.0f} | {r['cpu_s']:.1f} |")
    step = {label: r["peak_mib"] - r["before_mib"] for label, r in rows}
    cpu = {label: r["cpu_s"] for label, r in rows}
    plain, ckpt = rows[0][0], rows[1][0]
    lines += [
        "",
        f"Activation checkpointing cuts the memory the step adds by {100 * (1 - step[ckpt] / step[plain]):.0f} % "
        f"for {100 * (cpu[ckpt] / cpu[plain] - 1):.0f} % more CPU time in this one-step measurement (each block's "
        "forward pass runs again during the backward pass). "
        "What remains is mostly full-resolution: the three upsampled feature maps kept for the main head, "
        "the four full-resolution outputs with their loss terms, and one block recomputed at a time. "
        f"Each row is the median of {args.repeats} runs (by peak RSS); RSS also holds allocator caches, so "
        "differences under about 100 MiB are noise.",
    ]
    if args.amp:
        lines.append("")
        lines.append("The bf16 rows use `torch.autocast('cpu', dtype=torch.bfloat16)`; the shared training loop "
                     "uses autocast (fp16) only on CUDA, so on a CPU they show what AMP would save, not what "
                     "`glas-seg train` does.")
    return "\n".join(wrap(line) for line in lines) + "\n"


def write_section(text: str, path: Path = DOCS) -> None:
    """Replace (or append) the ``##`` section that ``text`` starts with, leaving other sections alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = text.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=508)
    parser.add_argument("--width", type=int, default=0, help="Micro-Net width (0: the builder's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--amp", type=int, nargs="?", const=1, default=0, help="also measure CPU bfloat16 autocast")
    parser.add_argument("--write-docs", action="store_true", help=f"update the '{SECTION}' section of {DOCS}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    configs = [("no checkpointing", False, False), ("activation checkpointing", True, False)]
    if args.amp:
        configs += [("bf16 autocast", False, True), ("checkpointing + bf16 autocast", True, True)]
    rows = []
    for label, checkpointing, amp in configs:
        results = []
        for _ in range(args.repeats):
            results.append(run_config(args, checkpointing, amp))
            print(f"{label}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        rows.append((label, sorted(results, key=lambda r: r["peak_mib"])[len(results) // 2]))
    text = table(args, rows)
    print(text)
    if args.write_docs:
        write_section(text)


if __name__ == "__main__":
    main()
