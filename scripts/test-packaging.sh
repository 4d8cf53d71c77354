#!/usr/bin/env bash
# Tests what scripts/package.sh makes, as a GPU node would install it (docs/install.md):
#  1. the platform wheel in a fresh venv with no Swift toolchain anywhere: `import clipvisor`
#     starts a private supervisor from the wheel's own binaries and decodes a clip, and the
#     `clipvisor` entry point runs;
#  2. the Debian package in a Debian 12 root booted with `systemd-nspawn -b` (a real systemd as
#     PID 1), driven from outside with nsenter: socket activation, READY/STATUS, watchdog pings,
#     decoding as a member of group clipvisor, the wheel's Python client with block slabs
#     against the sandboxed service, the refusal of a non-member, a FIFO answered
#     `timeout` with its journal fields, `systemctl reload` reopening the skip log, a crash
#     restarted by Restart=on-failure, a clean stop, and a worker whose FFmpeg library is gone.
# The root is made once with debootstrap from the Debian mirror and cached in
# $CLIPVISOR_TEST_ROOT_CACHE (default /var/cache/clipvisor-test-root); the container runs on a
# throw-away overlay of it (--volatile=overlay), so the cache stays pristine. Root only.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

fail() { echo "test-packaging: FAIL: $*" >&2; exit 1; }
step() { echo "-- $*"; }
[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, systemd-nspawn)"
for tool in debootstrap systemd-nspawn nsenter dpkg-shlibdeps; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (scripts/setup.sh installs it)"
done

