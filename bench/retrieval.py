"""Benchmark: batched point retrieval vs per-crop dense matrix powers, and CRF per-crop time.

Usage:
    python bench/retrieval.py [--device cpu|cuda] [--n 1024] [--batch 32] [--repeats 5]

Times are best-of-``repeats``. Prints progress lines, then ONE JSON object as the last stdout line:
    {"speedup_1_thread": …, "speedup_all_threads": …, "threads_all": …, "labels_equal": …,
     "by_threads": {"1": {"batched_ms", "dense_ms", "speedup", "retrieve_eq2_5_ms", …}, "2": …},
     "crf_ms": {"pydensecrf": {"128": …, "512": …}, "torch": {"128": …, "512": …}}, …}
Batched = ``exits.method.retrieval.retrieve_from_transition`` (Eq. 3-5: 3 batched vector-matrix
products + thresholds), the very function training's ``retrieve`` (train/steps.py
``generator_loss``) calls after Eq. 2, on the whole batch; dense = per crop
``torch.linalg.matrix_power(T, 3)``, row means over P_FG / P_BG and the same thresholds. Both in
one run on the same T, first with one torch thread, then with all (``os.cpu_count()``); the goal
(>= 50x) is the one-thread figure. ``retrieve_eq2_5_ms`` times ``retrieve`` itself (Sinkhorn +
Eq. 3-5), as training calls it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exits.config import RetrievalConfig  # noqa: E402
from exits.method.crf import build_crf  # noqa: E402
from exits.method.retrieval import (  # noqa: E402
    GridGeometry,
    label_points,
    retrieve,
    retrieve_from_transition,
    scale_thresholds,
    transition_matrix,
)

RCFG = RetrievalConfig()  # the paper's rule: absolute thresholds, scaled to n tokens
HOPS = RCFG.hops
CRF_SIZES = (128, 512)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=1024, help="tokens per crop (N²)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Best (minimum) wall time of ``fn()`` in ms after one warm-up call; the minimum is
    the least disturbed by other processes on a shared machine."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def make_inputs(n: int, batch: int, device: torch.device, seed: int):
    """Random attention-like T and random FG/BG/box sets of realistic sizes."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n, n, generator=g)
    T = transition_matrix(logits.softmax(-1)).to(device)  # (B, n, n)
    u = torch.rand(batch, n, generator=g)
    fg = (u < 4 / n).to(device)  # ~4 initial FG points
    fg[:, 0] = True
    bg = (u > 0.6).to(device)  # ~40 % outside the box
    in_box = ~bg
    return T, fg, bg, in_box


def dense_retrieve(T, fg, bg, in_box, tau_fg, tau_bg):
    """Per-crop reference: T^α formed densely, one crop at a time."""
    out = []
    for b in range(T.shape[0]):
        Ta = torch.linalg.matrix_power(T[b], HOPS)  # (n, n)
        diff = Ta[fg[b]].mean(0) - Ta[bg[b]].mean(0)  # (n,)
        out.append(
            label_points(
                diff[None], fg[b : b + 1], bg[b : b + 1], in_box[b : b + 1], tau_fg, tau_bg
            )
        )
    return torch.cat(out)


def bench_retrieval(args, device: torch.device) -> dict:
    """Eq. 3-5 (``retrieve_from_transition``) batched vs dense per crop, same T, one thread
    count (the caller sets it); plus Eq. 2-5 as training calls it (``retrieve``: Sinkhorn too)."""
    T, fg, bg, in_box = make_inputs(args.n, args.batch, device, args.seed)
    grid = math.isqrt(args.n)
    if grid * grid != args.n:
        raise ValueError(f"--n must be a square (N²), got {args.n}")
    geo = GridGeometry(fg=fg, bg=bg, in_box=in_box, grid=grid)
    tau_fg, tau_bg = scale_thresholds(RCFG.tau_fg, RCFG.tau_bg, args.n)
    batched_ms = timed_ms(lambda: retrieve_from_transition(T, geo, RCFG), device, args.repeats)
    dense_ms = timed_ms(
        lambda: dense_retrieve(T, fg, bg, in_box, tau_fg, tau_bg), device, max(1, args.repeats // 2)
    )
    sim = torch.rand(args.batch, args.n, args.n, generator=torch.Generator().manual_seed(1))
    full_ms = timed_ms(lambda: retrieve(sim.to(device), geo, RCFG), device, 1)
    fast = retrieve_from_transition(T.double(), geo, RCFG)
    slow = dense_retrieve(T.double(), fg, bg, in_box, tau_fg, tau_bg)
    threads = torch.get_num_threads()
    print(f"retrieval, {threads} thread(s): batched {batched_ms:.1f} ms, dense {dense_ms:.1f} ms, "
          f"x{dense_ms / batched_ms:.1f}; training's retrieve (Eq. 2-5) {full_ms:.1f} ms", flush=True)  # fmt: skip
    return {
        "batched_ms": round(batched_ms, 2),
        "dense_ms": round(dense_ms, 2),
        "speedup": round(dense_ms / batched_ms, 1),
        "labels_equal": bool(torch.equal(fast, slow)),
        "batched_ms_per_crop": round(batched_ms / args.batch, 3),
        "retrieve_eq2_5_ms": round(full_ms, 2),
    }


def bench_threads(args, device: torch.device) -> dict:
    """``bench_retrieval`` at one thread and at all threads (CPU); the goal is the 1-thread one."""
    counts = [1] if device.type == "cuda" else sorted({1, os.cpu_count() or 1})
    before = torch.get_num_threads()
    out = {}
    try:
        for k in counts:
            torch.set_num_threads(k)
            out[str(k)] = bench_retrieval(args, device)
    finally:
        torch.set_num_threads(before)
    return out


def step_edge(size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    right = torch.arange(size)[None, :].expand(size, size) >= size // 2
    image = torch.where(right, 200.0, 60.0) + 12 * torch.randn(3, size, size, generator=g)
    image = image.clamp(0, 255).to(torch.uint8)[None].to(device)
    probs = torch.where(right, 0.65, 0.35) + 0.25 * torch.randn(size, size, generator=g)
    return image, probs.clamp(0.01, 0.99)[None, None].to(device)


def bench_crf(args, device: torch.device) -> dict:
    out: dict[str, dict[str, float]] = {}
    for kind in ("pydensecrf", "torch"):
        try:
            crf = build_crf(kind)
        except ImportError as err:
            print(f"crf {kind}: unavailable ({err})", flush=True)
            continue
        crf_device = torch.device("cpu") if kind == "pydensecrf" else device
        out[kind] = {}
        for size in CRF_SIZES:
            image, probs = step_edge(size, crf_device)
            ms = timed_ms(lambda crf=crf, i=image, p=probs: crf(i, p), crf_device, 3)
            out[kind][str(size)] = round(ms, 2)
            print(f"crf {kind} {size}²: {ms:.1f} ms per crop", flush=True)
    return out


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "n": args.n,
        "batch": args.batch,
        "hops": HOPS,
    }
    per_threads = bench_threads(args, device)
    one, most = per_threads["1"], per_threads[max(per_threads, key=int)]
    result.update(
        speedup_1_thread=one["speedup"],
        speedup_all_threads=most["speedup"],
        threads_all=int(max(per_threads, key=int)),
        labels_equal=all(r["labels_equal"] for r in per_threads.values()),
        by_threads=per_threads,
    )
    result["crf_ms"] = bench_crf(args, device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
