"""Model registry: Models.json against its schema, names, user models, checked downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import jsonschema
import pytest
from test_checkpoints import write_import_inputs
from tiny_models import make_tiny_model_folder
from VCMSynthesisLib import cli, registry
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_config import ModelConfig
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.registry import download_model, list_models, resolve_model

SCHEMA = json.loads((registry.RESOURCES / "Models.schema.json").read_text())
ROLES = {"vcm_wegith_complexSemantics.pt": "adapter", "autoencoder.pth": "autoencoder",
         "diffusion_model.pth": "diffusion"}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own user model folder."""
    path = tmp_path / "home"
    monkeypatch.setenv(registry.HOME_VARIABLE, str(path))
    return path


def test_models_json_follows_its_schema():
    data = json.loads(registry.REGISTRY_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    names = [entry.get("name", entry.get("folder")) for entry in data["models"]]
    assert len(set(names)) == len(names)
    assert {"demo", "demo-t2-to-t1", "demo-superres", "brainldm-vcm-semantics"} <= set(names)
    reference = next(entry for entry in data["models"] if entry.get("name") == "brainldm-vcm-semantics")
    assert {file["role"] for file in reference["files"]} == {"adapter", "autoencoder", "diffusion"}


def test_shipped_entries_name_only_their_folder_and_the_list_says_what_the_config_says():
    """Task, description and conditions of a shipped model are said once, in its config.json."""
    entries = json.loads(registry.REGISTRY_PATH.read_text())["models"]
    shipped = [entry for entry in entries if "folder" in entry]
    assert len(shipped) == 5 and all(set(entry) == {"folder"} for entry in shipped)
    listed = {entry.name: entry for entry in list_models() if entry.source == "shipped"}
    assert list(listed) == [entry["folder"] for entry in shipped]
    for name, entry in listed.items():
        config = ModelConfig.load(entry.folder / "config.json")
        assert (config.name, config.task, config.description) == (name, entry.task, entry.description)
    assert listed["demo"].conditions == "segmentation: background, CSF, grey matter, white matter"
    assert listed["demo-t2-to-t1"].conditions == "volume: T2"
    assert listed["demo-base"].conditions == "none (unguided)"
    assert "under demo-t2-to-t1" in listed["demo-base"].description


@pytest.mark.parametrize("edit", [
    lambda entry: entry.update(task="synthesis"),  # a shipped entry repeating its config
    lambda entry: entry.update(files=[]),  # a shipped folder and files at once
    lambda entry: entry.pop("folder"),  # neither
    lambda entry: entry.update(task="painting"),
    lambda entry: entry.update(name="Has Spaces"),
])
def test_schema_refuses_malformed_entries(edit):
    data = json.loads(registry.REGISTRY_PATH.read_text())
    edit(data["models"][0])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(data)


def test_schema_refuses_a_malformed_checksum():
    data = json.loads(registry.REGISTRY_PATH.read_text())
    data["models"][-1]["files"][0]["sha256"] = "abc"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(data)


def test_user_models_are_listed_after_registered_ones(home):
    make_tiny_model_folder(home / "models" / "mine", task="translation", labels=None)
    (home / "models" / "broken").mkdir()
    (home / "models" / "broken" / "config.json").write_text("{")
    entries = list_models()
    names = [entry.name for entry in entries]
    assert names[:6] == ["demo", "demo-t2-to-t1", "demo-superres", "demo-base", "demo-base-v2",
                         "brainldm-vcm-semantics"]
    assert names[-1] == "mine" and "broken" not in names
    mine = entries[-1]
    assert (mine.source, mine.task, mine.conditions, mine.available) == (
        "user", "translation", "volume: T2", True)
    reference = entries[5]
    assert reference.source == "download" and not reference.available
    assert reference.folder == home / "models" / "brainldm-vcm-semantics"


def test_resolve_names_and_folders(home, tmp_path, monkeypatch):
    folder = make_tiny_model_folder(home / "models" / "mine")
    assert resolve_model("mine") == folder
    assert resolve_model(str(folder)) == folder
    assert resolve_model(folder) == folder
    monkeypatch.chdir(tmp_path)
    make_tiny_model_folder(tmp_path / "here")
    make_tiny_model_folder(tmp_path / "demo")  # a folder does not shadow a model name
    assert resolve_model("here") == Path("here")
    monkeypatch.setattr(registry, "SHIPPED_MODELS", tmp_path / "shipped")
    shipped = make_tiny_model_folder(tmp_path / "shipped" / "demo")
    assert resolve_model("demo") == shipped
    with pytest.raises(UserError, match="shipped model 'demo-superres' is missing from this installation"):
        resolve_model("demo-superres")


@pytest.mark.parametrize("name, message", [
    ("nonsense", "unknown model 'nonsense'; known models: demo, demo-t2-to-t1, demo-superres, "
                 "demo-base, demo-base-v2, brainldm-vcm-semantics; or give the path of a model folder"),
    ("./not/here", "model folder not/here does not exist"),
    ("brainldm-vcm-semantics", "model 'brainldm-vcm-semantics' is not downloaded yet; run "
                               "`vcm-synthesis download-model brainldm-vcm-semantics`"),
])
def test_resolve_errors_say_what_to_do(name, message):
    with pytest.raises(UserError) as raised:
        resolve_model(name)
    assert message in str(raised.value)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def release(tmp_path):
    """Tiny checkpoints in the released formats, and a registry entry pointing at them."""
    source = tmp_path / "release"
    source.mkdir()
    write_import_inputs(source)
    sizes = json.loads((source / "sizes.json").read_text())
    files = [{"role": role, "name": name, "url": (source / name).as_uri(), "sha256": _sha256(source / name),
              "size": (source / name).stat().st_size} for name, role in ROLES.items()]
    entry = {"name": "paper-tiny", "task": "synthesis", "description": "tiny release",
             "conditions": "8 labels", "import": "reference", "import_params": sizes, "files": files}
    return source, entry


def _write_registry(tmp_path: Path, entry: dict) -> Path:
    data = {"format_version": 1, "models": [entry]}
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    path = tmp_path / "Models.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def http_root(release):
    """Serves the release folder on 127.0.0.1."""
    source, _ = release
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(source))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http_checks_and_imports(home, tmp_path, release, http_root):
    _, entry = release
    for file in entry["files"]:
        file["url"] = f"{http_root}/{file['name']}"
        del file["size"]  # taken from Content-Length
    registry_path = _write_registry(tmp_path, entry)
    seen = []
    folder = download_model("paper-tiny", progress=lambda *args: seen.append(args), registry=registry_path)

    assert folder == home / "models" / "paper-tiny"
    model = load_model_folder(folder)
    assert model.config.name == "paper-tiny" and len(model.config.labels) == 8
    assert resolve_model("paper-tiny", registry=registry_path) == folder
    final = {name: (done, total) for name, done, total in seen}
    assert set(final) == set(ROLES)
    assert all(done == total and done > 0 for done, total in final.values())
    downloads = home / "downloads" / "paper-tiny"
    assert [path.name for path in downloads.iterdir()] == ["SHA256SUMS"]  # converted, then removed
    assert registry.read_lock(downloads / "SHA256SUMS") == {
        file["name"]: file["sha256"] for file in entry["files"]}
    assert download_model("paper-tiny", registry=registry_path) == folder  # already there


