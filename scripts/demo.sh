#!/usr/bin/env bash
# The main job on the embedded defaults: start a local supervisor, decode sample clips through it
# (good ones, a hanging FIFO, a corrupt and a truncated file, a missing one), show the results,
# the status and the skip log. Everything lives in a scratch directory removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIPVISOR_SKIP_TORCH=${CLIPVISOR_SKIP_TORCH:-1} scripts/setup.sh   # the demo needs no torch
command -v swift >/dev/null || export PATH="/opt/swift/usr/bin:$PATH"

echo "== building (release)"
for product in clipvisor clipvisor-worker; do
    swift build -c release --product "$product" >/tmp/clipvisor-build.log 2>&1 || { cat /tmp/clipvisor-build.log; exit 1; }
done
bin="$PWD/.build/release"

demo=$(mktemp -d /tmp/clipvisor-demo.XXXXXX)
supervisor_pid=
cleanup() {
    [ -n "$supervisor_pid" ] && kill "$supervisor_pid" 2>/dev/null && wait "$supervisor_pid" 2>/dev/null
    rm -rf "$demo"
}
trap cleanup EXIT

echo "== making sample clips in $demo"
# Natural-looking content: moving test pattern with film-grain noise, and a tone.
ffmpeg -nostdin -v error -f lavfi -i "testsrc2=size=1280x720:rate=30,noise=alls=25:allf=t+u" \
    -f lavfi -i "sine=frequency=440:sample_rate=48000" -t 6 -c:v libx264 -preset veryfast \
    -pix_fmt yuv420p -c:a aac -movflags +faststart "$demo/street.mp4"
ffmpeg -nostdin -v error -f lavfi -i "mandelbrot=size=640x360:rate=25" -t 4 -c:v libx264 \
    -preset veryfast -pix_fmt yuv420p "$demo/zoom.mp4"
cp "$demo/street.mp4" "$demo/corrupt.mp4"        # garbage over the middle of the video data
dd if=/dev/urandom of="$demo/corrupt.mp4" bs=1k seek=300 count=200 conv=notrunc status=none
ffmpeg -nostdin -v error -i "$demo/zoom.mp4" -c copy "$demo/zoom-moov-last.mp4"
head -c 60000 "$demo/zoom-moov-last.mp4" > "$demo/truncated.mp4"
mkfifo "$demo/hanging.fifo"                        # opening it blocks forever: a real hang

echo "== starting the supervisor"
export CLIPVISOR_SOCKET="$demo/clipvisor.sock"
# Generous default deadline: good clips must pass on a busy 2-core machine. The hang gets its own
# short deadline below, as a training job would give its clips.
"$bin/clipvisor" serve --skip-log "$demo/skips.jsonl" --deadline 60 2>"$demo/supervisor.log" &
supervisor_pid=$!
for _ in $(seq 100); do "$bin/clipvisor" status 2>/dev/null | grep -q " idle " && break; sleep 0.1; done
"$bin/clipvisor" status

echo
echo "== decoding through the supervisor"
for clip in street.mp4 zoom.mp4 corrupt.mp4 truncated.mp4 hanging.fifo missing.mp4; do
    echo "-- $clip"
    deadline=()
    [ "$clip" = hanging.fifo ] && deadline=(--deadline 3)   # a FIFO with no writer: a real hang
    # A skipped clip exits 1 with its reason printed: that is the point of the demo, not a failure.
    "$bin/clipvisor" decode "$demo/$clip" --fps 2 --max-pixels 200704 "${deadline[@]}" || true
done

echo
echo "== the same from Python, into numpy"
python3 - "$demo" <<'PY'
import sys, time
import clipvisor
demo = sys.argv[1]
# Good clips get the supervisor's generous deadline; the FIFO gets a short one. Every skip is
# printed as what it is (the clip and the reason), never as a traceback.
clips = [("street.mp4", None), ("corrupt.mp4", None), ("hanging.fifo", 2.0)]
with clipvisor.Client(spawn=False) as client:
    for name, deadline in clips:
        start = time.perf_counter()
        try:
            video = client.video(f"{demo}/{name}", fps=2.0, max_pixels=448 * 448, deadline=deadline)
        except clipvisor.ClipSkipped as skip:
            print(f"{name}: skipped ({skip.reason}) after {time.perf_counter() - start:.1f} s: {skip}")
            continue
        print(f"{name}: frames {video.frames.shape} {video.frames.dtype}, pts {[round(float(t), 3) for t in video.pts]}, "
              f"sample_fps {video.sample_fps:.3f}, {1000 * (time.perf_counter() - start):.0f} ms")
PY

echo
echo "== status"
"$bin/clipvisor" status
echo
echo "== skip log (found through the running supervisor)"
"$bin/clipvisor" skips
echo
echo "== the supervisor's own log (stderr)"
cat "$demo/supervisor.log"
