#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only when they are missing.
#   openssh-server: a private sshd on 127.0.0.1 for the runner tests
#   chromium:       headless browser for the real-JupyterLab "Run All" test
#   git:            the env.json tests make small repositories
#   gcc:            the multi-node tests build a stand-in for the head's packet filter (tests/sshd.py)
#   iproute2:       `ip`, which finds the interface holding a node's private address (the loopback here)
# Idempotent: a second run installs nothing. Run as root (or via sudo).
# `--check`: install nothing; exit 1 naming what is missing, 0 when all is there (cheap: `make test` runs
# this first and `make system-deps`, the install, only when something is missing).
set -euo pipefail

PACKAGES=(openssh-server chromium git gcc iproute2)
case "${1:-}" in
    ""|--check) ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query prints "install ok installed" only for a fully installed package.
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: all present (${PACKAGES[*]})"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "system-deps: missing ${missing[*]}"
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "system-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi

echo "system-deps: installing ${missing[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system-deps: installed ${missing[*]}"
