"""Benchmark of `edit`'s encode at the paper's size: MONAI's whole-volume `AutoencoderKL.encode`
against `decoding.encode` in slabs, peak memory and time, each variant in its own process.

BrainLDM's autoencoder (random weights, prepared as `model_folder.frozen` prepares it) encodes a
random 160x224x160 image. Peak is VmHWM above the process after a warm-up encode of a small
image (weights loaded, allocator and kernels warmed), so it is the encode's own; the latent is
compared with the first variant's (mean and max absolute difference). Use one thread on a shared
machine: memory is reliable, time only roughly so.

`--edit` measures a whole `edit.edit_scan` instead (the paper's networks with random weights, a
synthetic 8-label segmentation and scan at 160x224x160, 1 step, decoded in slabs of 8 rows): its
peak with the scan encoded as `variant` says, above the process with the model loaded.

Usage: .venv/bin/python bench/bench_encoding.py [--variants whole,8,4] [--grid 160,224,160]
       [--threads 1] [--edit]
  whole   `AutoencoderKL.encode` (what `edit` ran before); a number: slabs of that many rows
  norm64  `AutoencoderKL.encode` with GroupNorm computed in float64 (its float32 statistics
          over millions of values are the coarse part): the reference that shows which float32
          encode is the closer (put it first); about twice the whole encode's memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def _status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def run_variant(variant: str, grid: tuple[int, ...], latent_path: Path) -> dict:
    """Encodes once in this process as `variant` says; saves the latent to `latent_path`."""
    from monai.networks.nets import AutoencoderKL
    from VCMSynthesisLib.checkpoints import reference_model_config
    from VCMSynthesisLib.decoding import DecodePlan, encode
    from VCMSynthesisLib.model_folder import frozen

    torch.manual_seed(0)
    autoencoder = frozen(AutoencoderKL(**reference_model_config("paper-sizes").autoencoder.params),
                         torch.device("cpu"))
    image = torch.rand(1, 1, *grid, generator=torch.Generator().manual_seed(1)) * 2 - 1
    if variant == "norm64":
        group_norm = F.group_norm
        F.group_norm = lambda x, groups, weight, bias, eps: group_norm(  # what nn.GroupNorm calls
            x.double(), groups, weight.double(), bias.double(), eps).float()
    if variant in ("whole", "norm64"):
        run = lambda x: autoencoder.encode(x)[0].float()  # noqa: E731
    else:
        run = lambda x: encode(autoencoder, x, DecodePlan(slab_rows=int(variant)))  # noqa: E731
    with torch.inference_mode():
        run(image[:, :, :16, :16, :16])
        before = _status_bytes("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
        start = time.perf_counter()
        latent = run(image)
        seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM:")
    torch.save(latent, latent_path)
    names = {"whole": "MONAI whole-volume encode", "norm64": "MONAI whole-volume encode, float64 GroupNorm"}
    return {"variant": names.get(variant, f"slabs of {variant} rows"),
            "grid": "x".join(map(str, grid)), "encode_s": seconds, "encode_peak_gb": (peak - before) / 2**30,
            "process_peak_gb": peak / 2**30}


def run_edit_variant(variant: str, folder: Path) -> dict:
    """One paper-size `edit_scan` in this process, the scan encoded as `variant` says."""
    import SimpleITK as sitk
    from VCMSynthesisLib import edit
    from VCMSynthesisLib.decoding import DecodePlan

    sys.path.insert(0, str(REPO / "bench"))
    from bench_sampler import _paper_model

    model = _paper_model(torch.device("cpu"))
    model.decode_plan = DecodePlan(slab_rows=8)
    if variant == "whole":  # what `edit` ran before: MONAI's whole-volume encode
        model.encode = lambda image: model.autoencoder.encode(image)[0] * model.config.scale_factor
    else:
        model.decode_plan = DecodePlan(slab_rows=int(variant))
    shape = model.config.grid.size[::-1]  # SimpleITK's k, j, i
    distance = np.linalg.norm(np.indices(shape) - np.array(shape).reshape(3, 1, 1, 1) / 2, axis=0)
    labels = np.clip(8 - (distance // 9).astype(np.int16), 0, 8)  # shells 1..8 around the centre
    edited = np.where(distance < 14, 3, labels).astype(np.int16)  # the ventricles grown
    scan = (labels * 100.0 + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)
    for name, array in (("scan", scan), ("original", labels), ("edited", edited)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{name}.nrrd"))
    inputs = edit.read_edit_inputs(folder / "scan.nrrd", folder / "edited.nrrd",
                                   original=folder / "original.nrrd")
    before = _status_bytes("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    edit.edit_scan(model, inputs, steps=1)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM:")
    name = "MONAI whole-volume encode" if variant == "whole" else f"encode in slabs of {variant} rows"
    return {"variant": name, "edit_s": seconds, "edit_peak_gb": (peak - before) / 2**30,
            "model_gb": before / 2**30, "process_peak_gb": peak / 2**30}


def _print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="whole,8,4")
    parser.add_argument("--grid", default="160,224,160")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--edit", action="store_true", help="measure a whole paper-size edit (see above)")
    # each variant runs in its own process, so that its peak is its own
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = tuple(int(size) for size in args.grid.split(","))
    if args.one:
        variant, path = args.one[0], Path(args.one[1])
        print(json.dumps(run_edit_variant(variant, path) if args.edit else run_variant(variant, grid, path)))
        return 0
    variants = args.variants.split(",")
    if not all(variant in ("whole", "norm64") or variant.isdigit() for variant in variants):
        parser.error(f"--variants takes 'whole', 'norm64' and numbers of rows, got {args.variants}")
    rows, latents = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for index, variant in enumerate(variants):
            path = Path(scratch) if args.edit else Path(scratch) / f"{index}.pt"  # the edit's files, a latent
            command = [sys.executable, __file__, "--grid", args.grid, "--threads", str(args.threads),
                       "--one", variant, str(path), *(["--edit"] if args.edit else [])]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"variant {variant} failed:\n{result.stderr}", file=sys.stderr)
                return 1
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            if not args.edit:
                latents.append(torch.load(path, weights_only=True))
    if args.edit:
        print(f"torch threads: {args.threads}, torch {torch.__version__}; a 1-step paper-size edit_scan")
        _print_table(("scan encode", "edit s", "edit peak above the loaded model GB", "loaded model GB",
                      "process peak GB"),
                     [(row["variant"], f"{row['edit_s']:.1f}", f"{row['edit_peak_gb']:.2f}",
                       f"{row['model_gb']:.2f}", f"{row['process_peak_gb']:.2f}") for row in rows])
        return 0
    print(f"torch threads: {args.threads}, torch {torch.__version__}; the latent against the first row's")
    _print_table(("variant", "image grid", "encode s", "encode peak GB", "process peak GB", "mean diff",
                  "max diff"),
                 [(row["variant"], row["grid"], f"{row['encode_s']:.1f}", f"{row['encode_peak_gb']:.2f}",
                   f"{row['process_peak_gb']:.2f}", f"{(latent - latents[0]).abs().mean():.2e}",
                   f"{(latent - latents[0]).abs().max():.2e}")
                  for row, latent in zip(rows, latents, strict=True)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
