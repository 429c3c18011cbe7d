"""``batchless bench speed`` and ``batchless bench memory``: the performance benchmarks behind BENCHMARKS.md.

``speed`` times a training step and inference of batchless against BatchNorm, GroupNorm, LayerNorm and
identity, per layer (1d/2d/3d shapes, float32 and bfloat16) and in a small ResNet, interleaved in one
process (see :mod:`.bench_speed`). ``memory`` measures the peak training memory of a conv net against the
micro-batch size at a fixed effective batch, one fresh process per configuration (see :mod:`.bench_memory`).
Both print a Markdown table and write JSON with ``--out``; ``--quick`` is a tiny smoke-test mode whose
numbers mean nothing. ``ddp`` times a DDP training step on CPU processes against SyncBatchNorm (see
:mod:`.bench_ddp`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from . import bench_ddp, bench_memory, bench_microbatch, bench_speed
from .options import device_name, int_list, make_parent, output_file, positive_int


def run_speed(args: argparse.Namespace) -> int:
    make_parent(args.out)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _speed(args, device)
    finally:
        torch.set_num_threads(threads)


def _speed(args: argparse.Namespace, device: torch.device) -> int:
    shapes = bench_speed.QUICK_SHAPES if args.quick else bench_speed.LAYER_SHAPES
    if args.shapes:
        shapes = args.shapes
    rounds, warmup, inner = (3, 1, 1) if args.quick else (args.rounds, args.warmup, None)
    log = _log(args)
    result = {"benchmark": "speed", "command": _command(), "machine": bench_speed.machine_info(device),
              "config": {"rounds": rounds, "warmup": warmup, "quick": args.quick}}
    result["layers"] = bench_speed.bench_layers(shapes, args.dtypes, rounds=rounds, inner=inner, warmup=warmup,
                                                device=device, compile=args.compile, other_path=args.fused, log=log)
    batch, image = (2, 8) if args.quick else (args.model_batch, 32)
    result["models"], result["fold"] = [], None
    if not args.no_models:
        result["models"] = bench_speed.bench_models(
            batch, image, widths=(4, 8, 8) if args.quick else (16, 32, 64), rounds=rounds, inner=inner,
            warmup=warmup, device=device, compile=args.compile, other_path=args.fused, log=log)
        result["fold"] = _fold(batch, image, rounds=rounds, warmup=warmup, device=device, quick=args.quick, log=log)
    print(bench_speed.markdown_table(result["layers"]) + "\n\n" + bench_speed.markdown_table(result["models"]))
    fold = result["fold"]
    if fold:
        print(f"\n{fold['model']} {tuple(fold['input'])} inference, ratio to the model without normalization: "
              f"folded batchless {fold['ratio']:.3f}x ({fold['ratio_biased']:.3f}x with conv biases), "
              f"unfolded batchless {fold['ratio_unfolded']:.3f}x "
              f"(none {fold['results']['none']['median_ms']:.3f} ms; max rel. diff {fold['max_rel_diff']:.1e})")
    _write(args.out, result)
    return 0


def _fold(batch, image, *, rounds, warmup, device, quick, log):
    """Folded batchless inference vs the model without normalization (``bench_fold``, when installed)."""
    try:
        from .bench_fold import benchmark_fold
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.bench_fold":
            raise
        log("fold: not benchmarked (batchless_experiments.bench_fold is not installed)")
        return None
    return benchmark_fold(batch=batch, image=image, rounds=rounds, warmup=warmup, device=device, quick=quick)


def run_memory(args: argparse.Namespace) -> int:
    make_parent(args.out)
    make_parent(args.plot)
    device = torch.device(args.device)
    cfg = bench_memory.MemoryConfig.quick() if args.quick else bench_memory.MemoryConfig(
        effective_batches=args.effective_batches, image=args.image, width=args.width)
    result = bench_memory.run(cfg, device=device, log=_log(args))
    result["command"] = _command()
    print(bench_memory.markdown_table(result))
    if args.plot:
        bench_memory.plot(result, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    _write(args.out, result)
    return 0


def run_microbatch(args: argparse.Namespace) -> int:
    make_parent(args.out)
    rounds, warmup, steps = (3, 1, 2) if args.quick else (args.rounds, 3, args.steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bench_microbatch.run(rounds=rounds, warmup=warmup, steps=steps, log=_log(args))
    finally:
        torch.set_num_threads(threads)
    result["command"] = _command()
    print(bench_microbatch.markdown_table(result))
    _write(args.out, result)
    return 0


def _log(args):
    return (lambda m: None) if args.silent else (lambda m: print(m, file=sys.stderr, flush=True))


def _command() -> str:
    return "batchless " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("batchless") else ""


def _write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"json: {path}", file=sys.stderr)


def _dtype_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in bench_speed.DTYPES for v in values):
        raise argparse.ArgumentTypeError(f"expected dtypes from {', '.join(bench_speed.DTYPES)}; received {text!r}")
    return values


def _shape_list(text: str) -> dict[str, tuple[int, ...]]:
    """Shape names from LAYER_SHAPES, or explicit shapes such as ``8x16`` or ``4x8x16x16`` (N, C, *)."""
    shapes = {}
    for v in (v.strip() for v in text.split(",")):
        if v in bench_speed.LAYER_SHAPES:
            shapes[v] = bench_speed.LAYER_SHAPES[v]
        elif re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*){1,4}", v):
            shapes[v] = tuple(int(d) for d in v.split("x"))
        else:
            raise argparse.ArgumentTypeError(
                f"expected shape names from {', '.join(bench_speed.LAYER_SHAPES)} or shapes like 8x16 "
                f"(2 to 5 positive sizes); received {v!r} in {text!r}")
    return shapes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="speed and memory benchmarks (BENCHMARKS.md)",
                              description="Speed and memory benchmarks of batchless against the other norms.")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    s = sub.add_parser("speed", help="training step and inference time, layers and a small ResNet",
                       description="Interleaved timings (median over rounds, ratio to BatchNorm in the same "
                                   "rounds) of batchless, BatchNorm, GroupNorm, LayerNorm and identity.")
    s.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads (default 1)")
    s.add_argument("--rounds", type=positive_int, default=21, help="timed rounds per comparison (default 21)")
    s.add_argument("--warmup", type=positive_int, default=3, help="warm-up rounds (default 3)")
    s.add_argument("--shapes", type=_shape_list, default=None,
                   help=f"layer shapes by name, from {', '.join(bench_speed.LAYER_SHAPES)}, or explicit "
                        "(N, C, *) shapes such as 8x16 (default: all the named ones)")
    s.add_argument("--no-models", action="store_true", help="layers only: skip the ResNet and fold benchmarks")
    s.add_argument("--dtypes", type=_dtype_list, default=list(bench_speed.DTYPES),
                   help="activation dtypes (default float32,bfloat16; parameters stay float32)")
    s.add_argument("--model-batch", type=positive_int, default=32, help="ResNet batch size (default 32)")
    s.add_argument("--compile", action="store_true",
                   help="also time torch.compile-d batchless and BatchNorm (whole-layer/model compilation)")
    s.add_argument("--fused", action="store_true",
                   help="also time batchless on the kernel paths of batchless.fused it does not take by "
                        "default on the device: batchless+eager, batchless+compiled (torch.compile's kernels)")
    _common(s)
    s.set_defaults(func=run_speed)

    m = sub.add_parser("memory", help="peak training memory vs micro-batch size at a fixed effective batch",
                       description="Peak training memory of a conv net on square images: batchless with "
                                   "micro-batches 1, 2, 4, ... vs BatchNorm at the full batch; a fresh process "
                                   "per configuration (CPU: peak resident-set increase; CUDA: "
                                   "max_memory_allocated).")
    m.add_argument("--effective-batches", type=int_list, default=[128, 256], help="default 128,256")
    m.add_argument("--image", type=positive_int, default=64, help="image side (default 64)")
    m.add_argument("--width", type=positive_int, default=64, help="conv net width (default 64)")
    m.add_argument("--plot", type=output_file, default=None, help="write a PNG plot here")
    _common(m)
    m.set_defaults(func=run_memory)

    mb = sub.add_parser("microbatch", help="the paper's claim on the Fashion-MNIST CNN: micro-batch 1 vs batch 64",
                        description="Batchless at effective batch 64 with micro-batch 1 against the batch of 64, on "
                                    "the Fashion-MNIST study's CNN (CPU, one thread): the same model (float64), "
                                    "extra training memory (fresh processes) and time per step.")
    mb.add_argument("--rounds", type=positive_int, default=21, help="timed rounds (default 21)")
    mb.add_argument("--steps", type=positive_int, default=10, help="float64 Adam steps compared (default 10)")
    _common(mb)
    mb.set_defaults(func=run_microbatch, device="cpu")

    bench_ddp.add_parser(sub)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny smoke-test mode (numbers meaningless)")
    p.add_argument("--device", type=device_name, default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", type=output_file, default=None, help="write the results as JSON here")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