work=$(mktemp -d /tmp/clipvisor-test-packaging.XXXXXX)
nspawn_pid=""
leader=""
container_init() { ps --ppid "$nspawn_pid" -o pid= 2>/dev/null | tr -d ' ' | head -1 || true; }
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        [ -n "$leader" ] || leader=$(container_init)
        kill -TERM "$nspawn_pid" 2>/dev/null || true   # nspawn powers the container off
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        # A container that does not halt (e.g. still booting): killing its PID 1 from outside
        # ends its whole PID namespace, and nspawn exits. Never wait without a bound.
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            [ -n "$leader" ] || leader=$(container_init)
            [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$nspawn_pid" 2>/dev/null || true
        fi
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "test-packaging: FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR
started=$SECONDS

echo "== package"
# CLIPVISOR_REUSE_DIST=1 tests the dist/ of an earlier scripts/package.sh (when iterating on tests).
if [ "${CLIPVISOR_REUSE_DIST:-0}" != 1 ] || ! ls dist/*.deb >/dev/null 2>&1; then
    scripts/package.sh >"$work/package.log" 2>&1 || { cat "$work/package.log"; fail "scripts/package.sh failed"; }
fi
version=$(sed -n 's/^ *public static let string = "\([^"]*\)".*/\1/p' Sources/Shared/Version.swift)
deb=$(ls dist/clipvisor_"$version"_amd64.deb)
wheel=$(ls dist/clipvisor-"$version"+ffmpeg*-py3-none-manylinux_*_x86_64.whl)
ls dist/clipvisor-"$version"-py3-none-any.whl >/dev/null
echo "sizes: $(stat -c '%n %s' "$deb" "$wheel" dist/clipvisor-"$version"-py3-none-any.whl | tr '\n' ';')"
packaged=$SECONDS

# Test media, made here (never committed): a 2 s clip with audio.
mkdir -p "$work/share"
ffmpeg -loglevel error -y -f lavfi -i testsrc2=d=2:s=320x240:r=25 -f lavfi -i sine=d=2 \
    -c:v libx264 -pix_fmt yuv420p -c:a aac -shortest "$work/share/clip.mp4"

echo "== wheel in a fresh venv, no Swift toolchain"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$wheel" >"$work/pip.log" 2>&1 ||
    { cat "$work/pip.log"; fail "pip install $wheel failed"; }
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for binary in "$site/clipvisor/bin/clipvisor" "$site/clipvisor/bin/clipvisor-worker"; do
    [ -x "$binary" ] || fail "$binary is not in the wheel or not executable"
    if ldd "$binary" | grep -E 'libswift|/opt/swift|not found'; then fail "$binary needs the above"; fi
done
# A clean environment: no toolchain on PATH or the loader path, no repository on PYTHONPATH,
# no system service or per-user supervisor to find.
mkdir -p "$work/home" "$work/runtime"
chmod 700 "$work/runtime"
clean=(env -i HOME="$work/home" XDG_RUNTIME_DIR="$work/runtime" PATH="$work/venv/bin:/usr/bin:/bin" LANG=C.UTF-8)
(cd "$work" && "${clean[@]}" python -W always - "$work/share/clip.mp4" "$site" "$version" <<'EOF') || fail "import clipvisor from the wheel"
import sys, warnings, os
from importlib.metadata import version
clip, site, expected = sys.argv[1], sys.argv[2], sys.argv[3]
assert version("clipvisor").split("+")[0] == expected, version("clipvisor")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import clipvisor
    assert clipvisor.__file__.startswith(site), clipvisor.__file__
    # client.py still writes the version a second time: it must agree with Version.swift.
    assert clipvisor.__version__ == expected, (clipvisor.__version__, expected)
    with clipvisor.Client() as client:
        video = client.video(clip, fps=2.0)
started = [str(w.message) for w in caught if "private" in str(w.message)]
assert started, [str(w.message) for w in caught]
assert os.path.join(site, "clipvisor", "bin", "clipvisor") in started[0], started[0]
assert video.frames.shape[0] >= 2 and video.frames.shape[1] == 3, video.frames.shape
print("wheel: decoded", video.frames.shape, "with", os.path.join(site, "clipvisor", "bin", "clipvisor"))
EOF
got=$(cd "$work" && "${clean[@]}" clipvisor --version)
[ "$got" = "$version" ] || fail "the wheel's clipvisor entry point says '$got', expected $version"
(cd "$work" && "${clean[@]}" clipvisor decode "$work/share/clip.mp4" --fps 2 >"$work/entry.log" 2>&1) ||
    { cat "$work/entry.log"; fail "clipvisor decode through the entry point"; }
echo "wheel: entry point clipvisor --version = $got; clipvisor decode ok"
wheeled=$SECONDS

echo "== Debian 12 booted with systemd-nspawn"
cache=${CLIPVISOR_TEST_ROOT_CACHE:-/var/cache/clipvisor-test-root}
# What the root needs beyond minbase: systemd as PID 1 and the package's run-time dependencies
# as the .deb declares them (first alternatives, so that dpkg -i needs no network). A new list
# makes a new root.
depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/ //g' | grep -v '^$' | sort -u | paste -sd, -)
include="systemd,dbus,$depends"
rootfs="$cache/bookworm-$(echo "$include" | md5sum | cut -c1-8)"
if [ ! -x "$rootfs/usr/lib/systemd/systemd" ]; then
    step "debootstrap (once; cached in $rootfs)"
    mkdir -p "$cache"
    rm -rf "$rootfs.part"
    debootstrap --variant=minbase --include="$include" bookworm "$rootfs.part" \
        "${CLIPVISOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 ||
        { tail -30 "$work/debootstrap.log"; fail "debootstrap failed"; }
    mv "$rootfs.part" "$rootfs"
fi
cp "$deb" "$work/share/clipvisor.deb"
mkfifo "$work/share/hang.fifo"
chmod -R a+rX "$work/share"
chmod a+r "$work/share/hang.fifo"

booted_at=$SECONDS
machine="clipvisor-test-$$"
systemd-nspawn -D "$rootfs" --volatile=overlay --register=no --keep-unit --quiet -b --console=passive \
    --machine="$machine" --bind-ro="$work/share:/srv/test" >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!
for _ in $(seq 600); do
    leader=$(container_init)
    [ -n "$leader" ] && [ "$(cat /proc/"$leader"/comm 2>/dev/null)" = systemd ] && break
    leader=""
    sleep 0.1
done
[ -n "$leader" ] || { cat "$work/nspawn.log"; fail "the container did not start within 60 s"; }
inside() { nsenter -t "$leader" -a -- /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
as_user() { local user=$1; shift; inside setpriv --reuid="$user" --regid="$user" --init-groups --reset-env -- "$@"; }
state=""
for _ in $(seq 300); do
    state=$(inside systemctl is-system-running 2>&1 || true)
    case "$state" in running | degraded) break ;; esac
    sleep 0.2
done
[ "$state" = running ] || [ "$state" = degraded ] || { cat "$work/nspawn.log"; fail "the container's systemd is '$state' after 60 s"; }
echo "booted in $((SECONDS - booted_at)) s (systemd: $state)"

unit() { inside systemctl show -P "$1" clipvisor.service; }
journal() { inside journalctl -q --no-pager -u clipvisor.service "$@"; }

step "install the package"
inside dpkg -i /srv/test/clipvisor.deb >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
inside getent passwd clipvisor >/dev/null || fail "the package did not create the clipvisor user"
[ "$(inside systemctl is-enabled clipvisor.socket)" = enabled ] || fail "clipvisor.socket is not enabled"
[ "$(inside systemctl is-active clipvisor.socket)" = active ] || fail "clipvisor.socket is not listening"
[ "$(inside systemctl is-active clipvisor.service || true)" = inactive ] || fail "clipvisor.service runs before any client"
inside test -S /run/clipvisor/clipvisor.sock || fail "no /run/clipvisor/clipvisor.sock"
# Watchdog pings every 2 s instead of 15, so that two are seen quickly (a drop-in, as an admin would).
inside mkdir -p /etc/systemd/system/clipvisor.service.d
printf '[Service]\nWatchdogSec=4s\n' | inside tee /etc/systemd/system/clipvisor.service.d/test-watchdog.conf >/dev/null
inside systemctl daemon-reload
inside useradd --create-home --groups clipvisor alice
inside useradd --create-home bob

step "socket activation on the first decode, as a member of clipvisor"
out=$(as_user alice clipvisor decode /srv/test/clip.mp4 --fps 2 2>&1) || { echo "$out"; journal | tail -20; fail "decode as alice"; }
echo "$out" | grep -q "video" || { echo "$out"; fail "decode as alice printed no video"; }
# Started by the socket; READY (active) once every worker has said it is ready, which on a
# loaded machine may come after this first clip was answered.
active=""
for _ in $(seq 300); do
    active=$(inside systemctl is-active clipvisor.service || true)
    case "$active" in active | failed | inactive) break ;; esac
    sleep 0.2
