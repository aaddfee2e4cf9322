"""The installed version of farmhand."""

__version__ = "0.1.0"
