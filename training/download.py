"""Fetch and verify a public dataset archive, then unpack it safely (no paths outside the destination)."""

from __future__ import annotations

import hashlib
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from models.errors import UserError

from .progress import progress


class DownloadError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Source:
    url: str
    size: int | None = None  # bytes
    md5_first_mib: str | None = None  # fastai's check: md5 of the first MiB
    sha256: str | None = None  # whole-file check, when known


# CamVid as fastai distributes it (fastai layout, 32 classes, 720x960); size and hash from fastai's
# own download_checks.py, so a file that passes here is the one fastai's users get.
SOURCES = {
    "camvid": Source("https://s3.amazonaws.com/fast-ai-imagelocal/camvid.tgz", 598913237,
                     "648371e4f3a833682afb39b08a3ce2aa"),
    "camvid-tiny": Source("https://s3.amazonaws.com/fast-ai-sample/camvid_tiny.tgz", 2314212,
                          "2cf6daf91b7a2083ecfa3e9968e9d915"),
}


def verify(path: Path, source: Source) -> None:
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        raise DownloadError(f"{path}: {size} bytes, expected {source.size} from {source.url}; "
                            "the download is incomplete or the file changed upstream")
    with path.open("rb") as f:
        first = hashlib.md5(f.read(1 << 20), usedforsecurity=False).hexdigest()
    if source.md5_first_mib and first != source.md5_first_mib:
        raise DownloadError(f"{path}: checksum {first} does not match {source.md5_first_mib} for {source.url}")
    if source.sha256:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != source.sha256:
            raise DownloadError(f"{path}: sha256 {h.hexdigest()} does not match {source.sha256}")


def fetch(source: Source, dest: Path, show: bool = True) -> Path:
    """Download `source` into `dest` (verified, then extracted); returns the extracted folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = source.url.rstrip("/").rsplit("/", 1)[-1]
    archive, part = dest / name, dest / (name + ".part")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as r, part.open("wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or source.size
            with progress(show=show, total=total, unit="B", unit_scale=True, desc=name) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"could not download {source.url}: {e}") from e
    try:
        verify(part, source)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    part.replace(archive)
    try:
        with tarfile.open(archive) as tar:
            tops = {m.name.split("/", 1)[0] for m in tar.getmembers() if m.name}
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and links out of dest
    except (tarfile.TarError, OSError) as e:
        raise DownloadError(f"{archive}: cannot unpack ({e})") from e
    archive.unlink()
    # Archives usually hold one top folder (camvid/); return it, else the destination itself.
    only = dest / next(iter(tops)) if len(tops) == 1 else dest
    return only if only.is_dir() else dest
