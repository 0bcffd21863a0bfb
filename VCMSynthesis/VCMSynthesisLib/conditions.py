"""Segmentations and modalities -> condition channels on the model grid, and results back.

This is the one place that turns user volumes into what the networks see:

- a segmentation becomes one one-hot channel per row of the model's label table (a Slicer
  `.seg.nrrd` segment matches a row by name, otherwise by label value; with a label map, its
  values become the labels the map gives them);
- each modality becomes one channel, scaled so that its low and high percentiles map to 0
  and 1 (as the reference VCM training did with MONAI's ScaleIntensityRangePercentiles); the
  scaling is kept so that outputs can be mapped back to input units;
- everything is resampled onto the model grid: the model's spacing and size, axis-aligned in
  its anatomical orientation, centred on the content (labelled voxels, else the foreground of
  the first modality); labels with nearest neighbour, intensities linearly;
- a result on the model grid goes back onto the reference geometry (the segmentation's, else
  the first modality's) with exactly its size, spacing, origin and direction.

Arrays handed to and from the networks are indexed [i, j, k] (the first index runs along the
orientation's first letter); SimpleITK's own arrays are [k, j, i].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.label_maps import LabelMap
from VCMSynthesisLib.model_config import Grid, Label, Modality, ModelConfig, label_of_segment
from VCMSynthesisLib.volumes import Segmentation

# Unit vector, in SimpleITK's LPS space, that an axis pointing toward each letter runs along.
_AXIS_TOWARD = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0), "I": (0.0, 0.0, -1.0),
}


@dataclass(frozen=True)
class IntensityScaling:
    """Linear map of input intensities with `low` -> 0 and `high` -> 1 (no clipping)."""

    low: float
    high: float

    @classmethod
    def from_percentiles(cls, array: np.ndarray, low_percentile: float, high_percentile: float,
                         what: str) -> IntensityScaling:
        low, high = np.percentile(array, [low_percentile, high_percentile])
        if not high > low:
            raise UserError(
                f"{what} has the same value ({low:g}) at its {low_percentile:g}th and "
                f"{high_percentile:g}th percentiles, so it cannot be normalized; give a real scan"
            )
        return cls(float(low), float(high))

    def normalize(self, array: np.ndarray) -> np.ndarray:
        return ((np.asarray(array, dtype=np.float64) - self.low) / (self.high - self.low)).astype(np.float32)

    def restore(self, array: np.ndarray) -> np.ndarray:
        """Normalized values back in input units."""
        return (np.asarray(array, dtype=np.float64) * (self.high - self.low) + self.low).astype(np.float32)


@dataclass
class Conditions:
    """Condition channels on the model grid, and the geometry to map results back onto.

    Args:
        channels: (C, *grid.size) float32, labels (one-hot, table order) then modalities.
        grid: an image holding the model grid's geometry in physical space.
        reference: an image holding the reference geometry (the output's).
        scalings: modality name -> how its intensities were normalized.
        cropped: the content extends beyond the model grid, so results cover only part of it.
        content: the labelled voxels of the reference, [k, j, i] (None without a segmentation).
    """

    channels: np.ndarray
    grid: sitk.Image
    reference: sitk.Image
    scalings: dict[str, IntensityScaling] = field(default_factory=dict)
    cropped: bool = False
    content: np.ndarray | None = None

    def to_reference(self, array: np.ndarray, *, default_value: float, labels: bool = False) -> sitk.Image:
        """A model-grid array [i, j, k] resampled onto the reference geometry (float32 unless labels)."""
        on_grid = image_from_array(np.asarray(array), self.grid)
        return resample_to_grid(on_grid, self.reference, labels=labels, default_value=default_value)

    def synthesized_to_reference(self, array: np.ndarray, config: ModelConfig) -> sitk.Image:
        """A synthesized model-grid image on the reference geometry, with a clean background.

        A model trained on skull-stripped images (`intensity.background` set) draws faint haze
        outside the anatomy, and the model grid's edge would show as a rectangle on the
        reference: there the image is set to the background value, exactly, beyond a soft edge
        of about one reference voxel around the labelled voxels.
        """
        background = config.intensity_range[0] if config.intensity_background is None \
            else config.intensity_background
        image = self.to_reference(array, default_value=background)
        if config.intensity_background is None or self.content is None or not self.content.any():
            return image
        content = _with_geometry(self.content.astype(np.uint8), image)
        grown = sitk.Cast(sitk.BinaryDilate(content, [1, 1, 1]), sitk.sitkFloat32)
        weight = sitk.GetArrayFromImage(sitk.DiscreteGaussian(grown, variance=0.5, useImageSpacing=False))
        weight *= sitk.GetArrayViewFromImage(sitk.BinaryDilate(content, [2, 2, 2]))  # nothing beyond 2 voxels
        values = sitk.GetArrayFromImage(image)
        cleaned = sitk.GetImageFromArray((background + weight * (values - background)).astype(np.float32))
        cleaned.CopyInformation(image)
        return cleaned


def grid_direction(orientation: str) -> tuple[float, ...]:
    """SimpleITK direction matrix (row-major) of axes pointing toward the letters of `orientation`."""
    columns = np.array([_AXIS_TOWARD[letter] for letter in orientation.upper()]).T
    return tuple(float(v) for v in columns.ravel())


def model_grid_for(reference: sitk.Image, grid: Grid, content: np.ndarray | None = None) -> sitk.Image:
    """An image with the model grid's geometry, centred on the content of `reference`.

    The grid's centre is the centre of the content's bounding box, moved by under half a
    reference voxel where that puts grid voxel centres on reference voxel centres.

    Args:
        reference: the image the content is in.
        grid: the model's spacing, size and orientation.
        content: boolean mask in SimpleITK order [k, j, i] of `reference`; None or empty centres
            the grid on the whole reference.
    """
    if content is not None and content.any():
        ks, js, is_ = (np.flatnonzero(content.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        low = np.array([is_[0], js[0], ks[0]], dtype=np.float64)
        high = np.array([is_[-1], js[-1], ks[-1]], dtype=np.float64)
    else:
        low = np.zeros(3)
        high = np.array(reference.GetSize(), dtype=np.float64) - 1
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(((low + high) / 2).tolist()))
    direction = np.array(grid_direction(grid.orientation)).reshape(3, 3)
    half_extent = np.array(grid.spacing) * (np.array(grid.size) - 1) / 2
    origin = centre - direction @ half_extent
    # Along reference axes parallel to a grid axis, move the grid by under half a reference
    # voxel so that its voxel centres fall on the reference's (exact round trips when the
    # spacings match, as for 1 mm scans on a 1 mm model grid).
    origin_index = np.array(reference.TransformPhysicalPointToContinuousIndex(origin.tolist()))
    reference_axes = np.array(reference.GetDirection()).reshape(3, 3)
    reference_axes = reference_axes / np.linalg.norm(reference_axes, axis=0)
    parallel = (np.abs(reference_axes.T @ direction) > 1 - 1e-9).any(axis=1)
    origin_index[parallel] = np.round(origin_index[parallel])
    image = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in grid.spacing])
    image.SetDirection(tuple(direction.ravel().tolist()))
    image.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint(origin_index.tolist()))
    return image


def resample_to_grid(image: sitk.Image, grid: sitk.Image, *, labels: bool,
                     default_value: float = 0.0) -> sitk.Image:
    """`image` resampled onto the geometry of `grid` (nearest neighbour for labels, else linear).

    The result has exactly `grid`'s size, spacing, origin and direction; intensities come out
    as float32, labels keep their pixel type.
    """
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    pixel_type = image.GetPixelID() if labels else sitk.sitkFloat32
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, float(default_value), pixel_type)


def array_from_image(image: sitk.Image) -> np.ndarray:
    """Voxels indexed [i, j, k] (a copy)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def image_from_array(array: np.ndarray, geometry: sitk.Image) -> sitk.Image:
    """An image of `array` [i, j, k] with the geometry of `geometry`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.CopyInformation(geometry)
    return image


def check_overlap(image: sitk.Image, reference: sitk.Image, what: str, reference_what: str) -> None:
    """Refuse a condition whose physical extent does not meet the reference's."""
    low_a, high_a = _physical_bounds(image)
    low_b, high_b = _physical_bounds(reference)
    gap = np.maximum(np.maximum(low_a - high_b, low_b - high_a), 0.0)
    if gap.any():
        raise UserError(
            f"{what} does not overlap {reference_what} (they lie {np.linalg.norm(gap):.1f} mm apart); "
            "give conditions of the same subject, in the same space"
        )


def label_values_to_table(segmentation: Segmentation, labels: tuple[Label, ...],
                          model_name: str, label_map: LabelMap | None = None) -> np.ndarray:
    """The segmentation's voxels as label-table values (SimpleITK order), checked against the table.

    0 is always allowed and means unlabelled. With a `label_map`, every value (a `.seg.nrrd`
    segment: the value it stands for, `LabelMap.segment_values`) becomes the label the map gives it.
    Raises a UserError for an empty segmentation or a value (segment) that the table, or the
    map, does not have.
    """
    array = sitk.GetArrayViewFromImage(segmentation.labelmap)
    values, inverse = np.unique(array, return_inverse=True)
    if not (values != 0).any():
        raise UserError(f"segmentation '{segmentation.path}' is empty (every voxel is 0); "
                        "label at least one structure")
    if label_map is not None:
        lookup = _mapped_values(segmentation, values, label_map, labels, model_name)
        return lookup[inverse].reshape(array.shape)
    table_values = {label.value for label in labels}
    allowed = ", ".join(f"{label.value} ({label.name})" for label in labels)
    lookup = np.zeros(len(values), dtype=np.int32)
    for index, value in enumerate(values.tolist()):
        if value == 0:
            continue
        segment = segmentation.segments.get(value)
        if segment is not None:
            # The worker's command line has no --label: a value that is a label maps (by_value).
            mapped = label_of_segment(labels, segment.name, segment.label_value, by_value=True)
            if mapped is None:
                raise UserError(
                    f"segment '{segment.name}' (label value {segment.label_value}) of "
                    f"'{segmentation.path}' matches no label of model '{model_name}'; name or "
                    f"number segments as its labels: {allowed}"
                )
        elif value in table_values:
            mapped = value
        else:
            raise UserError(
                f"label value {value} in '{segmentation.path}' is not in model '{model_name}''s label "
                f"table; relabel the segmentation with its values: {allowed}"
            )
        lookup[index] = mapped
    return lookup[inverse].reshape(array.shape)


def _mapped_values(segmentation: Segmentation, values: np.ndarray, label_map: LabelMap,
                   labels: tuple[Label, ...], model_name: str) -> np.ndarray:
    """The table value of each of `values` (the segmentation's distinct values) under `label_map`."""
    to_table = label_map.resolve(labels, model_name)
    segments = {value: (segment.name, segment.label_value) for value, segment in segmentation.segments.items()
                if value in values}
    of_segment = label_map.segment_values(segments, str(segmentation.path))
    sources = [of_segment.get(value, value) for value in values.tolist()]
    unlisted = sorted({source for source in sources if source != 0 and source not in to_table})
    if unlisted and label_map.unmapped != "background":
        raise UserError(
            f"label value(s) {', '.join(map(str, unlisted))} of '{segmentation.path}' are not in label map "
            f"'{label_map.source}'; add them to a map file (--label-map FILE.json) or pass --unmapped "
            "background to leave them out"
        )
    lookup = np.array([to_table.get(source, 0) if source != 0 else 0 for source in sources], dtype=np.int32)
    if not lookup.any():
        raise UserError(f"label map '{label_map.source}' leaves no voxel of '{segmentation.path}' labelled; "
                        "check that the map is for this segmentation")
    return lookup


def assemble_conditions(config: ModelConfig, segmentation: Segmentation | None,
                        modalities: dict[str, sitk.Image], modality_paths: dict[str, str] | None = None,
                        label_map: LabelMap | None = None) -> Conditions:
    """Condition channels of `config` from a segmentation and named modality volumes.

    Args:
        config: the model's config (label table, modalities, grid).
        segmentation: the labelmap, required when the model has a label table.
        modalities: modality name (as in the model's config, case-insensitive) -> volume.
        modality_paths: modality name -> file, to name files in error messages.
        label_map: turns the segmentation's own values into the model's labels (`label_maps`).

    Raises:
        UserError: a missing, unknown or non-overlapping condition, a label outside the table,
            an empty segmentation, a constant modality.
    """
    modality_paths = modality_paths or {}
    given = _match_modalities(config, modalities)
    if config.labels and segmentation is None:
        raise UserError(f"model '{config.name}' needs a segmentation (labels: "
                        f"{', '.join(label.name for label in config.labels)}); give one")
    if segmentation is not None and not config.labels:
        raise UserError(f"model '{config.name}' takes no segmentation; leave it out")
    if segmentation is None and not given:
        raise UserError(f"model '{config.name}' needs at least one condition volume")

    if segmentation is not None:
        reference = segmentation.labelmap
        reference_what = f"segmentation '{segmentation.path}'"
    else:
        first = next(iter(modalities))
        reference = modalities[first]
        reference_what = f"{first} '{modality_paths.get(first, first)}'"
    for name, image in modalities.items():
        if image is not reference:
            check_overlap(image, reference, f"{name} '{modality_paths.get(name, name)}'", reference_what)

    scalings = {}
    normalized = {}
    for modality, name in given:
        image = modalities[name]
        scaling = _scaling_for(modality, sitk.GetArrayViewFromImage(image),
                               f"{name} '{modality_paths.get(name, name)}'")
        scalings[modality.name] = scaling
        normalized_array = scaling.normalize(sitk.GetArrayViewFromImage(image))
        normalized[modality.name] = _with_geometry(normalized_array, image)

    if segmentation is not None:
        table_array = label_values_to_table(segmentation, config.labels, config.name, label_map)
        content = table_array != 0
        labelmap = _with_geometry(table_array, reference)
    else:
        content = sitk.GetArrayViewFromImage(normalized[given[0][0].name]) > 0
    grid = model_grid_for(reference, config.grid, content)

    channels = []
    if segmentation is not None:
        on_grid = array_from_image(resample_to_grid(labelmap, grid, labels=True))
        channels += [(on_grid == label.value).astype(np.float32) for label in config.labels]
    for modality, _ in given:
        on_grid = resample_to_grid(normalized[modality.name], grid, labels=False)
        channels.append(array_from_image(on_grid))
    return Conditions(channels=np.stack(channels), grid=grid, reference=reference, scalings=scalings,
                      cropped=_is_cropped(content, reference, grid),
                      content=np.asarray(content) if segmentation is not None else None)


def _match_modalities(config: ModelConfig, modalities: dict[str, sitk.Image]) -> list[tuple[Modality, str]]:
    """(model modality, given name) in model order; errors for missing or unknown modalities."""
    wanted = {modality.name.casefold(): modality for modality in config.modalities}
    takes = ", ".join(wanted_modality.name for wanted_modality in config.modalities) or "none"
    for name in modalities:
        if name.casefold() not in wanted:
            raise UserError(f"model '{config.name}' takes no modality '{name}' (it takes: {takes}); "
                            "leave it out or pick another model")
    given = {name.casefold(): name for name in modalities}
    missing = [modality.name for modality in config.modalities if modality.name.casefold() not in given]
    if missing:
        raise UserError(f"model '{config.name}' needs modality {', '.join(missing)}; give "
                        + " ".join(f"--modality {name}=FILE" for name in missing))
    return [(modality, given[modality.name.casefold()]) for modality in config.modalities]


def _scaling_for(modality: Modality, array: np.ndarray, what: str) -> IntensityScaling:
    normalization = modality.normalization
    if normalization.get("kind") != "percentile":
        raise UserError(f"modality {modality.name}: normalization kind {normalization.get('kind')!r} is "
                        "not supported (use \"percentile\"); fix the model's config.json")
    return IntensityScaling.from_percentiles(array, float(normalization.get("low", 0.0)),
                                             float(normalization.get("high", 99.5)), what)


def _with_geometry(array: np.ndarray, geometry: sitk.Image) -> sitk.Image:
    """An image of a SimpleITK-order array [k, j, i] with the geometry of `geometry`."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(geometry)
    return image


def _physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical box around the image's voxels (outer voxel edges)."""
    last = np.array(image.GetSize(), dtype=np.float64) - 0.5
    corners = [image.TransformContinuousIndexToPhysicalPoint(np.where(bits, last, -0.5).tolist())
               for bits in np.ndindex(2, 2, 2)]
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def _is_cropped(content: np.ndarray, reference: sitk.Image, grid: sitk.Image) -> bool:
    """Whether some content voxel falls outside the model grid."""
    if not content.any():
        return False
    inside = resample_to_grid(_with_geometry(np.ones(grid.GetSize()[::-1], np.uint8), grid), reference,
                              labels=True, default_value=0)
    return bool((content & (sitk.GetArrayViewFromImage(inside) == 0)).any())
