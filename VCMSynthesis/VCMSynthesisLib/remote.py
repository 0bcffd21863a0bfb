"""The client of `vcm-synthesis serve` (`serve.py`): run a job folder on a remote GPU.

Standard library only (`http.client`), so that Slicer's Python and the batch script need
nothing more. `run_remote_job(job, server)` uploads a `jobs.Job` folder as a tar, passes the
server's JSON lines to `on_line` as they come, then downloads the results, checks their sha256
and renames each into place; the job is deleted on the server afterwards. Every failure is one
`UserError` line (unreachable, refused, version mismatch, the job's own one-line reason); a
server silent for `SILENCE_S` (it heartbeats every 2 s) or gone mid-job leaves no output.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from VCMSynthesisLib import __version__
from VCMSynthesisLib.errors import EXIT_SIGINT, EXIT_SIGTERM, Cancelled, UsageError, UserError
from VCMSynthesisLib.jobs import JOB_DESCRIPTION, LOG_NAME, Job

#: A server says something at least every 2 s (`serve.HEARTBEAT_S`); silence this long means it is gone.
SILENCE_S = 10.0
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Server:
    """Where a server listens and the token it wants (`Server.from_files(url, token_file)`)."""

    url: str
    token: str

    @classmethod
    def from_files(cls, url: str, token_file: str | os.PathLike | None) -> Server:
        from VCMSynthesisLib.serve import read_token

        if token_file is None:
            raise UsageError("--server needs --token-file FILE (the file holding the server's access token)")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"--server '{url}' is not an http:// or https:// URL (e.g. http://gpu-host:8765)")
        return cls(url=url.rstrip("/"), token=read_token(token_file))

    def _connection(self, timeout_s: float = SILENCE_S) -> http.client.HTTPConnection:
        parsed = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        return kind(parsed.hostname, parsed.port, timeout=timeout_s)

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        """Send one request; return (connection, response) for a 2xx answer, else one `UserError` line."""
        connection = self._connection()
        headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        try:
            connection.request(method, urllib.parse.urlsplit(self.url).path + path, body=body,
                               headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise UserError(f"cannot reach the VCM Synthesis server at {self.url} ({_reason(error)}); is "
                            "`vcm-synthesis serve` running there, and the URL right?") from None
        if response.status >= 400:
            detail = _detail(response)
            connection.close()
            if response.status == 401:
                raise UserError(f"the server at {self.url} refused the access token; check --token-file")
            raise UserError(f"the server at {self.url} refused the job: {detail}")
        return connection, response

    def info(self) -> dict:
        """`GET /info` (version, device, GPU, models), refused when the versions differ."""
        connection, response = self.request("GET", "/info")
        with contextlib.closing(connection):
            info = json.loads(response.read())
        if info.get("version") != __version__:
            raise UserError(f"the server at {self.url} runs VCM Synthesis {info.get('version')}, this client "
                            f"{__version__}; install the same version on both")
        return info


def _reason(error: BaseException) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"no answer within {SILENCE_S:g} s"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _detail(response) -> str:
    """The server's one-line reason from an error response."""
    body = response.read(64 * 1024)
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = body.decode("utf-8", "replace").strip() or f"HTTP {response.status} {response.reason}"
    return str(detail).splitlines()[0] if str(detail) else f"HTTP {response.status}"


def job_bundle(job: Job) -> Path:
    """The job folder as the tar the server takes (written into the folder): its files by bare
    name, and `job.json` whose arguments name them so."""
    prefix = str(job.folder) + os.sep
    arguments = [token.replace(prefix, "") for token in job.arguments]
    archive = job.folder / ".upload.tar"
    with tarfile.open(archive, mode="w", format=tarfile.PAX_FORMAT) as bundle:
        description = json.dumps({"arguments": arguments, "output": job.output.name}).encode("utf-8")
        info = tarfile.TarInfo(JOB_DESCRIPTION)
        info.size = len(description)
        bundle.addfile(info, io.BytesIO(description))
        for path in sorted(job.folder.iterdir()):
            skipped = path.name.startswith(".") or path.name in (JOB_DESCRIPTION, LOG_NAME)
            if path.is_file() and not skipped:
                bundle.add(path, arcname=path.name, recursive=False)
    return archive


