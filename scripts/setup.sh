#!/usr/bin/env bash
# Installs what clipvisor needs on Debian 12, as root: FFmpeg 5.1, zstd and systemd development
# packages (the worker links FFmpeg; the supervisor links libsystemd), the ffmpeg CLI (test
# fixtures only), chromium (renders clipvisor-scan's report in its test), and the Python client
# with its test dependencies. Idempotent and quiet when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libavformat-dev libavcodec-dev libswscale-dev libswresample-dev libavutil-dev
          libzstd-dev libsystemd-dev pkg-config ffmpeg zstd util-linux systemd chromium
          # scripts/package.sh and scripts/test-packaging.sh (a .deb, and a booted Debian 12 root);
          # libcurl's link name for the --static-swift-stdlib build (FoundationNetworking, via FlyingFox).
          dpkg-dev binutils lintian debootstrap systemd-container libcurl4-openssl-dev)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v swift >/dev/null; then
    for candidate in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
        [ -x "$candidate/swift" ] && export PATH="$candidate:$PATH"
    done
fi
command -v swift >/dev/null || {
    echo "setup: the Swift 6 toolchain is not installed; get it from https://www.swift.org/install/linux/ (Debian 12) and put swift on PATH" >&2
    exit 1
}

pip_install() {
    # Debian's own python3 refuses system-wide installs (PEP 668); a pyenv or venv python does not.
    python3 -m pip install -q --disable-pip-version-check "$@" 2>/tmp/clipvisor-pip.err || {
        if grep -q externally-managed /tmp/clipvisor-pip.err; then
            python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@"
        else
            cat /tmp/clipvisor-pip.err >&2
            return 1
        fi
    }
}
python3 -c "import numpy, zstandard, pytest" 2>/dev/null || pip_install numpy zstandard pytest
python3 -c "import prometheus_client" 2>/dev/null || pip_install prometheus_client  # test-only: parses the metrics text
# clipvisor-scan: progress bar, report plots, Parquet; its browser test renders the report in chromium.
python3 -c "import tqdm, matplotlib, pyarrow" 2>/dev/null || pip_install tqdm matplotlib pyarrow
# The protocol fuzz tests (clients/python/tests/test_fuzz_protocol.py) generate requests with hypothesis.
python3 -c "import hypothesis" 2>/dev/null || pip_install hypothesis
pip_install --no-deps -e clients/python
# The Python client's linter and type checker (scripts/test.sh), pinned: a new release's rules
# must not fail CI on code that did not change.
{ python3 -m ruff --version 2>/dev/null | grep -qx "ruff 0.17.6" &&
  python3 -m mypy --version 2>/dev/null | grep -q "^mypy 2.4.1 "; } || pip_install "ruff==0.17.6" "mypy==2.4.1"
if [ "${CLIPVISOR_SKIP_TORCH:-0}" != 1 ]; then
    # The DataLoader tests need torch (large; pip caches it); the compatibility tests compare
    # against qwen-vl-utils (with decord and torchvision) and librosa themselves.
    python3 -c "import torch, torchvision" 2>/dev/null || pip_install torch torchvision
    python3 -c "import qwen_vl_utils, decord, librosa" 2>/dev/null || pip_install "qwen-vl-utils==0.0.11" decord librosa
fi
# clipvisor.ray (a Ray Data datasource) and its tests/benchmark; ray[data] brings pyarrow and pandas.
python3 -c "import ray.data, pyarrow" 2>/dev/null || pip_install "ray[data]==2.60.0"
