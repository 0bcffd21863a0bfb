"""Make the demo training data and the held-out evaluation sets from real brain templates.

Two openly licensed human brains install from the package registries: the MNI ICBM152 2009
template that nilearn ships (an average of 152 brains, with grey and white matter maps) and
Colin27 (one man scanned 27 times), which Debian's `mricron-data` ships as `ch2bet.nii.gz`.
Training uses the MNI brain only; Colin27 is held out entirely, so one evaluation set is a brain
the adapter never saw.

Training subjects are randomised the way SynthSeg randomises its label maps, so that the adapter
learns to follow labels rather than one brain: a random affine (rotations to +-15 degrees,
per-axis scale +-12 %), a coarse and a local B-spline warp, label edits (ventricles and sulci
grown or shrunk, cortex thickened or thinned; the T1 follows with the edited tissue's own
intensity), a mild intensity variation, and for most subjects the label map is resampled onto
an oblique, anisotropic "acquisition" grid (as a user's segmentation is), while the T1 stays on
the 2 mm grid. Per subject: a T1 in [0, 1], a tissue label map (0 background, 1 CSF incl.
ventricles, 2 grey matter, 3 white matter) and a SIMULATED T2-weighted-like image made from the
tissue maps (not a measured T2; only for the modality-translation demo).

Held-out sets (each a folder with its own `manifest.csv`, split `test`), under `--out`/heldout:
- `recipe`: MNI warps drawn with the first demo's mild recipe (+-5 degrees, +-4 %), 2 mm grid;
- `oblique`: MNI under strong deformation on oblique, anisotropic 2 x 2 x 2.2 mm grids;
- `colin27`: the Colin27 brain on its own 1 mm grid, mildly deformed as `recipe`;
- `colin27-oblique`: Colin27, deformed, on oblique, anisotropic grids.

    apt-get install mricron-data    # Colin27 (held out); nilearn already ships the MNI brain
    python training/prepare_demo_data.py --out training/data --train 160 --test 6
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
import SimpleITK as sitk
from nilearn.datasets import struct
from scipy import ndimage
from sklearn.mixture import GaussianMixture
from VCMSynthesisLib.cli import run_reporting_errors
from VCMSynthesisLib.errors import UserError

GRID_SIZE = (80, 96, 80)
GRID_SPACING = 2.0
COLIN27_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
# Intensities of the simulated T2-like contrast per tissue (CSF bright, grey above white).
T2_TISSUE_INTENSITY = (1.0, 0.55, 0.38)  # CSF, grey, white


@dataclass(frozen=True)
class Recipe:
    """How strongly a subject is deformed, edited and resampled."""

    rotation_deg: float
    scale: float
    coarse_warp_mm: float
    local_warp_mm: float
    edit_probability: float
    oblique_probability: float


MILD = Recipe(rotation_deg=5, scale=0.04, coarse_warp_mm=3.0, local_warp_mm=0.0, edit_probability=0.0,
              oblique_probability=0.0)
STRONG = Recipe(rotation_deg=15, scale=0.12, coarse_warp_mm=4.0, local_warp_mm=1.5, edit_probability=0.6,
                oblique_probability=0.7)


@dataclass
class Brain:
    """A 1 mm brain: T1 in [0, 1], tissue probabilities (CSF, grey, white) and the brain mask."""

    t1: sitk.Image
    tissues: list[sitk.Image]
    mask: sitk.Image


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(reference)
    return image


def load_mni152() -> Brain:
    """nilearn's skull-stripped MNI template; CSF = brain mask minus grey and white matter."""
    t1, gm, wm = (sitk.ReadImage(str(path), sitk.sitkFloat32) / 255.0 for path in
                  (struct.MNI152_FILE_PATH, struct.GM_MNI152_FILE_PATH, struct.WM_MNI152_FILE_PATH))
    mask = sitk.GetArrayFromImage(t1) > 0
    gm_array = np.clip(sitk.GetArrayFromImage(gm), 0, 1)
    wm_array = np.clip(sitk.GetArrayFromImage(wm), 0, 1)
    csf_array = np.clip(mask - gm_array - wm_array, 0, 1)
    return Brain(t1, [_like(a * mask, t1) for a in (csf_array, gm_array, wm_array)], _like(mask, t1))


