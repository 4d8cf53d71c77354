"""The package's version comes from the Swift sources, the one place it is written.

``Sources/Shared/Version.swift`` holds ``ClipvisorVersion.string``; the binaries print it
(``clipvisor --version``), scripts/package.sh stamps the Debian package with it, and this file
gives it to the wheels. Everything else is in pyproject.toml.
"""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION_SWIFT = os.path.join(HERE, "..", "..", "Sources", "Shared", "Version.swift")


def version() -> str:
    try:
        with open(VERSION_SWIFT, encoding="utf-8") as f:
            found = re.search(r'static let string = "([^"]+)"', f.read())
    except OSError:
        found = None
    if found:
        return found.group(1)
    # An sdist has no Swift sources next to it: its PKG-INFO keeps the version it was made with.
    try:
        with open(os.path.join(HERE, "PKG-INFO"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    raise RuntimeError(f"cannot find the clipvisor version in {VERSION_SWIFT}")


setup(version=version())
