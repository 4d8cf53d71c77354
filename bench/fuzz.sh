#!/usr/bin/env bash
# Fuzzes the Swift parsers with libFuzzer for a fixed time budget each (docs/chaos.md):
#
#   json     Sources/Shared/JSONParser.swift (+ a serialize/parse round-trip property)
#   framing  MessageBuffer of Sources/Supervisor/Server/MessageFraming.swift (vs a direct reading)
#   block    Sources/Shared/Block/BlockReader.swift (AddressSanitizer; seeded with real blocks)
#   config   ConfigFile.parse of Sources/Supervisor/Config/ConfigFile.swift (toml++ via TOMLKit)
#
# Usage: bench/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
#
# The harnesses (Tests/Fuzz/*.swift) are compiled here with `swiftc -sanitize=fuzzer` from the
# parser sources directly, so they cost the package build nothing. `config` links the objects of
# the debug build (TOMLKit, Shared...): run `swift build` first. Output in bench/out/fuzz/:
# binaries, corpora (kept between runs, so each run starts where the last stopped), crashers
# (crash-*, minimised with -minimize_crash when found) and one log per target.
# Exit status 1 when any target found a crasher.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
command -v swiftc >/dev/null || export PATH="/opt/swift/usr/bin:$PATH"
SECONDS_PER=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(json framing block config)
OUT=$ROOT/bench/out/fuzz
mkdir -p "$OUT/src" "$OUT/seeds" "$OUT/crashes"
S=$ROOT/Sources
DEBUG=$ROOT/.build/debug
export SWIFT_BACKTRACE=enable=no  # let libFuzzer see the crash and write the input

quiet_link() { grep -v "Cannot export local symbol" || true; }

build() {  # build NAME FLAGS... -- SOURCES...
    local name=$1; shift
    local bin=$OUT/fuzz-$name
    echo "== build $name"
    if ! swiftc -parse-as-library -O -module-name "Fuzz$name" "$@" -o "$bin" 2>&1 | quiet_link >"$OUT/build-$name.log"; then
        cat "$OUT/build-$name.log"; return 1
    fi
    [ -x "$bin" ] || { cat "$OUT/build-$name.log"; return 1; }
}

JSON_SOURCES=("$S/Shared/JSONParser.swift" "$S/Shared/JSONValue.swift" "$S/Shared/TypedThrows.swift")

build_json() {
    build json -sanitize=fuzzer,address Tests/Fuzz/FuzzJSON.swift "${JSON_SOURCES[@]}"
}

build_framing() {
    # One module: the supervisor file without its `import Shared`.
    sed '/^import Shared$/d' "$S/Supervisor/Server/MessageFraming.swift" >"$OUT/src/MessageFraming.swift"
    build framing -sanitize=fuzzer,address Tests/Fuzz/FuzzFraming.swift "$OUT/src/MessageFraming.swift" "${JSON_SOURCES[@]}"
}

build_block() {
    build block -sanitize=fuzzer,address -Xcc -fmodule-map-file="$S/CZstd/module.modulemap" Tests/Fuzz/FuzzBlock.swift \
        "$S/Shared/Block/BlockReader.swift" "$S/Shared/Block/BlockFormat.swift" "$S/Shared/Block/CRC32.swift" \
        "${JSON_SOURCES[@]}" -lzstd
}

