"""Test volumes with awkward geometry: oblique, sheared, anisotropic; NRRD (LPS or RAS) and NIfTI.

Files are written by pynrrd (so a NRRD can state its space as RAS, as some tools do) or by
SimpleITK (NIfTI, which stores RAS), never by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import SimpleITK as sitk


def rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rx @ ry @ rz


def _unit_columns(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=0)


# name -> (spacing, origin, direction as a 3x3 matrix whose columns are the axes, in LPS)
GEOMETRIES = {
    "axis_aligned": ((1.0, 1.0, 1.0), (-20.0, 15.0, -10.0), np.eye(3)),
    "anisotropic": ((0.6, 0.9, 3.3), (12.5, -7.25, 30.0), np.diag([-1.0, -1.0, 1.0])),
    "oblique": ((0.8, 1.1, 2.2), (10.123, -20.7, 33.3), rotation(0.3, -0.2, 0.7)),
    "sheared": ((0.9, 1.2, 1.7), (-5.5, 8.25, 3.0),
                _unit_columns(rotation(-0.4, 0.25, 0.1) @ np.array([[1, 0.2, 0], [0, 1, 0.1], [0, 0, 1]]))),
}

FORMATS = ("nrrd-lps", "nrrd-ras", "nifti")


def make_image(array_kji: np.ndarray, geometry: str) -> sitk.Image:
    """An image of a SimpleITK-order array [k, j, i] with one of `GEOMETRIES`."""
    spacing, origin, direction = GEOMETRIES[geometry]
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    return image


def write_case(image: sitk.Image, folder: Path, name: str, file_format: str) -> Path:
    """Write `image` as `file_format` (one of `FORMATS`) and return the path."""
    if file_format == "nifti":
        path = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(path))
        return path
    path = folder / f"{name}.nrrd"
    direction = np.array(image.GetDirection()).reshape(3, 3)
    columns = direction * np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    space = "left-posterior-superior"
    if file_format == "nrrd-ras":
        flip = np.array([-1.0, -1.0, 1.0])
        columns, origin, space = columns * flip[:, None], origin * flip, "right-anterior-superior"
    header = {"space": space, "space directions": columns.T, "space origin": origin,
              "kinds": ["domain"] * 3, "encoding": "gzip"}
    nrrd.write(str(path), sitk.GetArrayFromImage(image).transpose(2, 1, 0), header, index_order="F")
    return path


def blob(shape_kji: tuple[int, int, int], centre_kji, radii_kji) -> np.ndarray:
    """Boolean ellipsoid in an array of `shape_kji`."""
    grids = np.indices(shape_kji, dtype=np.float64)
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_kji, radii_kji, strict=True))
    return distance <= 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def geometry_of(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()