def load_colin27(path: Path) -> Brain:
    """Colin27's skull-stripped T1; tissue probabilities from a 3-class Gaussian mixture on it."""
    if not path.is_file():
        raise UserError(f"Colin27 ({path}) is not installed; run `apt-get install mricron-data` "
                        f"or pass --colin27 FILE")
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    # The brain extraction leaves specks of scalp: keep the largest connected component, filled.
    components, _ = ndimage.label(array > 0)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(components == np.argmax(sizes))
    array = np.where(mask, array / np.percentile(array[mask], 99.5), 0.0).clip(0, 1)
    mixture = GaussianMixture(3, random_state=0).fit(array[mask].reshape(-1, 1))
    order = np.argsort(mixture.means_.ravel())  # CSF < grey < white in T1
    posteriors = mixture.predict_proba(array[mask].reshape(-1, 1))[:, order]
    tissues = []
    for k in range(3):
        volume = np.zeros(array.shape, np.float32)
        volume[mask] = posteriors[:, k]
        tissues.append(_like(volume, image))
    return Brain(_like(array, image), tissues, _like(mask, image))


def brain_grid(mask: sitk.Image, spacing=(GRID_SPACING,) * 3, size=GRID_SIZE,
               rotation: sitk.Transform | None = None) -> sitk.Image:
    """A grid of `size` voxels of `spacing` centred on the brain, axis-aligned or rotated."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0.5, sitk.sitkUInt8))
    centre = np.array(stats.GetCentroid(1))
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    if rotation is not None:
        direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ direction
    origin = centre - direction @ ((np.array(size) - 1) / 2 * np.array(spacing))
    grid = sitk.Image(list(size), sitk.sitkFloat32)
    grid.SetSpacing(list(spacing))
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


def random_rotation(rng: np.random.Generator, degrees: float) -> sitk.Euler3DTransform:
    return sitk.Euler3DTransform([0, 0, 0], *np.deg2rad(rng.uniform(-degrees, degrees, size=3)))


def random_deformation(brain: Brain, rng: np.random.Generator, recipe: Recipe) -> sitk.Transform:
    """An affine about the brain centre (rotation, per-axis scale), then a coarse and a local warp."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(brain.mask > 0.5, sitk.sitkUInt8))
    centre = list(stats.GetCentroid(1))
    rotation = random_rotation(rng, recipe.rotation_deg)
    scale = np.diag(rng.uniform(1 - recipe.scale, 1 + recipe.scale, size=3))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix((np.array(rotation.GetMatrix()).reshape(3, 3) @ scale).ravel().tolist())
    transforms = [affine]
    for mesh, sd in ((4, recipe.coarse_warp_mm), (8, recipe.local_warp_mm)):
        if sd > 0:
            bspline = sitk.BSplineTransformInitializer(brain.t1, [mesh] * 3)
            bspline.SetParameters(rng.normal(0.0, sd, size=len(bspline.GetParameters())).tolist())
            transforms.append(bspline)
    return sitk.CompositeTransform(transforms)


