"""The ``farmhand`` command line: a thin synchronous shell over the Python API."""
