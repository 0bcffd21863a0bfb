"""Headless VCM synthesis: the module's scene glue and worker, driven from the command line.

    Slicer --no-main-window --python-script VCMSynthesisBatch.py --segmentation case.seg.nrrd --output t1.nrrd
    python VCMSynthesisBatch.py --segmentation case.seg.nrrd --output t1.nrrd      (with slicer-core)
    python VCMSynthesisBatch.py --cases manifest.csv          (the `vcm-synthesis batch` manifest)
    python VCMSynthesisBatch.py --cases folder/ --output-dir out/
    python VCMSynthesisBatch.py --superres thick.nrrd --output thin.nrrd
    python VCMSynthesisBatch.py --edit scan.nrrd --segmentation edited.seg.nrrd \
        --original-segmentation original.seg.nrrd --output edited_scan.nrrd

A `.seg.nrrd` is loaded into an MRML scene and exported on its reference geometry (or on
`--reference`), exactly as the panel does; a plain labelmap goes to the worker as it is. The
result always has the geometry of that labelmap. Errors are one line on stderr; exit codes:
0 done, 1 bad input or a failed case, 2 bad command line, 130/143 cancelled.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Installed and in a checkout alike, VCMSynthesisLib sits two folders up (VCMSynthesis/).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

try:
    from VCMSynthesisLib import jobs
    from VCMSynthesisLib.cli import OneLineArgumentParser, run_reporting_errors
    from VCMSynthesisLib.errors import EXIT_USAGE, UsageError, UserError
    from VCMSynthesisLib.files import refuse_overwriting_inputs
    from VCMSynthesisLib.label_maps import add_label_map_arguments, label_map_of
    from VCMSynthesisLib.runtime import DEVICES, add_scheduler_argument, positive_int, seed_value
    from VCMSynthesisLib.superres import positive_mm
    from VCMSynthesisLib.volumes import LABEL_MAX
except KeyboardInterrupt:  # Ctrl-C while starting: one line, not a traceback
    print("cancelled while starting: nothing was written", file=sys.stderr)
    sys.exit(130)

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
OUTPUT_SUFFIX = "_synthesized.nrrd"


@dataclass
class Case:
    """One synthesis (a segmentation file and/or modality files, an optional reference, the output),
    or, with `edit`, one edit of that scan (`segmentation` is then the edited one)."""

    segmentation: Path | None
    output: Path
    reference: Path | None = None
    modalities: dict[str, Path] = field(default_factory=dict)
    seed: int | None = None
    edit: Path | None = None
    original_segmentation: Path | None = None
    region: Path | None = None


def parse_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        name, separator, right = value.partition("=")
        if not separator or not name or not right:
            raise UsageError(f"{flag} takes NAME=VALUE, got '{value}'")
        pairs[name] = right
    return pairs


def _has_suffix(path: Path, suffixes) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def cases_from_folder(folder: Path, output_dir: Path) -> list[Case]:
    """Every segmentation (`.seg.nrrd`, else labelmap) file in a folder, one case each."""
    files = sorted(
        path for path in folder.iterdir() if path.is_file() and _has_suffix(path, LABELMAP_SUFFIXES)
    )
    if not files:
        raise UserError(f"'{folder}' holds no .seg.nrrd, .nrrd or .nii.gz files; point --cases at the cases")
    cases = []
    for path in files:
        stem = path.name
        for suffix in (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        cases.append(Case(segmentation=path, output=output_dir / (stem + OUTPUT_SUFFIX)))
    return cases


def cases_from_manifest(manifest: Path) -> list[Case]:
    """The cases of a `vcm-synthesis batch` manifest (same CSV format; see `batch.read_manifest`)."""
    from VCMSynthesisLib.batch import read_manifest

    return [
        Case(segmentation=row.segmentation, output=row.output, modalities=row.modalities, seed=row.seed,
             edit=row.edit, original_segmentation=row.original_segmentation, region=row.region)
        for row in read_manifest(manifest)
    ]


def segmentation_job(
    case: Case, folder: Path, arguments: argparse.Namespace, labels: dict[str, str]
) -> jobs.Job:
    """The worker job of one case; a `.seg.nrrd` goes through the MRML scene glue first."""
    options = {
        "model": arguments.model,
        "steps": arguments.steps,
        "scheduler": arguments.scheduler,
        "seed": arguments.seed if case.seed is None else case.seed,
        "strength": arguments.strength,
        "device": arguments.device,
        "output": case.output,
        "label_map": arguments.label_map,
        "unmapped": arguments.unmapped,
    }
    modalities = {**case.modalities, **{name: Path(path) for name, path in arguments.modality.items()}}
    for name, path in modalities.items():
        if not path.is_file():
            raise UserError(f"the {name} volume '{path}' does not exist; check the path")
    if case.edit is not None:
        return _edit_job(case, folder, arguments, labels, modalities, options)
    if case.segmentation is None:  # a modality-only case (translation models)
        if case.reference is not None:
            raise UserError(
                "--reference needs a .seg.nrrd input; a modality-only result takes the grid of "
                "the first modality"
            )
        return jobs.synthesis_job(folder, segmentation=None, modalities=modalities, **options)
    _require_file(case.segmentation, "segmentation")
    if not _has_suffix(case.segmentation, (SEGMENTATION_SUFFIX,)):
        if case.reference is not None:
            raise UserError(
                f"a reference geometry needs a .seg.nrrd input, and '{case.segmentation}' is a labelmap; "
                "its own grid is the output grid"
            )
        return jobs.synthesis_job(folder, segmentation=case.segmentation, modalities=modalities, **options)
    labelmap = _exported_labelmap(case.segmentation, case.reference, folder / "segmentation.nrrd", arguments,
                                  labels)
    # Modality files go on as they are: the worker resamples them from their own geometry.
    return jobs.synthesis_job(folder, segmentation=labelmap, modalities=modalities, **options)


def _edit_job(case: Case, folder: Path, arguments: argparse.Namespace, labels: dict[str, str],
              modalities: dict[str, Path], options: dict) -> jobs.Job:
    """An edit of `case.edit`: `.seg.nrrd` segmentations are exported on the scan's grid, labelmaps
    (which must already be on it) and the region mask go to the worker as they are."""
    if case.reference is not None:
        raise UserError("--reference does not go with --edit: the edited scan is the output grid")
    if case.segmentation is None or (case.original_segmentation is None) == (case.region is None):
        raise UsageError("--edit needs --segmentation (the edited one) and one of --original-segmentation "
                         "or --region")
    if modalities:
        raise UsageError("--modality does not go with --edit here; use `vcm-synthesis edit --modality`")
    _require_file(case.edit, "scan to edit")
    labelmaps = {}
    for name, path in (("edited", case.segmentation), ("original", case.original_segmentation)):
        if path is not None:
            _require_file(path, "segmentation")
            labelmaps[name] = (_exported_labelmap(path, case.edit, folder / f"{name}.nrrd", arguments, labels)
                               if _has_suffix(path, (SEGMENTATION_SUFFIX,)) else path)
    if case.region is not None:
        _require_file(case.region, "region mask")
    return jobs.edit_job(folder, image=case.edit, segmentation=labelmaps["edited"],
                         original_segmentation=labelmaps.get("original"), region=case.region,
                         margin_mm=arguments.margin_mm, **options)


def _require_file(path: Path, role: str) -> None:
    if not path.is_file():
        raise UserError(f"the {role} '{path}' does not exist; check the path")


def _exported_labelmap(path: Path, reference: Path | None, output: Path, arguments: argparse.Namespace,
                       labels: dict[str, str]) -> Path:
    """A `.seg.nrrd` as a model-label labelmap on `reference`'s grid (None: its own reference
    geometry), through the MRML scene glue as the panel does it."""
    import slicer
    from VCMSynthesisLib import scene
    from VCMSynthesisLib.volumes import read_image_information

    # Headers are checked first: Slicer's NRRD reader aborts the process on a damaged one.
    for checked in (path, reference):
        if checked is not None:
            read_image_information(checked, allow_layers=checked == path)
    mrml_scene = slicer.vtkMRMLScene()
    segmentation_node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(segmentation_node):
        raise UserError(f"cannot read '{path}' as a Slicer segmentation; save it again from Slicer")
    reference_node = None
    if reference is not None:
        reference_node = scene.read_volume_file(reference)
        mrml_scene.AddNode(reference_node)
    names = scene.segment_names(segmentation_node)
    values = scene.segment_label_values(segmentation_node)
    if arguments.read_label_map is not None:  # segments keep the numbers the map knows; the worker maps them
        label_of_segment = arguments.read_label_map.segment_values(
            {segment_id: (name, values[segment_id]) for segment_id, name in names.items()}, str(path))
        label_of_segment = {segment_id: value for segment_id, value in label_of_segment.items() if value != 0}
    else:
        # With every segment given by --label, the model's table (and torch) is not needed here.
        table = [] if set(names.values()) <= set(labels) else scene.model_label_table(arguments.model)
        label_of_segment = _label_mapping(names, labels, table, path, values, by_value=arguments.map_by_value)
    return scene.export_segmentation(segmentation_node, label_of_segment, output, reference_node)


def _label_mapping(
    names: dict[str, str],
    labels: dict[str, str],
    table: list[dict],
    path: Path,
    label_values: dict[str, int] | None = None,
    by_value: bool = False,
) -> dict[str, int]:
    """Segment ID -> label value: `--label NAME=VALUE`, else the name, else (Slicer's "Label_N"
    names, or every segment with `--map-by-value`) the segment's value; any other segment is
    refused, so that no segment silently becomes a label it is not.

    Matches by value are reported on stderr.
    """
    from VCMSynthesisLib import scene

    by_name = {name: segment_id for segment_id, name in names.items()}
    unknown = [name for name in labels if name not in by_name]
    if unknown:
        raise UserError(
            f"--label names segment(s) {', '.join(unknown)} that '{path}' does not have "
            f"(it has: {', '.join(names.values())})"
        )
    mapping = scene.default_label_mapping(names, table, label_values, by_value=by_value)
    by_value = [
        f"{names[segment_id]}={value}"
        for segment_id, value in mapping.items()
        if segment_id not in scene.default_label_mapping(names, table) and names[segment_id] not in labels
    ]
    if by_value:
        print(
            f"note: '{path.name}': segments mapped by their label value: {', '.join(by_value)}",
            file=sys.stderr,
        )
    for name, value in labels.items():
        try:
            mapping[by_name[name]] = int(value)
        except ValueError:
            raise UsageError(f"--label {name}={value}: the value must be an integer label value") from None
        if not 0 <= mapping[by_name[name]] <= LABEL_MAX:
            raise UsageError(f"--label {name}={value}: label values go from 0 to {LABEL_MAX}")
    mapping = {segment_id: value for segment_id, value in mapping.items() if value != 0}
    unmatched = [
        name for segment_id, name in names.items() if segment_id not in mapping and name not in labels
    ]
    if unmatched:
        label_names = ", ".join(f"{entry['value']}={entry['name']}" for entry in table)
        raise UserError(
            f"segment(s) {', '.join(unmatched)} of '{path}' match no model label ({label_names}); rename "
            "them, pass --label 'SEGMENT=VALUE' (VALUE 0 leaves a segment out), or --map-by-value to use "
            "their label values"
        )
    return mapping


def _inputs_of(cases: list[Case], arguments: argparse.Namespace) -> dict[str, Path]:
    """Every file the run reads, named as the user knows it: no output may be one of them."""
    manifest = arguments.cases if arguments.cases is not None and arguments.cases.is_file() else None
    inputs = {"--cases": manifest}
    for name, path in arguments.modality.items():
        inputs[f"--modality {name}"] = Path(path)
    for case in cases:
        source = case.segmentation or case.output
        inputs[f"the segmentation {source.name}"] = case.segmentation
        inputs[f"the reference of {source.name}"] = case.reference
        inputs.update({f"the {name} volume of {source.name}": path
                       for name, path in case.modalities.items()})
    return {label: path for label, path in inputs.items() if path is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="VCMSynthesisBatch", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()  # none of them: a modality-only case (--modality)
    source.add_argument("--segmentation", type=Path, help=".seg.nrrd or labelmap file (one case)")
    source.add_argument("--cases", type=Path, help="folder of segmentation files, or a manifest CSV")
    source.add_argument("--superres", type=Path, metavar="VOLUME", help="thick-slice volume to super-resolve")
    parser.add_argument("--edit", type=Path, metavar="SCAN",
                        help="edit this scan where --segmentation differs from --original-segmentation")
    parser.add_argument("--original-segmentation", type=Path, help="--edit: the segmentation before the edit")
    parser.add_argument("--region", type=Path, help="--edit: mask of the voxels to re-synthesize instead")
    parser.add_argument("--margin-mm", type=float,
                        help="--edit: blend zone in mm (default: that of vcm-synthesis edit)")
    parser.add_argument("--output", type=Path, help="result file (one case, --superres)")
    parser.add_argument("--output-dir", type=Path, help="folder of the results (--cases FOLDER)")
    parser.add_argument("--reference", type=Path, help="volume whose grid the result takes (.seg.nrrd input)")
    parser.add_argument(
        "--model", help="registry model name or model folder (default: demo; superres: its own)"
    )
    parser.add_argument("--modality", action="append", metavar="NAME=FILE", help="modality condition volume")
    parser.add_argument(
        "--label", action="append", metavar="SEGMENT=VALUE", help="segment name -> model label"
    )
    parser.add_argument("--map-by-value", action="store_true",
                        help="map .seg.nrrd segments whose names match no model label by their label value")
    add_label_map_arguments(parser)
    parser.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
    add_scheduler_argument(parser)
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
    parser.add_argument("--strength", type=float,
                        help="condition strength: 1 as trained, above 1 follows the segmentation more "
                             "closely (default: the model's)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--spacing", type=positive_mm, help="superres: output spacing in mm")
    parser.add_argument("--samples", type=positive_int,
                        help="superres: samples to average (default: that of vcm-synthesis superres)")
    parser.add_argument(
        "--python", help="Python executable for the worker (default: this one / PythonSlicer)"
    )
    parser.add_argument("--server", metavar="URL", help="run the jobs on a `vcm-synthesis serve` server")
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="--server: file holding its token")
    parser.add_argument("--skip-existing", action="store_true", help="--cases: keep outputs that exist")
    parser.add_argument(
        "--keep-job-folders", action="store_true", help="keep job folders of successful cases"
    )
    return parser


def _print_progress(label: str):
    def report(progress: jobs.Progress) -> None:
        eta = "" if progress.eta_s is None else f", about {progress.eta_s:.0f} s left"
        print(f"{label}: step {progress.step}/{progress.total}{eta}", file=sys.stderr, flush=True)

    return report


def _run_job(job: jobs.Job, arguments: argparse.Namespace, label: str) -> None:
    if arguments.server is not None:  # the same job on a `vcm-synthesis serve` GPU
        from VCMSynthesisLib.remote import Server, run_remote_job

        report = _print_progress(label)

        def on_line(line: dict) -> None:
            if "warning" in line:
                print(f"warning: {label}: {line['warning']}", file=sys.stderr)
            elif (progress := jobs.Progress.from_line(line)) is not None:
                report(progress)

        run_remote_job(job, Server.from_files(arguments.server, arguments.token_file), on_line=on_line)
        return
    outcome = jobs.run_job(job, python=arguments.python, on_progress=_print_progress(label))
    for text in outcome.warnings:
        print(f"warning: {label}: {text}", file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    try:
        arguments = build_parser().parse_args(argv)
    except SystemExit as stop:
        return EXIT_USAGE if stop.code not in (0, None) else 0
    work = Path(tempfile.mkdtemp(prefix="vcm-batch-"))
    try:
        return run_reporting_errors(lambda: _run(arguments, work))
    finally:
        if not any(work.iterdir()):  # failed jobs keep their folder: the error names its log
            work.rmdir()


PATH_ARGUMENTS = ("segmentation", "cases", "superres", "edit", "original_segmentation", "region", "output",
                  "output_dir", "reference", "token_file")


def _absolute_paths(arguments: argparse.Namespace) -> None:
    """Paths as the caller meant them: against this working folder (the worker runs in its job
    folder). A manifest's own paths are relative to the manifest (`batch.read_manifest`)."""
    for name in PATH_ARGUMENTS:
        if getattr(arguments, name) is not None:
            setattr(arguments, name, getattr(arguments, name).absolute())
    arguments.modality = {name: Path(path).absolute() for name, path in arguments.modality.items()}
    if arguments.model is not None and Path(arguments.model).is_dir():  # a model folder, not a name
        arguments.model = str(Path(arguments.model).absolute())
    if isinstance(arguments.label_map, Path):  # a file, not a preset name
        arguments.label_map = arguments.label_map.absolute()
    if arguments.python is not None and Path(arguments.python).parent != Path():  # not a bare name on PATH
        arguments.python = str(Path(arguments.python).absolute())