def test_wrong_checksum_leaves_nothing_behind(home, tmp_path, release):
    _, entry = release
    entry["files"][1]["sha256"] = "0" * 64
    registry_path = _write_registry(tmp_path, entry)
    with pytest.raises(UserError, match="autoencoder.pth from file://.* does not match its checksum"):
        download_model("paper-tiny", registry=registry_path)
    assert not (home / "models" / "paper-tiny").exists()
    leftovers = sorted(path.name for path in (home / "downloads" / "paper-tiny").iterdir())
    assert leftovers == ["vcm_wegith_complexSemantics.pt"]  # only the file that was verified


def test_wrong_md5_is_refused_even_with_the_right_sha256(home, tmp_path, release):
    source, entry = release
    entry["files"][0]["md5"] = hashlib.md5((source / entry["files"][0]["name"]).read_bytes()).hexdigest()
    entry["files"][1]["md5"] = "0" * 32
    registry_path = _write_registry(tmp_path, entry)
    message = r"autoencoder.pth from file://.* does not match .* \(md5 [0-9a-f]{32}, expected 0{32}\)"
    with pytest.raises(UserError, match=message):
        download_model("paper-tiny", registry=registry_path)
    assert not (home / "models" / "paper-tiny").exists()
    leftovers = sorted(path.name for path in (home / "downloads" / "paper-tiny").iterdir())
    assert leftovers == ["vcm_wegith_complexSemantics.pt"]  # its md5 matched


