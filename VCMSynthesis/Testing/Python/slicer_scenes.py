"""Small real MRML scenes for the tests (slicer-core): reference volumes with awkward geometry
and segmentations drawn on them. A few thousand voxels each, so tests stay fast."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

SHAPE_KJI = (10, 14, 12)  # slices, rows, columns


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    cosine, sine = np.cos(angle), np.sin(angle)
    first, second = [index for index in range(3) if index != axis]
    rotation = np.eye(3)
    rotation[first, first] = rotation[second, second] = cosine
    rotation[first, second], rotation[second, first] = -sine, sine
    return rotation


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


# IJK-to-RAS matrices the result must reproduce exactly.
GEOMETRIES = {
    "oblique": _affine(_rotation(2, 30) @ _rotation(0, 20) * 1.5, (-12.25, 30.5, 7.125)),
    "sheared": _affine(np.array([[1.4, 0.35, 0.0], [0.0, 1.6, 0.0], [0.2, 0.0, 2.2]]), (5.0, -8.0, 11.0)),
    "anisotropic": _affine(np.diag([-0.8, -1.1, 6.0]), (40.0, 25.0, -60.0)),  # 6 mm slices
}


def matrix_of(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def image_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData from a (k, j, i) array (Slicer's array order)."""
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def array_of(node) -> np.ndarray:
    image = node.GetImageData()
    columns, rows, slices = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(slices, rows, columns)


def new_scene():
    return slicer.vtkMRMLScene()


def add_volume(scene, affine: np.ndarray, array: np.ndarray | None = None, name: str = "reference"):
    array = np.random.default_rng(0).random(SHAPE_KJI).astype(np.float32) if array is None else array
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    node.SetAndObserveImageData(image_from_array(array))
    node.SetIJKToRASMatrix(vtk_matrix(affine))
    node.CreateDefaultDisplayNodes()
    return node


def blob_labelmap() -> np.ndarray:
    """Two nested boxes (values 1 and 2) and a small separate one (value 3)."""
    labelmap = np.zeros(SHAPE_KJI, dtype=np.uint8)
    labelmap[2:8, 3:11, 2:10] = 1
    labelmap[4:6, 5:9, 4:8] = 2
    labelmap[1:3, 1:3, 9:11] = 3
    return labelmap


def add_segmentation(
    scene, reference, labelmap: np.ndarray, names: dict[int, str], name: str = "condition"
):
    """A segmentation node whose segments are the labelmap's values, drawn on `reference`."""
    segmentation = slicer.vtkMRMLSegmentationNode()
    segmentation.SetName(name)
    scene.AddNode(segmentation)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    labelmap_node = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap_node)
    labelmap_node.SetAndObserveImageData(image_from_array(labelmap))
    labelmap_node.SetIJKToRASMatrix(vtk_matrix(matrix_of(reference)))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation)
    scene.RemoveNode(labelmap_node)
    segments = segmentation.GetSegmentation()
    for index in range(segments.GetNumberOfSegments()):
        segments.GetNthSegment(index).SetName(names[index + 1])
    return segmentation


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def add_parameter_node(scene, module: str = "VCMSynthesis"):
    """The module's parameter node as Slicer's `ScriptedLoadableModuleLogic.getParameterNode` makes it."""
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetSingletonTag(module)
    node.SetAttribute("ModuleName", module)
    scene.AddNode(node)
    return node


def parameter_node_of(scene, module: str = "VCMSynthesis"):
    nodes = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
    found = [node for node in nodes if node.IsA("vtkMRMLScriptedModuleNode")
             and node.GetAttribute("ModuleName") == module]
    assert len(found) == 1, found
    return found[0]


def save_and_reload(scene, folder, kind: str):
    """Save `scene` with slicer-core's storage (a `.mrb` bundle, or a `.mrml` file beside the data
    files) and load it into a new scene that already holds nodes, so every node gets a new ID."""
    folder.mkdir(parents=True, exist_ok=True)
    nodes = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
    storable = [node for node in nodes if node.IsA("vtkMRMLStorableNode") and node.GetScene() is scene]
    if kind == "mrb":
        for node in storable:
            if node.GetStorageNode() is None:
                node.AddDefaultStorageNode()
        assert scene.WriteToMRB(str(folder / "scene.mrb"))
    else:
        for index, node in enumerate(storable):
            if node.GetStorageNode() is None:
                node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            storage.SetFileName(str(folder / f"node{index}.{storage.GetDefaultWriteFileExtension()}"))
            assert storage.WriteData(node), node.GetName()
        scene.SetURL(str(folder / "scene.mrml"))
        assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(folder / "cache"))
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    reloaded.SetDataIOManager(io_manager)
    for node_class in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLScriptedModuleNode"):
        for _ in range(3):  # the saved IDs are taken: loading gives the nodes new ones
            reloaded.AddNewNodeByClass(node_class)
    if kind == "mrb":
        assert reloaded.ReadFromMRB(str(folder / "scene.mrb"), False)
    else:
        reloaded.SetURL(str(folder / "scene.mrml"))
        assert reloaded.Import()
    return reloaded
