"""Benchmark of the modulated sampler: per-step time of the base model and of VCM, sampling,
decoding and peak memory, as medians of several runs.

VCM's time is split as the sampler runs it: the condition encoder once per run, the time U-Net
and heads (`VCM.modulation`) at every step.

Each case and variant runs in its own subprocess so that its peak RSS is its own. Cases:
  tiny   the test suite's tiny model (16^3 grid, latent 3x4x4x4)
  demo   the shipped demo model, if `VCMSynthesis/Resources/Models/demo` exists
  paper  the paper's sizes with random weights: BrainLDM (MONAI model zoo) with the paper's VCM,
         160x224x160 image, latent 3x20x28x20

Variants, side by side in one run (the same seed gives the same image within float rounding):
  before  the networks as MONAI builds them (NCDHW), the whole volume decoded at once: the
          code before bounded-memory decoding
  whole   as loaded now (`model_folder.frozen`: channels-last on the CPU), decoded whole
  slabs   as loaded now, decoded in slabs of `--slab-rows` rows (`decoding.py`): what
          `memory.plan_decode` chooses when the whole volume does not fit

Usage: .venv/bin/python bench/bench_sampler.py [--cases tiny,demo,paper] [--variants whole]
       [--device cpu|cuda] [--repeats 3] [--steps 3] [--threads N] [--slab-rows 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_FOLDER = REPO / "VCMSynthesis" / "Resources" / "Models" / "demo"


def _tiny_model(device: torch.device, as_loaded: bool = True):
    sys.path.insert(0, str(REPO / "VCMSynthesis" / "Testing" / "Python"))
    from tiny_models import tiny_config, tiny_networks

    return _random_model(tiny_config(), tiny_networks(tiny_config()), device, as_loaded)


def _paper_model(device: torch.device, as_loaded: bool = True):
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from VCMSynthesisLib.checkpoints import reference_model_config
    from VCMSynthesisLib.networks import VCM

    config = reference_model_config("paper-sizes")
    networks = (AutoencoderKL(**config.autoencoder.params), DiffusionModelUNet(**config.diffusion.params),
                VCM(**config.adapter.params))
    return _random_model(config, networks, device, as_loaded)


def _random_model(config, networks, device: torch.device, as_loaded: bool):
    """A LoadedModel of `networks`, prepared as `load_model_folder` prepares them, or (not
    `as_loaded`) as MONAI builds them."""
    from VCMSynthesisLib.model_folder import LoadedModel, frozen

    prepare = frozen if as_loaded else (lambda net, device: net.to(device).eval().requires_grad_(False))
    autoencoder, diffusion, adapter = (prepare(net, device) for net in networks)
    return LoadedModel(config=config, folder=Path("."), autoencoder=autoencoder, diffusion=diffusion,
                       adapter=adapter, device=device)


def _demo_model(device: torch.device, as_loaded: bool = True):
    from VCMSynthesisLib.model_folder import load_model_folder

    model = load_model_folder(DEMO_FOLDER, device)
    if not as_loaded:
        for network in (model.autoencoder, model.diffusion, model.adapter):
            network.to(memory_format=torch.contiguous_format)
    return model


def network_inputs(model, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
    """A latent, the base's input and context, a condition, as the sampler hands them over."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    condition = torch.rand(1, len(config.condition_channel_names), *config.grid.size, generator=generator)
    latent = torch.randn(1, *config.latent_shape, generator=generator)
    context = None
    base_input = latent
    if config.covariates is not None:
        context = torch.tensor(config.covariates.default).view(1, 1, -1)
        base_input = torch.cat([latent, context.view(1, -1, 1, 1, 1).expand(-1, -1, *latent.shape[2:])], 1)
    adapter_context = context if model.adapter.params.get("unet_cross_attention_dim") is not None else None
    to = {"device": device, "memory_format": memory_format}
    return {"latent": latent.to(**to), "base_input": base_input.to(**to), "condition": condition.to(**to),
            "adapter_input": torch.cat([latent, latent], 1).to(**to),
            "context": None if context is None else context.to(device),
            "adapter_context": None if adapter_context is None else adapter_context.to(device),
            "t": torch.tensor([500], device=device)}


