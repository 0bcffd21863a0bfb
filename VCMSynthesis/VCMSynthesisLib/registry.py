"""The model registry: shipped, downloadable and user models, by name.

`Resources/Models.json` (schema: `Resources/Models.schema.json`) lists the shipped models (a
folder under `Resources/Models/`) and the downloadable ones (files with URLs and sha256,
converted into a model folder after download). Downloaded and user-made models live in the user
model folder: `$VCM_SYNTHESIS_HOME`, else `~/.cache/vcm-synthesis`, as `models/<name>/`.

Downloads (`downloads.fetch`) resume a kept partial file and are checked against the
registry's sha256/md5, the user's `--sha256`, or `downloads/<name>/SHA256SUMS` (the sha256 an
earlier download recorded for a file nobody published a checksum for). Registries of the user's
own (`$VCM_SYNTHESIS_REGISTRY`) add entries. Firewalled sites import copied files with
`download-model NAME --from FOLDER`, or place them in `downloads/<name>/` (checked the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from VCMSynthesisLib.downloads import Expected, check_file, fetch
from VCMSynthesisLib.errors import UsageError, UserError
from VCMSynthesisLib.files import HOME_VARIABLE, atomic_path, remove_stale_partials, user_home
from VCMSynthesisLib.model_config import CONFIG_NAME, ModelConfig

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
REGISTRY_PATH = RESOURCES / "Models.json"
SHIPPED_MODELS = RESOURCES / "Models"
REGISTRY_VARIABLE = "VCM_SYNTHESIS_REGISTRY"  # user registries (os.pathsep-separated JSON files)
LOCK_NAME = "SHA256SUMS"
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


def _registry_entries(registry: Path, user: bool = False) -> list[ModelEntry]:
    """The entries of one registry file; a user registry (`user`) is validated against the schema."""
    try:
        data = json.loads(registry.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _damaged(registry, user, f"{type(error).__name__}: {error}") from None
    if user:
        problem = schema_problem(data)
        if problem is not None:
            raise _damaged(registry, user, problem)
    try:
        entries = []
        for item in data["models"]:
            files = tuple(
                RemoteFile(f["role"], f["name"], f["url"], f.get("sha256"), f.get("md5"), f.get("size"))
                for f in item.get("files", ()))
            if "folder" in item:
                if user:
                    raise _damaged(registry, user, f"an entry names the shipped folder {item['folder']!r}; "
                                                   "a user registry adds downloadable entries (files + "
                                                   "import) only")
                entries.append(_folder_entry(SHIPPED_MODELS / item["folder"], "shipped"))
                continue
            entries.append(ModelEntry(
                name=item["name"], task=item["task"], description=item["description"],
                conditions=item["conditions"], source="download",
                folder=user_home() / "models" / item["name"], files=files,
                import_format=item.get("import"), import_params=item.get("import_params"),
            ))
    except UserError as error:  # a shipped model's config.json
        raise _damaged(registry, user, str(error)) from None
    except (KeyError, TypeError, AttributeError) as error:
        raise _damaged(registry, user, f"{type(error).__name__}: {error}") from None
    return entries


def _damaged(registry: Path, user: bool, reason: str) -> UserError:
    if user:
        return UserError(f"model registry {registry} (from ${REGISTRY_VARIABLE}) is invalid: {reason}; "
                         f"fix it (schema: {RESOURCES / 'Models.schema.json'}) or remove it from "
                         f"${REGISTRY_VARIABLE}")
    return UserError(f"model registry {registry} is unreadable or damaged ({reason}); reinstall the "
                     f"extension")


def schema_problem(data: object) -> str | None:
    """Where `data` breaks `Models.schema.json`, in one line (None: it follows it).

    Uses jsonschema where it is installed; otherwise a minimal check of the fields the loader
    reads (the catalogue must not need more than the standard library).
    """
    schema = json.loads((RESOURCES / "Models.schema.json").read_text(encoding="utf-8"))
    try:
        import jsonschema
    except ImportError:
        return _minimal_schema_problem(data, schema)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    return None if error is None else f"{error.json_path}: {error.message}"


def _minimal_schema_problem(data: object, schema: dict) -> str | None:
    if not isinstance(data, dict) or data.get("format_version") != 1 or \
            not isinstance(data.get("models"), list):
        return '$: must be {"format_version": 1, "models": [...]}'
    model_schema, file_schema = schema["$defs"]["model"], schema["$defs"]["file"]
    shipped, downloadable = model_schema["oneOf"]
    for index, model in enumerate(data["models"]):
        where = f"$.models[{index}]"
        if not isinstance(model, dict):
            return f"{where}: must be an object"
        kind = shipped if "folder" in model else downloadable
        if "folder" in model and len(model) > 1:
            return f"{where}: a shipped entry names only its folder"
        problem = _fields_problem(model, {**model_schema, "required": kind["required"]}, where)
        if problem:
            return problem
        for number, file in enumerate(model.get("files") or ()):
            problem = _fields_problem(file, file_schema, f"{where}.files[{number}]")
            if problem:
                return problem
    return None


def _fields_problem(item: object, schema: dict, where: str) -> str | None:
    """Required fields, unknown fields, enums and string patterns of one schema object."""
    if not isinstance(item, dict):
        return f"{where}: must be an object"
    missing = [key for key in schema["required"] if key not in item]
    if missing:
        return f"{where}: lacks {', '.join(missing)}"
    unknown = sorted(set(item) - set(schema["properties"]))
    if unknown:
        return f"{where}: unknown field {unknown[0]!r}"
    for key, value in item.items():
        rule = schema["properties"][key]
        options = rule.get("oneOf", [rule])
        if value is None and any(option.get("type") == "null" for option in options):
            continue
        for option in options:
            if "enum" in option and value not in option["enum"]:
                return f"{where}.{key}: {value!r} is not one of {option['enum']}"
            if option.get("type") == "string" and (
                    not isinstance(value, str) or not re.search(option.get("pattern", ""), value)):
                return f"{where}.{key}: {value!r} is not a valid {key}"
    return None


def user_registries() -> list[Path]:
    """The registry files named by `$VCM_SYNTHESIS_REGISTRY`, in order."""
    parts = os.environ.get(REGISTRY_VARIABLE, "").split(os.pathsep)
    return [Path(part).expanduser() for part in parts if part]


def _all_registry_entries(registry: Path) -> list[ModelEntry]:
    """The registry's entries, then those of the user registries (a name may appear once)."""
    entries = _registry_entries(registry)
    origin = {entry.name: registry for entry in entries}
    for path in user_registries():
        for entry in _registry_entries(path, user=True):
            if entry.name in origin:
                raise UserError(f"model registry {path} (from ${REGISTRY_VARIABLE}) registers {entry.name!r} "
                                f"again (already in {origin[entry.name]}); give its entry another name")
            origin[entry.name] = path
            entries.append(entry)
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
            entries.append(_folder_entry(folder, "user"))
        except UserError as error:
            _warn_broken(folder, str(error))
    return entries


