#!/usr/bin/env bash
# The whole test suite of reach, runnable on a fresh Debian machine.
#
# Installs what the tests need (when run as root and something is missing),
# then runs every test of the workspace. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the test suite needs. The NAT lab (network namespaces,
# nftables, miniupnpd, coturn) will add to this list; the suite today needs
# only a C compiler (for ring) and pkg-config.
APT_PACKAGES=(build-essential pkg-config)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "error: missing packages ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install the Rust toolchain (rustup) first" >&2
    exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --locked 2>&1 | tee -a "$log"
# Doc tests (the examples in the API docs compile).
cargo test --workspace --doc --locked 2>&1 | tee -a "$log"

# One closing line over every test binary, so the total is easy to find.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f; if (p == 0) exit 1 }' "$log"
