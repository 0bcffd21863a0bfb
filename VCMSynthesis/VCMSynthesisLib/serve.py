"""`vcm-synthesis serve`: run the panel's jobs on this machine's GPU for clients elsewhere.

A client (`remote.py`: the CLI's `--server`, the batch script) uploads a job folder as one tar
(the condition files and `job.json`, whose worker arguments name those files by bare name);
the server checks it, queues it (FIFO, one job at a time: one GPU), runs the same worker code
in this process with the model kept loaded between jobs, and streams the worker's JSON lines
back on the same response, plus `{"queue": k}` while waiting and `{"heartbeat": true}` when
nothing else was said for `HEARTBEAT_S`. The last line is `{"result": NAME, "sha256": HEX, ...}`
or `{"error": "<one line>", "exit_code": N}`; the client then fetches the files and deletes the job.

Security: every request needs `Authorization: Bearer <token>` (compared with
`hmac.compare_digest`, 401 before any work); the token is read from a file. Uploads are limited
in size (413) and in number of jobs queued (429); only bare file names with volume suffixes are
accepted, NRRD headers may not name a detached data file, and every path argument must name a
file of the job. Job folders live under the server's work folder and are removed once their
result is fetched, or `KEEP_S` after the job ended.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name
# types imported inside `create_app` (FastAPI is imported only when serving); hence `Optional`.
import argparse
import asyncio
import contextlib
import gzip
import hmac
import io
import json
import os
import queue
import shutil
import sys
import tarfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from VCMSynthesisLib import __version__
from VCMSynthesisLib.errors import EXIT_SIGINT, Cancelled, UserError

DEFAULT_PORT = 8765
#: Commands a server runs; their parsers are the CLI's own.
SERVED_COMMANDS = ("synthesize", "edit", "superres")
#: Names an upload may hold besides `job.json`: single-file volumes (no .nhdr/.mhd/.hdr pairs).
VOLUME_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii")
JOB_DESCRIPTION = "job.json"
MAX_FILES = 16
HEARTBEAT_S = 2.0
KEEP_S = 600.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_NRRD_DATA_FIELDS = ("data file", "datafile")


class Refused(Exception):
    """An upload the server will not run: HTTP `status` and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_token(path: Union[str, os.PathLike]) -> str:
    """The access token in `path` (its first line), refused in one line when missing or short."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise UserError(f"cannot read the token file '{path}' ({error.strerror}); "
                        "give --token-file FILE") from None
    if len(token) < 16:
        raise UserError(f"the token file '{path}' holds no token of 16 characters or more; write one with "
                        "`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE`")
    return token


def token_matches(header: Optional[str], token: str) -> bool:
    """Whether an `Authorization` header carries `token`, compared in constant time."""
    given = header[len("Bearer "):] if header and header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


# --- what an upload may hold ------------------------------------------------------------------


def check_upload_name(name: str) -> None:
    """A bare file name (no folder, no `..`, not hidden) that is `job.json` or a volume."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise Refused(400, f"the upload holds '{name}': only plain file names are accepted, no paths")
    if name != JOB_DESCRIPTION and not name.lower().endswith(VOLUME_SUFFIXES):
        raise Refused(400, f"the upload holds '{name}': only {', '.join(VOLUME_SUFFIXES)} volumes and "
                           f"{JOB_DESCRIPTION} are accepted")


def check_volume_content(name: str, head: bytes) -> None:
    """Refuse a volume that is not a self-contained NRRD or NIfTI file (by content, not by name).

    ITK picks a reader by content, so a NRRD header in a file named `.nii.gz` is read as NRRD:
    every NRRD header is checked for a detached data file, whatever the name.
    """
    if head.startswith(b"\x1f\x8b"):  # gzip: only .nii.gz holds it
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(head)) as unpacked:
                head = unpacked.read(352)
        except (OSError, EOFError):
            head = b""
        if head[344:347] not in (b"n+1", b"n+2") and head[4:7] not in (b"n+2",):
            raise Refused(400, f"'{name}' is compressed but not a NIfTI volume")
        return
    if head.startswith(b"NRRD"):
        header = head.split(b"\n\n", 1)[0].decode("latin-1")
        for line in header.splitlines()[1:]:
            key = line.split(":", 1)[0].strip().lower()
            if key in _NRRD_DATA_FIELDS:
                raise Refused(400, f"'{name}' is a NRRD header naming a separate data file; upload "
                                   "self-contained .nrrd files (data in the file)")
        return
    if head[344:347] in (b"n+1",) or head[4:8] == b"n+2\0":
        return
    raise Refused(400, f"'{name}' is neither a NRRD nor a NIfTI volume")