def _folder_entry(folder: Path, source: str) -> ModelEntry:
    """A model folder's entry, from its config.json: a shipped model's registry entry names only
    the folder, so that task, description and conditions are said once, in the config."""
    if source == "shipped" and not (folder / CONFIG_NAME).is_file():  # listed, `resolve_model` says why
        return ModelEntry(name=folder.name, task="missing", description="missing from this installation",
                          conditions="-", source=source, folder=folder)
    config = ModelConfig.load(folder / CONFIG_NAME)
    return ModelEntry(name=folder.name, task=config.task, description=config.description,
                      conditions=config.conditions_summary, source=source, folder=folder)


def list_models(registry: Path = REGISTRY_PATH) -> list[ModelEntry]:
    """Registered models (shipped and downloadable) followed by the user's own model folders."""
    entries = _all_registry_entries(registry)
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


def _expected(file: RemoteFile, given: Mapping[str, str], lock: Mapping[str, str]) -> Expected:
    """The checksums a file must match: the registry's, else the user's `--sha256`, else the lock file's."""
    if file.sha256:
        return Expected(file.sha256, file.md5, file.size, "the registry")
    if file.name in given:
        return Expected(given[file.name], file.md5, file.size, "--sha256")
    if file.name in lock:
        return Expected(lock[file.name], file.md5, file.size, f"{LOCK_NAME} of an earlier download")
    return Expected(None, file.md5, file.size, "the registry")


def read_lock(path: Path) -> dict[str, str]:
    """`SHA256SUMS` (the `sha256sum` format: `HEX  NAME` per line) as {name: hex}."""
    if not path.is_file():
        return {}
    sums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if not line.strip():
            continue
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()) or not name:
            raise UserError(f"{path} line {number} is not `<64 hex digits>  <file name>`; fix or delete the "
                            f"file (it records the sha256 of earlier downloads)")
        sums[name] = digest.lower()
    return sums


def _write_lock(path: Path, sums: Mapping[str, str]) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())),
                             encoding="utf-8")


