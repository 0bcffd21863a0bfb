"""Fault injection: runs killed at random moments, and runs on a full disk; is anything lost?

Each kill run is `python -m VCMSynthesisLib synthesize` (a tiny random model, one thread) writing
over an existing output, sent SIGKILL, SIGTERM or SIGINT (in turn) at a random moment: two runs
in three at a uniform moment of the whole run (start-up and imports included), one in three at a
uniform moment of the write itself (after its partial file appears). Outputs cycle through
.nrrd, .nii.gz, .nii and .mha; the segmentation is large enough (`--size`^3 voxels) that
writing takes a fair share of the run. After each run the final name must hold either the
previous file, unchanged, or a complete new one (read back in full by SimpleITK, and by nibabel
for NIfTI): otherwise it is corrupt; a missing file is lost. Exit codes: 0 (done before the
signal, or signalled after the rename), 130/143 (cancelled), -9 (SIGKILL), -15 (SIGTERM during
the imports, before the worker installs its handler); any other is listed below the table.
Partial files left right after a run are counted (SIGKILL cannot clean up: the next run into
that folder removes them, which is checked at the end). Full-disk runs write onto a 1 MiB tmpfs
filled to a random free space below the output's size (root only; skipped otherwise).

Usage: .venv/bin/python bench/bench_faults.py [--kills 210] [--full-disk 20] [--size 128]
       [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "VCMSynthesis"), str(REPO / "VCMSynthesis" / "Testing" / "Python")]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "VCMSynthesis"), "OMP_NUM_THREADS": "1"}
SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def _command(model: Path, segmentation: Path, output: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "VCMSynthesisLib", "synthesize", "--model", str(model), "--segmentation",
            str(segmentation), "--output", str(output), "--device", "cpu", "--seed", str(seed),
            "--progress", "json"]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _complete(path: Path) -> bool:
    """Reads back in full: SimpleITK for every format, nibabel's data too for NIfTI (ITK's NIfTI
    reader zero-fills a truncated file)."""
    try:
        sitk.ReadImage(str(path))
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel

            np.asarray(nibabel.load(str(path)).dataobj)
    except Exception:
        return False
    return True


def _partials(folder: Path, pid: int | None = None) -> int:
    """Partial files in `folder` (of process `pid` only, if given)."""
    marks = (".partial-", ".previous-") if pid is None else (f".partial-{pid}", f".previous-{pid}")
    return sum(any(mark in path.name for mark in marks) for path in folder.iterdir())


def _setup(work: Path, size: int) -> tuple[Path, Path, Path]:
    from tiny_models import make_tiny_model_folder
    from volume_cases import blob, make_image, write_case

    model = make_tiny_model_folder(work / "tiny", modalities=None)
    shape = (size,) * 3
    labels = np.zeros(shape, np.int16)
    labels[blob(shape, (size // 2,) * 3, (size // 3,) * 3)] = 1
    labels[blob(shape, (size // 2,) * 3, (size // 6,) * 3)] = 2
    image = make_image(labels, "axis_aligned")
    image.SetSpacing((32.0 / size,) * 3)
    large = write_case(image, work, "large", "nrrd-lps")
    small_shape = (14, 16, 18)
    small = np.zeros(small_shape, np.int16)
    small[blob(small_shape, (7, 8, 9), (5, 6, 7))] = 1
    small_path = write_case(make_image(small, "oblique"), work, "small", "nrrd-lps")
    return model, large, small_path


def _clean_run(command: list[str]) -> None:
    subprocess.run(command, capture_output=True, check=True, env=ENV)


def _timed_run(command: list[str], output: Path) -> tuple[float, float]:
    """(seconds to exit, seconds the partial file exists: the write) of a clean run."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    partial = output.with_name(f".{output.name.split('.')[0]}.partial-{process.pid}{_suffix(output)}")
    appeared = renamed = None
    while process.poll() is None:
        exists = partial.exists()
        if appeared is None and exists:
            appeared = time.perf_counter()
        elif appeared is not None and renamed is None and not exists:
            renamed = time.perf_counter()
        time.sleep(0.001)
    end = time.perf_counter()
    return end - start, (renamed or end) - (appeared or end)


def _suffix(path: Path) -> str:
    return next(suffix for suffix in SUFFIXES if path.name.endswith(suffix))


