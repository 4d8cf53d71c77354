#!/usr/bin/env bash
# Runs every test: Swift (block format, decode engine, supervisor, skip log, systemd glue)
# and Python (client, compatibility layer, DataLoader), against real processes and files.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v swift >/dev/null || export PATH="/opt/swift/usr/bin:$PATH"

echo "== swift build"
if ! swift build --build-tests >/tmp/clipvisor-build.log 2>&1; then
    cat /tmp/clipvisor-build.log
    exit 1
fi
grep -E "warning:" /tmp/clipvisor-build.log | grep -v "/.build/checkouts/" | sort -u || true

echo "== swift test"
# Serial: the supervisor tests measure deadlines and spawn many processes on small machines.
swift test --skip-build --no-parallel

echo "== python lint and types (ruff, mypy; config in clients/python/pyproject.toml)"
(cd clients/python && python3 -m ruff check . && python3 -m mypy)

echo "== python tests"
export CLIPVISOR_BIN="$PWD/.build/debug/clipvisor"
python3 -m pytest -q clients/python/tests

echo "== release build (what the demo and the service run; no warnings from our code)"
if ! swift build -c release >/tmp/clipvisor-release.log 2>&1; then
    cat /tmp/clipvisor-release.log
    exit 1
fi
if grep -E "^$PWD/(Sources|Tests)/.*warning:" /tmp/clipvisor-release.log; then
    echo "warnings in our own code (above)" >&2
    exit 1
fi

if [ -x scripts/check-systemd.sh ]; then
    echo "== systemd units"
    scripts/check-systemd.sh
fi
if [ -x scripts/test-packaging.sh ] && [ "${CLIPVISOR_SKIP_PACKAGING:-0}" != 1 ]; then
    echo "== packaging (wheel in a fresh venv; the .deb in a booted Debian 12 container)"
    scripts/test-packaging.sh
fi
echo "== all tests passed"
