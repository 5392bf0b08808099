"""The contract between training and service: the network, the checkpoint format, the classes."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _source_version() -> str:
    """A source tree that was not pip-installed (the Docker image): the version its pyproject.toml says."""
    import tomllib

    try:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


try:
    __version__ = version("camvid-segment")
except PackageNotFoundError:
    __version__ = _source_version()
