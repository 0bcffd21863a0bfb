"""Resumable, checked downloads of one file over HTTP(S) or from a `file://` URL.

MONAI's `monai.apps.download_url` (urlretrieve, or gdown for Google Drive) restarts from zero
and cannot resume a 2 GB file, so this is our own plain path for any host or lab mirror:

- the bytes go to `<target>.partial`, kept when the connection drops; the next call asks for
  the rest with an HTTP `Range` request (a server that ignores it sends the whole file again,
  which restarts the partial file cleanly);
- the file's checksums cover the whole file (the kept part is hashed first), and the partial
  file becomes `target` (`os.replace`) only once they match;
- Google Drive's "can't scan this file for viruses" page is followed through its download form;
- every failure is one `UserError` line: host unreachable, HTTP error, a web page instead of
  the file, dropped connection, disk full, checksum mismatch.
"""

from __future__ import annotations

import html.parser
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from VCMSynthesisLib.checksums import BLOCK_BYTES, Checksums
from VCMSynthesisLib.errors import UserError
from VCMSynthesisLib.files import write_error

TIMEOUT_S = 60  # per socket operation: a stalled server is a dropped connection
PARTIAL_SUFFIX = ".partial"
_MAX_PAGE_BYTES = 1 << 20  # a confirmation page is a few kB
_PAGE_TYPES = ("text/html", "application/xhtml+xml")
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<!--")

Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class Expected:
    """What a file must match; `source` says where the values come from, for messages."""

    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    source: str = "the registry"

    @property
    def checkable(self) -> bool:
        return self.sha256 is not None or self.md5 is not None

    def mismatch(self, checksums: Checksums, size: int) -> str | None:
        """Why a file with these checksums and size is not the expected one (None: it is)."""
        if self.size is not None and size != self.size:
            return f"{size} bytes, expected {self.size}"
        found = []
        if self.sha256 is not None and checksums.sha256 != self.sha256:
            found.append(f"sha256 {checksums.sha256}, expected {self.sha256}")
        if self.md5 is not None and checksums.md5 != self.md5:
            found.append(f"md5 {checksums.md5}, expected {self.md5}")
        return "; ".join(found) or None


def partial_path(target: Path) -> Path:
    """Where the bytes of `target` are kept while it is downloaded (and after a dropped connection)."""
    return target.with_name(target.name + PARTIAL_SUFFIX)


def check_file(path: Path, expected: Expected) -> Checksums:
    """The checksums of `path`; a one-line `UserError` if it is a web page or not the expected file."""
    with path.open("rb") as stream:
        if stream.read(2048).lower().lstrip().startswith(_HTML_STARTS):
            raise UserError(f"{path} is a web page, not the file (a browser saves Google Drive's \"can't "
                            f"scan this file for viruses\" page under the file's name): open the page, press "
                            f"its download button, and put the downloaded file there instead")
    checksums = Checksums.of_file(path)
    reason = expected.mismatch(checksums, path.stat().st_size)
    if reason is not None:
        raise UserError(f"{path} does not match the checksum from {expected.source} ({reason}): it is "
                        f"damaged or a different file; replace it with a verified copy, or delete it to "
                        f"download again")
    return checksums


def fetch(url: str, target: Path, expected: Expected, progress: Progress | None = None,
          confirmed: bool = False) -> Checksums:
    """Downloads `url` to `target` (resuming `<target>.partial`), checked against `expected`.

    A web page holding a download confirmation form (Google Drive's "can't scan this file for
    viruses" page, `<form id="download-form">`) is followed once (`confirmed`), as gdown does.

    Returns:
        The checksums of the complete file (a file with nothing to check against is taken as
        the server sent it; its sha256 is here to be recorded).
    """
    partial = partial_path(target)
    kept = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={kept}-"} if kept else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and kept:  # the kept part is not a prefix of the file: start again
            partial.unlink()
            return fetch(url, target, expected, progress, confirmed)
        raise UserError(f"cannot download {target.name}: {url} answered HTTP {error.code} {error.reason}; "
                        f"check the URL (or the mirror), or place the file by hand at {target}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise UserError(f"cannot download {target.name}: cannot reach {_host(url)} ({reason}); check the "
                        f"network, or place the file by hand at {target}") from None
    with response:
        start = _resumed_from(response, kept)
        checksums = Checksums()
        if start:
            with partial.open("rb") as stream:
                while block := stream.read(BLOCK_BYTES):
                    checksums.update(block)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else expected.size
        page = _web_page_start(response, resumed=bool(start))
        if page is not None:
            link = None if confirmed else _confirmation_link(response.read(_MAX_PAGE_BYTES),
                                                             response.geturl() or url)
            if link is None:
                raise _web_page_error(url, response.geturl() or url, page, target)
            return fetch(link, target, expected, progress, confirmed=True)
        done = _stream(response, partial, start, checksums, url, target, total, progress)
    if total is not None and done != total:
        raise _dropped(url, target, done, total)
    reason = expected.mismatch(checksums, done)
    if reason is not None:
        partial.unlink(missing_ok=True)
        why = ("the server sent no Content-Length, so the connection may have dropped before the end: run "
               "the command again" if total is None else
               "the download is corrupt or the file has changed: try again")
        raise UserError(f"{target.name} from {url} does not match its checksum from {expected.source} "
                        f"({reason}); {why}, or place a verified copy at {target}")
    os.replace(partial, target)
    return checksums


