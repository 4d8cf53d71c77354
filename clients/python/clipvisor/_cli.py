"""The ``clipvisor`` console command of the platform wheel: runs the bundled binary.

scripts/package.sh puts ``clipvisor`` and ``clipvisor-worker`` into ``clipvisor/bin/`` of the
platform wheel and declares this module's :func:`main` as its ``clipvisor`` entry point, so
``pip install clipvisor-...-manylinux_*.whl`` gives a working ``clipvisor serve``/``decode``/
``status`` on PATH without a Swift toolchain. The process is replaced (``execv``), so signals,
exit status and the supervisor's ``/proc/self/exe`` (how it finds its worker) are the binary's own.
"""

from __future__ import annotations

import os
import sys

from .spawn import bundled_binary


def main() -> None:
    binary = bundled_binary()
    if binary is None:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "clipvisor")
        sys.stderr.write(f"clipvisor: {here} is missing or not executable: this installation of the Python "
                         "package has no bundled binaries (install the platform wheel, or clipvisor's "
                         "Debian package)\n")
        sys.exit(127)
    os.execv(binary, ["clipvisor"] + sys.argv[1:])


if __name__ == "__main__":
    main()