def run_kills(work: Path, model: Path, segmentation: Path, kills: int, rng: random.Random) -> list[dict]:
    folders = {suffix: work / f"kills{suffix.replace('.', '-')}" for suffix in SUFFIXES}
    durations = {}
    for suffix, folder in folders.items():
        folder.mkdir()
        output = folder / f"result{suffix}"
        _clean_run(_command(model, segmentation, output, 0))  # the previous file
        runs = [_timed_run(_command(model, segmentation, output, 0), output) for _ in range(3)]
        durations[suffix] = tuple(float(np.median(column)) for column in zip(*runs, strict=True))
    results = []
    for index in range(kills):
        signum = SIGNALS[index % len(SIGNALS)]
        suffix = SUFFIXES[(index // len(SIGNALS)) % len(SUFFIXES)]
        during_write = (index // (len(SIGNALS) * len(SUFFIXES))) % 3 == 2
        folder = folders[suffix]
        output = folder / f"result{suffix}"
        previous = _digest(output)
        process = subprocess.Popen(_command(model, segmentation, output, index + 1), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=ENV)
        if during_write:
            pattern = f".result.partial-{process.pid}{suffix}"
            deadline = time.monotonic() + 120
            while not (folder / pattern).exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, durations[suffix][1]))
        else:
            time.sleep(rng.uniform(0, durations[suffix][0] * 1.05))
        if process.poll() is None:
            process.send_signal(signum)
        _, err = process.communicate()
        after = _digest(output)
        if after is None:
            outcome = "lost"
        elif after == previous:
            outcome = "kept"
        else:
            outcome = "replaced" if _complete(output) else "corrupt"
        moment = "write" if during_write else "uniform"
        results.append({"signal": signal.Signals(signum).name, "moment": moment,
                        "outcome": outcome, "code": process.returncode,
                        "partials": _partials(folder, process.pid), "traceback": "Traceback" in err,
                        "last_line": (err.strip().splitlines() or [""])[-1]})
    for suffix, folder in folders.items():  # one clean run into each folder removes SIGKILL's partials
        _clean_run(_command(model, segmentation, folder / f"result{suffix}", 10**6))
    results.append({"left_after_clean_runs": sum(_partials(folder) for folder in folders.values())})
    return results


def _mount(point: Path, size: str) -> bool:
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                             capture_output=True, check=False)
    return mounted.returncode == 0


def run_full_disk(work: Path, model: Path, segmentation: Path, runs: int,
                  rng: random.Random) -> list[dict] | None:
    from test_faults import fill
    results = []
    for index in range(runs):
        suffix = SUFFIXES[index % len(SUFFIXES)]
        disk = work / f"disk{index}"
        if not _mount(disk, "1m"):
            return None
        try:
            output = disk / f"result{suffix}"
            _clean_run(_command(model, segmentation, output, 0))
            previous, size = _digest(output), output.stat().st_size
            fill(disk, rng.randrange(0, size))
            finished = subprocess.run(_command(model, segmentation, output, index + 1), capture_output=True,
                                      text=True, env=ENV, check=False)
            after = _digest(output)
            outcome = ("lost" if after is None else "kept" if after == previous
                       else "replaced" if _complete(output) else "corrupt")
            error_lines = [line for line in finished.stderr.splitlines() if line.startswith("error:")]
            results.append({"outcome": outcome, "code": finished.returncode, "partials": _partials(disk),
                            "traceback": "Traceback" in finished.stderr,
                            "one_line": len(error_lines) == 1 or finished.returncode == 0})
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    return results


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def report(kills: list[dict], full_disk: list[dict] | None) -> str:
    left = kills[-1]["left_after_clean_runs"]
    kills = kills[:-1]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for result in kills:
        groups[(result["signal"], result["moment"])].append(result)
    rows = [["signal", "moment", "runs", "corrupt", "lost", "kept previous", "replaced (complete)",
             "exit codes", "runs leaving partials", "tracebacks"]]
    for (name, moment), results in sorted(groups.items()):
        outcomes = Counter(result["outcome"] for result in results)
        codes = Counter(result["code"] for result in results)
        rows.append([name, moment, str(len(results)), str(outcomes["corrupt"]), str(outcomes["lost"]),
                     str(outcomes["kept"]), str(outcomes["replaced"]),
                     " ".join(f"{code}:{count}" for code, count in sorted(codes.items())),
                     str(sum(result["partials"] > 0 for result in results)),
                     str(sum(result["traceback"] for result in results))])
    text = _table(rows)
    expected = {0, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 130, 143}
    for result in kills:
        if result["code"] not in expected:
            text += f"\n{result['signal']} -> exit {result['code']}: {result['last_line']}"
    text += (f"\n\n{len(kills)} kills: {sum(r['outcome'] == 'corrupt' for r in kills)} corrupt, "
             f"{sum(r['outcome'] == 'lost' for r in kills)} lost; partial files left after one clean run "
             f"into each folder: {left}\n")
    if full_disk is None:
        return text + "\nfull-disk runs skipped: mounting a tmpfs needs root\n"
    outcomes = Counter(result["outcome"] for result in full_disk)
    rows = [["full-disk runs", "corrupt", "lost", "kept previous", "replaced (fitted)", "non-zero exit",
             "runs leaving partials", "tracebacks", "one error line"],
            [str(len(full_disk)), str(outcomes["corrupt"]), str(outcomes["lost"]), str(outcomes["kept"]),
             str(outcomes["replaced"]), str(sum(r["code"] != 0 for r in full_disk)),
             str(sum(r["partials"] > 0 for r in full_disk)), str(sum(r["traceback"] for r in full_disk)),
             str(sum(r["one_line"] for r in full_disk))]]
    return text + "\n" + _table(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=210, help="killed runs (default 210)")
    parser.add_argument("--full-disk", type=int, default=20, help="full-disk runs (default 20; root only)")
    parser.add_argument("--size", type=int, default=128, help="segmentation size per axis (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    args = parser.parse_args()
    # Started in the background (`cmd &`), this process and its children would ignore SIGINT;
    # a handled signal is reset to the default in the children, so they see Ctrl-C as a user's would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    try:
        model, large, small = _setup(work, args.size)
        started = time.perf_counter()
        kills = run_kills(work, model, large, args.kills, rng)
        full_disk = run_full_disk(work, model, small, args.full_disk, rng) if args.full_disk else None
        print(report(kills, full_disk))
        print(f"({time.perf_counter() - started:.0f} s; segmentation {args.size}^3, tiny model, one thread)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
