#!/usr/bin/env bash
# The whole test suite of reach, runnable on a fresh Debian machine.
#
# Installs what the tests need (when run as root and something is missing),
# then runs every test of the workspace. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the test suite needs: a C compiler (for ring), and for the
# NAT lab iproute2 (namespaces, veth, tc), nftables (the NATs), coturn (a
# third-party STUN server and turnutils_stunclient) and miniupnpd-nftables
# (port mapping on lab routers), prometheus for promtool (checks /metrics),
# and chromium (the dashboard's headless browser test).
APT_PACKAGES=(build-essential pkg-config iproute2 nftables coturn miniupnpd-nftables prometheus chromium)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "warning: missing packages ${missing[*]} (not root, cannot install): the NAT lab tests will be skipped" >&2
    fi
fi

# The NAT lab needs root. Without it the lab tests say why and pass, unless
# REACH_LAB_REQUIRED=1 (CI sets it), where they fail.
if [[ $(id -u) -ne 0 ]]; then
    echo "note: not root: the NAT lab tests will be skipped" >&2
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