done
[ "$active" = active ] || { journal | tail -20; fail "the service started by its socket is '$active', not active (READY)"; }

step "READY and STATUS"
[ "$(unit SubState)" = running ] || fail "SubState $(unit SubState)"
status=""
for _ in $(seq 150); do
    status=$(unit StatusText)
    case "$status" in serving:*) break ;; esac
    sleep 0.2
done
case "$status" in
    "serving: "*) echo "STATUS=$status" ;;
    *) journal | tail -20; fail "STATUS is '$status', not 'serving: ...' (could no worker start?)" ;;
esac
workers=$(inside clipvisor status --json 2>/dev/null | python3 -c 'import json,sys; w=json.load(sys.stdin)["workers"]; print(w.get("last_start_error"))' 2>/dev/null || true)
[ "$workers" = None ] || fail "worker start error in the container: $workers"
# Under the unit's sandbox (SystemCallFilter, RestrictNamespaces, nspawn's own filter) workers are
# cloned by the fork server, not exec'd after a refused clone.
start=$(inside clipvisor status --json 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin)["workers"]["start"]; print(s["mode"], s["fork_server_pid"] is not None, s["problem"])' 2>/dev/null || true)
[ "$start" = "fork-server True None" ] || { journal | tail -20; fail "workers are not cloned by the fork server in the service: $start"; }
echo "workers cloned by the fork server"

