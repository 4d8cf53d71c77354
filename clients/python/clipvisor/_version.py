"""The client's version: sent in the hello (``clipvisor-python/<version>``).

Written once, in Sources/Shared/Version.swift; setup.py stamps the package's metadata with it,
and this reads it back from there (or, in a source checkout not installed, from that file).
"""

import os
import re


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        PackageNotFoundError, version = Exception, None  # type: ignore[assignment,misc]
    if version is not None:
        try:
            # The platform wheel's local label (`+ffmpeg5`: the FFmpeg its worker links) is not
            # part of the client's version.
            return version("clipvisor").split("+")[0]
        except PackageNotFoundError:
            pass
    swift = os.path.join(os.path.dirname(__file__), "..", "..", "..", "Sources", "Shared", "Version.swift")
    try:
        with open(swift, encoding="utf-8") as f:
            found = re.search(r'static let string = "([^"]+)"', f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    return "0+unknown"


__version__ = _version()
