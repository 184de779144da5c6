#!/usr/bin/env bash
# Fetch ONNX Runtime C/C++ headers (Debian's libonnxruntime-dev) into DEST without touching the
# system's apt configuration: a private sources list and state folder. The library itself comes
# from the onnxruntime Python wheel (see CMakeLists.txt). Idempotent.
#   usage: cpp/fetch-onnxruntime.sh [DEST]   (default: build/onnxruntime-headers)
set -euo pipefail
DEST="${1:-build/onnxruntime-headers}"
if [ -f "$DEST/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
    echo "ONNX Runtime headers already in $DEST"
    exit 0
fi
# The Debian mirror apt already uses here: the URL after "URIs:" (deb822) or after "deb" and
# its optional [options] (one-line format).
MIRROR="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | sed -nE 's/^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]*debian[^[:space:]]*).*/\3/p' \
    | grep -v security | head -1 || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" \
    > "$WORK/sources.list"
APT=(-o Dir::Etc::SourceList="$WORK/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$WORK/lists" -o Dir::Cache="$WORK/cache"
     -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${APT[@]}" -qq update
(cd "$WORK" && apt-get "${APT[@]}" -qq download libonnxruntime-dev)
mkdir -p "$WORK/x" "$DEST"
dpkg-deb -x "$WORK"/libonnxruntime-dev_*.deb "$WORK/x"
rm -rf "$DEST/include"
mkdir -p "$DEST/include"
cp -r "$WORK/x/usr/include/onnxruntime" "$DEST/include/"
echo "ONNX Runtime headers in $DEST/include/onnxruntime"