def unpack_upload(archive: Path, folder: Path) -> dict:
    """Extract an uploaded tar into `folder` (checked member by member); return its `job.json`."""
    try:
        with tarfile.open(archive, mode="r:") as bundle:
            members = bundle.getmembers()
            if len(members) > MAX_FILES:
                raise Refused(400, f"the upload holds {len(members)} files; a job has at most {MAX_FILES}")
            names = set()
            for member in members:
                check_upload_name(member.name)
                if not member.isfile() or member.name in names:
                    raise Refused(400, f"the upload's '{member.name}' is not a plain file, or comes twice")
                names.add(member.name)
                source = bundle.extractfile(member)
                head = source.read(64 * 1024)
                if member.name != JOB_DESCRIPTION:
                    check_volume_content(member.name, head)
                with open(folder / member.name, "xb") as target:
                    target.write(head)
                    shutil.copyfileobj(source, target)
    except tarfile.TarError as error:
        raise Refused(400, f"the upload is not a tar archive of a job folder ({error})") from None
    if JOB_DESCRIPTION not in names:
        raise Refused(400, f"the upload has no {JOB_DESCRIPTION}")
    try:
        description = json.loads((folder / JOB_DESCRIPTION).read_text(encoding="utf-8"))
        arguments = description["arguments"]
        if not (isinstance(arguments, list) and all(isinstance(a, str) for a in arguments)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise Refused(400, f"the upload's {JOB_DESCRIPTION} holds no list of worker arguments") from None
    return description


def parse_job_arguments(arguments: list[str], folder: Path, models: set[str],
                        device: str) -> argparse.Namespace:
    """The job's worker command line, parsed by the CLI's own parser, its paths inside `folder`.

    Every path must be a bare name (inputs: files of the upload; outputs: new names); the model
    must be one this server lists; the device is the server's.
    """
    from VCMSynthesisLib.cli import build_parser

    if not arguments or arguments[0] not in SERVED_COMMANDS:
        command = arguments[0] if arguments else "nothing"
        raise Refused(400, f"this server runs {', '.join(SERVED_COMMANDS)} jobs, not {command}")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser(arguments[0]).parse_args(arguments)
    except SystemExit:
        reason = (stderr.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
        raise Refused(400, f"the job's arguments are not valid here ({reason})") from None
    if getattr(args, "server", None) is not None:
        raise Refused(400, "the job's arguments name another server (--server)")
    if args.model not in models:
        raise Refused(400, f"model '{args.model}' is not on this server; it has: {', '.join(sorted(models))}")
    uploaded = {path.name for path in folder.iterdir()}
    outputs = {"output", "uncertainty", "preview"}

    def inside(path: Path, key: str) -> Path:
        name, flag = str(path), "--" + key.replace("_", "-")
        if name != Path(name).name or name in ("", ".", ".."):
            raise Refused(400, f"the job's {flag} '{name}' is a path; name a file of the job")
        if key in outputs and name in uploaded:
            raise Refused(400, f"the job's {flag} '{name}' is one of its inputs; outputs never overwrite "
                               "inputs")
        if key not in outputs and name not in uploaded:
            raise Refused(400, f"the job's {flag} '{name}' is not in the upload")
        return folder / name

    for key, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, key, inside(value, key))
    if hasattr(args, "modality"):
        args.modality = [(name, inside(path, "modality")) for name, path in args.modality]
    if hasattr(args, "preview"):
        args.preview = None  # nobody watches it here
    args.device, args.progress = device, "json"
    return args


# --- the queue --------------------------------------------------------------------------------


class ThreadCancellation:
    """`runtime.SignalCancellation`'s interface for a job run on the server's thread: `cancel()`
    (from a request) is seen by the sampler between steps; writes in `deferred()` complete."""

    def __init__(self) -> None:
        self._requested = threading.Event()

    def cancel(self) -> None:
        self._requested.set()

    def should_cancel(self) -> bool:
        return self._requested.is_set()

    def raise_if_requested(self) -> None:
        if self._requested.is_set():
            raise Cancelled(EXIT_SIGINT)

    def commit(self) -> None:
        """Just before a write's rename (`files.AtomicWrites`): a cancel so far still stops it."""
        self.raise_if_requested()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.raise_if_requested()
        yield


@dataclass
class ServerJob:
    """One uploaded job: its folder, parsed arguments, the lines said so far, its results."""

    id: str
    folder: Path
    args: argparse.Namespace
    lines: list[dict] = field(default_factory=list)
    results: dict[str, Path] = field(default_factory=dict)  # file name -> path, once succeeded
    ended_at: Optional[float] = None
    cancellation: ThreadCancellation = field(default_factory=ThreadCancellation)

    def say(self, line: dict[str, Any]) -> None:
        self.lines.append(line)  # list.append is atomic; readers only read by index

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def settled(self) -> bool:
        """Whether its last line (result or error) was said: a client that leaves now still fetches."""
        return bool(self.lines) and ("result" in self.lines[-1] or "error" in self.lines[-1])


class JobQueue:
    """FIFO of jobs run one at a time on one thread, with the last model kept loaded."""

    def __init__(self, device: str, max_jobs: int, keep_s: float = KEEP_S):
        self.device, self.max_jobs, self.keep_s = device, max_jobs, keep_s
        self.jobs: dict[str, ServerJob] = {}
        self.waiting: list[str] = []
        self._fifo: queue.Queue[ServerJob] = queue.Queue()
        self._lock = threading.Lock()
        self._model: Optional[tuple[str, Any]] = None  # (name, LoadedModel)
        threading.Thread(target=self._run_forever, name="vcm-serve-jobs", daemon=True).start()

    def open_jobs(self) -> int:
        return sum(not job.ended for job in self.jobs.values())

    def submit(self, job: ServerJob) -> None:
        with self._lock:
            if self.open_jobs() >= self.max_jobs:
                raise Refused(429, f"the server has {self.max_jobs} jobs queued or running; try again later")
            self.jobs[job.id] = job
            self.waiting.append(job.id)
        self._fifo.put(job)

    def position(self, job: ServerJob) -> int:
        """1 for the next job to run, 0 once running."""
        with self._lock:
            return self.waiting.index(job.id) + 1 if job.id in self.waiting else 0

    def remove(self, job: ServerJob) -> None:
        job.cancellation.cancel()
        with self._lock:
            self.jobs.pop(job.id, None)
        if job.ended:
            shutil.rmtree(job.folder, ignore_errors=True)
        # A job still running removes its folder when it ends (`_run_forever`).

    def _run_forever(self) -> None:
        while True:
            try:
                job = self._fifo.get(timeout=1.0)
            except queue.Empty:
                self._remove_expired()
                continue
            with self._lock:
                self.waiting.remove(job.id)
            self._run(job)
            job.ended_at = time.monotonic()
            if job.id not in self.jobs:  # deleted while running
                shutil.rmtree(job.folder, ignore_errors=True)
            self._remove_expired()

    def _remove_expired(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.ended and now - job.ended_at > self.keep_s:
                self.remove(job)

    def loaded_model(self, name: str):
        """The model `name` on this server's device, loading it unless it is the one kept."""
        from VCMSynthesisLib.worker import load_model

        if self._model is None or self._model[0] != name:
            self._model = None  # free the previous one first (GPU memory)
            self._model = (name, load_model(name, self.device))
        return self._model[1]

    def _run(self, job: ServerJob) -> None:
        from VCMSynthesisLib.checksums import Checksums
        from VCMSynthesisLib.files import provenance_sidecar
        from VCMSynthesisLib.runtime import JsonProgress

        args = job.args
        try:
            job.cancellation.raise_if_requested()
            start = time.perf_counter()
            model = self.loaded_model(args.model)
            load_s = time.perf_counter() - start
            progress = JsonProgress(emit=job.say)
            warn = lambda message: job.say({"warning": message})  # noqa: E731
            if args.command == "synthesize":
                from VCMSynthesisLib.worker import synthesis_request, synthesize

                result = synthesize(model, synthesis_request(args), progress=progress,
                                    cancellation=job.cancellation, warn=warn)
            elif args.command == "superres":
                from VCMSynthesisLib.superres import check_superres_paths, run_superres
                from VCMSynthesisLib.volumes import read_volume

                check_superres_paths(args)
                result = run_superres(model, args, read_volume(args.input), progress=progress,
                                      cancellation=job.cancellation, warn=warn)
            else:
                from VCMSynthesisLib.edit import check_edit_request, edit_request, run_edit

                request = edit_request(args)
                check_edit_request(request)
                result = run_edit(model, request, progress=progress, cancellation=job.cancellation, warn=warn)
            line: dict[str, Any] = {"result": result.output.name,
                                    "sha256": Checksums.of_file(result.output).sha256,
                                    "timings": {"load_s": round(load_s, 4),
                                                **{k: round(v, 4) for k, v in result.timings.items()}}}
            job.results[result.output.name] = result.output
            if result.uncertainty is not None:
                line["uncertainty"] = result.uncertainty.name
                line["uncertainty_sha256"] = Checksums.of_file(result.uncertainty).sha256
                job.results[result.uncertainty.name] = result.uncertainty
            # A NIfTI result's provenance is its sidecar (`files.provenance_sidecar`): it travels too.
            sidecars = {volume: provenance_sidecar(path) for volume, path in list(job.results.items())}
            line["sidecars"] = {volume: {"name": sidecar.name, "sha256": Checksums.of_file(sidecar).sha256}
                                for volume, sidecar in sidecars.items() if sidecar.is_file()}
            job.results.update({sidecar.name: sidecar for sidecar in sidecars.values() if sidecar.is_file()})
            for key in ("edited_voxels",):
                if hasattr(result, key):
                    line[key] = getattr(result, key)
            job.say(line)
        except Cancelled:
            job.say({"error": "cancelled; nothing was written", "exit_code": EXIT_SIGINT})
        except UserError as error:
            job.say({"error": str(error), "exit_code": error.exit_code})
        except Exception as error:  # a bug: one line to the client, the traceback in the server's log
            traceback.print_exc()
            reason = f"internal error on the server: {type(error).__name__}: {error}".splitlines()[0]
            job.say({"error": reason, "exit_code": 1})


# --- the HTTP application ---------------------------------------------------------------------


@dataclass
class ServerSettings:
    token: str
    work_folder: Path
    device: str = "auto"
    max_jobs: int = 8
    max_upload_bytes: int = 512 * 1024 * 1024
    keep_s: float = KEEP_S


def served_models() -> list[str]:
    """The names of the models this server can run (`registry.list_models`, available ones)."""
    from VCMSynthesisLib.registry import list_models

    return [entry.name for entry in list_models() if entry.available]


def server_info(device: str) -> dict[str, Any]:
    """What `GET /info` says: versions, device, models (the panel's *Check server*)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"version": __version__, "device": device, "gpu": gpu, "torch": torch.__version__,
            "models": served_models()}


def create_app(settings: ServerSettings):
    """The FastAPI application; jobs run on a `JobQueue` thread of this process."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    from VCMSynthesisLib.runtime import resolve_device

    device = resolve_device(settings.device)
    jobs_folder = settings.work_folder / "jobs"
    shutil.rmtree(jobs_folder, ignore_errors=True)  # a previous server's jobs: no client can fetch them
    jobs_folder.mkdir(parents=True)
    jobs = JobQueue(device, settings.max_jobs, settings.keep_s)
    app = FastAPI(title="VCM Synthesis server", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def authorize(authorization: Optional[str] = Header(None)) -> None:
        if not token_matches(authorization, settings.token):
            raise HTTPException(401, "the server refused the access token; check --token-file")

    @app.exception_handler(Refused)
    async def refused(request: Request, error: Refused):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.get("/info", dependencies=[Depends(authorize)])
    def info():
        return server_info(device)

    def find(job_id: str) -> ServerJob:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"the server has no job {job_id} (fetched already, or expired)")
        return job

    @app.post("/jobs", dependencies=[Depends(authorize)])
    async def submit(request: Request):
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"the upload has {int(declared) / 2**20:.1f} MiB; this server takes at most "
                               f"{limit / 2**20:.0f} MiB (--max-upload-mb)")
        if jobs.open_jobs() >= settings.max_jobs:
            raise Refused(429, f"the server has {settings.max_jobs} jobs queued or running; try again later")
        job_id = uuid.uuid4().hex
        folder = jobs_folder / job_id
        folder.mkdir()
        archive = jobs_folder / f"{job_id}.tar"
        try:
            received = 0
            with open(archive, "xb") as target:
                async for block in request.stream():
                    received += len(block)
                    if received > limit:
                        raise Refused(413, f"the upload exceeds {limit / 2**20:.0f} MiB, this server's limit "
                                           "(--max-upload-mb)")
                    target.write(block)
            description = await asyncio.to_thread(unpack_upload, archive, folder)
            args = parse_job_arguments(description["arguments"], folder, set(served_models()), device)
            job = ServerJob(id=job_id, folder=folder, args=args)
            jobs.submit(job)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            archive.unlink(missing_ok=True)
        return StreamingResponse(stream_lines(job), media_type="application/x-ndjson")

    async def stream_lines(job: ServerJob):
        said, last_position, last_sent = 0, None, time.monotonic()
        try:
            yield json.dumps({"job": job.id}) + "\n"
            while True:
                position = jobs.position(job)
                if position and position != last_position:
                    last_position = position
                    yield json.dumps({"queue": position}) + "\n"
                    last_sent = time.monotonic()
                lines = job.lines[said:]
                said += len(lines)
                for line in lines:
                    yield json.dumps(line) + "\n"
                    last_sent = time.monotonic()
                if job.ended and said == len(job.lines):
                    return
                if time.monotonic() - last_sent > HEARTBEAT_S:
                    yield json.dumps({"heartbeat": True}) + "\n"
                    last_sent = time.monotonic()
                await asyncio.sleep(0.05)
        finally:
            if not job.settled:  # the client went away mid-job: nobody will fetch the result
                jobs.remove(job)

    @app.get("/jobs/{job_id}/files/{name}", dependencies=[Depends(authorize)])
    def fetch(job_id: str, name: str):
        job = find(job_id)
        if name not in job.results:
            raise HTTPException(404, f"job {job_id} has no result '{name}'")
        return FileResponse(job.results[name], media_type="application/octet-stream")

    @app.delete("/jobs/{job_id}", dependencies=[Depends(authorize)])
    def delete(job_id: str):
        jobs.remove(find(job_id))
        return {"deleted": job_id}

    app.state.jobs = jobs
    return app


# --- command line -----------------------------------------------------------------------------


def register(subparsers) -> None:
    from VCMSynthesisLib.registry import user_home
    from VCMSynthesisLib.runtime import DEVICES, positive_int

    parser = subparsers.add_parser(
        "serve", help="run synthesis jobs for remote clients (Slicer on a laptop) on this machine's GPU",
        description="Serve the panel's jobs over HTTP: clients connect with --server URL --token-file F.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; others need a TLS reverse proxy)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the access token")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where jobs run (default auto)")
    parser.add_argument("--max-jobs", type=positive_int, default=8,
                        help="jobs queued or running at most (429 beyond)")
    parser.add_argument("--max-upload-mb", type=positive_int, default=512, help="largest upload (413 beyond)")
    parser.add_argument("--result-timeout-s", type=float, default=KEEP_S,
                        help=f"remove a job's folder this long after it ended, fetched or not "
                             f"(default {KEEP_S:g})")
    parser.add_argument("--work-dir", type=Path, default=user_home() / "server",
                        help="where job folders live (default: the user model folder's server/)")
    parser.set_defaults(handler=run_serve_command)


def start_warnings(host: str, token_file: Path) -> list[str]:
    """What `serve` warns about before it listens: a non-loopback address, a token others can read."""
    warnings = []
    if host not in LOOPBACK_HOSTS:
        warnings.append(f"serving on {host} without TLS: the token and the scans cross the network in clear; "
                        "put a TLS reverse proxy in front (README: Remote GPU server)")
    if os.name == "posix" and Path(token_file).stat().st_mode & 0o077:
        warnings.append(f"the token file '{token_file}' is readable by other users; chmod 600 it")
    return warnings


def run_serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs FastAPI and uvicorn: pip install 'vcm-synthesis[server]'") from None
    token = read_token(args.token_file)
    for warning in start_warnings(args.host, args.token_file):
        print(f"warning: {warning}", file=sys.stderr)
    settings = ServerSettings(token=token, work_folder=args.work_dir.resolve(), device=args.device,
                              max_jobs=args.max_jobs, max_upload_bytes=args.max_upload_mb * 2**20,
                              keep_s=args.result_timeout_s)
    app = create_app(settings)
    print(f"serving VCM Synthesis {__version__} on http://{args.host}:{args.port} "
          f"(device {app.state.jobs.device}, work folder {settings.work_folder})", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

