"""The one way this tool writes files: complete and verified, or not at all.

Every output (volumes, uncertainty maps, model folders, downloads, training files) is written
to a temporary name beside its target (`.NAME.partial-PID[SUFFIX]`), flushed to the disk
(fsync), checked by a `verify` callable (e.g. read back), and only then renamed over the target
with `os.replace`. So a full disk, a crash, a SIGKILL or a Cancel leaves the previous file as it
was: the target is never half-written. A cancel request (`raise_if_cancelled`) is honoured up to
the rename. Partial files of processes that died (SIGKILL, power loss) are removed by the next
write into the same folder (`remove_stale_partials`; POSIX only, where a PID can be checked).

Also here: the user folder (`user_home`), where downloaded models and crash logs live.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from VCMSynthesisLib.errors import UserError

HOME_VARIABLE = "VCM_SYNTHESIS_HOME"
# `.NAME.partial-PID...` (being written) and `.NAME.previous-PID` (a folder moved aside while
# its replacement is renamed in).
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(?P<kind>partial|previous)-(?P<pid>\d+)(?P<suffix>.*)$")

Verify = Callable[[Path], None]


def user_home() -> Path:
    """The user folder: `$VCM_SYNTHESIS_HOME`, else `~/.cache/vcm-synthesis`."""
    configured = os.environ.get(HOME_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "vcm-synthesis"


def partial_path(target: str | os.PathLike, suffix: str | None = None) -> Path:
    """The temporary name of `target` for this process: `.NAME.partial-PID` + `suffix`.

    `suffix` (default: the target's format suffix, `.nii.gz` counting as one) stays at the end
    of the name, since writers pick the format from it; `NAME` is the rest of the target's name.
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes[-2:]) if target.suffix == ".gz" else target.suffix
    name = target.name
    if suffix and name.endswith(suffix) and len(name) > len(suffix):
        name = name[: -len(suffix)]
    return target.with_name(f".{name}.partial-{os.getpid()}{suffix}")


def provenance_sidecar(volume: str | os.PathLike) -> Path:
    """`<volume>.json`: the provenance of a volume whose format has no key/value header (NIfTI, MHA)."""
    return Path(f"{os.fspath(volume)}.json")


def remove_stale_partials(folder: str | os.PathLike) -> None:
    """Removes the partial files and folders that dead processes left in `folder`.

    A `.NAME.previous-PID` folder (a model folder moved aside during its replacement) is put
    back as NAME when NAME is missing, else removed. Files of live processes (another write in
    progress) are kept. Only on POSIX: elsewhere a PID cannot be checked without side effects.
    """
    if os.name != "posix":
        return
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if match["kind"] == "previous" and not path.with_name(match["name"]).exists():
                os.replace(path, path.with_name(match["name"]))
            else:
                _remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or not a PID we can check): keep its files
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_error(target: str | os.PathLike, error: OSError) -> UserError:
    """The one-line message of a failed write; the target is unchanged (and says so)."""
    free_space, other_folder = "free some space or write to another disk", "choose a folder you can write to"
    reasons = {
        errno.ENOSPC: ("the disk is full (no space left on device)", free_space),
        errno.EDQUOT: ("the disk quota is exceeded", free_space),
        errno.EROFS: ("the disk is read-only", other_folder),
        errno.EACCES: ("permission denied", other_folder),
        errno.ENAMETOOLONG: ("the file name is too long", "give a shorter name"),
    }
    reason, advice = reasons.get(error.errno, (error.strerror or str(error), other_folder))
    state = "it was left as it was" if Path(target).exists() else "nothing was written"
    return UserError(f"cannot write '{target}': {reason}; {advice} ({state})")


def _as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write; writers in C or Rust (ITK, safetensors, torch.save)
    raise their own types, with the system's message in the text."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, Exception) and os.strerror(errno.ENOSPC) in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


@dataclass
class _Staged:
    target: Path
    temporary: Path
    verify: Verify | None


