#!/usr/bin/env bash
# Builds what a GPU node installs without a compiler (docs/install.md), into dist/:
#   clipvisor-VERSION+ffmpegN-py3-none-manylinux_2_G_x86_64.whl  the Python client with the
#       clipvisor and clipvisor-worker binaries inside and a `clipvisor` command;
#   clipvisor-VERSION-py3-none-any.whl   the Python client alone (hosts that bring the binaries);
#   clipvisor_VERSION_amd64.deb          binaries, socket-activated systemd service, config, docs.
# The binaries are release builds with the Swift runtime linked in (--static-swift-stdlib): they
# need only glibc, libstdc++, libzstd, libsystemd and (the worker) FFmpeg's libraries. The
# version is ClipvisorVersion.string in Sources/Shared/Version.swift, and nowhere else.
# Needs what scripts/setup.sh installs, plus dpkg-dev (dpkg-shlibdeps); lintian is run when
# installed. Run as any user; takes ~3 minutes on 2 cores from a clean checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v swift >/dev/null || export PATH="/opt/swift/usr/bin:$PATH"

fail() { echo "package: $*" >&2; exit 1; }

version=$(sed -n 's/^ *public static let string = "\([^"]*\)".*/\1/p' Sources/Shared/Version.swift)
[ -n "$version" ] || fail "cannot read the version from Sources/Shared/Version.swift"
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
[ "$arch" = amd64 ] || fail "only amd64 is packaged (this is $arch)"

echo "== release build (static Swift runtime)"
if ! swift build -c release --static-swift-stdlib >/tmp/clipvisor-package-build.log 2>&1; then
    cat /tmp/clipvisor-package-build.log >&2
    fail "release build failed"
fi
release=$(swift build -c release --static-swift-stdlib --show-bin-path)

rm -rf dist
mkdir -p dist/bin
for binary in clipvisor clipvisor-worker; do
    install -m 0755 "$release/$binary" dist/bin/
    strip --strip-unneeded dist/bin/$binary
    # Nothing of the toolchain may be needed at run time.
    if ldd dist/bin/$binary | grep -E 'libswift|/opt/swift|not found'; then
        fail "dist/bin/$binary needs the libraries above"
    fi
    got=$(dist/bin/$binary --version)
    [ "$got" = "$version" ] || fail "dist/bin/$binary --version says $got, Version.swift says $version"
done

# What the binaries link decides the tags: the newest glibc symbol version they need, and the
# FFmpeg the worker was built against (libavcodec.so.59 is FFmpeg 5.x).
glibc=$(objdump -T dist/bin/clipvisor dist/bin/clipvisor-worker | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2 -n -u | tail -1)
glibc_minor=${glibc#GLIBC_2.}
avcodec=$(objdump -p dist/bin/clipvisor-worker | sed -n 's/.*NEEDED *libavcodec\.so\.\([0-9]*\)$/\1/p')
[ -n "$avcodec" ] || fail "dist/bin/clipvisor-worker does not link libavcodec"
case "$avcodec" in
    58) ffmpeg=4 ;; 59) ffmpeg=5 ;; 60) ffmpeg=6 ;; 61) ffmpeg=7 ;;
    *) fail "unknown FFmpeg major for libavcodec.so.$avcodec" ;;
esac
platform="manylinux_2_${glibc_minor}_x86_64"

echo "== wheels"
python3 -m pip wheel -q --no-deps --disable-pip-version-check -w dist clients/python >/tmp/clipvisor-package-wheel.log 2>&1 || {
    cat /tmp/clipvisor-package-wheel.log >&2
    fail "pip wheel clients/python failed"
}
rm -rf clients/python/build
pure="dist/clipvisor-$version-py3-none-any.whl"
[ -f "$pure" ] || fail "pip wheel did not make $pure (is the version in setup.py read from Version.swift?)"
python3 packaging/binary_wheel.py "$pure" dist/bin dist --platform "$platform" --local "ffmpeg$ffmpeg" >/dev/null

