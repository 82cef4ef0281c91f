"""carepath: reinforcement learning for the next step of depression care (decision support)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("carepath")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"