class AtomicWrites:
    """Files (or folders) written under temporary names and renamed into place together.

    Use as a context manager: `stage()` gives each output's temporary path to write; a clean
    exit fsyncs, verifies and renames them all (in staging order), an exception removes them.
    An `OSError` (full disk, permissions) becomes a one-line `UserError` naming the target.

    Args:
        raise_if_cancelled: called after everything is written and verified, just before the
            first rename; it raises (e.g. `errors.Cancelled`) to abort, leaving the targets.
    """

    def __init__(self, raise_if_cancelled: Callable[[], None] | None = None) -> None:
        self.raise_if_cancelled = raise_if_cancelled
        self._staged: list[_Staged] = []

    def stage(self, target: str | os.PathLike, *, suffix: str | None = None, folder: bool = False,
              verify: Verify | None = None) -> Path:
        """A temporary path for `target` (an empty folder if `folder`); see `partial_path`.

        Args:
            verify: called with the temporary path once it is written and synced; raises
                (a `UserError` saying what is wrong) if the file is not complete and right.
        """
        target = Path(target)
        remove_stale_partials(target.parent)
        temporary = partial_path(target, suffix)
        _remove(temporary)
        self._staged.append(_Staged(target, temporary, verify))
        try:
            if folder:
                temporary.mkdir()
        except OSError as error:
            raise write_error(target, error) from None
        return temporary

    def __enter__(self) -> AtomicWrites:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            try:
                self._commit()
            except BaseException:
                self._discard()
                raise
            return
        self._discard()
        error = _as_os_error(exc)
        if error is not None and self._staged:
            raise write_error(self._staged[-1].target, error) from None

    def _commit(self) -> None:
        for staged in self._staged:
            try:
                _fsync_tree(staged.temporary)
            except OSError as error:
                raise write_error(staged.target, error) from None
            if staged.verify is not None:
                staged.verify(staged.temporary)
        if self.raise_if_cancelled is not None:
            self.raise_if_cancelled()
        for staged in self._staged:
            try:
                _replace(staged.temporary, staged.target)
            except OSError as error:
                raise write_error(staged.target, error) from None
        for folder in {staged.target.parent for staged in self._staged}:
            _fsync_folder(folder)

    def _discard(self) -> None:
        for staged in self._staged:
            _remove(staged.temporary)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, suffix: str | None = None, folder: bool = False,
                verify: Verify | None = None,
                raise_if_cancelled: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary sibling of `target` to write; it replaces `target` only if the block completes.

    One file (or folder) through `AtomicWrites`: synced, verified, renamed; on any error the
    temporary is removed and `target` is left as it was.
    """
    with AtomicWrites(raise_if_cancelled) as writes:
        yield writes.stage(target, suffix=suffix, folder=folder, verify=verify)


def _replace(temporary: Path, target: Path) -> None:
    """`os.replace`, except that an existing folder is moved aside first (folders cannot be
    replaced in one step); a crash in between leaves it as `.NAME.previous-PID`, which
    `remove_stale_partials` puts back."""
    if not (temporary.is_dir() and target.is_dir()):
        os.replace(temporary, target)
        return
    previous = target.with_name(f".{target.name}.previous-{os.getpid()}")
    _remove(previous)
    os.replace(target, previous)
    try:
        os.replace(temporary, target)
    except OSError:
        os.replace(previous, target)
        raise
    _remove(previous)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        _fsync_folder(path)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as stream:  # writable: Windows' fsync needs it
        os.fsync(stream.fileno())


def _fsync_folder(folder: Path) -> None:
    """Makes a rename durable (POSIX); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if two paths name one file: equal once resolved (links, `..`), or hard links."""
    a, b = Path(a), Path(b)
    with contextlib.suppress(OSError, RuntimeError):
        if a.resolve() == b.resolve():
            return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_overwriting_inputs(outputs: Mapping[str, str | os.PathLike | None],
                              inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """A one-line `UserError` if an output is an input, or two outputs are one file.

    Args:
        outputs, inputs: what the user calls each file (e.g. "--output") -> its path (None: unused).
    """
    outputs = {label: path for label, path in outputs.items() if path is not None}
    inputs = {label: path for label, path in inputs.items() if path is not None}
    for index, (label, path) in enumerate(outputs.items()):
        for other_label, other in inputs.items():
            if same_file(path, other):
                raise UserError(f"{label} '{path}' is the same file as {other_label} '{other}'; write the "
                                "result to another file (an input is never overwritten)")
        for other_label, other in list(outputs.items())[index + 1:]:
            if same_file(path, other):
                raise UserError(f"{label} and {other_label} name the same file '{path}'; "
                                "give two different files")
