#!/usr/bin/env python3
"""Turns the pure-Python clipvisor wheel into the platform wheel that carries the binaries.

    binary_wheel.py PURE_WHEEL BIN_DIR OUT_DIR --platform manylinux_2_35_x86_64 --local ffmpeg5

The platform wheel is the pure one plus ``clipvisor/bin/clipvisor`` and
``clipvisor/bin/clipvisor-worker`` (mode 0755), a ``clipvisor`` console entry point
(``clipvisor._cli:main``, next to the pure wheel's own entry points), ``Root-Is-Purelib: false`` and a platform tag; its version gets a
local label naming the FFmpeg the worker links (``0.1.0+ffmpeg5``: libavcodec.so.59), because
the FFmpeg libraries are the host's, not the wheel's. RECORD is recomputed. Only the standard
library is used, so this runs wherever scripts/package.sh does.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import zipfile

BINARIES = ("clipvisor", "clipvisor-worker")


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pure_wheel")
    parser.add_argument("bin_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--platform", required=True, help="platform tag, e.g. manylinux_2_35_x86_64")
    parser.add_argument("--local", required=True, help="local version label, e.g. ffmpeg5")
    args = parser.parse_args()

    name = os.path.basename(args.pure_wheel)
    match = re.fullmatch(r"clipvisor-([^-]+)-py3-none-any\.whl", name)
    if not match:
        sys.exit(f"binary_wheel.py: {args.pure_wheel}: not a pure clipvisor wheel (clipvisor-VERSION-py3-none-any.whl)")
    version = match.group(1)
    new_version = f"{version}+{args.local}"
    old_info, new_info = f"clipvisor-{version}.dist-info", f"clipvisor-{new_version}.dist-info"
    tag = f"py3-none-{args.platform}"
    out = os.path.join(args.out_dir, f"clipvisor-{new_version}-{tag}.whl")

    entries: list[tuple[zipfile.ZipInfo, bytes]] = []
    with zipfile.ZipFile(args.pure_wheel) as pure:
        for info in pure.infolist():
            data = pure.read(info)
            filename = info.filename
            if filename == f"{old_info}/RECORD":
                continue
            if filename.startswith(old_info + "/"):
                filename = new_info + filename[len(old_info):]
            if filename == f"{new_info}/WHEEL":
                lines = [line for line in data.decode().splitlines()
                         if line and not line.startswith(("Root-Is-Purelib:", "Tag:"))]
                lines += ["Root-Is-Purelib: false", f"Tag: {tag}"]
                data = ("\n".join(lines) + "\n").encode()
            elif filename == f"{new_info}/METADATA":
                data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
            new = zipfile.ZipInfo(filename, date_time=info.date_time)
            new.external_attr = info.external_attr
            new.compress_type = zipfile.ZIP_DEFLATED
            entries.append((new, data))

    for binary in BINARIES:
        path = os.path.join(args.bin_dir, binary)
        with open(path, "rb") as f:
            data = f.read()
        info = zipfile.ZipInfo(f"clipvisor/bin/{binary}", date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = (0o100755 << 16)
        info.compress_type = zipfile.ZIP_DEFLATED
        entries.append((info, data))
    # The pure wheel's entry points (clipvisor-scan) stay; `clipvisor` joins its console scripts.
    old_points = [(i, d) for i, d in entries if i.filename == f"{new_info}/entry_points.txt"]
    text = old_points[0][1].decode() if old_points else ""
    if "[console_scripts]" not in text:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + "[console_scripts]\n"
    text = text.replace("[console_scripts]\n", "[console_scripts]\nclipvisor = clipvisor._cli:main\n", 1)
    info = zipfile.ZipInfo(f"{new_info}/entry_points.txt", date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    entries = [(i, d) for i, d in entries if i.filename != f"{new_info}/entry_points.txt"]
    entries.append((info, text.encode()))

    record = [record_line(i.filename, d) for i, d in entries] + [f"{new_info}/RECORD,,"]
    info = zipfile.ZipInfo(f"{new_info}/RECORD", date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    entries.append((info, ("\n".join(record) + "\n").encode()))

    tmp = out + ".part"
    with zipfile.ZipFile(tmp, "w", compresslevel=9) as wheel:
        for info, data in entries:
            wheel.writestr(info, data)
    os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
