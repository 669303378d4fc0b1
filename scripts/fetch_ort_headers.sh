#!/usr/bin/env bash
# Fetch ONNX Runtime C/C++ headers for the C++ runtime build.
#
# The onnxruntime wheel ships libonnxruntime.so but no headers. Debian trixie's
# libonnxruntime-dev (1.21) headers work against the wheel's newer library because the
# C API is versioned. This downloads that one package through a private apt state
# directory (the system's apt configuration and installed packages are not touched) and
# unpacks it into third_party/onnxruntime-dev (git-ignored).
#
# Usage: scripts/fetch_ort_headers.sh [DEST]   (prints the include directory)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/third_party/onnxruntime-dev}"
include_dir="$dest/usr/include/onnxruntime"
if [[ -f "$include_dir/onnxruntime_cxx_api.h" ]]; then
  echo "$include_dir"
  exit 0
fi

mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(grep -hoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
    | awk '{print $2}' | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
keyring="/usr/share/keyrings/debian-archive-keyring.gpg"

state="$(mktemp -d)"
trap 'rm -rf "$state"' EXIT
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/etc/preferences.d" \
  "$state/etc/sources.list.d"
echo "deb [signed-by=$keyring] $mirror trixie main" > "$state/etc/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$state/etc/sources.list"
  -o "Dir::Etc::SourceParts=$state/etc/sources.list.d"
  -o "Dir::Etc::Preferences=$state/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$state/etc/preferences.d"
  -o "Dir::State::Lists=$state/lists"
  -o "Dir::Cache=$state/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=$(id -un)"
)
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$state" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev >&2)
mkdir -p "$dest"
dpkg -x "$state"/libonnxruntime-dev_*.deb "$dest"
if [[ ! -f "$include_dir/onnxruntime_cxx_api.h" ]]; then
  echo "libonnxruntime-dev did not contain onnxruntime_cxx_api.h; set ONNXRUNTIME_INCLUDE_DIR" >&2
  exit 1
fi
echo "$include_dir"
