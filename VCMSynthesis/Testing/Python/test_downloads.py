"""Downloads against a real HTTP server on 127.0.0.1: resume, web pages, checksums, user registries.

The server (`LoopbackServer`) serves tiny checkpoints in the released formats and misbehaves on
request as real hosts do: it drops the connection half-way, ignores Range, answers with a web
page, omits Content-Length, redirects. Each download ends in a real import (`import_reference`).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_checkpoints import assert_one_error_line, write_import_inputs
from VCMSynthesisLib import registry
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.model_folder import load_model_folder
from VCMSynthesisLib.registry import download_model, list_models

ROLES = {"vcm_wegith_complexSemantics.pt": "adapter", "autoencoder.pth": "autoencoder",
         "diffusion_model.pth": "diffusion"}
GOOGLE_PAGE = (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
               b"Google Drive can't scan this file for viruses.</body></html>")


class LoopbackServer:
    """Serves `files` by name; the `drop`, `ignore_range`, `page`, `no_length`, `redirect`
    settings make it misbehave for one path; `requests` records (path, Range header)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drop: dict[str, int] = {}  # path -> bytes sent before the connection is closed (once)
        self.ignore_range: set[str] = set()
        self.page: dict[str, tuple[str, bytes]] = {}  # path -> (Content-Type, body)
        self.no_length: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.queries: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path, _, query = self.path.lstrip("/").partition("?")
                server.requests.append((path, self.headers.get("Range")))
                server.queries.append(query)
                if path in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", f"/{server.redirect[path]}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.page:
                    content_type, body = server.page[path]
                    self._send(200, body, content_type)
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[path], 0
                range_header = self.headers.get("Range")
                if range_header and path not in server.ignore_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                self._send(206 if start else 200, body[start:], "application/octet-stream",
                           content_range=f"bytes {start}-{len(body) - 1}/{len(body)}" if start else None,
                           cut=server.drop.pop(path, None), length=path not in server.no_length)

            def _send(self, status: int, body: bytes, content_type: str, content_range: str | None = None,
                      cut: int | None = None, length: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.close_connection = True  # the end of the body is the end of the connection
                if content_range:
                    self.send_header("Content-Range", content_range)
                self.end_headers()
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def ranges(self, path: str) -> list[str | None]:
        return [value for requested, value in self.requests if requested == path]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv(registry.HOME_VARIABLE, str(path))
    monkeypatch.delenv(registry.REGISTRY_VARIABLE, raising=False)
    return path


@pytest.fixture
def release(tmp_path):
    """The tiny release files and the import sizes."""
    source = tmp_path / "release"
    source.mkdir()
    write_import_inputs(source)
    return source, json.loads((source / "sizes.json").read_text())


@pytest.fixture
def server(release):
    source, _ = release
    loopback = LoopbackServer({name: (source / name).read_bytes() for name in ROLES})
    thread = threading.Thread(target=loopback.http.serve_forever, daemon=True)
    thread.start()
    yield loopback
    loopback.http.shutdown()
    loopback.http.server_close()


def user_registry(tmp_path: Path, monkeypatch, release, server, name: str = "lab-mirror",
                  **overrides) -> Path:
    """A registry of the user's own (`$VCM_SYNTHESIS_REGISTRY`) naming the loopback server."""
    source, sizes = release
    files = []
    for file_name, role in ROLES.items():
        data = (source / file_name).read_bytes()
        file = {"role": role, "name": file_name, "url": f"{server.url}/{file_name}",
                "sha256": hashlib.sha256(data).hexdigest(), "md5": None, "size": None}
        file.update(overrides.get(file_name, {}))
        files.append(file)
    data = {"format_version": 1, "models": [
        {"name": name, "task": "synthesis", "description": "the tiny release on a lab mirror",
         "conditions": "8 labels", "import": "reference", "import_params": sizes, "files": files}]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(registry.REGISTRY_VARIABLE, os.pathsep.join(
        [p for p in os.environ.get(registry.REGISTRY_VARIABLE, "").split(os.pathsep) if p] + [str(path)]))
    return path


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "VCMSynthesisLib", *arguments], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=120)