def _run(arguments: argparse.Namespace, work: Path) -> int:
    arguments.modality = parse_pairs(arguments.modality, "--modality")
    labels = parse_pairs(arguments.label, "--label")
    _absolute_paths(arguments)
    if arguments.label_map is not None and (labels or arguments.map_by_value):
        raise UsageError("--label-map says what every segment is; leave out --label and --map-by-value")
    arguments.read_label_map = label_map_of(arguments)  # a bad map fails here, before any case
    if not (arguments.segmentation or arguments.cases or arguments.superres or arguments.modality):
        raise UsageError("give --segmentation, --modality NAME=FILE (translation), --cases or --superres")
    if arguments.cases is None and arguments.output is None:
        raise UsageError("--output FILE is needed with --segmentation, --modality and --superres")
    if arguments.cases is not None and arguments.cases.is_dir() and arguments.output_dir is None:
        raise UsageError("--output-dir FOLDER is needed with --cases FOLDER")
    if arguments.superres is not None:
        if arguments.label_map is not None:
            raise UsageError("--label-map goes with segmentations, not --superres")
        if not arguments.superres.is_file():
            raise UserError(f"the volume '{arguments.superres}' does not exist; check the path")
        refuse_overwriting_inputs({"--output": arguments.output}, {"--superres": arguments.superres})
        job = jobs.superres_job(
            jobs.new_job_folder(work),
            input_path=arguments.superres,
            output=arguments.output,
            model=arguments.model,
            spacing=arguments.spacing,
            samples=arguments.samples,
            steps=arguments.steps,
            scheduler=arguments.scheduler,
            seed=arguments.seed,
            device=arguments.device,
        )
        _run_job(job, arguments, arguments.superres.name)
        if not arguments.keep_job_folders:
            shutil.rmtree(job.folder, ignore_errors=True)
        print(arguments.output)
        return 0
    arguments.model = arguments.model or "demo"
    if arguments.cases is None:
        cases = [
            Case(segmentation=arguments.segmentation, output=arguments.output, reference=arguments.reference,
                 edit=arguments.edit, original_segmentation=arguments.original_segmentation,
                 region=arguments.region)
        ]
    elif arguments.cases.is_dir():
        cases = cases_from_folder(arguments.cases, arguments.output_dir)
    elif arguments.cases.is_file():
        cases = cases_from_manifest(arguments.cases)
    else:
        raise UserError(f"--cases '{arguments.cases}' is neither a folder nor a CSV file; check the path")
    inputs = _inputs_of(cases, arguments)
    failures = 0
    for number, case in enumerate(cases, start=1):
        label = f"case {number}/{len(cases)} ({(case.segmentation or case.output).name})"
        folder = None
        try:
            refuse_overwriting_inputs({"the output": case.output}, inputs)  # never skipped as "existing"
            if arguments.skip_existing and case.output.exists():
                print(f"{label}: {case.output} exists, skipped", file=sys.stderr)
                continue
            case.output.parent.mkdir(parents=True, exist_ok=True)
            folder = jobs.new_job_folder(work)
            job = segmentation_job(case, folder, arguments, labels)
            _run_job(job, arguments, label)
        except UserError as error:
            if len(cases) == 1:
                raise
            failures += 1
            print(f"error: {label}: {error}", file=sys.stderr)
            continue
        if not arguments.keep_job_folders:
            shutil.rmtree(folder, ignore_errors=True)
        print(case.output)
    if failures:
        print(f"error: {failures} of {len(cases)} cases failed (see above)", file=sys.stderr)
        return UserError.exit_code
    return 0


def main() -> None:
    status = run(sys.argv[1:])
    # Done: a signal during the interpreter's teardown would only turn the status into a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    slicer = sys.modules.get("slicer")
    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(status)  # inside Slicer: sys.exit would leave the application running
    else:
        sys.exit(status)


if __name__ == "__main__":
    main()
