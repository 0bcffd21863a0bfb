"""The model registry: shipped, downloadable and user models, by name.

`Resources/Models.json` (schema: `Resources/Models.schema.json`) lists the shipped models (a
folder under `Resources/Models/`) and the downloadable ones (files with URLs and sha256,
converted into a model folder after download). Downloaded and user-made models live in the user
model folder: `$VCM_SYNTHESIS_HOME`, else `~/.cache/vcm-synthesis`, as `models/<name>/`.

Downloads are streamed to a temporary file, checked against sha256 before use and renamed into
place; a file without a registered sha256 is refused unless the user gives the expected value.
Firewalled sites can place the files by hand in `downloads/<name>/` of the user model folder
(they are checked the same way), or convert them directly with `vcm-synthesis import-reference
... --output <user model folder>/models/<name>`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from VCMSynthesisLib.checksums import BLOCK_BYTES as _BLOCK
from VCMSynthesisLib.checksums import Checksums
from VCMSynthesisLib.errors import UsageError, UserError
from VCMSynthesisLib.files import HOME_VARIABLE, atomic_path, remove_stale_partials, user_home
from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
REGISTRY_PATH = RESOURCES / "Models.json"
SHIPPED_MODELS = RESOURCES / "Models"
REFERENCE_ROLES = ("adapter", "autoencoder", "diffusion")

Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class RemoteFile:
    """A downloadable file of a registry entry; `role` says what `import` does with it."""

    role: str
    name: str
    url: str
    sha256: str | None
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A model a user can pick by name.

    Args:
        name: the name users type.
        task: synthesis, translation or superres.
        description: one line.
        conditions: what the model takes, in words.
        source: "shipped", "download" (registered, downloaded on request) or "user".
        folder: where its model folder is (or will be, once downloaded).
        files: the files to download (downloadable entries).
        import_format: how downloaded files become a model folder ("reference").
        import_params: network kwargs passed to the import (for checkpoints of other sizes).
    """

    name: str
    task: str
    description: str
    conditions: str
    source: str
    folder: Path
    files: tuple[RemoteFile, ...] = ()
    import_format: str | None = None
    import_params: Mapping | None = None

    @property
    def available(self) -> bool:
        return (self.folder / CONFIG_NAME).is_file()


def _registry_entries(registry: Path) -> list[ModelEntry]:
    try:
        data = json.loads(registry.read_text(encoding="utf-8"))
        entries = []
        for item in data["models"]:
            files = tuple(
                RemoteFile(f["role"], f["name"], f["url"], f.get("sha256"), f.get("md5"), f.get("size"))
                for f in item.get("files", ()))
            shipped = "folder" in item
            entries.append(ModelEntry(
                name=item["name"], task=item["task"], description=item["description"],
                conditions=item["conditions"], source="shipped" if shipped else "download",
                folder=SHIPPED_MODELS / item["folder"] if shipped else user_home() / "models" / item["name"],
                files=files, import_format=item.get("import"), import_params=item.get("import_params"),
            ))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"model registry {registry} is unreadable or damaged ({type(error).__name__}: "
                        f"{error}); reinstall the extension") from None
    return entries


_warned_folders: set[Path] = set()


def _warn_broken(folder: Path, reason: str) -> None:
    """One stderr line per broken user model folder and process (listing runs several times)."""
    if folder not in _warned_folders:
        _warned_folders.add(folder)
        print(f"warning: skipping user model folder {folder}: {reason}", file=sys.stderr, flush=True)


