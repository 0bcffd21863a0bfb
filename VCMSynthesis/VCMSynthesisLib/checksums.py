"""File checksums (sha256 and md5 in one read): downloads, imported checkpoints, provenance.

Its own module so that `registry.py` (downloads) and `checkpoints.py` (imports) both use it
without importing each other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK_BYTES = 1 << 20  # read size when streaming files and downloads


class Checksums:
    """sha256 and md5 of a byte stream, fed block by block, so one read serves both."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)

    def update(self, block: bytes) -> None:
        self._sha256.update(block)
        self._md5.update(block)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()

    def matches(self, sha256: str, md5: str | None) -> bool:
        """True if the stream has this sha256 and, where one is given, this md5."""
        return self.sha256 == sha256 and md5 in (None, self.md5)

    @classmethod
    def of_file(cls, path: Path) -> Checksums:
        checksums = cls()
        with path.open("rb") as stream:
            while block := stream.read(BLOCK_BYTES):
                checksums.update(block)
        return checksums
