"""Make the demo data set from the MNI ICBM152 2009 template that nilearn ships (no download).

Each subject is the template under a random smooth deformation (small affine + B-spline) with a
mild intensity variation, on a 2 mm grid cropped to a box around the brain. Per subject it writes
a T1 image in [0, 1], a tissue label map (0 background, 1 CSF incl. ventricles, 2 grey matter,
3 white matter) and a SIMULATED T2-weighted-like image made from the tissue probabilities (CSF
bright, grey above white, bias field, noise): it is not a measured T2 and only serves the
modality-translation demo. nilearn ships no CSF map: CSF is the brain mask minus grey and white
matter, so ventricles and sulci count as CSF.

    python training/prepare_demo_data.py --out training/data --train 48 --test 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import numpy as np
import SimpleITK as sitk
from nilearn.datasets import struct
from VCMSynthesisLib.cli import run_reporting_errors

GRID_SIZE = (80, 96, 80)
GRID_SPACING = 2.0
# Intensities of the simulated T2-like contrast per tissue (CSF bright, grey above white).
T2_TISSUE_INTENSITY = {"csf": 1.0, "gm": 0.55, "wm": 0.38}


def load_template() -> dict[str, sitk.Image]:
    """T1, grey and white matter maps (1 mm, 0..255 in the files) as float images in [0, 1]."""
    paths = {"t1": struct.MNI152_FILE_PATH, "gm": struct.GM_MNI152_FILE_PATH,
             "wm": struct.WM_MNI152_FILE_PATH}
    images = {key: sitk.ReadImage(str(path), sitk.sitkFloat32) / 255.0 for key, path in paths.items()}
    # The nilearn template is skull-stripped: the brain mask is where the T1 is non-zero.
    images["mask"] = sitk.Cast(images["t1"] > 0, sitk.sitkFloat32)
    return images


def brain_grid(mask: sitk.Image) -> sitk.Image:
    """The 2 mm reference grid: GRID_SIZE voxels centred on the brain's bounding box."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask, sitk.sitkUInt8))
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    centre_index = [x0 + (sx - 1) / 2, y0 + (sy - 1) / 2, z0 + (sz - 1) / 2]
    centre = np.array(mask.TransformContinuousIndexToPhysicalPoint(centre_index))
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    half_extent = (np.array(GRID_SIZE) - 1) / 2 * GRID_SPACING
    origin = centre - direction @ half_extent
    grid = sitk.Image(list(GRID_SIZE), sitk.sitkFloat32)
    grid.SetSpacing([GRID_SPACING] * 3)
    grid.SetDirection(mask.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def random_deformation(template: sitk.Image, centre: np.ndarray, rng: np.random.Generator,
                       bspline_mm: float) -> sitk.Transform:
    """A random similarity-like affine about the brain centre followed by a smooth B-spline warp."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    angles = np.deg2rad(rng.uniform(-5, 5, size=3))
    rotation = sitk.Euler3DTransform(centre.tolist(), *angles)
    scale = np.diag(rng.uniform(0.96, 1.04, size=3))
    affine.SetMatrix((np.array(rotation.GetMatrix()).reshape(3, 3) @ scale).ravel().tolist())
    bspline = sitk.BSplineTransformInitializer(template, [4, 4, 4])
    params = rng.normal(0.0, bspline_mm, size=len(bspline.GetParameters()))
    bspline.SetParameters(params.tolist())
    return sitk.CompositeTransform([affine, bspline])


def smooth_field(grid: sitk.Image, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field exp(amplitude * noise), noise a cubic upsampling of 4^3 values."""
    coarse = sitk.GetImageFromArray(rng.normal(0.0, 1.0, size=(4, 4, 4)).astype(np.float32))
    coarse.SetSpacing([s * n / 4 for s, n in zip(grid.GetSpacing(), grid.GetSize(), strict=True)])
    coarse.SetOrigin(grid.GetOrigin())
    coarse.SetDirection(grid.GetDirection())
    fine = sitk.Resample(coarse, grid, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return np.exp(amplitude * sitk.GetArrayFromImage(fine))


def make_subject(template: dict[str, sitk.Image], grid: sitk.Image, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """One deformed subject on the grid: t1, t2 (simulated) and labels, as (z, y, x) arrays."""
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in GRID_SIZE]))
    transform = random_deformation(template["t1"], centre, rng, bspline_mm=3.0)
    warped = {key: sitk.GetArrayFromImage(sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0))
              for key, image in template.items()}
    mask = warped["mask"] > 0.5
    gm = np.clip(warped["gm"], 0, 1)
    wm = np.clip(warped["wm"], 0, 1)
    csf = np.clip(warped["mask"] - gm - wm, 0, 1)
    labels = np.where(mask, np.argmax(np.stack([csf, gm, wm]), axis=0) + 1, 0).astype(np.uint8)

    t1 = warped["t1"] ** rng.uniform(0.9, 1.1) * smooth_field(grid, rng, 0.03)
    t1 = t1 * rng.uniform(0.95, 1.05) + mask * rng.normal(0.0, 0.01, size=t1.shape)
    t1 = np.clip(t1, 0.0, 1.0).astype(np.float32)

    t2 = (T2_TISSUE_INTENSITY["csf"] * csf + T2_TISSUE_INTENSITY["gm"] * gm
          + T2_TISSUE_INTENSITY["wm"] * wm) * smooth_field(grid, rng, 0.1)
    t2_image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(t2.astype(np.float32)), 0.6)
    t2 = sitk.GetArrayFromImage(t2_image) + rng.normal(0.0, 0.02, size=t2.shape)
    t2 = (np.abs(t2) * 1000.0).astype(np.float32)  # magnitude image, arbitrary scanner-like units
    return {"t1": t1, "t2": t2, "labels": labels}


def write_volume(array: np.ndarray, grid: sitk.Image, path: Path) -> None:
    """Write a (z, y, x) array with the grid's geometry, atomically."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    with common.atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("training/data"))
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    template = load_template()
    grid = brain_grid(template["mask"])
    case_dir = args.out / "cases"
    case_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(args.train + args.test):
        rng = np.random.default_rng([args.seed, index])
        subject = make_subject(template, grid, rng)
        case = f"sub-{index:03d}"
        files = {kind: case_dir / f"{case}_{kind}.nii.gz" for kind in ("t1", "t2", "labels")}
        for kind, path in files.items():
            write_volume(subject[kind], grid, path)
        split = "train" if index < args.train else "test"
        rows.append({"case": case, "split": split, "image": f"cases/{files['t1'].name}",
                     "labels": f"cases/{files['labels'].name}", "t2": f"cases/{files['t2'].name}"})
        print(f"{case} ({split})", flush=True)
    manifest = args.out / "manifest.csv"
    common.write_csv(manifest, rows)
    print(f"wrote {len(rows)} cases and {manifest}")


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
