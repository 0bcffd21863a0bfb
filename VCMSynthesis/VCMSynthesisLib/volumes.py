"""Reading and atomically writing 3D volumes (NRRD, NIfTI, MHA; Slicer `.seg.nrrd`).

Every file a user hands us goes through `read_volume` or `read_segmentation`, which check the
header before reading any voxel data, so that a wrong file fails in one line and a header that
claims a huge volume never allocates it. `write_volume_atomic` writes to a temporary name in the
output's folder and renames it into place, so a crash or a Cancel never leaves half a file.
Given the reference file, it copies the reference's geometry header verbatim (pynrrd for NRRD,
nibabel for NIfTI): SimpleITK's own writer re-derives the header from spacing and direction and
can move them by one unit in the last place, which would break voxel-for-voxel alignment.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.files import (
    AtomicWrites,
    partial_path,
    provenance_sidecar,
    remove_stale_partials,
    write_error,
)
from VCMSynthesisLib.model_config import LABEL_MAX

# Larger than any scan this tool is meant for (1024 x 1024 x 512); a header claiming more is
# either corrupt or needs cropping before synthesis.
MAX_VOXELS = 1024 * 1024 * 512

WRITABLE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
# Headers outside these ranges are corrupt (or hostile): no scan has metre-sized voxels.
MIN_SPACING_MM, MAX_SPACING_MM = 1e-4, 1e4
MAX_ORIGIN_MM = 1e7
LABEL_MIN = -LABEL_MAX - 1  # labelmaps are int32
_NRRD_GEOMETRY_KEYS = ("space", "space origin", "space units")


@dataclass(frozen=True)
class Segment:
    """A segment of a Slicer `.seg.nrrd`: its name and the label value it has in its layer."""

    name: str
    label_value: int


@dataclass
class Segmentation:
    """A labelmap and, for `.seg.nrrd` files, which segment each of its values is.

    Args:
        labelmap: scalar int32 image; 0 is background.
        segments: labelmap value -> segment metadata; empty for a plain labelmap file, whose
            values are label values as they stand.
        path: the file it was read from.
    """

    labelmap: sitk.Image
    path: Path
    segments: dict[int, Segment] = field(default_factory=dict)


def output_suffix(path: str | os.PathLike) -> str:
    """The format suffix of an output path (`.nii.gz` counts as one), or a UserError."""
    name = Path(path).name.lower()
    for suffix in WRITABLE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise UserError(
        f"cannot write '{path}': unsupported output format; name it *.nrrd, *.nii.gz, *.nii or *.mha"
    )


def check_output_writable(path: str | os.PathLike) -> Path:
    """Fail now, before any compute, if `path` cannot be written; returns it as a Path.

    Creates and removes a probe file in the output folder, since permission bits alone do
    not tell (root, read-only mounts, ACLs).
    """
    path = Path(path)
    suffix = output_suffix(path)
    if path.is_dir():
        raise UserError(f"cannot write '{path}': it is a folder; give a file name ending in {suffix}")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"cannot write '{path}': folder '{folder}' does not exist; create it first")
    remove_stale_partials(folder)
    probe = partial_path(path, ".probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as error:
        raise write_error(path, error) from None
    probe.unlink()
    return path


def read_image_information(path: str | os.PathLike, *, allow_layers: bool = False) -> sitk.ImageFileReader:
    """Read and check only the header: an existing 3D scalar image of a sane size.

    Args:
        path: the image file.
        allow_layers: accept several components per voxel (the layers of a `.seg.nrrd`).

    Returns:
        the reader, with its image information read, ready to `Execute()`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; check the path")
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not an image file; give a NRRD or NIfTI file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _check_header_geometry(path)
    try:
        with _native_messages_captured():
            reader.ReadImageInformation()
    except RuntimeError:
        raise UserError(
            f"'{path}' is not an image file that can be read (or its header is corrupt); "
            "give a NRRD, NIfTI or MHA volume"
        ) from None
    _check_geometry(reader, path)
    size = reader.GetSize()
    if reader.GetDimension() < 3 or min(size) < 2:
        raise UserError(f"'{path}' is a 2D image (size {_format_size(size)}); give a 3D volume")
    if reader.GetDimension() > 3:
        raise UserError(
            f"'{path}' is a {reader.GetDimension()}D image (size {_format_size(size)}); "
            "give a single 3D volume (split the series into 3D volumes first)"
        )
    if reader.GetNumberOfComponents() != 1 and not allow_layers:
        raise UserError(
            f"'{path}' has {reader.GetNumberOfComponents()} values per voxel (a vector or colour "
            "image); give a scalar 3D volume"
        )
    voxels = int(np.prod(size, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise UserError(
            f"'{path}' claims a {_format_size(size)} volume ({voxels:.3g} voxels, more than "
            f"{MAX_VOXELS:.3g}); crop or downsample it first (Slicer: Crop Volume)"
        )
    return reader


def _check_geometry(reader: sitk.ImageFileReader, path) -> None:
    """Spacing, origin and direction must place every voxel: finite, positive, non-singular."""
    spacing, origin = np.array(reader.GetSpacing()), np.array(reader.GetOrigin())
    direction = np.array(reader.GetDirection()).reshape(reader.GetDimension(), -1)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise UserError(f"'{path}' has voxel spacing {tuple(spacing.tolist())}; spacings must be positive "
                        "finite millimetres: fix the file's header (spacing / space directions)")
    if (spacing > MAX_SPACING_MM).any() or (spacing < MIN_SPACING_MM).any():
        raise UserError(f"'{path}' has voxel spacing {tuple(spacing.tolist())} mm, outside "
                        f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm; fix the file's header (units are mm)")
    if not (np.isfinite(origin).all() and (np.abs(origin) < MAX_ORIGIN_MM).all()):
        raise UserError(f"'{path}' has origin {tuple(origin.tolist())}; it must be finite (within "
                        f"{MAX_ORIGIN_MM:g} mm): fix the file's header")
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6:
        raise UserError(f"'{path}' has a singular direction matrix (its axes are not independent "
                        "directions), so its voxels have no place in space; fix the header's directions")


def _check_header_geometry(path: Path) -> None:
    """What ITK gets wrong or reports vaguely: a NIfTI without orientation (ITK silently uses
    identity axes), NaN or all-zero forms, NaN in a NRRD's space fields."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel

            header = nibabel.load(str(path)).header
            sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
            form = "sform" if sform_code else "qform"
            affine = header.get_sform() if sform_code else header.get_qform()
            spacing = np.hypot.reduce(affine[:3, :3], axis=0)
        elif name.endswith((".nrrd", ".nhdr")):
            import nrrd

            header = nrrd.read_header(str(path))
            sform_code = qform_code = None
            form = "space directions / space origin"
            directions = np.asarray(header.get("space directions", np.zeros((0, 3))), dtype=np.float64)
            directions = directions[~np.isnan(directions).all(axis=1)]  # "none": a list axis (layers)
            origin = np.asarray(header.get("space origin", np.zeros(directions.shape[1:])), dtype=np.float64)
            affine = np.vstack([directions, origin.reshape(1, -1)])
            spacing = np.hypot.reduce(directions, axis=1)  # no overflow to inf for 1e300
        else:
            return
    except Exception:  # not readable this way: ITK's reader says what it can
        return
    if sform_code == 0 and qform_code == 0:
        raise UserError(f"'{path}' is a NIfTI file without orientation (its sform and qform codes are both "
                        "0), so where its voxels lie is unknown; save it again with its orientation")
    if affine.size and not np.isfinite(affine).all():
        raise UserError(f"'{path}' has NaN or infinite values in its {form}; fix the file's header")
    if (spacing > MAX_SPACING_MM).any():  # ITK's NRRD reader would quietly make it 1 mm
        raise UserError(f"'{path}' has voxel spacing {tuple(spacing.tolist())} mm in its {form}, more than "
                        f"{MAX_SPACING_MM:g} mm; fix the file's header (units are mm)")
    if sform_code is not None and abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"'{path}' has a singular (e.g. all-zero) NIfTI {form}, so its voxels have no place "
                        "in space; save it again with its orientation")


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a scalar 3D volume with every check a user-supplied file needs.

    Returns:
        the image, with its pixel type as stored and its geometry in LPS (SimpleITK's).
    """
    reader = read_image_information(path)
    image = _execute(reader, path)
    _check_finite(image, path)
    return image


def read_segmentation(path: str | os.PathLike) -> Segmentation:
    """Read a labelmap (NRRD, NIfTI) or a Slicer `.seg.nrrd`, flattened to one int32 labelmap.

    In a `.seg.nrrd` each segment is label value `Segment{i}_LabelValue` in layer
    `Segment{i}_Layer`; overlapping segments live on different layers. Segments are painted
    in file order (a later one wins where they overlap); each keeps its label value unless
    that value is already taken by a segment of another layer, in which case it gets the next
    free one. `Segmentation.segments` says which segment each value is.
    """
    path = Path(path)
    reader = read_image_information(path, allow_layers=True)
    segment_table = _seg_nrrd_segments(path)
    if reader.GetNumberOfComponents() != 1 and segment_table is None:
        raise UserError(
            f"'{path}' has {reader.GetNumberOfComponents()} values per voxel; give a labelmap "
            "(one value per voxel) or a Slicer .seg.nrrd"
        )
    image = _execute(reader, path)
    _check_finite(image, path)
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UserError(
            f"'{path}' has non-integer values, so it is not a labelmap; give a segmentation "
            "whose voxels are label values"
        )
    if array.size and (array.min() < LABEL_MIN or array.max() > LABEL_MAX):
        raise UserError(f"'{path}' has label values from {array.min():.6g} to {array.max():.6g}, outside "
                        f"the 32-bit range of label values ({LABEL_MIN}..{LABEL_MAX}); relabel it with small "
                        "values")
    if segment_table is None:
        labelmap = sitk.Cast(image, sitk.sitkInt32)
        return Segmentation(labelmap=labelmap, path=path)
    layers = array.reshape(array.shape[:3] + (-1,)).astype(np.int64, copy=False)
    flat = np.zeros(layers.shape[:3], dtype=np.int32)
    segments: dict[int, Segment] = {}
    for layer, segment in segment_table:
        if layer >= layers.shape[3]:
            raise UserError(
                f"'{path}' names layer {layer} for segment '{segment.name}' but has "
                f"{layers.shape[3]} layers; save the segmentation again from Slicer"
            )
        value = segment.label_value
        while value in segments or value == 0:
            value += 1
        segments[value] = segment
        flat[layers[..., layer] == segment.label_value] = value
    labelmap = sitk.GetImageFromArray(flat)
    labelmap.SetOrigin(image.GetOrigin())
    labelmap.SetSpacing(image.GetSpacing())
    labelmap.SetDirection(image.GetDirection())
    return Segmentation(labelmap=labelmap, path=path, segments=segments)


def write_volume_atomic(
    image: sitk.Image,
    path: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    raise_if_cancelled: Callable[[], None] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `image` to `path` completely or not at all (see `write_volumes_atomic`).

    Args:
        image: a scalar 3D image.
        path: the output file; its suffix picks the format (see `WRITABLE_SUFFIXES`).
        reference: the file whose geometry `image` carries (as `read_volume` returned it). When
            output and reference are both NRRD or both NIfTI, the reference's geometry header
            is copied verbatim, so reading the output gives back the reference's size, spacing,
            origin and direction bit for bit.
        raise_if_cancelled: checked once the file is written and verified, before the rename.
        metadata: key/value fields (provenance, `worker.provenance`) for the NRRD header, or for
            other formats the sidecar `files.provenance_sidecar(path)`.
    """
    return write_volumes_atomic([(image, path, reference)], raise_if_cancelled, metadata)[0]


def write_volumes_atomic(
    volumes: Sequence[tuple[sitk.Image, str | os.PathLike, str | os.PathLike | None]],
    raise_if_cancelled: Callable[[], None] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write several volumes (image, path, reference), renamed into place only once all are written.

    Each goes to a temporary file beside its output (`files.AtomicWrites`), is synced and read
    back (complete, same geometry, same voxels) before any output is replaced, so a full disk,
    a crash or a cancel leaves every previous file as it was. Non-finite voxels are refused.
    `metadata` goes into each NRRD's header as `key:=value` fields; every other format gets it
    as a JSON sidecar (`files.provenance_sidecar`), staged in the same `AtomicWrites` just
    before its volume, so neither is renamed into place unless both were written.
    """
    paths = []
    with AtomicWrites(raise_if_cancelled) as writes:
        for image, path, reference in volumes:
            path = Path(path)
            suffix = output_suffix(path)
            _check_finite_result(image, path)
            verify = partial(_verify_volume, image=image, suffix=suffix, target=path)
            if metadata and _format_family(suffix) != "nrrd":
                sidecar = provenance_sidecar(path)
                with _opened(writes.stage(sidecar, suffix=".json"), sidecar) as stream:
                    json.dump(dict(metadata), stream, indent=2)
            temporary = writes.stage(path, suffix=suffix, verify=verify)
            _write_volume(image, temporary, suffix, reference, metadata or {})
            paths.append(path)
    return paths


@contextlib.contextmanager
def _opened(temporary: Path, target: Path) -> Iterator:
    try:
        with temporary.open("w", encoding="utf-8") as stream:
            yield stream
    except OSError as error:
        raise write_error(target, error) from None


def _write_volume(image: sitk.Image, temporary: Path, suffix: str, reference,
                  metadata: Mapping[str, str]) -> None:
    family = _format_family(suffix)
    fields = metadata if family == "nrrd" else {}
    copy_header = reference is not None and family == _format_family(_input_suffix(reference))
    if copy_header:
        _check_same_geometry(image, reference)
    with _native_messages_captured() as messages:
        if copy_header and family == "nrrd":
            copy_header = _write_nrrd_with_reference_header(image, temporary, reference, fields)
        elif copy_header:
            _write_nifti_with_reference_header(image, temporary, reference)
        if not copy_header:
            if fields:
                image = sitk.Image(image)  # a copy: the caller's image keeps its metadata
                for key, value in fields.items():
                    image.SetMetaData(key, value)
            try:
                sitk.WriteImage(image, str(temporary), useCompression=True)
            except RuntimeError as error:
                raise _os_error(str(error) + messages.text()) from None


def _os_error(message: str) -> OSError:
    """ITK reports failed writes as RuntimeErrors; the reason is in the text."""
    if "No space left" in message:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.EIO, message.strip().splitlines()[-1] if message.strip() else "write failed")


def _verify_volume(temporary: Path, *, image: sitk.Image, suffix: str, target: Path) -> None:
    """The written file reads back complete, with `image`'s geometry and voxels.

    ITK's NIfTI writer reports a short write only on stderr and its reader zero-fills a
    truncated file, so NIfTI data is also counted (through gzip for .nii.gz).
    """
    with _native_messages_captured():
        try:
            if suffix in (".nii", ".nii.gz"):
                _check_nifti_complete(temporary, compressed=suffix == ".nii.gz")
            written = sitk.ReadImage(str(temporary))
        except Exception as error:  # whatever the reader trips on, the file is not right
            written, problem = None, f"it does not read back ({type(error).__name__})"
    if written is not None:
        problem = _difference(image, written)
    if problem is not None:
        free = shutil.disk_usage(temporary.parent).free
        raise UserError(f"cannot write '{target}': the file written {problem} (the disk has "
                        f"{free / 2**20:.0f} MiB free); free some space or write elsewhere "
                        "(nothing was replaced)")


def _check_nifti_complete(path: Path, compressed: bool) -> None:
    import gzip

    import nibabel

    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
        header = nibabel.Nifti1Header.from_fileobj(stream)
        needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * \
            header.get_data_dtype().itemsize
        size = stream.tell()
        while block := stream.read(1 << 22):  # gzip raises EOFError on a stream cut short
            size += len(block)
    if size < needed:
        raise EOFError(f"{size} of {needed} bytes")


def _difference(image: sitk.Image, written: sitk.Image) -> str | None:
    if written.GetSize() != image.GetSize() or written.GetNumberOfComponentsPerPixel() != 1:
        return "has another size"
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        if not np.allclose(getattr(written, name)(), getattr(image, name)(), rtol=1e-5, atol=1e-4):
            return "has another geometry"
    if not np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image)):
        return "reads back with other voxel values"
    return None


def _check_finite_result(image: sitk.Image, path: Path) -> None:
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        count = int(array.size - np.isfinite(array).sum())
        raise UserError(f"the result for '{path}' has {count} NaN or infinite voxels, so it was not written; "
                        "the model or its settings are broken (check its weights and noise schedule)")


class _Captured:
    def __init__(self, sink) -> None:
        self.sink = sink

    def text(self) -> str:
        if self.sink is None:
            return ""
        self.sink.seek(0)
        return self.sink.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _native_messages_captured() -> Iterator[_Captured]:
    """Keeps what ITK and niftilib print straight to file descriptors 1 and 2 (e.g. "wrote
    only 7840 of 16128 bytes") off the user's terminal and the worker's JSON stdout; a failure
    is reported in one line instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        sink = tempfile.TemporaryFile()
    except OSError:  # no room even for that (the temp folder's disk is full): do not capture
        yield _Captured(None)
        return
    with sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield _Captured(sink)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    """Exact equality of size, spacing, origin and direction (no tolerance)."""
    return (
        a.GetSize() == b.GetSize()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
    )


def _format_size(size) -> str:
    return "x".join(str(s) for s in size)


def _execute(reader: sitk.ImageFileReader, path) -> sitk.Image:
    try:
        with _native_messages_captured():
            return reader.Execute()
    except RuntimeError:
        raise UserError(
            f"'{path}' is truncated or corrupt (its voxel data cannot be read); export or copy it again"
        ) from None


def _check_finite(image: sitk.Image, path) -> None:
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        count = int(array.size - np.isfinite(array).sum())
        raise UserError(
            f"'{path}' has {count} NaN or infinite voxels; replace them (e.g. with 0) and try again"
        )


def _seg_nrrd_segments(path: Path) -> list[tuple[int, Segment]] | None:
    """(layer, segment) for each `Segment{i}_*` entry of a NRRD header, or None if it has none."""
    if not path.name.lower().endswith(".nrrd"):
        return None
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except (nrrd.NRRDError, OSError, ValueError):
        return None
    table = []
    index = 0
    while f"Segment{index}_LabelValue" in header or f"Segment{index}_ID" in header:
        try:
            name = header.get(f"Segment{index}_Name", f"Segment {index}")
            value = int(header.get(f"Segment{index}_LabelValue", 1))
            layer = int(header.get(f"Segment{index}_Layer", 0))
            if not (LABEL_MIN <= value <= LABEL_MAX and 0 <= layer < 2**16):
                raise ValueError(value)
        except ValueError:
            raise UserError(
                f"'{path}' has a malformed Segment{index} entry; save the segmentation again from Slicer"
            ) from None
        table.append((layer, Segment(name=name, label_value=value)))
        index += 1
    return table or None


def _input_suffix(path) -> str:
    name = Path(path).name.lower()
    for suffix in (".nrrd", ".nhdr", ".nii.gz", ".nii"):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def _format_family(suffix: str) -> str:
    return {".nrrd": "nrrd", ".nii.gz": "nifti", ".nii": "nifti"}.get(suffix, suffix)


def _check_same_geometry(image: sitk.Image, reference) -> None:
    info = sitk.ImageFileReader()
    info.SetFileName(str(reference))
    info.ReadImageInformation()
    if (
        image.GetSize() != info.GetSize()
        or image.GetSpacing() != info.GetSpacing()
        or image.GetOrigin() != info.GetOrigin()
        or image.GetDirection() != info.GetDirection()
    ):
        raise ValueError(f"image geometry differs from its reference '{reference}'")


def _xyz_array(image: sitk.Image) -> np.ndarray:
    """Voxels indexed [i, j, k] (file order), where SimpleITK's arrays are [k, j, i]."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _write_nrrd_with_reference_header(image: sitk.Image, temporary: Path, reference,
                                      fields: Mapping[str, str]) -> bool:
    """Write with the reference's space fields and `fields` as key/value pairs; False (nothing
    written) if the reference has no space fields."""
    import nrrd

    source = nrrd.read_header(str(reference))
    if "space directions" not in source:
        return False
    header = {key: source[key] for key in _NRRD_GEOMETRY_KEYS if key in source}
    directions = np.asarray(source["space directions"], dtype=np.float64)
    header["space directions"] = directions[~np.isnan(directions).any(axis=1)]
    header["kinds"] = ["domain"] * 3
    header["encoding"] = "gzip"
    header.update(fields)
    nrrd.write(str(temporary), _xyz_array(image), header, index_order="F")
    return True


def _write_nifti_with_reference_header(image: sitk.Image, temporary: Path, reference) -> None:
    import nibabel

    header = nibabel.load(str(reference)).header.copy()
    array = _xyz_array(image)
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)
    nibabel.save(nibabel.Nifti1Image(array, None, header), str(temporary))