def test_dropped_connection_then_resume_with_range_imports_the_model(home, tmp_path, monkeypatch, release,
                                                                     server):
    user_registry(tmp_path, monkeypatch, release, server)
    big = "diffusion_model.pth"
    half = len(server.files[big]) // 2
    server.drop[big] = half

    failed = run_cli("download-model", "lab-mirror")
    assert failed.returncode == 1
    port = server.http.server_address[1]
    assert_one_error_line(failed.stderr, f"the connection to 127.0.0.1:{port} dropped")
    assert "run the same command again to resume" in failed.stderr
    assert not (home / "models" / "lab-mirror").exists()
    partial = home / "downloads" / "lab-mirror" / f"{big}.partial"
    assert partial.stat().st_size == half

    resumed = run_cli("download-model", "lab-mirror")
    assert resumed.returncode == 0, resumed.stderr
    assert server.ranges(big) == [None, f"bytes={half}-"]  # the rest only
    folder = home / "models" / "lab-mirror"
    assert resumed.stdout.strip() == str(folder)
    assert load_model_folder(folder).config.name == "lab-mirror"
    assert not partial.exists()

    listed = [json.loads(line) for line in run_cli("models", "--json").stdout.splitlines()]
    mine = next(entry for entry in listed if entry["name"] == "lab-mirror")
    assert (mine["source"], mine["available"], mine["folder"]) == ("download", True, str(folder))


def test_a_server_that_ignores_range_restarts_the_file_cleanly(home, tmp_path, monkeypatch, release, server):
    user_registry(tmp_path, monkeypatch, release, server)
    big = "diffusion_model.pth"
    server.drop[big] = 1000
    server.ignore_range.add(big)
    with pytest.raises(UserError, match="dropped after"):
        download_model("lab-mirror")
    folder = download_model("lab-mirror")
    assert server.ranges(big) == [None, "bytes=1000-"]
    assert load_model_folder(folder).diffusion is not None  # not the kept part plus the whole file


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_a_web_page_instead_of_the_file_is_one_line_and_no_model(home, tmp_path, monkeypatch, release, server,
                                                                  content_type):
    user_registry(tmp_path, monkeypatch, release, server)
    server.page["autoencoder.pth"] = (content_type, GOOGLE_PAGE)
    failed = run_cli("download-model", "lab-mirror")
    assert failed.returncode == 1
    assert_one_error_line(failed.stderr, "answered with a web page, not the file")
    assert "Google Drive sent its \"can't scan this file for viruses\" page" in failed.stderr
    assert "--from FOLDER" in failed.stderr
    assert not (home / "models" / "lab-mirror").exists()
    assert not (home / "downloads" / "lab-mirror" / "autoencoder.pth").exists()
    assert not (home / "downloads" / "lab-mirror" / "autoencoder.pth.partial").exists()


def test_google_drives_virus_scan_page_is_followed_and_resumed(home, tmp_path, monkeypatch, release, server):
    """The page's download form leads to the file; a dropped download resumes through the page again."""
    big = "diffusion_model.pth"
    form = (b'<!DOCTYPE html><html><body>Google Drive can\'t scan this file for viruses.'
            b'<form id="download-form" action="/' + big.encode() + b'" method="get">'
            b'<input type="hidden" name="id" value="1XO"><input type="hidden" name="confirm" value="t">'
            b'<input type="submit" value="Download anyway"></form></body></html>')
    server.page["uc"] = ("text/html; charset=utf-8", form)
    user_registry(tmp_path, monkeypatch, release, server, **{big: {"url": f"{server.url}/uc?id=1XO"}})
    half = len(server.files[big]) // 2
    server.drop[big] = half
    with pytest.raises(UserError, match="dropped after"):
        download_model("lab-mirror")
    folder = download_model("lab-mirror")
    assert load_model_folder(folder).diffusion is not None
    assert server.ranges("uc") == [None, f"bytes={half}-"]
    assert server.ranges(big) == [None, f"bytes={half}-"]
    assert "id=1XO&confirm=t" in server.queries


def test_a_wrong_hash_never_becomes_a_model(home, tmp_path, monkeypatch, release, server):
    user_registry(tmp_path, monkeypatch, release, server, **{"autoencoder.pth": {"sha256": "1" * 64}})
    with pytest.raises(UserError, match="autoencoder.pth from http://127.0.0.1.* does not match its checksum "
                                        "from the registry"):
        download_model("lab-mirror")
    downloads = home / "downloads" / "lab-mirror"
    assert not (home / "models" / "lab-mirror").exists()
    assert not (downloads / "autoencoder.pth").exists()
    assert not (downloads / "autoencoder.pth.partial").exists()
    assert not list_models()[-1].available