step "the wheel's Python client with block slabs, from the host, against the sandboxed service"
# The service's socket, reached through the container's root; blocks come back in slabs the
# supervisor made under the unit's sandbox (docs/protocol.md, "Block slabs").
(cd "$work" && "${clean[@]}" python - "/proc/$leader/root/run/clipvisor/clipvisor.sock" <<'EOF') ||
import sys
import numpy as np
import clipvisor
sock = sys.argv[1]
with clipvisor.Client(sock, spawn=False) as slabbed, clipvisor.Client(sock, spawn=False, slabs=0) as plain:
    assert slabbed.server["slabs"] == 4, slabbed.server
    for fps in (2.0, 8.0, 25.0, 2.0):
        a = slabbed.video("/srv/test/clip.mp4", fps=fps)
        b = plain.video("/srv/test/clip.mp4", fps=fps)
        assert np.array_equal(a.frames, b.frames), fps
    clips = slabbed.sample([{"path": "/srv/test/clip.mp4", "frames": 4}] * 6)
    assert all(isinstance(c, clipvisor.Video) and c.frames.shape[0] == 4 for c in clips), clips
    slabs = slabbed.status()["memory"]["slabs"]
    assert 1 <= slabs["count"] <= 4, slabs
print(f"python client: {slabs['count']} block slabs holding {slabs['bytes']} bytes, same frames as fresh memfds")
EOF
    { journal | tail -20; fail "the Python client with block slabs against the service"; }

step "watchdog pings"
first=$(unit WatchdogTimestampMonotonic)
sleep 5
second=$(unit WatchdogTimestampMonotonic)
[ "$first" != 0 ] && [ "$second" -gt "$first" ] || fail "no watchdog ping in 5 s ($first -> $second)"

step "a non-member is refused, clearly"
if out=$(as_user bob clipvisor decode /srv/test/clip.mp4 --fps 2 2>&1); then
    echo "$out"; fail "bob (not in group clipvisor) decoded"
fi
echo "$out" | grep -q "permission denied on /run/clipvisor/clipvisor.sock: join group clipvisor" ||
    { echo "$out"; fail "bob was not told to join group clipvisor"; }
echo "$out" | grep -q "starting one for this call" && fail "bob got a private supervisor without asking"

step "a FIFO is answered timeout, with its journal fields"
t0=$(date +%s%N)
out=$(as_user alice clipvisor decode /srv/test/hang.fifo --deadline 2 --tag fifo-test 2>&1 || true)
elapsed_ms=$((($(date +%s%N) - t0) / 1000000))
echo "$out" | grep -q "timeout" || { echo "$out"; fail "the FIFO was not answered timeout"; }
[ "$elapsed_ms" -lt 10000 ] || fail "the FIFO took $elapsed_ms ms for a 2 s deadline"
alice_uid=$(inside id -u alice)
fields=""
for _ in $(seq 20); do
    fields=$(journal SKIP_REASON=timeout -o json --output-fields=CLIP_PATH,DEADLINE_MS,ELAPSED_MS,TAG,CLIENT_UID,MESSAGE_ID || true)
    [ -n "$fields" ] && break
    sleep 0.2
done
echo "$fields" | python3 -c '
import json, sys
uid = sys.argv[1]
entries = [json.loads(line) for line in sys.stdin if line.strip()]
assert entries, "no journal entry with SKIP_REASON=timeout"
e = entries[-1]
assert e["CLIP_PATH"] == "/srv/test/hang.fifo" and e["DEADLINE_MS"] == "2000" and e["TAG"] == "fifo-test", e
assert e["CLIENT_UID"] == uid and e["MESSAGE_ID"] == "5c3f7a0e2b9d4e61a8c4d2f19b07e3a5", e
print("journal: SKIP_REASON=timeout CLIP_PATH=%s ELAPSED_MS=%s DEADLINE_MS=%s" % (e["CLIP_PATH"], e["ELAPSED_MS"], e["DEADLINE_MS"]))
' "$alice_uid" || fail "journal fields of the timeout"
echo "client saw the timeout after $elapsed_ms ms"

