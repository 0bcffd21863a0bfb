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


def write_slicer_segmentation(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A real .seg.nrrd saved by Slicer's segmentation storage node: 3 segments on 2 layers.

    Returns the path and the two painted label arrays [k, j, i] (values 1, 2 and 5).
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    shape = (10, 12, 14)  # k, j, i
    first = np.zeros(shape, np.int16)
    first[2:6, 3:8, 4:9] = 1
    first[6:9, 5:10, 6:12] = 2
    overlapping = np.zeros(shape, np.int16)
    overlapping[3:7, 4:9, 5:10] = 5
    segmentation = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(segmentation)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for array, name in ((first, "CSF"), (overlapping, "Tumour")):
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        labelmap.SetName(name)
        scene.AddNode(labelmap)
        image = vtk.vtkImageData()
        image.SetDimensions(shape[2], shape[1], shape[0])
        image.AllocateScalars(vtk.VTK_SHORT, 1)
        image.GetPointData().GetScalars().DeepCopy(numpy_support.numpy_to_vtk(array.ravel()))
        labelmap.SetAndObserveImageData(image)
        labelmap.SetSpacing(0.8, 1.1, 2.5)
        labelmap.SetOrigin(5.0, 6.0, 7.0)
        assert logic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segments = segmentation.GetSegmentation()
    segments.GetNthSegment(0).SetName("CSF")
    segments.GetNthSegment(1).SetName("grey matter")
    segments.GetNthSegment(2).SetName("Tumour")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    path = folder / "brain.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    assert segments.GetNumberOfLayers() == 2
    return path, first, overlapping