echo "== Debian package"
root=$(mktemp -d /tmp/clipvisor-deb.XXXXXX)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/etc/clipvisor" "$root/usr/share/doc/clipvisor/examples" "$root/usr/share/man/man1"
install -m 0755 dist/bin/clipvisor dist/bin/clipvisor-worker "$root/usr/bin/"
# The units and the config of the repository name the from-source paths (/usr/local/bin).
for unit in clipvisor.service clipvisor.socket; do
    sed 's|/usr/local/bin/|/usr/bin/|g' "systemd/$unit" >"$root/lib/systemd/system/$unit"
    chmod 0644 "$root/lib/systemd/system/$unit"
done
sed 's|/usr/local/bin/|/usr/bin/|g' systemd/clipvisor.toml >"$root/etc/clipvisor/clipvisor.toml"
chmod 0644 "$root/etc/clipvisor/clipvisor.toml"
for page in clipvisor.1 clipvisor-worker.1; do
    gzip -9n <"packaging/debian/$page" >"$root/usr/share/man/man1/$page.gz"
    chmod 0644 "$root/usr/share/man/man1/$page.gz"
done
install -m 0644 packaging/debian/sysusers.conf "$root/usr/lib/sysusers.d/clipvisor.conf"
install -m 0644 packaging/debian/copyright "$root/usr/share/doc/clipvisor/copyright"
for doc in README.md docs/systemd.md docs/install.md; do
    [ -f "$doc" ] && gzip -9n <"$doc" >"$root/usr/share/doc/clipvisor/$(basename "$doc").gz"
done
install -m 0644 systemd/clipvisor.service.d/read-only-data.conf.example systemd/clipvisor.service.d/metrics.conf.example \
    systemd/clipvisor-hugepages.tmpfiles.example "$root/usr/share/doc/clipvisor/examples/"
date=$(git log -1 --format=%cD 2>/dev/null || date -R)
printf 'clipvisor (%s) unstable; urgency=medium\n\n  * Built by scripts/package.sh from the clipvisor sources.\n\n -- clipvisor developers <clipvisor@lists.clipvisor.org>  %s\n' \
    "$version" "$date" | gzip -9n >"$root/usr/share/doc/clipvisor/changelog.gz"
chmod 0644 "$root"/usr/share/doc/clipvisor/*.gz "$root/usr/share/doc/clipvisor/examples/"*

# Dependencies computed from what the binaries link (dpkg-shlibdeps reads debian/control).
shlibs_dir=$(mktemp -d /tmp/clipvisor-shlibs.XXXXXX)
mkdir -p "$shlibs_dir/debian"
printf 'Source: clipvisor\n\nPackage: clipvisor\nArchitecture: amd64\n' >"$shlibs_dir/debian/control"
shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O "$root/usr/bin/clipvisor" "$root/usr/bin/clipvisor-worker" 2>/tmp/clipvisor-shlibdeps.err) || {
    cat /tmp/clipvisor-shlibdeps.err >&2
    fail "dpkg-shlibdeps failed"
}
rm -rf "$shlibs_dir"
shlibs=${shlibs#shlibs:Depends=}
# What debhelper's dh_installsystemd and dh_installsysusers add for the maintainer scripts.
misc="init-system-helpers (>= 1.54~), systemd | systemd-standalone-sysusers | systemd-sysusers"

for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/clipvisor/clipvisor.toml >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@INSTALLED_SIZE@|$size|" -e "s#@SHLIBS@#$shlibs#" -e "s#@MISC@#$misc#" \
    packaging/debian/control.in >"$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
deb="dist/clipvisor_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null

if command -v lintian >/dev/null; then
    # Errors fail the build; warnings are printed.
    lintian --no-tag-display-limit "$deb" >/tmp/clipvisor-lintian.log 2>&1 || true
    cat /tmp/clipvisor-lintian.log
    if grep -q '^E:' /tmp/clipvisor-lintian.log; then
        fail "lintian found errors in $deb"
    fi
fi

rm -rf dist/bin
echo "== dist/"
ls -l dist/
