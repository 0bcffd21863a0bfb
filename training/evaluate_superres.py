"""Evaluate axial super-resolution on held-out subjects against B-spline and linear interpolation.

For each held-out case and slab thickness, the true 2 mm T1 is turned into a thick-slice scan
(`simulate_thick_slices`, random slab offset), which every method brings back onto the true
grid: SimpleITK linear and B-spline interpolation, linear interpolation made consistent with the
slabs (`superres.enforce_consistency`, no model: what the consistency step alone gives), and the
VCM super-resolution (`superres.super_resolve`, default settings). PSNR and SSIM are measured
inside the brain (label map > 0), in the input's intensity units; the table shows medians.

    python training/evaluate_superres.py --model demo-superres --thickness 3 5 7 --cases 8
"""

from __future__ import annotations

import sys
import time

import common
import evaluate
import numpy as np
import SimpleITK as sitk
import torch
from simulate_thick_slices import simulate_thick_slices
from VCMSynthesisLib import superres
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.registry import resolve_model

METHODS = ("linear", "bspline", "linear+consistency", "vcm")


def interpolate(thick: sitk.Image, grid: sitk.Image, interpolator: int) -> sitk.Image:
    """`thick` resampled onto `grid` (slab values taken as samples at the slab centres)."""
    return sitk.Resample(thick, grid, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32, True)


def reconstruct(method: str, thick: sitk.Image, grid: sitk.Image, model, steps: int | None,
                seed: int, samples: int) -> sitk.Image:
    axis = superres.slice_geometry(thick).axis
    if method == "linear":
        return interpolate(thick, grid, sitk.sitkLinear)
    if method == "bspline":
        return interpolate(thick, grid, sitk.sitkBSpline)
    if method == "linear+consistency":
        return superres.enforce_consistency(interpolate(thick, grid, sitk.sitkLinear), thick, axis)
    mean, _ = superres.super_resolve(model, thick, grid, samples=samples, steps=steps, seed=seed)
    return mean


def main(argv: list[str] | None = None) -> None:
    parser = common.evaluation_arguments(__doc__.splitlines()[0], "demo-superres")
    parser.add_argument("--thickness", type=float, nargs="+", default=[3.0, 5.0, 7.0])
    parser.add_argument("--samples", type=int, default=superres.DEFAULT_SAMPLES,
                        help="samples averaged by the VCM method (default: the CLI's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model_folder(resolve_model(args.model))
    cases = common.read_manifest(args.manifest, split=args.split)[: args.cases]
    rows = []
    for case_index, case in enumerate(cases):
        truth = sitk.ReadImage(str(case.files["image"]), sitk.sitkFloat32)
        brain = sitk.GetArrayFromImage(sitk.ReadImage(str(case.files["labels"]))) > 0
        truth_array = sitk.GetArrayFromImage(truth)
        for thickness in args.thickness:
            rng = np.random.default_rng([args.seed, case_index, int(round(thickness * 100))])
            thick = simulate_thick_slices(truth, thickness, float(rng.uniform(0.0, thickness)))
            for method in METHODS:
                start = time.perf_counter()
                estimate = reconstruct(method, thick, truth, model, args.steps, args.seed, args.samples)
                seconds = time.perf_counter() - start
                figures = evaluate.masked_psnr_ssim(sitk.GetArrayFromImage(estimate), truth_array, brain)
                rows.append({"case": case.name, "thickness_mm": thickness, "method": method,
                             **figures, "seconds": seconds})
                print(f"{case.name} {thickness:g} mm {method}: PSNR {figures['psnr']:.2f} dB, "
                      f"SSIM {figures['ssim']:.4f}, {seconds:.1f} s", flush=True)
    tables = median_tables(rows)
    heading = f"Medians over {len(cases)} held-out cases (PSNR and SSIM inside the brain, input units)"
    print(f"\n{heading}\n\n{tables}")
    if args.out is not None:
        command = "python training/evaluate_superres.py " + " ".join(sys.argv[1:] if argv is None else argv)
        common.write_json(args.out, {"model": str(args.model), "rows": rows, "table": tables,
                                     "heading": heading, "command": command})


def median_tables(rows: list[dict]) -> str:
    """Medians per method, one Markdown table per slab thickness."""
    tables = []
    for thickness in sorted({row["thickness_mm"] for row in rows}):
        chosen = [{key: value for key, value in row.items() if key != "thickness_mm"}
                  for row in rows if row["thickness_mm"] == thickness]
        tables.append(f"{thickness:g} mm slabs:\n\n{evaluate.median_table(chosen)}")
    return "\n\n".join(tables)


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