def test_a_file_without_published_checksums_is_recorded_then_checked(home, tmp_path, release):
    """No sha256, no md5: downloaded with one warning, its sha256 locked for the next machine."""
    source, entry = release
    adapter = entry["files"][0]
    adapter["sha256"] = None
    registry_path = _write_registry(tmp_path, entry)
    warnings = []
    folder = download_model("paper-tiny", registry=registry_path, warn=warnings.append)
    digest = _sha256(source / adapter["name"])
    lock = home / "downloads" / "paper-tiny" / "SHA256SUMS"
    assert len(warnings) == 1 and f"nothing was published to check {adapter['name']}" in warnings[0]
    assert digest in warnings[0] and str(lock) in warnings[0]
    assert registry.read_lock(lock)[adapter["name"]] == digest
    assert digest in (folder / "README.md").read_text()  # the model card names it too

    # a second machine with the first one's lock file refuses a different file
    second = tmp_path / "second"
    (second / "downloads" / "paper-tiny").mkdir(parents=True)
    (second / "downloads" / "paper-tiny" / "SHA256SUMS").write_text(lock.read_text())
    (source / adapter["name"]).write_bytes((source / adapter["name"]).read_bytes() + b"changed")
    os.environ[registry.HOME_VARIABLE] = str(second)
    with pytest.raises(UserError, match=f"{adapter['name']} from file://.* does not match its checksum from "
                                        "SHA256SUMS of an earlier download"):
        download_model("paper-tiny", registry=registry_path, warn=warnings.append)
    assert not (second / "models" / "paper-tiny").exists()


def test_sha256_pins_a_file_without_published_checksums(home, tmp_path, release):
    source, entry = release
    entry["files"][0]["sha256"] = None
    registry_path = _write_registry(tmp_path, entry)
    name = entry["files"][0]["name"]
    with pytest.raises(UserError, match=f"{name} from file://.* does not match its checksum from --sha256"):
        download_model("paper-tiny", sha256={name: "0" * 64}, registry=registry_path)
    given = {name: _sha256(source / name).upper()}
    folder = download_model("paper-tiny", sha256=given, registry=registry_path, warn=pytest.fail)
    assert load_model_folder(folder).adapter is not None


def test_files_placed_by_hand_are_checked_and_used(home, tmp_path, release):
    source, entry = release
    downloads = home / "downloads" / "paper-tiny"
    downloads.mkdir(parents=True)
    for file in entry["files"]:
        (downloads / file["name"]).write_bytes((source / file["name"]).read_bytes())
        file["url"] = (tmp_path / "unreachable" / file["name"]).as_uri()
    registry_path = _write_registry(tmp_path, entry)
    assert load_model_folder(download_model("paper-tiny", registry=registry_path)).config.name == "paper-tiny"


def test_unreachable_url_says_where_to_place_the_file(home, tmp_path, release):
    _, entry = release
    entry["files"][0]["url"] = (tmp_path / "gone.pt").as_uri()
    registry_path = _write_registry(tmp_path, entry)
    message = "cannot download vcm_wegith_complexSemantics.pt: .* place the file by hand"
    with pytest.raises(UserError, match=message):
        download_model("paper-tiny", registry=registry_path)
    assert not (home / "models" / "paper-tiny").exists()


def test_download_cli_errors(home, tmp_path, capsys):
    assert cli.main(["download-model", "brainldm-vcm-semantics", "--from", str(tmp_path)]) == 1
    lacks = "lacks autoencoder.pth, diffusion_model.pth, vcm_wegith_complexSemantics.pt"
    assert lacks in capsys.readouterr().err
    assert cli.main(["download-model", "brainldm-vcm-semantics", "--sha256", "autoencoder.pth=xyz"]) == 2
    assert "must be FILE=<64 hex digits>" in capsys.readouterr().err
    assert cli.main(["download-model", "brainldm-vcm-semantics", "--sha256", f"other.pt={'0' * 64}"]) == 2
    assert "--sha256 names other.pt, not a file of 'brainldm-vcm-semantics'" in capsys.readouterr().err
    assert not home.exists()


def test_a_broken_user_folder_is_skipped_with_one_warning_and_named_when_asked_for(home, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_warned_folders", set())
    make_tiny_model_folder(home / "models" / "good")
    broken = home / "models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"format_version": NaN}')
    assert "good" in [entry.name for entry in list_models()]
    assert "good" in [entry.name for entry in list_models()]  # listed twice, warned once
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"warning: skipping user model folder {broken}: {broken / 'config.json'} has the "
                        "value NaN, which is not a number JSON allows; fix or replace the file"]
    assert resolve_model("good") == home / "models" / "good"
    with pytest.raises(UserError, match="has the value NaN"):
        resolve_model("broken")
