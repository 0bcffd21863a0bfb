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
  half    slabs as above, the big maps stored in float16 between blocks: what the plan chooses
          when float32 slabs do not fit
Each row also gives the largest difference of its image from the first variant's.

Usage: .venv/bin/python bench/bench_sampler.py [--cases tiny,demo,paper] [--variants before,half]
       [--device cpu|cuda] [--repeats 3] [--steps 3] [--threads N] [--slab-rows 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEMO_FOLDER = REPO / "VCMSynthesis" / "Resources" / "Models" / "demo"


def _tiny_model(device: torch.device, as_loaded: bool = True):
    sys.path.insert(0, str(REPO / "VCMSynthesis" / "Testing" / "Python"))
    from tiny_models import tiny_config, tiny_networks

    return _random_model("tiny", tiny_config(), lambda: tiny_networks(tiny_config()), device, as_loaded)


def _paper_model(device: torch.device, as_loaded: bool = True):
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from VCMSynthesisLib.checkpoints import reference_model_config
    from VCMSynthesisLib.networks import VCM

    config = reference_model_config("paper-sizes")

    def networks():
        torch.manual_seed(0)  # the same weights in every variant's process
        return (AutoencoderKL(**config.autoencoder.params), DiffusionModelUNet(**config.diffusion.params),
                VCM(**config.adapter.params))

    return _random_model("paper", config, networks, device, as_loaded)


def _random_model(name: str, config, networks, device: torch.device, as_loaded: bool):
    """A LoadedModel of the random `networks()`, loaded by `load_model_folder` from a folder they
    are saved in once (in the temporary directory: 2.4 GB for the paper's), or (not `as_loaded`)
    as MONAI builds them."""
    from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig
    from VCMSynthesisLib.model_folder import LoadedModel, load_model_folder, save_model_folder

    if not as_loaded:
        autoencoder, diffusion, adapter = (net.to(device).eval().requires_grad_(False) for net in networks())
        return LoadedModel(config=config, folder=Path("."), autoencoder=autoencoder, diffusion=diffusion,
                           adapter=adapter, device=device)
    folder = Path(tempfile.gettempdir()) / f"vcm-bench-{name}-random"
    if not (folder / CONFIG_NAME).is_file() or ModelConfig.load(folder / CONFIG_NAME) != config:
        save_model_folder(folder, config, *networks())
    return load_model_folder(folder, device)


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


VARIANTS = ("before", "whole", "slabs", "half")


def _plan(variant: str, slab_rows: int):
    from VCMSynthesisLib.decoding import WHOLE, DecodePlan

    if variant in ("before", "whole"):
        return WHOLE
    return DecodePlan(slab_rows=slab_rows, stored_dtype=torch.float16 if variant == "half" else None)


class PeakAnonymous:
    """The largest RssAnon of this process, polled every 10 ms in a thread: memory the OS cannot
    reclaim without swap. The peak RSS (VmHWM) also counts mapped file pages, such as the base
    model's weights, which it can reclaim and read back."""

    def __init__(self):
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        status = Path("/proc/self/status")
        while not self._stop.wait(0.01):
            line = next(line for line in status.read_text().splitlines() if line.startswith("RssAnon:"))
            self.peak_bytes = max(self.peak_bytes, int(line.split()[1]) * 1024)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def run_case(case: str, variant: str, device: torch.device, repeats: int, steps: int, slab_rows: int,
             image_path: Path) -> dict:
    """Measures one case in this process, saves its last image to `image_path`; returns its row."""
    anonymous = PeakAnonymous()
    from VCMSynthesisLib.sampler import SamplingStats, sample

    build = {"tiny": _tiny_model, "demo": _demo_model, "paper": _paper_model}[case]
    model = build(device, as_loaded=variant != "before")
    model.decode_plan = _plan(variant, slab_rows)
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
        image = sample(model, condition, steps=steps, seed=0, stats=stats)
        runs.append((time.perf_counter() - start, stats.decoder_s))
    np.save(image_path, image.numpy())
    row = {
        "case": case,
        "variant": {"slabs": f"slabs of {slab_rows}", "half": f"slabs of {slab_rows}, float16 storage"}.get(
            variant, variant),
        "latent": "x".join(map(str, config.latent_shape)),
        "grid": "x".join(map(str, config.grid.size)),
        "base_step_s": base_s,
        "vcm_step_s": vcm_s,
        "vcm_encoder_s": encoder_s,
        "steps": steps,
        "sample_s": statistics.median(run[0] for run in runs),
        "decode_s": statistics.median(run[1] for run in runs),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_anonymous_gb": anonymous.stop() / 2**30,
        "cuda_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return row


def _print_table(rows: list[dict], device: str, threads: int) -> None:
    print(f"device: {device}, torch threads: {threads}, torch {torch.__version__}; medians")
    header = ("case", "variant", "image grid", "latent", "base/step s", "VCM/step s", "cond. encoder/run s",
              "steps", "sample s", "decode s", "peak RSS GB", "peak anon. GB", "CUDA peak GB",
              "max image diff")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cuda = "-" if row["cuda_peak_gb"] is None else f"{row['cuda_peak_gb']:.2f}"
        cells = (row["case"], row["variant"], row["grid"], row["latent"], f"{row['base_step_s']:.4f}",
                 f"{row['vcm_step_s']:.4f}", f"{row['vcm_encoder_s']:.4f}", row["steps"],
                 f"{row['sample_s']:.3f}", f"{row['decode_s']:.3f}", f"{row['peak_rss_gb']:.2f}",
                 f"{row['peak_anonymous_gb']:.2f}", cuda,
                 f"{row['image_difference']:.2e}")
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,demo,paper")
    parser.add_argument("--variants", default="whole", help=f"some of {', '.join(VARIANTS)} (see above)")
    parser.add_argument("--slab-rows", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--one-case", help=argparse.SUPPRESS)  # used by the subprocess of each case
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)  # where that subprocess saves its image
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_case:
        case, variant = args.one_case.split(":")
        print(json.dumps(run_case(case, variant, torch.device(args.device), args.repeats, args.steps,
                                  args.slab_rows, args.image)))
        return 0
    rows = []
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants takes {', '.join(VARIANTS)}, got {args.variants}")
    with tempfile.TemporaryDirectory() as images:
        for case in args.cases.split(","):
            if case == "demo" and not (DEMO_FOLDER / "config.json").is_file():
                print(f"skipping demo: {DEMO_FOLDER} does not exist yet", file=sys.stderr)
                continue
            first = None
            for variant in variants:
                image = Path(images) / f"{case}-{variant}.npy"
                command = [sys.executable, __file__, "--one-case", f"{case}:{variant}", "--image", str(image),
                           "--device", args.device, "--repeats", str(args.repeats), "--steps",
                           str(args.steps), "--threads", str(args.threads), "--slab-rows",
                           str(args.slab_rows)]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    print(f"case {case} ({variant}) failed:\n{result.stderr}", file=sys.stderr)
                    return 1
                row = json.loads(result.stdout.strip().splitlines()[-1])
                first = np.load(image) if first is None else first
                row["image_difference"] = float(np.abs(np.load(image) - first).max())
                rows.append(row)
    _print_table(rows, args.device, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