def download_model(
    name: str,
    progress: Progress | None = None,
    sha256: Mapping[str, str] | None = None,
    registry: Path = REGISTRY_PATH,
    source_folder: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Downloads a registered model, checks every file and converts it into a model folder.

    Files already in `downloads/<name>/` of the user model folder (an earlier download, or
    placed by hand) are checked and used; a kept `<file>.partial` is resumed. A file with a
    published sha256 or md5 must match it; one with neither is taken as it comes (with a
    warning) and its sha256 recorded in `downloads/<name>/SHA256SUMS`, which later downloads
    (copy it to another machine) check against. The model folder appears only once every
    file is verified and the import succeeded.

    Args:
        name: a downloadable registry entry.
        progress: called as `progress(file_name, bytes_done, bytes_total_or_None)`.
        sha256: expected sha256 per file name, pinning files the registry has no sha256 for.
        registry: the registry file.
        source_folder: a folder holding the files (copied from elsewhere): nothing is
            downloaded, the files are checked and imported from there, and left as they are.
        warn: called with one-line warnings (default: printed to stderr).

    Returns:
        The model folder.
    """
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    entry = _find(name, registry)
    if entry.source != "download":
        if entry.available:
            return entry.folder
        raise UserError(f"model {entry.name!r} is {entry.source}, not downloadable; nothing to download")
    if entry.available:
        return entry.folder
    given = {file_name: value.lower() for file_name, value in (sha256 or {}).items()}
    unknown = sorted(set(given) - {file.name for file in entry.files})
    if unknown:
        raise UsageError(f"--sha256 names {', '.join(unknown)}, not a file of {entry.name!r} "
                         f"({', '.join(file.name for file in entry.files)})")
    downloads = user_home() / "downloads" / entry.name
    lock_path = downloads / LOCK_NAME
    lock = read_lock(lock_path)
    if source_folder is not None:
        missing = [file.name for file in entry.files if not (source_folder / file.name).is_file()]
        if missing:
            raise UserError(f"{source_folder} lacks {', '.join(missing)} of {entry.name!r}; copy every file "
                            f"({', '.join(file.name for file in entry.files)}) into it")
        lock = {**read_lock(source_folder / LOCK_NAME), **lock}
    paths, sums = {}, dict(lock)
    expected = {file.name: _expected(file, given, lock) for file in entry.files}
    where = source_folder or downloads
    present = {file.name: check_file(where / file.name, expected[file.name]) for file in entry.files
               if (where / file.name).is_file()}  # all of them before any download
    for file in entry.files:
        path = where / file.name
        checksums = present.get(file.name)
        if checksums is None:
            downloads.mkdir(parents=True, exist_ok=True)
            checksums = fetch(file.url, path, expected[file.name], progress)
        if not expected[file.name].checkable:
            warn(f"nothing was published to check {file.name} against; its sha256 {checksums.sha256} is "
                 f"recorded in {lock_path} and the model card: copy that file to check another machine's "
                 f"download against this one")
        sums[file.name] = checksums.sha256
        paths[file.role] = path
    folder = _install(entry, paths)
    downloads.mkdir(parents=True, exist_ok=True)
    _write_lock(lock_path, sums)  # only files that imported: a broken one must not be locked in
    if source_folder is None:
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
        """One bar per file, with speed and time left; a resumed file starts at its kept bytes."""
        bar = bars.get(file_name)
        if bar is None:
            bar = tqdm(total=total, initial=done, desc=file_name, unit="B", unit_scale=True,
                       unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
            bars[file_name] = bar
        bar.update(done - bar.n)

    def warn(message: str) -> None:
        tqdm.write(f"warning: {message}", file=sys.stderr)

    source_folder = args.source_folder
    if source_folder is not None and not source_folder.is_dir():
        raise UsageError(f"--from {source_folder} is not a folder; give the folder holding the copied files")
    try:
        folder = download_model(args.name, progress, _parse_sha256(args.sha256), source_folder=source_folder,
                                warn=warn)
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
        description="Download a registered model (resuming an interrupted download), check its published "
                    "sha256/md5 and convert it into a model folder under "
                    f"${HOME_VARIABLE} (default ~/.cache/vcm-synthesis). Registries of your own "
                    f"(${REGISTRY_VARIABLE}) add entries.",
    )
    parser.add_argument("name", help="registered model name (see `vcm-synthesis models`)")
    parser.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                        help="expected sha256 of a file the registry has no checksum for (repeatable)")
    parser.add_argument("--from", dest="source_folder", type=Path, metavar="FOLDER",
                        help="import files copied from elsewhere (offline sites): check and convert the "
                             "files in FOLDER, download nothing")
    parser.set_defaults(handler=_run_download)