def _host(url: str) -> str:
    """The server of a URL (the URL itself for `file://`), for messages."""
    return urllib.parse.urlsplit(url).netloc or url


def _resumed_from(response, kept: int) -> int:
    """Where the response body starts in the file: `kept` for a matching 206, else 0."""
    content_range = response.headers.get("Content-Range", "")
    if kept and getattr(response, "status", None) == 206 and content_range.startswith(f"bytes {kept}-"):
        return kept
    return 0


def _web_page_start(response, resumed: bool) -> bytes | None:
    """The first bytes (lower case) of a web page sent instead of the file; None for a file.

    Only the `Content-Type` or the first bytes tell (the status is 200). Peeking keeps the
    bytes for `_stream`.
    """
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    first = b"" if resumed or not hasattr(response, "peek") else response.peek(2048).lower()
    if content_type in _PAGE_TYPES or first.lstrip().startswith(_HTML_STARTS):
        return first
    return None


class _DownloadForm(html.parser.HTMLParser):
    """The action and hidden fields of `<form id="download-form">` (Google Drive's confirmation)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form" and attributes.get("id") == "download-form" and self.action is None:
            self.action, self._inside = attributes.get("action", ""), True
        elif tag == "input" and self._inside and attributes.get("type") == "hidden" and "name" in attributes:
            self.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


def _confirmation_link(page: bytes, base: str) -> str | None:
    """The URL a download confirmation page's form leads to (GET), or None without one."""
    form = _DownloadForm()
    form.feed(page.decode("utf-8", "replace"))
    if not form.action:
        return None
    return f"{urllib.parse.urljoin(base, form.action)}?{urllib.parse.urlencode(form.fields)}"


def _web_page_error(url: str, final_url: str, page: bytes, target: Path) -> UserError:
    drive = "google" in _host(final_url).lower() or b"google drive" in page
    why = ("Google Drive sent its \"can't scan this file for viruses\" page without a download link"
           if drive else "the link may need a login or lead to a download page")
    return UserError(f"cannot download {target.name}: {url} answered with a web page, not the file ({why}); "
                     f"open the URL in a browser, save the file, and import it with `vcm-synthesis "
                     f"download-model NAME --from FOLDER` (or place it at {target})")


def _stream(response, partial: Path, start: int, checksums: Checksums, url: str, target: Path,
            total: int | None, progress: Progress | None) -> int:
    done = start
    try:
        out = partial.open("ab" if start else "wb")
    except OSError as error:
        raise _write_failed(partial, error) from None
    with out:
        if progress is not None:
            progress(target.name, done, total)
        while True:
            try:
                block = response.read(BLOCK_BYTES)
            except (OSError, http.client.HTTPException):  # reset, timeout, IncompleteRead
                out.flush()
                raise _dropped(url, target, done, total) from None
            if not block:
                break
            try:
                out.write(block)
            except OSError as error:
                raise _write_failed(partial, error) from None
            checksums.update(block)
            done += len(block)
            if progress is not None:
                progress(target.name, done, total)
    return done


def _dropped(url: str, target: Path, done: int, total: int | None) -> UserError:
    of = f" of {_megabytes(total)}" if total else ""
    return UserError(f"the connection to {_host(url)} dropped after {_megabytes(done)}{of} of {target.name}; "
                     f"the part is kept in {partial_path(target)}: run the same command again to resume")


def _write_failed(partial: Path, error: OSError) -> UserError:
    return UserError(f"{write_error(partial, error)}; then run the same command again to resume "
                     "(VCM_SYNTHESIS_HOME moves the downloads to another disk)")


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"
