"""GPU benchmark of the paper-size model (random weights) with the speed options side by side.

For each option (autocast precision fp32 / fp16 / bf16, `torch.backends.cudnn.benchmark`,
`channels_last_3d` weights and inputs): per-step ms of the base model and of VCM (`modulation`),
the condition encoder (once per run) and the decoder in s, the totals they make for 50 steps and
for the few-step default (the shipped `demo`'s `sampling`), and the peak GPU memory. Then
`sampler.sample` end to end, as the worker runs it (its own fp16 autocast on CUDA), for 50 DDIM
steps and for the few-step default.

Run through bench/gpu_bench.sh, which installs the carried monai wheel on a device machine:
    bash bench/gpu_bench.sh [--json FILE]          # on a GPU: the paper's sizes
    bash bench/gpu_bench.sh --device cpu --quick   # anywhere: the tiny model, in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sampler  # noqa: E402  (the models and the timing of bench_sampler.py)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
FULL_STEPS = 50


def few_step_default() -> tuple[str, int]:
    """The shipped demo's default sampler and steps: the few-step setting this project ships."""
    from VCMSynthesisLib.model_config import ModelConfig

    config = ModelConfig.load(bench_sampler.DEMO_FOLDER / "config.json")
    return config.sampling_scheduler, config.sampling_steps


def measure_option(model, device: torch.device, precision: str, cudnn_benchmark: bool, channels_last: bool,
                   repeats: int, few_steps: int) -> dict:
    """One row: the networks' forward times and peak memory under one set of options."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    for network in (model.autoencoder, model.diffusion, model.adapter):
        network.to(memory_format=memory_format)
    x = bench_sampler.network_inputs(model, device, memory_format)
    dtype = PRECISIONS[precision]
    autocast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    adapter, scale = model.adapter, model.config.scale_factor
    with torch.inference_mode(), autocast:
        def timed(forward):
            return bench_sampler._median_forward_s(forward, device, repeats)

        base_s = timed(lambda: model.diffusion(x["base_input"], x["t"], context=x["context"]))
        encoder_s = timed(lambda: adapter.encode_condition(x["condition"]))
        encoded = adapter.encode_condition(x["condition"])
        vcm_s = timed(lambda: adapter.modulation(x["adapter_input"], encoded, x["t"],
                                                 context=x["adapter_context"]))
        decode_s = timed(lambda: model.autoencoder.decode(x["latent"] / scale))
        finite = bool(torch.isfinite(model.autoencoder.decode(x["latent"] / scale)).all())

    def total(steps: int) -> float:
        return encoder_s + steps * (base_s + vcm_s) + decode_s

    return {"precision": precision, "cudnn_benchmark": cudnn_benchmark, "channels_last_3d": channels_last,
            "base_ms": 1000 * base_s, "vcm_ms": 1000 * vcm_s, "encoder_s": encoder_s, "decode_s": decode_s,
            "total_full_s": total(FULL_STEPS), "total_few_s": total(few_steps), "finite": finite,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def end_to_end(model, device: torch.device, scheduler: str, steps: int) -> dict:
    """`sampler.sample` as the worker runs it: wall time, its networks' share, peak memory."""
    from VCMSynthesisLib.sampler import SamplingStats, sample

    torch.backends.cudnn.benchmark = False
    for network in (model.autoencoder, model.diffusion, model.adapter):
        network.to(memory_format=torch.contiguous_format)
    config = model.config
    condition = torch.rand(1, len(config.condition_channel_names), *config.grid.size,
                           generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = SamplingStats()
    start = time.perf_counter()
    sample(model, condition, steps=steps, scheduler=scheduler, seed=0, stats=stats)
    return {"scheduler": scheduler, "steps": steps, "wall_s": time.perf_counter() - start,
            "decode_s": stats.decoder_s, "model_s": stats.model_s,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _option_cells(row: dict) -> tuple:
    if "error" in row:
        return (row["precision"], row["cudnn_benchmark"], row["channels_last_3d"], row["error"])
    return (row["precision"], row["cudnn_benchmark"], row["channels_last_3d"], f"{row['base_ms']:.1f}",
            f"{row['vcm_ms']:.1f}", f"{row['encoder_s']:.3f}", f"{row['decode_s']:.3f}",
            f"{row['total_full_s']:.2f}", f"{row['total_few_s']:.2f}", _gb(row["peak_gb"]), row["finite"])


def _print_row(cells) -> None:
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="the tiny test model, not the paper's sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per median, after a warm-up")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu (with --quick for the tiny model)", file=sys.stderr)
        return 1
    few = few_step_default()
    start = time.perf_counter()
    model = (bench_sampler._tiny_model if args.quick else bench_sampler._paper_model)(device)
    case = "tiny model (--quick)" if args.quick else "paper sizes (BrainLDM + VCM, random weights)"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (f"{case}: image {'x'.join(map(str, model.config.grid.size))}, latent "
              f"{'x'.join(map(str, model.config.latent_shape))}; {name}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads; model built in {time.perf_counter() - start:.1f} s; "
              f"medians of {args.repeats} forwards after a warm-up")
    print(header + "\n", flush=True)
    _print_row(("precision", "cudnn.benchmark", "channels_last_3d", "base ms/step", "VCM ms/step",
                "cond. encoder s", "decode s", f"total s, {FULL_STEPS} steps", f"total s, {few[1]} steps",
                "peak GB", "finite"))
    print("|" + "---|" * 11, flush=True)
    # CPU autocast has no useful fp16 convolutions, and cudnn.benchmark is CUDA's.
    precisions = ("fp32", "fp16", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    benchmarks = (False, True) if device.type == "cuda" else (False,)
    rows = []
    for precision, benchmark, channels_last in itertools.product(precisions, benchmarks, (False, True)):
        try:
            row = measure_option(model, device, precision, benchmark, channels_last, args.repeats, few[1])
        except RuntimeError as error:  # out of memory, or an option this build lacks: the others still run
            row = {"precision": precision, "cudnn_benchmark": benchmark, "channels_last_3d": channels_last,
                   "error": str(error).splitlines()[0][:200]}
        rows.append(row)
        _print_row(_option_cells(row))
    print(f"\nsampler.sample end to end (its own precision: fp16 autocast on CUDA; few-step default "
          f"{few[0]} {few[1]} steps, the shipped demo's):\n", flush=True)
    _print_row(("scheduler", "steps", "wall s", "networks s", "decode s", "peak GB"))
    print("|---|---|---|---|---|---|", flush=True)
    runs = []
    for scheduler, steps in (("ddim", FULL_STEPS), few):
        run = end_to_end(model, device, scheduler, steps)
        runs.append(run)
        _print_row((scheduler, steps, f"{run['wall_s']:.2f}", f"{run['model_s']:.2f}",
                    f"{run['decode_s']:.2f}", _gb(run["peak_gb"])))
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    if args.json is not None:
        args.json.write_text(json.dumps({"header": header, "options": rows, "end_to_end": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