def run_remote_job(job: Job, server: Server, destinations: dict[str, Path] | None = None,
                   on_line: Callable[[dict], None] | None = None) -> dict:
    """Run `job` on `server`, its outputs written where its arguments say (as a local run would).

    `destinations` (default: from `localize_job(job)`, which then also links the inputs into the
    folder) maps the job's output names to local paths; each is downloaded beside its path, its
    sha256 checked, then renamed into place (the uncertainty first, the output last). Returns
    the server's result line. Ctrl+C or a dropped connection cancels the job on the server.
    """
    if destinations is None:
        job, destinations = localize_job(job)
    server.info()
    archive = job_bundle(job)
    try:
        with open(archive, "rb") as body:
            connection, response = server.request(
                "POST", "/jobs", body=body,
                headers={"Content-Type": "application/x-tar", "Content-Length": str(archive.stat().st_size)})
    finally:
        archive.unlink(missing_ok=True)
    job_id = None
    try:
        with contextlib.closing(connection):
            final = None
            while final is None:
                try:
                    raw = response.readline()
                except (OSError, http.client.HTTPException) as error:
                    raise UserError(f"the server at {server.url} stopped answering during the job "
                                    f"({_reason(error)}); nothing was written; run it again") from None
                if not raw:
                    raise UserError(f"the server at {server.url} closed the connection during the job "
                                    "(it may have stopped); nothing was written; run it again")
                line = json.loads(raw)
                if "job" in line:
                    job_id = line["job"]
                elif "result" in line or "error" in line:
                    final = line
                elif on_line is not None:  # heartbeats too: a caller may stop on any line
                    on_line(line)
        if "error" in final:
            code = int(final.get("exit_code") or 1)
            if code in (EXIT_SIGINT, EXIT_SIGTERM):
                raise Cancelled(code)
            error_type = UsageError if code == UsageError.exit_code else UserError
            raise error_type(f"{final['error']} (on the server {server.url})")
        _download_results(server, job_id, final, destinations)
        return final
    except KeyboardInterrupt:
        raise Cancelled(EXIT_SIGINT) from None  # closing the stream cancels the job on the server
    finally:
        if job_id is not None:
            _delete_quietly(server, job_id)


def _download_results(server: Server, job_id: str, final: dict, destinations: dict[str, Path]) -> None:
    """The result (and uncertainty) files of a finished job, each with its provenance sidecar where
    the server wrote one (NIfTI), as a local run writes them: renamed into place together, only
    once every file has arrived with the server's sha256 (`files.AtomicWrites`)."""
    from VCMSynthesisLib.files import AtomicWrites, provenance_sidecar
    from VCMSynthesisLib.volumes import output_suffix

    sidecars = final.get("sidecars") or {}
    volumes = [(final.get("uncertainty"), final.get("uncertainty_sha256")),
               (final["result"], final["sha256"])]
    with AtomicWrites() as writes:
        for name, sha256 in volumes:
            if name is None or name not in destinations:
                continue
            destination = Path(destinations[name])
            sidecar = sidecars.get(name)
            if sidecar is not None:  # staged first, like the local write: never a volume without it
                _download(server, job_id, sidecar["name"], sidecar["sha256"],
                          writes.stage(provenance_sidecar(destination), suffix=".json"))
            temporary = writes.stage(destination, suffix=output_suffix(destination))
            _download(server, job_id, name, sha256, temporary)


def _download(server: Server, job_id: str, name: str, sha256: str, temporary: Path) -> None:
    """Stream one result file into `temporary`; a file without the server's sha256 is refused."""
    from VCMSynthesisLib.checksums import Checksums

    connection, response = server.request("GET", f"/jobs/{job_id}/files/{urllib.parse.quote(name)}")
    with contextlib.closing(connection), open(temporary, "wb") as target:
        while True:
            try:  # the network's errors; the disk's are `AtomicWrites`' one line
                block = response.read(_BLOCK)
            except (OSError, http.client.HTTPException) as error:
                raise UserError(f"the result '{name}' from {server.url} did not arrive "
                                f"({_reason(error)}); nothing was written; run it again") from None
            if not block:
                break
            target.write(block)
    if Checksums.of_file(temporary).sha256 != sha256:
        raise UserError(f"the result '{name}' from {server.url} arrived damaged (sha256 differs); "
                        "nothing was written; run it again")


def _delete_quietly(server: Server, job_id: str) -> None:
    """Remove the job's folder on the server (it also expires there on its own)."""
    try:
        connection, _ = server.request("DELETE", f"/jobs/{job_id}")
        connection.close()
    except UserError:
        pass


# --- `vcm-synthesis synthesize|edit|superres --server URL --token-file F` --------------------------------


#: The path arguments a worker writes; every other path argument is an input it reads.
OUTPUT_ARGUMENTS = ("output", "uncertainty", "preview")


