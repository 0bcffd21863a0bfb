"""Slicer scene glue: MRML nodes to condition files, and the worker's result back to a node.

Only MRML and module-logic classes are used (no `slicer.app`, no Qt), so this runs in Slicer,
in the batch script under plain Python with the `slicer-core` wheel, and in pytest.
Geometry is carried by the nodes' IJK-to-RAS matrices and the files' NRRD headers, never
re-derived, so oblique, sheared and anisotropic references come back exactly.
Nothing here adds a node to the scene except `load_result` on success.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path

import slicer
import vtk

from VCMSynthesisLib import jobs, label_maps
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.files import provenance_sidecar
from VCMSynthesisLib.model_config import SAMPLING_SCHEDULERS, Label, label_of_segment


def _require_untransformed(node, role: str) -> None:
    if node.GetParentTransformNode() is not None:
        raise UserError(
            f"the {role} '{node.GetName()}' is under a transform; harden the transform "
            "(Data module, right-click > Harden transform) and try again"
        )


def default_label_mapping(
    segment_names: Mapping[str, str],
    label_table: Iterable[Mapping],
    label_values: Mapping[str, int] | None = None,
    by_value: bool = False,
) -> dict[str, int]:
    """Segment ID -> model label value of the segments `model_config.label_of_segment` matches
    (by name; by label value for Slicer's "Label_N" names, or for every segment with `by_value`).

    Other segments are left out: the panel shows them as *(not used)* for the user to map; the
    batch script refuses them unless `--label` or `--map-by-value` says what they are.
    """
    labels = tuple(Label(int(entry["value"]), str(entry["name"])) for entry in label_table)
    mapping = {}
    for segment_id, name in segment_names.items():
        value = label_of_segment(labels, name, (label_values or {}).get(segment_id), by_value)
        if value is not None:
            mapping[segment_id] = value
    return mapping


#: The panel's *(not used)*: a segment the user left out of the label condition.
NOT_USED = -1
# On the module's parameter node (a vtkMRMLScriptedModuleNode, saved with the scene): the panel's
# segment -> label choices as JSON, the segmentation they belong to, and one volume reference per
# modality channel. Node references, not IDs: a reloaded scene gives its nodes new IDs.
LABEL_CHOICES_PARAMETER = "segmentLabels"
LABEL_CHOICES_SEGMENTATION_ROLE = "segmentLabelsSegmentation"
MODALITY_ROLE_PREFIX = "modalityVolume."


def panel_label_mapping(
    segment_names: Mapping[str, str],
    label_table: Iterable[Mapping],
    label_values: Mapping[str, int] | None,
    chosen: Mapping[str, int],
) -> dict[str, int]:
    """Segment ID -> what the panel shows for it: the user's earlier choice (`chosen`, e.g.
    `saved_label_mapping`; `NOT_USED` included) where the model still has that label, else the
    `default_label_mapping` match, else a FreeSurfer segment name a label-map preset knows
    (`label_maps.preset_suggestions`), else `NOT_USED` until the user sets it."""
    label_table = list(label_table)
    valid = {NOT_USED} | {int(entry["value"]) for entry in label_table}
    suggested = {**label_maps.preset_suggestions(segment_names, label_table),
                 **default_label_mapping(segment_names, label_table, label_values)}
    return {segment_id: chosen[segment_id] if chosen.get(segment_id) in valid
            else suggested.get(segment_id, NOT_USED) for segment_id in segment_names}


def used_labels(mapping: Mapping[str, int]) -> dict[str, int]:
    """The segments of a panel mapping that feed the label condition (all but *(not used)*)."""
    return {segment_id: value for segment_id, value in mapping.items() if value != NOT_USED}


def save_label_mapping(parameter_node, segmentation_node, mapping: Mapping[str, int]) -> None:
    """Keep the panel's segment -> label choices (`NOT_USED` too) on the parameter node, for
    `segmentation_node`: saved with the scene, they come back when it is loaded again."""
    was_modifying = parameter_node.StartModify()
    parameter_node.SetNodeReferenceID(LABEL_CHOICES_SEGMENTATION_ROLE, segmentation_node.GetID())
    parameter_node.SetParameter(LABEL_CHOICES_PARAMETER,
                                json.dumps({str(key): int(value) for key, value in mapping.items()}))
    parameter_node.EndModify(was_modifying)


def saved_label_mapping(parameter_node, segmentation_node) -> dict[str, int]:
    """The choices `save_label_mapping` kept for `segmentation_node`; empty for another
    segmentation (its segment IDs may repeat the other's) or an unreadable parameter."""
    saved_for = parameter_node.GetNodeReference(LABEL_CHOICES_SEGMENTATION_ROLE)
    if segmentation_node is None or saved_for is None or saved_for.GetID() != segmentation_node.GetID():
        return {}
    try:
        mapping = json.loads(parameter_node.GetParameter(LABEL_CHOICES_PARAMETER) or "{}")
        return {str(key): int(value) for key, value in mapping.items()}
    except (ValueError, TypeError, AttributeError):  # a scene edited by hand: the defaults again
        return {}


def _modality_role(name: str) -> str:
    # MRML writes references as "role:id;": a modality name may hold neither ':' nor ';' there.
    return MODALITY_ROLE_PREFIX + urllib.parse.quote(name, safe="")


def save_modality_volume(parameter_node, name: str, volume_node) -> None:
    """Remember which volume feeds the modality channel `name` (None: none)."""
    parameter_node.SetNodeReferenceID(_modality_role(name), volume_node.GetID() if volume_node else None)


def saved_modality_volumes(parameter_node, names: Iterable[str]) -> dict[str, object]:
    """Modality channel name -> the volume node remembered for it, for those of `names` that have one."""
    nodes = {name: parameter_node.GetNodeReference(_modality_role(name)) for name in names}
    return {name: node for name, node in nodes.items() if node is not None}


def changed_sampling(config, **values) -> dict:
    """The panel's sampling settings (`steps=`, `strength=`, `scheduler=`) to pass to a job:
    None where a value is the model's default (`config.sampling_<name>`), so that the worker
    uses the model's tuned settings and only what the user changed overrides them. With no
    config (a model not downloaded yet) the values pass as they are."""
    if config is None:
        return dict(values)
    return {name: None if value == getattr(config, f"sampling_{name}") else value
            for name, value in values.items()}


def sampling_summary(config) -> str:
    """One line naming a model's default sampling, shown under its description."""
    return (f"Defaults: {SAMPLING_SCHEDULERS[config.sampling_scheduler]}, {config.sampling_steps} steps, "
            f"strength {config.sampling_strength:g}.")


def segment_label_values(segmentation_node) -> dict[str, int]:
    """Segment ID -> the segment's label value in its labelmap layer."""
    segmentation = segmentation_node.GetSegmentation()
    return {
        segmentation.GetNthSegmentID(index): segmentation.GetNthSegment(index).GetLabelValue()
        for index in range(segmentation.GetNumberOfSegments())
    }


def model_label_table(model: str) -> list[dict]:
    """[{"value", "name"}] of a model's labels, for `default_label_mapping` (model name or folder)."""
    from VCMSynthesisLib import registry
    from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig

    config = ModelConfig.load(Path(registry.resolve_model(model)) / CONFIG_NAME)
    return [{"value": label.value, "name": label.name} for label in config.labels]


def segment_names(segmentation_node) -> dict[str, str]:
    """Segment ID -> segment name, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    return {
        segmentation.GetNthSegmentID(index): segmentation.GetNthSegment(index).GetName()
        for index in range(segmentation.GetNumberOfSegments())
    }


def _write_volume(image_data, ijk_to_ras: vtk.vtkMatrix4x4, path: Path, labelmap: bool) -> None:
    """Write image data with an IJK-to-RAS matrix through a node that never enters a scene."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetAndObserveImageData(image_data)
    node.SetIJKToRASMatrix(ijk_to_ras)
    _write_node(node, path)


def _write_node(node, path: Path) -> None:
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # job-folder files live for one run: speed over size
    if not storage.WriteData(node):
        raise UserError(f"cannot write '{path}'; check that the folder is writable and has free space")


def export_segmentation(
    segmentation_node,
    label_of_segment: Mapping[str, int],
    path: str | Path,
    reference_volume_node=None,
) -> Path:
    """Write the mapped segments as one labelmap NRRD on the reference geometry.

    Args:
        segmentation_node: the input `vtkMRMLSegmentationNode`.
        label_of_segment: segment ID -> model label value; later segments win where they overlap.
        path: the `.nrrd` file to write (in the job folder).
        reference_volume_node: the volume whose grid the labelmap (and so the result) takes;
            None uses the segmentation's own reference geometry.
    """
    path = Path(path)
    _require_untransformed(segmentation_node, "segmentation")
    if reference_volume_node is not None:
        _require_untransformed(reference_volume_node, "reference volume")
        if reference_volume_node.GetImageData() is None:
            raise UserError(f"the reference volume '{reference_volume_node.GetName()}' has no image data")
    known = set(segment_names(segmentation_node))
    unknown = [segment_id for segment_id in label_of_segment if segment_id not in known]
    if unknown:
        raise UserError(f"segment(s) {', '.join(unknown)} are not in '{segmentation_node.GetName()}'")
    if not label_of_segment:
        raise UserError(
            "no segment is mapped to a model label; map at least one segment to a label (or name "
            "the segments like the model's labels) and try again"
        )
    if reference_volume_node is None:
        reference_volume_node = reference_geometry_volume(segmentation_node)
    segment_ids = vtk.vtkStringArray()
    label_values = vtk.vtkIntArray()
    for segment_id, value in label_of_segment.items():
        segment_ids.InsertNextValue(segment_id)
        label_values.InsertNextValue(int(value))
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, reference_volume_node, segment_ids,
        slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged, label_values
    )
    if merged.GetPointData().GetScalars() is None:
        raise UserError(
            f"the segments of '{segmentation_node.GetName()}' could not be turned into a labelmap"
        )
    ijk_to_ras = vtk.vtkMatrix4x4()
    merged.GetImageToWorldMatrix(ijk_to_ras)
    # The merged image may start at a non-zero extent: move that offset into the origin.
    extent = merged.GetExtent()
    start = [extent[0], extent[2], extent[4], 1.0]
    origin = ijk_to_ras.MultiplyPoint(start)
    for row in range(3):
        ijk_to_ras.SetElement(row, 3, origin[row])
    image = vtk.vtkImageData()
    image.DeepCopy(merged)
    image.SetExtent(0, extent[1] - extent[0], 0, extent[3] - extent[2], 0, extent[5] - extent[4])
    image.SetOrigin(0.0, 0.0, 0.0)
    image.SetSpacing(1.0, 1.0, 1.0)
    _write_volume(image, ijk_to_ras, path, labelmap=True)
    return path


