#!/usr/bin/env bash
# Checks the systemd units (systemd/): `systemd-analyze verify` must find nothing wrong except
# that ExecStart's binary is not installed on this machine, and the service's exposure score
# (`systemd-analyze security --offline=true`) must stay at or below 1.5. The score is computed
# as an unprivileged user (nobody) when this runs as root, so it never depends on root's view.
# Needs systemd-analyze (systemd ≥ 250 for --offline/--threshold); no running systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

threshold=15   # --threshold is the exposure level × 10: 15 means ≤ 1.5.
binary=/usr/local/bin/clipvisor
allowed="clipvisor.service: Command $binary is not executable: No such file or directory"

command -v systemd-analyze >/dev/null || { echo "check-systemd: systemd-analyze is not installed" >&2; exit 1; }

work=$(mktemp -d /tmp/clipvisor-units.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
cp systemd/clipvisor.service systemd/clipvisor.socket "$work/"
chmod 644 "$work"/*

unprivileged() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=nobody --regid=nogroup --clear-groups --reset-env -- "$@"
    else
        "$@"
    fi
}

verify() {
    local label=$1; shift
    local output status=0
    output=$(cd "$work" && unprivileged systemd-analyze verify "$@" 2>&1) || status=$?
    local rest
    rest=$(printf '%s\n' "$output" | grep -vxF "$allowed" | grep -v '^$' || true)
    if [ -n "$rest" ]; then
        echo "check-systemd: systemd-analyze verify ($label) complains:" >&2
        printf '%s\n' "$rest" >&2
        exit 1
    fi
    if [ "$status" != 0 ] && ! [ -x "$binary" ] && ! printf '%s\n' "$output" | grep -qxF "$allowed"; then
        echo "check-systemd: systemd-analyze verify ($label) failed with status $status and no message" >&2
        exit 1
    fi
    echo "check-systemd: verify $label: ok"
}

verify "units" clipvisor.socket clipvisor.service

# The example drop-in, installed as it would be.
mkdir -p "$work/clipvisor.service.d"
chmod 755 "$work/clipvisor.service.d"
cp systemd/clipvisor.service.d/read-only-data.conf.example "$work/clipvisor.service.d/read-only-data.conf"
chmod 644 "$work/clipvisor.service.d/read-only-data.conf"
verify "units with read-only-data.conf" clipvisor.socket clipvisor.service

report=$(cd "$work" && unprivileged systemd-analyze security --offline=true --threshold="$threshold" --no-pager clipvisor.service 2>&1) || {
    printf '%s\n' "$report" >&2
    echo "check-systemd: clipvisor.service's exposure is above $((threshold / 10)).$((threshold % 10))" >&2
    exit 1
}
printf '%s\n' "$report" | grep -E '^(✗|→)' || true
echo "check-systemd: security: ok (threshold $((threshold / 10)).$((threshold % 10)))"

# The metrics drop-in (loopback TCP for Prometheus) must keep the score too.
cp systemd/clipvisor.service.d/metrics.conf.example "$work/clipvisor.service.d/metrics.conf"
chmod 644 "$work/clipvisor.service.d/metrics.conf"
verify "units with metrics.conf" clipvisor.socket clipvisor.service
report=$(cd "$work" && unprivileged systemd-analyze security --offline=true --threshold="$threshold" --no-pager clipvisor.service 2>&1) || {
    printf '%s\n' "$report" >&2
    echo "check-systemd: clipvisor.service with metrics.conf is exposed above $((threshold / 10)).$((threshold % 10))" >&2
    exit 1
}
printf '%s\n' "$report" | grep -E '^→' || true
echo "check-systemd: security with metrics.conf: ok"
