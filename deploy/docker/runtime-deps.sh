#!/usr/bin/env bash
# The Debian/Ubuntu packages a dynamically linked binary needs at run time, found from the binary
# itself (ldd + dpkg -S) rather than from a hand-kept list, so the runtime image gets exactly the
# shared libraries the build linked against: cpp-httplib, prometheus-cpp, spdlog, fmt, libgomp, and
# cuBLAS / NCCL when the CUDA backend links them (those already ship in the nvidia/cuda runtime image).
#
#   runtime-deps.sh list BINARY... > packages.txt   # build stage: one package name a line
#   runtime-deps.sh install packages.txt             # runtime stage: apt-get install the missing ones
set -euo pipefail

owner_of() {  # the package that owns a library file; tries the path as given, resolved and /usr-merged
  local lib=$1 real candidates c out
  real=$(readlink -f "$lib")
  candidates=("$lib" "$real")
  for c in "$lib" "$real"; do
    case $c in
      /usr/lib/*) candidates+=("${c#/usr}") ;;
      /lib/*) candidates+=("/usr$c") ;;
    esac
  done
  for c in "${candidates[@]}"; do
    if out=$(dpkg-query -S "$c" 2>/dev/null); then
      # "libfoo1:amd64: /usr/lib/...": keep the name, drop the architecture qualifier.
      echo "${out%%:*}" | sed 's/,.*//'
      return 0
    fi
  done
  echo "runtime-deps: no package owns $lib" >&2
  return 1
}

case ${1:-} in
  list)
    shift
    (($#)) || { echo "usage: $0 list BINARY..." >&2; exit 2; }
    libs=$(ldd "$@")
    if grep -q "not found" <<<"$libs"; then
      echo "runtime-deps: unresolved libraries:" >&2
      grep "not found" <<<"$libs" >&2
      exit 1
    fi
    awk '$2 == "=>" && $3 ~ /^\// { print $3 }' <<<"$libs" | sort -u |
      while read -r lib; do owner_of "$lib"; done | sort -u
    ;;
  install)
    [[ -f ${2:-} ]] || { echo "usage: $0 install PACKAGES_FILE" >&2; exit 2; }
    missing=()
    while read -r p; do
      [[ -n $p ]] || continue
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done <"$2"
    if ((${#missing[@]})); then
      echo "runtime-deps: installing ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}"
      rm -rf /var/lib/apt/lists/*
    else
      echo "runtime-deps: every package is already in the image"
    fi
    ;;
  *)
    echo "usage: $0 list BINARY... | install PACKAGES_FILE" >&2
    exit 2
    ;;
esac