def reference_geometry_volume(segmentation_node):
    """An unattached volume node on the segmentation's reference geometry (full extent).

    A `.seg.nrrd` stores its labelmap cropped to the segments but keeps the grid of the image it
    was drawn on; that grid is where the result belongs.
    """
    geometry = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    ijk_to_ras = vtk.vtkMatrix4x4()
    extent = [0, -1, 0, -1, 0, -1]
    converter = slicer.vtkSegmentationConverter
    if not geometry or not converter.DeserializeImageGeometry(geometry, ijk_to_ras, extent):
        raise UserError(
            f"the segmentation '{segmentation_node.GetName()}' has no reference geometry; "
            "choose a reference volume"
        )
    origin = ijk_to_ras.MultiplyPoint([extent[0], extent[2], extent[4], 1.0])
    for row in range(3):
        ijk_to_ras.SetElement(row, 3, origin[row])
    image = vtk.vtkImageData()
    image.SetDimensions(extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName(segmentation_node.GetName() + " reference")
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(ijk_to_ras)
    return volume


def export_volume(volume_node, path: str | Path, role: str = "volume") -> Path:
    """Write a scalar volume node to `path` with its own geometry (the worker resamples it)."""
    path = Path(path)
    _require_untransformed(volume_node, role)
    if volume_node.GetImageData() is None:
        raise UserError(
            f"the {role} '{volume_node.GetName()}' has no image data; load or pick another volume"
        )
    _write_node(volume_node, path)
    return path


def write_synthesis_job(
    folder: str | Path,
    segmentation_node,
    label_of_segment: Mapping[str, int],
    *,
    model: str,
    reference_volume_node=None,
    modality_nodes: Mapping[str, object] | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int | None = None,
    strength: float | None = None,
    device: str = "auto",
    output: str | Path | None = None,
    preview_every: int | None = None,
    samples: int | None = None,
) -> jobs.Job:
    """Export the conditions into `folder` and describe the `synthesize` run on them.

    The result is written on the labelmap's grid, i.e. the reference geometry; without a
    segmentation (translation models) on the first modality's grid. `output` defaults to
    `result.nrrd` in the job folder (the panel loads it from there).
    """
    folder = Path(folder)
    if segmentation_node is None and not modality_nodes:
        raise UserError("no condition given; pick a segmentation or a modality volume")
    if segmentation_node is None and reference_volume_node is not None:
        raise UserError(
            "a reference geometry needs a segmentation; without one the result takes the first "
            "modality's grid (set the reference to none)"
        )
    segmentation_path = None
    if segmentation_node is not None:
        segmentation_path = export_segmentation(
            segmentation_node, label_of_segment, folder / "segmentation.nrrd", reference_volume_node
        )
    modality_paths = {
        name: export_volume(node, folder / f"modality-{index}.nrrd", role=f"{name} volume")
        for index, (name, node) in enumerate((modality_nodes or {}).items())
    }
    return jobs.synthesis_job(
        folder, model=model, segmentation=segmentation_path, modalities=modality_paths,
        output=output, steps=steps, scheduler=scheduler, seed=seed, strength=strength, device=device,
        preview_every=preview_every, samples=samples,
    )


def write_superres_job(folder: str | Path, volume_node, **options) -> jobs.Job:
    """Export a thick-slice volume into `folder` and describe the `superres` run on it."""
    folder = Path(folder)
    input_path = export_volume(volume_node, folder / "thick-slices.nrrd", role="thick-slice volume")
    return jobs.superres_job(folder, input_path=input_path, **options)


def _register_segmentation_converters() -> None:
    """The labelmap <-> surface rules Slicer registers at start-up; the slicer-core wheel does not,
    and without them copying a segmentation cannot construct its labelmaps."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def remember_segmentation(segmentation_node):
    """An unattached copy of the segmentation as it is now: the "before" of an edit.

    The panel takes it when *Edit the loaded scan* starts, so the user edits one segmentation and
    never handles two; the copy keeps the segment IDs, so the same label mapping applies to it.
    """
    _register_segmentation_converters()
    copy = slicer.vtkMRMLSegmentationNode()
    copy.SetName(f"{segmentation_node.GetName()} before the edit")
    copy.GetSegmentation().DeepCopy(segmentation_node.GetSegmentation())
    return copy


def write_edit_job(
    folder: str | Path,
    scan_node,
    segmentation_node,
    original_node,
    label_of_segment: Mapping[str, int],
    *,
    model: str,
    **options,
) -> jobs.Job:
    """Export the scan and the segmentation before and after the edit (both on the scan's grid) into
    `folder`, and describe the `edit` run on them (`options` as `jobs.edit_job` takes them).

    Segments added during the edit are not in the copy taken before it; they count as unlabelled
    there, so all their voxels are edited.
    """
    folder = Path(folder)
    scan = export_volume(scan_node, folder / "scan.nrrd", role="scan")
    edited = export_segmentation(segmentation_node, label_of_segment, folder / "edited.nrrd", scan_node)
    existing = set(segment_names(original_node))
    before = {segment_id: value for segment_id, value in label_of_segment.items() if segment_id in existing}
    if not before:
        raise UserError("none of the mapped segments existed before the edit; map a segment of the "
                        "original segmentation to a model label")
    original = export_segmentation(original_node, before, folder / "original.nrrd", scan_node)
    return jobs.edit_job(folder, model=model, image=scan, segmentation=edited, original_segmentation=original,
                         **options)


class EditSession:
    """The panel's *Edit the loaded scan* mode: a scan, its segmentation, and that segmentation as
    it was when editing started (`remember_segmentation`), so that *Regenerate edited region*
    re-synthesizes exactly what the user changed since."""

    def __init__(self, scan_node, segmentation_node):
        if scan_node is None or segmentation_node is None:
            raise UserError("pick the scan and its segmentation, then start editing")
        self.scan_node = scan_node
        self.segmentation_node = segmentation_node
        self.before = remember_segmentation(segmentation_node)

    def write_job(self, folder: str | Path, label_of_segment: Mapping[str, int], **options) -> jobs.Job:
        """The `edit` job for the segmentation as it is now (`options` as `jobs.edit_job`)."""
        if self.segmentation_node.GetScene() is None or self.scan_node.GetScene() is None:
            raise UserError("the scan or the segmentation being edited was removed; start editing again")
        return write_edit_job(folder, self.scan_node, self.segmentation_node, self.before, label_of_segment,
                              **options)


def read_volume_file(path: str | Path, node=None):
    """Read a volume file into `node` (a new, unattached scalar volume node by default)."""
    path = Path(path)
    node = node if node is not None else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not path.is_file() or not storage.ReadData(node) or node.GetImageData() is None:
        raise UserError(f"cannot read the volume '{path}'; check that it exists and is NRRD or NIfTI")
    return node


def load_result(result_path: str | Path, scene, *, output_node=None, name: str = "Synthesized", next_to=None):
    """Put the worker's result into the scene with the file's exact IJK-to-RAS.

    Args:
        result_path: the worker's output file.
        scene: the `vtkMRMLScene`.
        output_node: an existing scalar volume node to update, or None for a new node.
        name: base name of a new node (made unique in the scene).
        next_to: a node whose subject-hierarchy folder (patient, study) also receives the result.

    The file is read completely before the scene is touched, so a bad file changes nothing.
    """
    return _put_in_scene(*_read_result(result_path), scene, output_node, name, next_to)


#: Prefix of the provenance fields (`worker.provenance`) copied onto result nodes as attributes.
PROVENANCE_PREFIX = "vcm_"
_MAX_HEADER_BYTES = 1 << 20


def read_provenance(path: str | Path) -> dict[str, str]:
    """The provenance fields of a result file: NRRD `vcm_*:=value` header fields, else its JSON
    sidecar (`files.provenance_sidecar`); empty if it has none. Standard library only, as the
    rest of Slicer's side."""
    path = Path(path)
    if path.name.lower().endswith(".nrrd"):
        fields = {}
        with path.open("rb") as stream:
            for line in stream.read(_MAX_HEADER_BYTES).split(b"\n")[1:]:
                if not line.strip():
                    break  # the blank line ends the header
                key, separator, value = line.decode("utf-8", "replace").partition(":=")
                if separator and key.startswith(PROVENANCE_PREFIX):
                    fields[key] = value.rstrip("\r")
        return fields
    sidecar = provenance_sidecar(path)
    if not sidecar.is_file():
        return {}
    try:
        fields = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read '{sidecar}', the provenance of '{path}': {error}; "
                        "remove it or write the result again") from None
    return {key: str(value) for key, value in fields.items() if key.startswith(PROVENANCE_PREFIX)}


def _read_result(path: str | Path):
    """A result file as a node (not yet in the scene) and its provenance fields."""
    return read_volume_file(path), read_provenance(path)


def _put_in_scene(loaded, made_with: Mapping[str, str], scene, output_node, name: str, next_to):
    """A volume read by `read_volume_file` as a new node, or into `output_node`, with its
    provenance fields as node attributes."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    loaded.GetIJKToRASMatrix(ijk_to_ras)
    if output_node is None:
        output_node = loaded
        output_node.SetName(scene.GenerateUniqueName(name))
        scene.AddNode(output_node)
        output_node.CreateDefaultDisplayNodes()
    else:
        was_modifying = output_node.StartModify()
        output_node.SetIJKToRASMatrix(ijk_to_ras)
        output_node.SetAndObserveImageData(loaded.GetImageData())
        output_node.EndModify(was_modifying)
        if output_node.GetDisplayNode() is None:
            output_node.CreateDefaultDisplayNodes()
    for key, value in made_with.items():
        output_node.SetAttribute(key, value)
    display = output_node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOn()
    if next_to is not None:
        place_next_to(output_node, next_to)
    return output_node


def apply_outcome(outcome: jobs.Outcome, scene, *, output_node=None, name: str, next_to=None):
    """The end of every run: the result into the scene on success, nothing at all otherwise.

    With several samples the spread across them comes too, as a new `<name> uncertainty` volume.
    Returns the output node, or None when the run was cancelled; raises `UserError` with the
    worker's one-line message and its log path when it failed.
    """
    if outcome.status == "cancelled":
        return None
    outcome.raise_for_status()
    # Both files are read before the scene changes: a bad one leaves it as it was.
    spread = _read_result(outcome.uncertainty) if outcome.uncertainty is not None else None
    node = _put_in_scene(*_read_result(outcome.result), scene, output_node, name, next_to)
    if spread is not None:
        _put_in_scene(*spread, scene, None, f"{name} uncertainty", next_to or node)
    return node


def show_preview(preview_path: str | Path, scene, preview_node=None, *, name: str):
    """The live preview of a running job in the scene: a "<name> (preview)" volume, created on the
    first call and updated after; `remove_preview` takes it out again when the run ends, whatever
    the outcome, so a cancelled run still leaves the scene as it was."""
    return load_result(preview_path, scene, output_node=preview_node, name=f"{name} (preview)")


def remove_preview(preview_node) -> None:
    """Take the preview volume and its display and storage nodes out of the scene."""
    if preview_node is None or preview_node.GetScene() is None:
        return
    mrml = preview_node.GetScene()
    node = preview_node
    helpers = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
    helpers += [node.GetNthStorageNode(index) for index in range(node.GetNumberOfStorageNodes())]
    mrml.RemoveNode(preview_node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            mrml.RemoveNode(helper)


def place_next_to(node, neighbour) -> None:
    """Move `node` into the subject-hierarchy folder (patient/study) that holds `neighbour`."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    neighbour_item = hierarchy.GetItemByDataNode(neighbour)
    if not neighbour_item:
        return
    parent = hierarchy.GetItemParent(neighbour_item)
    node_item = hierarchy.GetItemByDataNode(node)
    if node_item:
        hierarchy.SetItemParent(node_item, parent)
    else:  # no subject-hierarchy plugins (slicer-core) to create the item on AddNode
        hierarchy.CreateItem(parent, node)


def show_in_slice_views(volume_node) -> bool:
    """Show the volume as background in all slice views; False where there are none (headless)."""
    application = getattr(slicer, "app", None)
    if application is None or application.layoutManager() is None:
        return False
    slicer.util.setSliceViewerLayers(background=volume_node, fit=True)
    return True
