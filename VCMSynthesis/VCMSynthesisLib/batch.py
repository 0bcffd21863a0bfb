"""`vcm-synthesis batch`: many synthesis cases from a CSV manifest, resumable, split across ranks.

The manifest has one row per case and the columns `output` (required), `segmentation`, `seed`
and one `modality:<NAME>` column per modality (e.g. `modality:T2`); relative paths are taken
from the manifest's folder. A row with an `edit` scan is an edit (`vcm-synthesis edit`): its
`segmentation` is the edited one, and `original_segmentation` or `region` says what changed.
Cases whose output exists are skipped, so a stopped batch is resumed by running it again.
Started by `torchrun`, each rank takes every WORLD_SIZE-th pending case (`torch.distributed`:
gloo on the CPU, nccl on GPUs, one GPU per local rank), so that many GPUs or nodes share one
list. The model is loaded once per process.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.label_maps import LabelMap, add_label_map_arguments, label_map_of

MODALITY_PREFIX = "modality:"
EDIT_COLUMNS = ("edit", "original_segmentation", "region")


@dataclass(frozen=True)
class Case:
    """One manifest row (`row` counts from 2, the first data line, as a spreadsheet shows it)."""

    row: int
    segmentation: Path | None
    modalities: dict[str, Path]
    output: Path
    seed: int
    edit: Path | None = None  # the scan to edit; None synthesizes
    original_segmentation: Path | None = None
    region: Path | None = None


def read_manifest(path: str | os.PathLike) -> list[Case]:
    """Parse and check a manifest; paths come back absolute (relative ones from its folder)."""
    from VCMSynthesisLib.runtime import seed_value

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = [name.strip() for name in reader.fieldnames or []]
            rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
                    for row in reader]
    except FileNotFoundError:
        raise UserError(f"manifest '{path}' does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"manifest '{path}' cannot be read as CSV ({error}); save it as UTF-8 CSV") from None
    known = {"segmentation", "output", "seed", *EDIT_COLUMNS}
    unknown = [c for c in columns if c not in known and not c.startswith(MODALITY_PREFIX)]
    if "output" not in columns or unknown:
        raise UserError(
            f"manifest '{path}' has columns {columns}; it needs 'output' and may have 'segmentation', "
            f"'seed', '{MODALITY_PREFIX}<NAME>', 'edit', 'original_segmentation' and 'region' columns"
            + (f" (unknown: {unknown})" if unknown else ""))
    folder = path.parent
    cases = []
    for row_number, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue  # blank line
        if not row["output"]:
            raise UserError(f"manifest '{path}' row {row_number}: 'output' is empty; give the file to write")
        try:
            seed = seed_value(row.get("seed") or "0")
        except argparse.ArgumentTypeError as error:
            raise UserError(f"manifest '{path}' row {row_number}: seed {error}") from None
        modalities = {column[len(MODALITY_PREFIX):]: folder / row[column]
                      for column in columns if column.startswith(MODALITY_PREFIX) and row[column]}
        segmentation = folder / row["segmentation"] if row.get("segmentation") else None
        if segmentation is None and not modalities:
            raise UserError(f"manifest '{path}' row {row_number}: no segmentation and no modality; "
                            "give the case's conditions")
        edit = {column: folder / row[column] if row.get(column) else None for column in EDIT_COLUMNS}
        if edit["edit"] is not None and (segmentation is None or (edit["original_segmentation"] is None)
                                         == (edit["region"] is None)):
            raise UserError(f"manifest '{path}' row {row_number}: an edit needs its 'segmentation' (the "
                            "edited one) and one of 'original_segmentation' or 'region'")
        if edit["edit"] is None and (edit["original_segmentation"] or edit["region"]):
            raise UserError(f"manifest '{path}' row {row_number}: 'original_segmentation' and 'region' "
                            "belong to edits; give the scan to edit in 'edit'")
        cases.append(Case(row_number, segmentation, modalities, folder / row["output"], seed, **edit))
    outputs = [case.output.resolve() for case in cases]
    repeated = sorted({str(o) for o in outputs if outputs.count(o) > 1})
    if repeated:
        raise UserError(f"manifest '{path}' writes '{repeated[0]}' more than once; "
                        "give each case its own output")
    if not cases:
        raise UserError(f"manifest '{path}' has no cases; add one row per case")
    return cases


def overwriting_cases(cases: list[Case], manifest: str | os.PathLike) -> dict[int, str]:
    """Row -> why, for each case whose output is an input: its own, another case's or the manifest."""
    from VCMSynthesisLib.files import refuse_overwriting_inputs

    inputs = {"the manifest": manifest}
    for case in cases:
        inputs[f"the segmentation of row {case.row}"] = case.segmentation
        inputs[f"the scan to edit of row {case.row}"] = case.edit
        inputs[f"the original segmentation of row {case.row}"] = case.original_segmentation
        inputs[f"the region of row {case.row}"] = case.region
        inputs.update({f"the {name} volume of row {case.row}": path
                       for name, path in case.modalities.items()})
    problems = {}
    for case in cases:
        try:
            refuse_overwriting_inputs({"the output": case.output}, inputs)
        except UserError as error:
            problems[case.row] = str(error)
    return problems