def _user_entries(known: set[str]) -> list[ModelEntry]:
    """The user's model folders; a broken one is skipped with a warning, so that one bad folder
    never hides the others (or the shipped models)."""
    models = user_home() / "models"
    if not models.is_dir():
        return []
    remove_stale_partials(models)  # e.g. puts back a model folder whose replacement was killed
    entries = []
    try:
        folders = sorted(models.iterdir())
    except OSError as error:
        _warn_broken(models, f"cannot be listed ({error.strerror})")
        return []
    for folder in folders:
        if folder.name in known or folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            config = ModelConfig.load(folder / CONFIG_NAME)
        except UserError as error:
            _warn_broken(folder, str(error))
            continue
        entries.append(ModelEntry(name=folder.name, task=config.task, description=config.description,
                                  conditions=", ".join(config.condition_channel_names) or "none",
                                  source="user", folder=folder))
    return entries


def list_models(registry: Path = REGISTRY_PATH) -> list[ModelEntry]:
    """Registered models (shipped and downloadable) followed by the user's own model folders."""
    entries = _registry_entries(registry)
    return entries + _user_entries({entry.name for entry in entries})


def _find(name: str, registry: Path) -> ModelEntry:
    entries = list_models(registry)
    for entry in entries:
        if entry.name == name:
            return entry
    broken = user_home() / "models" / name
    if name and not name.startswith(".") and broken.is_dir():
        ModelConfig.load(broken / CONFIG_NAME)  # raises what is wrong with it
    raise UserError(f"unknown model {name!r}; known models: {', '.join(e.name for e in entries)}; "
                    f"or give the path of a model folder")


def resolve_model(name_or_folder: str | os.PathLike, registry: Path = REGISTRY_PATH) -> Path:
    """The model folder for a folder path, a shipped name or a downloaded/user model name.

    A bare word is a model name first; it is taken as a folder only if no model has that name.

    Raises:
        UserError: unknown name (listing the known ones), a folder that does not exist, a
            shipped model missing from the installation, or a model not downloaded yet.
    """
    text = os.fspath(name_or_folder)
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or "/" in text or text.startswith((".", "~"))
    if isinstance(name_or_folder, os.PathLike) or looks_like_path:
        if not path.is_dir():
            raise UserError(f"model folder {path} does not exist; give an existing folder or a model name")
        return path
    if path.is_dir() and text not in {entry.name for entry in list_models(registry)}:
        return path
    entry = _find(text, registry)
    if entry.available:
        return entry.folder
    if entry.source == "shipped":
        raise UserError(f"shipped model {entry.name!r} is missing from this installation (expected in "
                        f"{entry.folder}); reinstall the extension")
    raise UserError(f"model {entry.name!r} is not downloaded yet; run `vcm-synthesis download-model "
                    f"{entry.name}` or place its files by hand in {user_home() / 'downloads' / entry.name}")


def _fetch(file: RemoteFile, expected_sha256: str, target: Path, progress: Progress | None) -> None:
    """Streams `file` to a temporary name beside `target`, checks it, renames it into place."""
    checksums = Checksums()

    def verify(partial: Path) -> None:
        """What reached the disk is what was checked (a short write would not match)."""
        if not checksums.matches(expected_sha256, file.md5):
            found = f"sha256 {checksums.sha256}, expected {expected_sha256}"
            if file.md5:
                found += f"; md5 {checksums.md5}, expected {file.md5}"
            raise UserError(f"{file.name} from {file.url} does not match its checksum ({found}); the "
                            f"download is corrupt or the file has changed: try again or place a verified "
                            f"copy at {target}")
        if not Checksums.of_file(partial).matches(expected_sha256, file.md5):
            raise UserError(f"cannot write {target}: the file on disk differs from the download; "
                            f"check the disk (is it full?) and try again")

    with atomic_path(target, verify=verify) as partial:
        try:
            with urllib.request.urlopen(file.url, timeout=60) as response, partial.open("wb") as out:
                total = file.size or int(response.headers.get("Content-Length") or 0) or None
                done = 0
                while block := response.read(_BLOCK):
                    out.write(block)
                    checksums.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(file.name, done, total)
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
                ValueError) as error:  # the network's fault; a disk error is `atomic_path`'s
            reason = getattr(error, "reason", None) or error
            raise UserError(f"cannot download {file.name} from {file.url} ({reason}); check the network, "
                            f"or place the file by hand at {target}") from None