def tissue_labels(tissues: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    return np.where(mask, np.argmax(np.stack(tissues), axis=0) + 1, 0).astype(np.uint8)


EDITS = ("grow CSF", "shrink CSF", "thicken cortex", "thin cortex")


def edit_labels(labels: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """One anatomical edit of a 1 mm label map (`kind` one of EDITS, None: a random one): CSF
    (ventricles and sulci) grown or shrunk, cortex thickened or thinned, by 1-3 voxels. Voxels a
    shrinking tissue gives up go to the neighbouring tissue that grows into them."""
    kind = rng.choice(list(EDITS)) if kind is None else kind
    radius = int(rng.integers(1, 4 if kind == "grow CSF" else 3))
    grows, into = {"grow CSF": (1, (2, 3)), "shrink CSF": (2, (1,)), "thicken cortex": (2, (3,)),
                   "thin cortex": (3, (2,))}[kind]
    ball = ndimage.generate_binary_structure(3, 1)
    grown = ndimage.binary_dilation(labels == grows, ball, iterations=radius)
    edited = labels.copy()
    edited[grown & np.isin(labels, into)] = grows
    if kind == "shrink CSF":  # CSF is given up to grey matter; the brain's outline stays
        shrunk = ndimage.binary_dilation(np.isin(labels, (2, 3)), ball, iterations=radius) & (labels == 1)
        edited[shrunk] = 2
    return edited


def edited_t1(t1: np.ndarray, labels: np.ndarray, edited: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The T1 after a label edit: changed voxels take the new tissue's intensity (its median in
    this brain, with texture-like noise), blended over ~1 mm for partial volume."""
    changed = labels != edited
    if not changed.any():
        return t1
    medians = np.array([0.0] + [np.median(t1[labels == k]) for k in (1, 2, 3)])
    target = ndimage.gaussian_filter(medians[edited] + rng.normal(0, 0.02, t1.shape), 0.7)
    weight = np.clip(ndimage.gaussian_filter(changed.astype(np.float32), 0.8) * 2.0, 0, 1)
    return np.clip((1 - weight) * t1 + weight * target, 0, 1)


def smooth_field(grid: sitk.Image, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field exp(amplitude * noise), noise a cubic upsampling of 4^3 values."""
    coarse = sitk.GetImageFromArray(rng.normal(0.0, 1.0, size=(4, 4, 4)).astype(np.float32))
    coarse.SetSpacing([s * n / 4 for s, n in zip(grid.GetSpacing(), grid.GetSize(), strict=True)])
    coarse.SetOrigin(grid.GetOrigin())
    coarse.SetDirection(grid.GetDirection())
    fine = sitk.Resample(coarse, grid, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return np.exp(amplitude * sitk.GetArrayFromImage(fine))


def acquisition_grid(mask: sitk.Image, rng: np.random.Generator, spacing=None) -> sitk.Image:
    """An oblique, anisotropic grid covering the brain, as a user's scan and segmentation come."""
    if spacing is None:
        spacing = rng.uniform(1.0, 2.5, size=3)
        spacing[rng.integers(3)] = rng.uniform(2.0, 3.5)  # one thick-slice axis
    spacing = np.asarray(spacing, dtype=float)
    size = np.ceil(np.array(GRID_SIZE) * GRID_SPACING / spacing).astype(int) + 8
    return brain_grid(mask, spacing=tuple(spacing), size=tuple(int(n) for n in size),
                      rotation=random_rotation(rng, 25))


def make_subject(brain: Brain, rng: np.random.Generator, recipe: Recipe, image_grid: sitk.Image | None,
                 label_grid: sitk.Image | None) -> dict[str, sitk.Image]:
    """One subject: t1, t2 (simulated) on `image_grid` and labels on `label_grid` (None: random)."""
    t1 = sitk.GetArrayFromImage(brain.t1)
    mask = sitk.GetArrayFromImage(brain.mask) > 0.5
    labels = tissue_labels([sitk.GetArrayFromImage(t) for t in brain.tissues], mask)
    tissues = brain.tissues
    if rng.random() < recipe.edit_probability:
        edited = edit_labels(labels, rng)
        t1 = edited_t1(t1, labels, edited, rng)
        # Edited tissue maps: one-hot of the new labels, softened like the template's maps.
        tissues = [_like(ndimage.gaussian_filter((edited == k).astype(np.float32), 0.5), brain.t1)
                   for k in (1, 2, 3)]
    transform = random_deformation(brain, rng, recipe)
    if image_grid is None:
        image_grid = brain_grid(brain.mask)
    if label_grid is None:
        label_grid = acquisition_grid(brain.mask, rng) if rng.random() < recipe.oblique_probability \
            else image_grid

    def warp(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Resample(image, grid, transform, sitk.sitkLinear, 0.0))

    t1_image = _like(t1, brain.t1)
    warped_mask = warp(brain.mask, image_grid) > 0.5
    warped_t1 = warp(t1_image, image_grid) ** rng.uniform(0.9, 1.1) * smooth_field(image_grid, rng, 0.03)
    warped_t1 = warped_t1 * rng.uniform(0.95, 1.05) + warped_mask * rng.normal(0.0, 0.01, warped_t1.shape)
    on_image_grid = [np.clip(warp(t, image_grid), 0, 1) for t in tissues]
    t2 = sum(w * t for w, t in zip(T2_TISSUE_INTENSITY, on_image_grid, strict=True))
    t2 = t2 * smooth_field(image_grid, rng, 0.1)
    t2 = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_like(t2, image_grid), 0.6))
    t2 = np.abs(t2 + rng.normal(0.0, 0.02, size=t2.shape)) * 1000.0  # magnitude, scanner-like units
    label_mask = warp(brain.mask, label_grid) > 0.5
    labels_out = tissue_labels([warp(t, label_grid) for t in tissues], label_mask)
    return {"t1": _like(np.clip(warped_t1, 0, 1), image_grid), "t2": _like(t2, image_grid),
            "labels": sitk.Cast(_like(labels_out, label_grid), sitk.sitkUInt8)}


def write_volume(image: sitk.Image, path: Path) -> None:
    with common.atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)