@dataclass
class Ranks:
    """This process's place among `torchrun` workers (rank 0 of 1 when started alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start_ranks(device: str) -> Ranks:
    """Join the `torchrun` group named by RANK/WORLD_SIZE, if any (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def _barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def run_batch(manifest: str | os.PathLike, model_name: str, *, steps: int | None = None,
              scheduler: str | None = None, strength: float | None = None, device: str = "auto",
              json_progress: bool = False, label_map: LabelMap | None = None) -> int:
    """Run this rank's pending cases; returns the exit code (1 if any case failed). `steps`,
    `scheduler` and `strength` are every case's (None: the model's); `label_map` turns every
    case's segmentation numbers into the model's labels."""
    from VCMSynthesisLib.runtime import SignalCancellation, emit_json, resolve_device
    from VCMSynthesisLib.worker import load_model

    cases = read_manifest(manifest)
    device = resolve_device(device)
    ranks = start_ranks(device)
    try:
        if device == "cuda" and ranks.distributed:
            import torch

            torch.cuda.set_device(ranks.local_rank)
            device = f"cuda:{ranks.local_rank}"
        # Every rank lists the pending cases before any writes one, so all split the same list.
        refused = overwriting_cases(cases, manifest)
        pending = [case for case in cases if not case.output.exists() and case.row not in refused]
        _barrier(ranks)
        mine = pending[ranks.rank::ranks.world]

        def report(case: Case, status: str, **extra) -> None:
            if json_progress:
                emit_json({"case": case.row, "output": str(case.output), "status": status, "rank": ranks.rank,
                           **extra})
            else:
                detail = f": {extra['error']}" if "error" in extra else ""
                print(f"[rank {ranks.rank}] row {case.row} {status} {case.output}{detail}", flush=True)

        failures = 0
        if ranks.rank == 0:
            pending_rows = {case.row for case in pending}
            for case in cases:
                if case.row in refused:  # not skipped: its output exists because it is an input
                    failures += 1
                    report(case, "failed", error=refused[case.row])
                elif case.row not in pending_rows:
                    report(case, "skipped")
        sampling = {"steps": steps, "scheduler": scheduler, "strength": strength}
        with SignalCancellation() as cancellation:
            model = load_model(model_name, device) if mine else None
            for case in mine:
                cancellation.next_job()
                start = time.perf_counter()
                try:
                    _run_case(model, case, sampling, cancellation, label_map)
                except UserError as error:
                    failures += 1
                    report(case, "failed", error=str(error))
                    continue
                report(case, "done", seconds=round(time.perf_counter() - start, 3))
        _barrier(ranks)
    finally:
        if ranks.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if failures:
        print(f"error: {failures} case(s) failed on rank {ranks.rank}; fix them and run the batch again "
              "(finished cases are skipped)", file=sys.stderr)
        return 1
    return 0


def _run_case(model, case: Case, sampling: dict, cancellation, label_map: LabelMap | None = None) -> None:
    """One case: an edit when the row names a scan to edit, else a synthesis; `sampling` holds the
    requests' `steps`, `scheduler` and `strength`."""
    if case.edit is not None:
        from VCMSynthesisLib.edit import EditRequest, run_edit

        run_edit(model, EditRequest(image=case.edit, segmentation=case.segmentation, output=case.output,
                                    original_segmentation=case.original_segmentation, region=case.region,
                                    modalities=case.modalities, seed=case.seed, label_map=label_map,
                                    **sampling),
                 cancellation=cancellation)
    else:
        from VCMSynthesisLib.worker import SynthesisRequest, synthesize

        synthesize(model, SynthesisRequest(segmentation=case.segmentation, modalities=case.modalities,
                                           output=case.output, seed=case.seed, label_map=label_map,
                                           **sampling),
                   cancellation=cancellation)


def register(subparsers) -> None:
    from VCMSynthesisLib.runtime import DEVICES, add_scheduler_argument, add_strength_argument, positive_int

    parser = subparsers.add_parser(
        "batch", help="synthesize every case of a CSV manifest (resumable; splits across torchrun ranks)",
        description="Synthesize (or edit) every case of a CSV manifest (columns output, segmentation, seed, "
                    "modality:<NAME>; for edits edit, original_segmentation or region; paths relative to the "
                    "manifest). Finished outputs are skipped; under torchrun the ranks share the cases.")
    parser.add_argument("--manifest", type=Path, required=True,
                        help="CSV with columns output, segmentation, seed, modality:<NAME> "
                             "(edits: edit, original_segmentation, region)")
    parser.add_argument("--model", required=True, help="model name or folder")
    add_label_map_arguments(parser)
    parser.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
    add_scheduler_argument(parser)
    add_strength_argument(parser)
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default auto)")
    parser.add_argument("--progress", choices=("text", "json"), default="text",
                        help="one line per case, as text or JSON")
    parser.set_defaults(handler=_run_batch_command)


def _run_batch_command(args: argparse.Namespace) -> int:
    return run_batch(args.manifest, args.model, steps=args.steps, scheduler=args.scheduler,
                     strength=args.strength, device=args.device, json_progress=args.progress == "json",
                     label_map=label_map_of(args))