def _verified(path: Path, expected_sha256: str, md5: str | None) -> bool:
    return path.is_file() and Checksums.of_file(path).matches(expected_sha256, md5)


def download_model(
    name: str,
    progress: Progress | None = None,
    sha256: Mapping[str, str] | None = None,
    registry: Path = REGISTRY_PATH,
) -> Path:
    """Downloads a registered model, checks every file and converts it into a model folder.

    Files already in `downloads/<name>/` of the user model folder (an earlier download, or
    placed by hand) are used when they match their checksum.

    Args:
        name: a downloadable registry entry.
        progress: called as `progress(file_name, bytes_done, bytes_total_or_None)`.
        sha256: expected sha256 per file name, for files the registry has no checksum for
            (check the value against the publisher's before passing it).
        registry: the registry file.

    Returns:
        The model folder.
    """
    entry = _find(name, registry)
    if entry.source != "download":
        if entry.available:
            return entry.folder
        raise UserError(f"model {entry.name!r} is {entry.source}, not downloadable; nothing to download")
    if entry.available:
        return entry.folder
    given = {file_name: value.lower() for file_name, value in (sha256 or {}).items()}
    expected = {file.name: file.sha256 or given.get(file.name) for file in entry.files}
    for file_name, digest in expected.items():
        if digest is None:
            raise UserError(f"{file_name} of {entry.name!r} has no registered sha256 to check it against; "
                            f"pass --sha256 {file_name}=<hex> with the publisher's value, or convert files "
                            f"you trust with `vcm-synthesis import-reference`")
    downloads = user_home() / "downloads" / entry.name
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for file in entry.files:
        target = downloads / file.name
        if not _verified(target, expected[file.name], file.md5):
            _fetch(file, expected[file.name], target, progress)
        paths[file.role] = target
    folder = _install(entry, paths)
    for path in paths.values():
        path.unlink(missing_ok=True)
    return folder


def _install(entry: ModelEntry, paths: dict[str, Path]) -> Path:
    """Converts checked downloads into the entry's model folder."""
    if entry.import_format != "reference":
        raise UserError(f"model {entry.name!r} has an unknown import format {entry.import_format!r}; "
                        f"update VCMSynthesis")
    from VCMSynthesisLib.checkpoints import import_reference

    return import_reference(paths["adapter"], paths["autoencoder"], paths["diffusion"], entry.folder,
                            name=entry.name, params=dict(entry.import_params or {}) or None)


def _parse_sha256(values: list[str]) -> dict[str, str]:
    parsed = {}
    for value in values:
        file_name, separator, digest = value.partition("=")
        if not separator or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise UsageError(f"--sha256 {value!r} must be FILE=<64 hex digits>")
        parsed[file_name] = digest
    return parsed


def _run_download(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(file_name: str, done: int, total: int | None) -> None:
        bar = bars.get(file_name)
        if bar is None:
            bar = tqdm(total=total, desc=file_name, unit="B", unit_scale=True, file=sys.stderr)
            bars[file_name] = bar
        bar.update(done - bar.n)

    try:
        folder = download_model(args.name, progress, _parse_sha256(args.sha256))
    finally:
        for bar in bars.values():
            bar.close()
    print(folder)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `vcm-synthesis download-model`."""
    parser = subparsers.add_parser(
        "download-model",
        help="download a registered model into the user model folder",
        description="Download a registered model, check its sha256 and convert it into a model folder "
                    f"under ${HOME_VARIABLE} (default ~/.cache/vcm-synthesis).",
    )
    parser.add_argument("name", help="registered model name (see `vcm-synthesis models`)")
    parser.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                        help="expected sha256 of a file the registry has no checksum for (repeatable)")
    parser.set_defaults(handler=_run_download)