def write_set(folder: Path, subjects, split_of) -> None:
    """Write subjects (case name -> volumes) and the folder's manifest.csv."""
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (case, volumes) in enumerate(subjects):
        files = {kind: f"cases/{case}_{kind}.nii.gz" for kind in volumes}
        for kind, name in files.items():
            write_volume(volumes[kind], folder / name)
        rows.append({"case": case, "split": split_of(index), "image": files["t1"], "labels": files["labels"],
                     "t2": files["t2"]})
        print(f"{folder.name}/{case} ({split_of(index)})", flush=True)
    common.write_csv(folder / "manifest.csv", rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("training/data"))
    parser.add_argument("--train", type=int, default=160, help="training subjects (MNI, strong recipe)")
    parser.add_argument("--test", type=int, default=6, help="cases per held-out set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colin27", type=Path, default=COLIN27_PATH, help="Colin27 T1, skull-stripped")
    parser.add_argument("--only", choices=["train", "heldout"], help="write only the training data or only "
                        "the held-out sets")
    args = parser.parse_args(argv)

    mni = load_mni152()
    fixed = brain_grid(mni.mask)
    if args.only != "heldout":
        write_set(args.out, ((f"sub-{i:03d}", make_subject(mni, np.random.default_rng([args.seed, i]), STRONG,
                                                           fixed, None)) for i in range(args.train)),
                  lambda index: "train")
    if args.only == "train":
        return
    heldout = args.out / "heldout"

    def cases(brain, recipe, name, oblique, grid=None):
        for i in range(args.test):
            rng = np.random.default_rng([args.seed, 1000 + i, len(name)])
            if grid is not None:
                image_grid = grid
            elif oblique:
                image_grid = acquisition_grid(brain.mask, rng, spacing=(2.0, 2.0, 2.2))
            else:
                image_grid = brain_grid(brain.mask)
            yield f"{name}-{i:02d}", make_subject(brain, rng, recipe, image_grid, image_grid)

    no_edit = {"edit_probability": 0.0, "oblique_probability": 0.0}
    strong = Recipe(**{**STRONG.__dict__, **no_edit})
    write_set(heldout / "recipe", cases(mni, MILD, "recipe", oblique=False), lambda index: "test")
    write_set(heldout / "oblique", cases(mni, strong, "oblique", oblique=True), lambda index: "test")
    colin = load_colin27(args.colin27)  # after the MNI sets: those need no Debian package
    colin_native = sitk.Cast(colin.mask, sitk.sitkFloat32)
    write_set(heldout / "colin27", cases(colin, MILD, "colin27", oblique=False, grid=colin_native),
              lambda index: "test")
    write_set(heldout / "colin27-oblique", cases(colin, strong, "colin27-oblique", oblique=True),
              lambda index: "test")


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors(main))
