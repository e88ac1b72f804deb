"""Fetching dataset files: mirrors tried in turn, md5 checked, a timeout on every download.

A download is written to a temporary file beside its destination and moved into place only
after its md5 matches, so an interrupted or corrupted download never looks like a good file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DatasetDownloadError", "check_md5", "default_data_root", "download_file", "file_md5"]

#: Seconds a download may take, and may wait for any single network read.
DOWNLOAD_TIMEOUT = 30.0

_CHUNK = 1 << 16


class DatasetDownloadError(RuntimeError):
    """A dataset file could not be fetched from any mirror, or its checksum did not match."""


def default_data_root() -> Path:
    """The folder datasets are downloaded to when no ``root`` is given.

    ``$AFNIO_DATA_DIR`` if set, otherwise ``~/.cache/afnio/datasets``.
    """
    configured = os.environ.get("AFNIO_DATA_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache/afnio/datasets"


def file_md5(path: str | os.PathLike[str]) -> str:
    """Return the hexadecimal md5 digest of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(dataset: str, source: object, got: str, expected: str) -> None:
    """Refuse a data file already on disk (or packaged) whose md5 ``got`` is not ``expected``.

    Args:
        dataset: The dataset's name, quoted in the error.
        source: The file, as shown in the error.
        got: The file's md5 hex digest.
        expected: The md5 hex digest the dataset was published with.

    Raises:
        ValueError: If the digests differ; the message says to delete the file to fetch it anew.
    """
    if got != expected:
        raise ValueError(
            f"{dataset}: data file {source} has md5 {got}, expected {expected}; it is corrupted "
            "or a different version — delete it to download it again"
        )


def _fetch(url: str, target: Path, timeout: float) -> str:
    """Stream ``url`` into ``target`` and return the md5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        while chunk := response.read(_CHUNK):
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {timeout:g} s")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def download_file(
    dataset: str, urls: Sequence[str], destination: Path, md5: str, timeout: float | None = None
) -> Path:
    """Download a file from the first mirror that serves it with the expected md5.

    Args:
        dataset: The dataset's name, quoted in errors.
        urls: Candidate URLs of the same file, tried in order.
        destination: Where the file goes; its folder is created if needed.
        md5: The expected md5 hex digest.
        timeout: Seconds allowed per download (defaults to :data:`DOWNLOAD_TIMEOUT`).

    Returns:
        ``destination``.

    Raises:
        DatasetDownloadError: If no mirror delivered the file with the right md5 (offline,
            timed out, not found, corrupted); the message lists each URL's failure and says where
            to put the file by hand.
    """
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    destination.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
        os.close(handle)
        temporary_path = Path(temporary)
        try:
            try:
                got = _fetch(url, temporary_path, timeout)
            except OSError as error:  # URLError, HTTPError and timeouts are all OSErrors
                failures.append(f"{url}: {error}")
                continue
            if got != md5:
                failures.append(f"{url}: md5 {got} does not match the expected {md5}")
                continue
            os.replace(temporary_path, destination)
            return destination
        finally:
            temporary_path.unlink(missing_ok=True)
    raise DatasetDownloadError(
        f"{dataset}: could not download {destination.name}. Tried:\n  "
        + "\n  ".join(failures)
        + f"\nIf this machine is offline, copy the file to {destination} (md5 {md5})."
    )
