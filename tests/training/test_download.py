import hashlib
import tarfile

import pytest

from training.cli import main
from training.data import open_folder
from training.download import DownloadError, Source, fetch

from ..conftest import CAMVID


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "camvid.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(CAMVID, arcname="camvid")
    return path


def test_fetch_verifies_and_unpacks_a_camvid_archive(archive, tmp_path):
    data = archive.read_bytes()
    source = Source(archive.as_uri(), size=len(data), md5_first_mib=hashlib.md5(data[: 1 << 20]).hexdigest(),
                    sha256=hashlib.sha256(data).hexdigest())
    folder = fetch(source, tmp_path / "data", show=False)
    assert folder == tmp_path / "data" / "camvid"
    assert len(open_folder(folder).pairs("all")) == 6
    assert not list((tmp_path / "data").glob("*.tgz*"))  # archive removed after unpacking


def test_a_corrupt_download_is_refused_and_removed(archive, tmp_path):
    with pytest.raises(DownloadError, match="expected 123"):
        fetch(Source(archive.as_uri(), size=123), tmp_path / "d", show=False)
    with pytest.raises(DownloadError, match="checksum"):
        fetch(Source(archive.as_uri(), md5_first_mib="0" * 32), tmp_path / "d", show=False)
    assert not list((tmp_path / "d").iterdir())
    with pytest.raises(DownloadError, match="could not download"):
        fetch(Source((tmp_path / "nope.tgz").as_uri()), tmp_path / "d", show=False)


def test_cli_download_from_a_local_mirror(archive, tmp_path, capsys):
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert main(["download", "camvid", "--dest", str(tmp_path / "x"), "--url", archive.as_uri(),
                 "--sha256", sha]) == 0
    assert capsys.readouterr().out.strip().endswith("camvid")
    assert main(["download", "camvid", "--dest", str(tmp_path / "y"), "--url", archive.as_uri(),
                 "--sha256", "f" * 64]) == 2