def _stage(folder: Path, path: Path, name: str) -> Path:
    """An input inside the job folder: as it is, or linked (else copied) under a bare name."""
    if path.parent == folder:
        return path
    if not path.is_file():
        raise UserError(f"cannot read '{path}': no such file; check the path")
    lower = path.name.lower()
    suffix = next((s for s in (".seg.nrrd", ".nii.gz") if lower.endswith(s)), path.suffix)
    staged = folder / f"{name}{suffix}"
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    return staged


def localize_job(job: Job) -> tuple[Job, dict[str, Path]]:
    """The same job with every file inside its folder, as a server takes it, and where each of
    its outputs goes here (`{name in the folder: local path}`).

    Inputs outside the folder (the batch script's labelmaps, the CLI's files) are linked in;
    outputs outside it are renamed into it. The arguments are read by the CLI's own parser.
    """
    from VCMSynthesisLib.cli import build_parser
    from VCMSynthesisLib.label_maps import preset_names
    from VCMSynthesisLib.volumes import output_suffix

    args = build_parser(job.arguments[0]).parse_args(job.arguments)
    if isinstance(getattr(args, "label_map", None), Path):
        raise UsageError(f"--label-map '{args.label_map}': a label map file does not travel to a server; "
                         f"use a preset ({', '.join(preset_names())}) or run without --server")
    folder, tokens, destinations = job.folder, {}, {}
    paths = {key: value for key, value in vars(args).items() if isinstance(value, Path)}
    inputs = {path.resolve() for key, path in paths.items() if key not in OUTPUT_ARGUMENTS}
    inputs |= {path.resolve() for _, path in getattr(args, "modality", [])}
    for key in OUTPUT_ARGUMENTS:
        if key in paths and paths[key].resolve() in inputs:
            raise UsageError(f"--{key} '{paths[key]}' names an input; give the result a file of its own")
    for key, value in vars(args).items():
        if not isinstance(value, Path):
            continue
        if key in OUTPUT_ARGUMENTS:
            inside = value if value.parent == folder else folder / f"{key}{output_suffix(value)}"
            destinations[inside.name] = value
        else:
            inside = _stage(folder, value, key)
        tokens[str(value)] = str(inside)
    for index, (name, path) in enumerate(getattr(args, "modality", [])):
        tokens[f"{name}={path}"] = f"{name}={_stage(folder, path, f'modality-{index}')}"
    arguments = [tokens.get(token, token) for token in job.arguments]
    return Job(folder=folder, arguments=arguments, output=Path(tokens[str(args.output)])), destinations


def remote_job(args, folder: Path) -> Job:
    """The job of a parsed `synthesize` / `edit` / `superres` command line (its files where they are)."""
    from VCMSynthesisLib.jobs import edit_job, superres_job, synthesis_job

    modalities = dict(getattr(args, "modality", []))
    samples = args.samples if args.samples > 1 else None
    if args.command == "superres":
        job = superres_job(folder, input_path=args.input, output=args.output, model=args.model,
                           spacing=args.spacing, samples=args.samples, steps=args.steps,
                           scheduler=args.scheduler, seed=args.seed)
        extra = [] if args.strength is None else ["--strength", repr(args.strength)]
        if args.uncertainty is not None:
            extra += ["--uncertainty", str(args.uncertainty)]
    elif args.command == "synthesize":
        job = synthesis_job(folder, model=args.model, segmentation=args.segmentation, modalities=modalities,
                            output=args.output, steps=args.steps, scheduler=args.scheduler, seed=args.seed,
                            strength=args.strength, samples=samples, label_map=args.label_map,
                            unmapped=args.unmapped)
        extra = ["--unguided"] if args.unguided else []
    else:
        job = edit_job(folder, model=args.model, image=args.image, segmentation=args.segmentation,
                       original_segmentation=args.original_segmentation, region=args.region,
                       output=args.output, margin_mm=args.margin_mm, samples=samples, steps=args.steps,
                       scheduler=args.scheduler, seed=args.seed, strength=args.strength,
                       label_map=args.label_map, unmapped=args.unmapped)
        extra = ["--resample", str(args.resample)]
        for name, path in modalities.items():
            extra += ["--modality", f"{name}={path}"]
    arguments = job.arguments + extra
    if "--uncertainty" in arguments:  # `jobs` puts it in the folder; this command names its own
        index = arguments.index("--uncertainty")
        if args.uncertainty is None:
            del arguments[index:index + 2]
        else:
            arguments[index + 1] = str(args.uncertainty)
    return Job(folder=folder, arguments=arguments, output=Path(args.output))