def _median_forward_s(forward, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run_case(case: str, variant: str, device: torch.device, repeats: int, steps: int, slab_rows: int) -> dict:
    """Measures one case in this process; returns its row."""
    from VCMSynthesisLib.decoding import WHOLE, DecodePlan
    from VCMSynthesisLib.sampler import SamplingStats, sample

    build = {"tiny": _tiny_model, "demo": _demo_model, "paper": _paper_model}[case]
    model = build(device, as_loaded=variant != "before")
    model.decode_plan = DecodePlan(slab_rows=slab_rows) if variant == "slabs" else WHOLE
    config = model.config
    x = network_inputs(model, device)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        base_s = _median_forward_s(lambda: model.diffusion(x["base_input"], x["t"], context=x["context"]),
                                   device, repeats)
        adapter = model.adapter
        # The sampler encodes the (time-free) condition once per run and modulates at every step.
        encoder_s = _median_forward_s(lambda: adapter.encode_condition(x["condition"]), device, repeats)
        encoded = adapter.encode_condition(x["condition"])
        vcm_s = _median_forward_s(lambda: adapter.modulation(x["adapter_input"], encoded, x["t"],
                                                             context=x["adapter_context"]), device, repeats)
    condition = x["condition"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(repeats):
        stats = SamplingStats()
        start = time.perf_counter()
        sample(model, condition, steps=steps, seed=0, stats=stats)
        runs.append((time.perf_counter() - start, stats.decoder_s))
    row = {
        "case": case,
        "variant": variant if variant != "slabs" else f"slabs of {slab_rows}",
        "latent": "x".join(map(str, config.latent_shape)),
        "grid": "x".join(map(str, config.grid.size)),
        "base_step_s": base_s,
        "vcm_step_s": vcm_s,
        "vcm_encoder_s": encoder_s,
        "steps": steps,
        "sample_s": statistics.median(run[0] for run in runs),
        "decode_s": statistics.median(run[1] for run in runs),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cuda_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return row


def _print_table(rows: list[dict], device: str, threads: int) -> None:
    print(f"device: {device}, torch threads: {threads}, torch {torch.__version__}; medians")
    header = ("case", "variant", "image grid", "latent", "base/step s", "VCM/step s", "cond. encoder/run s",
              "steps", "sample s", "decode s", "peak RSS GB", "CUDA peak GB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cuda = "-" if row["cuda_peak_gb"] is None else f"{row['cuda_peak_gb']:.2f}"
        cells = (row["case"], row["variant"], row["grid"], row["latent"], f"{row['base_step_s']:.4f}",
                 f"{row['vcm_step_s']:.4f}", f"{row['vcm_encoder_s']:.4f}", row["steps"],
                 f"{row['sample_s']:.3f}", f"{row['decode_s']:.3f}", f"{row['peak_rss_gb']:.2f}", cuda)
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,demo,paper")
    parser.add_argument("--variants", default="whole", help="before, whole and/or slabs (see above)")
    parser.add_argument("--slab-rows", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--one-case", help=argparse.SUPPRESS)  # used by the subprocess of each case
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_case:
        case, variant = args.one_case.split(":")
        print(json.dumps(run_case(case, variant, torch.device(args.device), args.repeats, args.steps,
                                  args.slab_rows)))
        return 0
    rows = []
    variants = args.variants.split(",")
    if not set(variants) <= {"before", "whole", "slabs"}:
        parser.error(f"--variants takes before, whole and slabs, got {args.variants}")
    for case in args.cases.split(","):
        if case == "demo" and not (DEMO_FOLDER / "config.json").is_file():
            print(f"skipping demo: {DEMO_FOLDER} does not exist yet", file=sys.stderr)
            continue
        for variant in variants:
            command = [sys.executable, __file__, "--one-case", f"{case}:{variant}", "--device", args.device,
                       "--repeats", str(args.repeats), "--steps", str(args.steps), "--threads",
                       str(args.threads), "--slab-rows", str(args.slab_rows)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"case {case} ({variant}) failed:\n{result.stderr}", file=sys.stderr)
                return 1
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    _print_table(rows, args.device, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