def test_missing_content_length_and_a_redirect_still_download(home, tmp_path, monkeypatch, release, server):
    source, _ = release
    md5 = hashlib.md5((source / "autoencoder.pth").read_bytes()).hexdigest()
    user_registry(tmp_path, monkeypatch, release, server, **{
        "autoencoder.pth": {"sha256": None, "md5": md5},  # md5 only, as the MONAI zoo publishes
        "diffusion_model.pth": {"url": f"{server.url}/moved/diffusion_model.pth"}})
    server.no_length.add("autoencoder.pth")
    server.redirect["moved/diffusion_model.pth"] = "diffusion_model.pth"
    seen = []
    folder = download_model("lab-mirror", progress=lambda *args: seen.append(args), warn=pytest.fail)
    assert load_model_folder(folder).autoencoder is not None
    assert ("autoencoder.pth", len(server.files["autoencoder.pth"]), None) in seen  # no total known
    assert [path for path, _ in server.requests].count("diffusion_model.pth") == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_and_no_model(home, tmp_path, monkeypatch, release, server):
    """The partial file links to /dev/full, where every write fails with ENOSPC (a real full disk)."""
    user_registry(tmp_path, monkeypatch, release, server)
    downloads = home / "downloads" / "lab-mirror"
    downloads.mkdir(parents=True)
    (downloads / "autoencoder.pth.partial").symlink_to("/dev/full")
    failed = run_cli("download-model", "lab-mirror")
    assert failed.returncode == 1
    partial = downloads / "autoencoder.pth.partial"
    assert_one_error_line(failed.stderr, f"cannot write '{partial}': the disk is full")
    assert not (home / "models" / "lab-mirror").exists() and not (downloads / "autoencoder.pth").exists()


def test_a_cut_download_without_content_length_says_so(home, tmp_path, monkeypatch, release, server):
    """Without Content-Length, a dropped connection looks like the end of the file: the checksum tells."""
    user_registry(tmp_path, monkeypatch, release, server)
    server.no_length.add("autoencoder.pth")
    server.drop["autoencoder.pth"] = 500
    with pytest.raises(UserError, match="does not match its checksum from the registry .*; the server sent "
                                        "no Content-Length, so the connection may have dropped"):
        download_model("lab-mirror")
    assert not (home / "models" / "lab-mirror").exists()
    assert download_model("lab-mirror").is_dir()  # the rerun starts over and succeeds


def test_a_file_placed_by_hand_that_fails_its_check_says_so(home, tmp_path, monkeypatch, release, server):
    user_registry(tmp_path, monkeypatch, release, server)
    placed = home / "downloads" / "lab-mirror" / "autoencoder.pth"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(server.files["autoencoder.pth"][:-1])  # a truncated copy
    with pytest.raises(UserError) as raised:
        download_model("lab-mirror")
    message = str(raised.value)
    assert f"{placed} does not match the checksum from the registry" in message
    assert "replace it with a verified copy, or delete it to download again" in message
    assert server.requests == []  # never downloaded over
    placed.write_bytes(GOOGLE_PAGE)  # a browser saved the virus-scan page under the file's name
    with pytest.raises(UserError, match=f"{placed} is a web page, not the file"):
        download_model("lab-mirror")
    assert placed.read_bytes() == GOOGLE_PAGE and not (home / "models" / "lab-mirror").exists()


def test_from_folder_imports_copied_files_without_the_network(home, tmp_path, monkeypatch, release, server):
    source, _ = release
    user_registry(tmp_path, monkeypatch, release, server)
    server.http.shutdown()  # an offline site
    before = {name: (source / name).read_bytes() for name in ROLES}
    completed = run_cli("download-model", "lab-mirror", "--from", str(source))
    assert completed.returncode == 0, completed.stderr
    assert load_model_folder(home / "models" / "lab-mirror").adapter is not None
    assert {name: (source / name).read_bytes() for name in ROLES} == before  # inputs untouched
    assert server.requests == []


@pytest.mark.parametrize("without_jsonschema", [False, True])
def test_a_broken_user_registry_is_one_line(home, tmp_path, monkeypatch, release, server, without_jsonschema):
    path = user_registry(tmp_path, monkeypatch, release, server,
                         **{"autoencoder.pth": {"sha256": "abc"}})
    if without_jsonschema:
        monkeypatch.setitem(sys.modules, "jsonschema", None)  # the minimal check
    with pytest.raises(UserError) as raised:
        list_models()
    message = str(raised.value)
    assert message.startswith(f"model registry {path} (from $VCM_SYNTHESIS_REGISTRY) is invalid: ")
    assert "models[0].files[1].sha256" in message and "\n" not in message
    assert message.endswith("or remove it from $VCM_SYNTHESIS_REGISTRY")


def test_user_registries_add_entries_and_cannot_shadow_others(home, tmp_path, monkeypatch, release, server):
    user_registry(tmp_path, monkeypatch, release, server, name="mirror-a")
    user_registry(tmp_path, monkeypatch, release, server, name="mirror-b")
    names = [entry.name for entry in list_models()]
    assert names[-2:] == ["mirror-a", "mirror-b"] and "demo" in names
    user_registry(tmp_path, monkeypatch, release, server, name="demo")
    with pytest.raises(UserError, match="registers 'demo' again"):
        list_models()