def run_remote_command(args) -> int:
    """A `synthesize` / `edit` / `superres` command line run on `--server`: same outputs, lines and
    exit codes."""
    from VCMSynthesisLib.jobs import Progress, new_job_folder
    from VCMSynthesisLib.runtime import TextProgress, check_samples_arguments, emit_json, emit_result
    from VCMSynthesisLib.volumes import check_output_writable

    server = Server.from_files(args.server, args.token_file)
    check_samples_arguments(args.samples, args.seed, args.uncertainty, args.output)
    check_output_writable(args.output)
    json_mode = args.progress == "json"
    bar = None if json_mode else TextProgress()

    def on_line(line: dict) -> None:
        if "heartbeat" in line:
            return
        if json_mode:
            emit_json(line)
        elif "warning" in line:
            print(f"warning: {line['warning']}", flush=True, file=sys.stderr)
        elif (progress := Progress.from_line(line)) is not None:
            bar(progress.step, progress.total)

    start = time.perf_counter()
    folder = new_job_folder()
    try:
        job, destinations = localize_job(remote_job(args, folder))
        final = run_remote_job(job, server, destinations, on_line)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    timings = {**final.get("timings", {}), "total_s": time.perf_counter() - start}
    extra = {"edited_voxels": final["edited_voxels"]} if "edited_voxels" in final else {}
    emit_result(json_mode, args.output, timings, uncertainty=args.uncertainty,
                describe=lambda t: f"on {server.url}, {t.get('total_s', 0):.1f} s in all", **extra)
    return 0


# --- the panel: a remote run with `jobs.WorkerRun`'s interface ---------------------------------


def check_server(url: str, token_file: str | os.PathLike | None) -> str:
    """One line for the panel's *Check server*: the server's version, device and models."""
    info = Server.from_files(url, token_file).info()
    device = info["device"] + (f" ({info['gpu']})" if info.get("gpu") else "")
    models = ", ".join(info.get("models") or []) or "none"
    return f"VCM Synthesis {info['version']} on {device}, torch {info.get('torch')}; models: {models}"


class RemoteRun:
    """`jobs.WorkerRun`'s interface (`poll`, `running`, `outcome`, `wait`, `cancel`, `warnings`,
    `preview`) for a job run on a server, so that the panel's timer loop runs either.

    The job runs on a thread (`run_remote_job`); `cancel()` closes its stream (the server
    cancels the job) and the outcome is "cancelled"; failures are the one-line message. The
    server's lines go to the job's `worker.log` (the panel's *Show log*).
    """

    def __init__(self, job: Job, server: Server):
        import queue
        import threading

        self.job, self.server = job, server
        self.warnings: list[str] = []
        self.preview = None  # a server writes no previews
        self._events: queue.Queue = queue.Queue()
        self._outcome = None
        self._cancel_requested = False
        self._connection_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vcm-remote-run", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from VCMSynthesisLib.jobs import Outcome, Progress

        log = open(self.job.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed below

        def on_line(line: dict) -> None:
            if self._cancel_requested:
                raise KeyboardInterrupt  # leaves the stream: the server cancels the job
            if "heartbeat" not in line:
                log.write(json.dumps(line) + "\n")
                log.flush()
            if "warning" in line:
                self.warnings.append(str(line["warning"]))
            elif (progress := Progress.from_line(line)) is not None:
                self._events.put(progress)

        log_path = self.job.log_path
        log.write(f"$ run on {self.server.url}: {' '.join(self.job.arguments)}\n")
        try:
            final = run_remote_job(self.job, self.server, on_line=on_line)
            log.write(json.dumps(final) + "\n")
            uncertainty = final.get("uncertainty")
            self._outcome = Outcome("succeeded", result=self.job.output, timings=final.get("timings") or {},
                                    log_path=log_path, exit_code=0, warnings=tuple(self.warnings),
                                    uncertainty=uncertainty and self.job.folder / uncertainty)
        except Cancelled as cancelled:
            self._outcome = Outcome("cancelled", message="cancelled", log_path=log_path,
                                    exit_code=cancelled.exit_code)
        except UserError as error:
            log.write(f"error: {error}\n")
            status = "cancelled" if self._cancel_requested else "failed"
            self._outcome = Outcome(status, message=str(error), log_path=log_path, exit_code=error.exit_code)
        finally:
            log.close()

    def poll(self) -> list:
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def outcome(self):
        return None if self.running else self._outcome

    def wait(self, timeout: float | None = None):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the remote job is still running after {timeout} s")
        return self._outcome

    def cancel(self) -> None:
        """Stop at the next line the server sends (within its 2 s heartbeat)."""
        self._cancel_requested = True