step "no library chatter in the journal"
chatter=$(inside journalctl -q --no-pager -b | grep -c "insecure memory" || true)
[ "$chatter" = 0 ] || { inside journalctl -q --no-pager -b | grep "insecure memory" | head -3; fail "$chatter 'insecure memory' lines in the journal"; }

step "systemctl reload reopens the skip log"
inside mv /var/lib/clipvisor/skips.jsonl /var/lib/clipvisor/skips.jsonl.1
inside systemctl reload clipvisor.service || { journal | tail -5; fail "systemctl reload"; }
as_user alice clipvisor decode /srv/test/missing.mp4 >/dev/null 2>&1 || true
inside grep -q '"/srv/test/missing.mp4"' /var/lib/clipvisor/skips.jsonl ||
    fail "after the reload the skip went elsewhere than a new skips.jsonl"
journal | grep -q "SIGHUP: reopening the skip log" || fail "no 'reopening the skip log' in the journal"

step "a crash of the main process is restarted"
old=$(unit MainPID)
inside systemctl kill --kill-whom=main --signal=SIGSEGV clipvisor.service
new=""
for _ in $(seq 600); do
    new=$(unit MainPID)
    [ "$new" != 0 ] && [ "$new" != "$old" ] && [ "$(unit SubState)" = running ] && break
    sleep 0.1
done
[ "$new" != 0 ] && [ "$new" != "$old" ] || fail "not restarted after SIGSEGV (MainPID $old -> $new)"
[ "$(unit NRestarts)" -ge 1 ] || fail "NRestarts is $(unit NRestarts)"
as_user alice clipvisor decode /srv/test/clip.mp4 --fps 2 >/dev/null || fail "decode after the restart"

step "systemctl stop leaves no process and no socket"
inside systemctl stop clipvisor.service clipvisor.socket
left=$(inside sh -c 'for p in /proc/[0-9]*; do [ "$(stat -c %U $p 2>/dev/null)" = clipvisor ] && cat $p/comm; done' || true)
[ -z "$left" ] || fail "processes of user clipvisor left after stop: $left"
inside test ! -e /run/clipvisor/clipvisor.sock || fail "the socket file is left after stop"

step "a worker that cannot load FFmpeg says so, in status and in the client"
inside dpkg --remove --force-depends libswscale6 >/dev/null 2>&1
inside systemctl start clipvisor.socket
out=$(as_user alice clipvisor decode /srv/test/clip.mp4 --fps 2 2>&1 || true)
expected="the decode worker cannot load libswscale.so.6 (not found on this host): install libswscale6"
echo "$out" | grep -qF "$expected" || { echo "$out"; fail "the client was not told which library is missing"; }
[ "$(echo "$out" | grep -c .)" = 1 ] || { echo "$out"; fail "the client's answer is not one line"; }
echo "$out" | grep -q "crashed" && fail "a host problem was answered crashed"
statusline=$(as_user alice clipvisor status 2>&1 | grep "last start failure" || true)
echo "$statusline" | grep -qF "$expected" || { as_user alice clipvisor status; fail "clipvisor status does not name the library"; }
unit StatusText | grep -qF "libswscale.so.6" || fail "systemd's STATUS does not name the library: $(unit StatusText)"
quarantined=$(as_user alice clipvisor status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["skip_log"]["quarantined"])')
[ "$quarantined" = 0 ] || fail "$quarantined clips quarantined for a host problem"
echo "client: $out"
inside systemctl stop clipvisor.service clipvisor.socket

echo "== packaging tests passed: package $((packaged - started)) s, wheel $((wheeled - packaged)) s, booted container $((SECONDS - booted_at)) s (root cache: $rootfs)"
