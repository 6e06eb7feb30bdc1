#!/usr/bin/env bash
# Installs FineServe's build and test dependencies from Debian packages.
# Idempotent: only missing packages are installed, so re-running it is cheap.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libcpp-httplib-dev nlohmann-json3-dev libsentencepiece-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libcli11-dev libspdlog-dev libfmt-dev
  clang libclang-rt-14-dev libomp-14-dev
  python3 python3-venv python3-pip
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all Debian dependencies present"
fi