build_config() {
    [ -d "$DEBUG/TOMLKit.build" ] && [ -d "$DEBUG/Shared.build" ] || {
        echo "config: no debug build objects in $DEBUG: run \`swift build\` first"; return 1; }
    # ConfigFile.swift and what it reaches in the supervisor, compiled here; the libraries they
    # import (TOMLKit, Shared, swift-system, swift-log...) come as the debug build's objects.
    local objs=$OUT/objs
    rm -rf "$objs"; mkdir -p "$objs"
    local i=0 o
    # toml++ (TOMLKit's CTOML target) is compiled here with coverage, so libFuzzer sees inside
    # the TOML parser too; with assertions on, as SwiftPM builds it in debug and release alike.
    local ctoml=$ROOT/.build/checkouts/TOMLKit/Sources/CTOML f
    for f in "$ctoml"/Sources/*.cpp; do
        clang++ -std=c++17 -O1 -w -DTOML_EXCEPTIONS=1 -fsanitize=fuzzer-no-link -I "$ctoml/include" -I "$ctoml/Sources" \
            -c "$f" -o "$objs/ctoml-$i.o" || return 1
        i=$((i + 1))
    done
    while IFS= read -r o; do cp "$o" "$objs/$i.o"; i=$((i + 1)); done < <(
        find "$DEBUG/TOMLKit.build" "$DEBUG/SystemPackage.build" "$DEBUG/CSystem.build" \
            "$DEBUG/Logging.build" "$DEBUG/Shared.build" "$DEBUG/CClipvisorShims.build" "$DEBUG/ArgumentParser.build" \
            "$DEBUG/ArgumentParserToolInfo.build" -name '*.o')
    local csystem
    csystem=$(find "$ROOT/.build/checkouts/swift-system" -path '*CSystem/include/module.modulemap' | head -1)
    build config -sanitize=fuzzer -I "$DEBUG/Modules" \
        -Xcc -fmodule-map-file="$DEBUG/CTOML.build/module.modulemap" \
        -Xcc -fmodule-map-file="$DEBUG/CClipvisorShims.build/module.modulemap" \
        -Xcc -fmodule-map-file="$S/CZstd/module.modulemap" -Xcc -fmodule-map-file="$S/CSystemd/module.modulemap" \
        -Xcc -fmodule-map-file="$csystem" -Xcc -I"$S/CClipvisorShims/include" \
        -Xcc -I"$ROOT/.build/checkouts/TOMLKit/Sources/CTOML/include" \
        Tests/Fuzz/FuzzConfig.swift "$S/Supervisor/Config/ConfigFile.swift" "$S/Supervisor/Config/ConfigSchema.swift" \
        "$S/Supervisor/Config/ServeSettings.swift" "$S/Supervisor/Server/ServeConfiguration.swift" \
        "$S/Supervisor/Server/SkipRecord.swift" "$S/Supervisor/Systemd/Journal.swift" "$S/Supervisor/Server/SkipLog.swift" \
        "$S/Supervisor/SocketDiscovery.swift" "$S/Supervisor/Server/Poller.swift" \
        "$objs"/*.o -lstdc++ -lzstd -lsystemd
}

frame() { python3 -c 'import sys,struct; b=sys.argv[1].encode(); sys.stdout.buffer.write(b"\x80"+struct.pack("<I",len(b))+b)' "$1"; }

seeds() {
    local d=$OUT/seeds/$1
    rm -rf "$d"; mkdir -p "$d"
    case $1 in
    json)
        printf '%s' '{"op":"hello","protocol":1,"client":"clipvisor-python/0.1.0","pid":4242}' >"$d/1"
        printf '%s' '{"op":"sample","id":3,"all_or_nothing":true,"clips":[{"path":"/d/a.mp4","fps":1.5e0},{"timestamps":[0,-1.25E+2]}]}' >"$d/2"
        printf '%s' '["\u00e9\ud83d\ude00\n\t\"\\",true,false,null,-0,1e308,{"a":{}}]' >"$d/3"
        ;;
    framing)
        frame '{"op":"status","id":1}' >"$d/1"
        { frame '{"op":"hello","protocol":1}'; frame '{"op":"decode","id":2,"path":"/x"}'; } >"$d/2"
        printf '\x03\x00\x00\x00\x00{}' >"$d/3"
        ;;
    block)
        local clip=$OUT/seed.mp4
        ffmpeg -hide_banner -loglevel error -y -f lavfi -i testsrc2=size=64x48:rate=10:duration=1 -f lavfi \
            -i sine=duration=1 -c:v libx264 -pix_fmt yuv420p -c:a aac -shortest "$clip" || return 1
        local worker=${CLIPVISOR_WORKER:-$DEBUG/clipvisor-worker}
        # Small blocks, raw (level -1000) and zstd-compressed frames, video, audio and both.
        "$worker" decode "$clip" --frames 2 --width 16 --height 16 --out "$d/video.block" >"$OUT/seed.log" &&
            "$worker" decode "$clip" --frames 2 --width 16 --height 16 --level 3 --out "$d/video3.block" >"$OUT/seed.log" &&
            "$worker" decode "$clip" --audio --no-video --sample-rate 1000 --end 0.25 --out "$d/audio.block" >"$OUT/seed.log" &&
            "$worker" decode "$clip" --frames 2 --width 8 --height 8 --audio --sample-rate 1000 --level 3 \
                --out "$d/both.block" >"$OUT/seed.log" || { cat "$OUT/seed.log"; return 1; }
        ;;
    config)
        cp systemd/clipvisor.toml "$d/example.toml"
        printf 'workers = 2\nroots = [\n  "/data",\n]\n[table]\nx = """\n[\n"""\n' >"$d/2.toml"
        ;;
    esac
}

declare -A MAXLEN=([json]=4096 [framing]=4096 [block]=65536 [config]=8192)
declare -A SUMMARY
status=0
for t in "${TARGETS[@]}"; do
    if ! "build_$t" || ! seeds "$t"; then
        SUMMARY[$t]="BUILD OR SEED FAILED (see above)"; status=1; continue
    fi
    corpus=$OUT/corpus/$t
    mkdir -p "$corpus"
    log=$OUT/$t.log
    echo "== fuzz $t for ${SECONDS_PER} s"
    before=$(ls "$OUT/crashes" | grep -c "^$t-" || true)
    "$OUT/fuzz-$t" -max_total_time="$SECONDS_PER" -max_len="${MAXLEN[$t]}" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$OUT/crashes/$t-" "$corpus" "$OUT/seeds/$t" >"$log" 2>&1
    rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    [ -n "$runs" ] || runs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    after=$(ls "$OUT/crashes" | grep -c "^$t-" || true)
    found=$((after - before))
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        status=1
        crash=$(ls -t "$OUT/crashes"/"$t"-crash-* "$OUT/crashes"/"$t"-oom-* "$OUT/crashes"/"$t"-timeout-* 2>/dev/null | head -1)
        if [ -n "$crash" ]; then
            "$OUT/fuzz-$t" -minimize_crash=1 -runs=20000 -exact_artifact_path="$crash.min" "$crash" >/dev/null 2>&1 || true
            [ -f "$crash.min" ] || cp "$crash" "$crash.min"
        fi
        why=$(grep -m1 -E 'Assertion|Fatal error|Precondition|ERROR: AddressSanitizer|ERROR: libFuzzer' "$log" | cut -c1-160)
        SUMMARY[$t]="${runs:-?} execs, cov ${cov:-?}: CRASHER (exit $rc) $why; input ${crash:-?}.min ($(od -An -c "${crash}.min" 2>/dev/null | tr -s ' ' | head -c 80))"
    else
        SUMMARY[$t]="${runs:-?} execs in ${SECONDS_PER} s, cov ${cov:-?}, corpus $(ls "$corpus" | wc -l), no crasher"
    fi
done
echo
echo "== fuzz summary (${SECONDS_PER} s per target; logs and crashers in $OUT)"
for t in "${TARGETS[@]}"; do printf '%-8s %s\n' "$t" "${SUMMARY[$t]}"; done
exit $status
