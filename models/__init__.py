"""The contract between training and service: the network, the checkpoint format, the classes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camvid-segment")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0+unknown"
