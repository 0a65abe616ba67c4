#!/usr/bin/env bash
# Release binaries for the Raspberry Pi with Debian's cross packages (no `cross`, no containers,
# no rustup downloads): Debian's rustc-web + its std for arm64/armhf, and the GNU cross linkers.
#
#   cross/build.sh                 # both targets
#   cross/build.sh aarch64         # Pi 3/4/5 with a 64-bit OS
#   cross/build.sh armv7           # Pi 2/3/4 with a 32-bit (armhf) OS
#   INSTALL=0 cross/build.sh       # do not apt-get install (packages already there)
#   FEATURES="--features embedded-broker" cross/build.sh   # with the embedded broker (demo)
#
# Output: target/cross/<triple>/release/village-gateway (+ a copy in target/cross/dist/).
# The result needs glibc >= 2.34 on the Pi (Raspberry Pi OS Bookworm or later).
# Needs root (or sudo) for apt-get the first time. Smoke test under qemu-user at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

declare -A TRIPLE=([aarch64]=aarch64-unknown-linux-gnu [armv7]=armv7-unknown-linux-gnueabihf)
declare -A DEBARCH=([aarch64]=arm64 [armv7]=armhf)
declare -A GCC=([aarch64]=aarch64-linux-gnu-gcc [armv7]=arm-linux-gnueabihf-gcc)
declare -A QEMU=([aarch64]="qemu-aarch64 -L /usr/aarch64-linux-gnu" [armv7]="qemu-arm -L /usr/arm-linux-gnueabihf")

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64 armv7)
for t in "${targets[@]}"; do
    [ -n "${TRIPLE[$t]:-}" ] || { echo "unknown target $t (aarch64 or armv7)" >&2; exit 2; }
done

# Debian's toolchain, not rustup's: only Debian ships std for these targets as packages.
RUSTC_DEB=${RUSTC_DEB:-/usr/bin/rustc}
CARGO_DEB=${CARGO_DEB:-/usr/bin/cargo}

install_packages() {
    local sudo=() pkgs=(rustc-web cargo-web qemu-user) t
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    for t in "${targets[@]}"; do
        "${sudo[@]}" dpkg --add-architecture "${DEBARCH[$t]}"
        pkgs+=("libstd-rust-web-dev:${DEBARCH[$t]}")
    done
    for t in "${targets[@]}"; do
        case $t in
            aarch64) pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
            armv7) pkgs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
        esac
    done
    local i
    for i in 1 2 3; do  # a mirror mid-sync fails `update` now and then
        "${sudo[@]}" apt-get update -qq && break
        [ "$i" -lt 3 ] || return 1
        sleep 15
    done
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
}

if [ "${INSTALL:-1}" != 0 ]; then
    install_packages
fi

need=("$RUSTC_DEB" "$CARGO_DEB")
for t in "${targets[@]}"; do need+=("$(command -v "${GCC[$t]}" || echo "${GCC[$t]}")"); done
for f in "${need[@]}"; do
    [ -x "$f" ] || { echo "missing $f: run without INSTALL=0, or see cross/README.md" >&2; exit 1; }
done

"$RUSTC_DEB" --version
"$CARGO_DEB" --version
# Debian's std for each target must be the very version of rustc-web: a mirror that is missing
# one architecture's bookworm-security index leaves that arch at bookworm's older rustc-web.
host_ver=$(dpkg-query -W -f '${Version}' rustc-web 2>/dev/null || echo none)
for t in "${targets[@]}"; do
    v=$(dpkg-query -W -f '${Version}' "libstd-rust-web-dev:${DEBARCH[$t]}" 2>/dev/null || echo none)
    if [ "$v" != "$host_ver" ]; then
        echo "libstd-rust-web-dev:${DEBARCH[$t]} is $v but rustc-web is $host_ver: they must match." >&2
        echo "apt-cache policy libstd-rust-web-dev:${DEBARCH[$t]} rustc-web; see cross/README.md." >&2
        exit 1
    fi
done
rust_version=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml)
echo "Cargo.toml rust-version: ${rust_version:-unset}"

# A target dir of its own: Debian's rustc must not share artifacts with rustup's.
export CARGO_TARGET_DIR="$ROOT/target/cross"
mkdir -p "$CARGO_TARGET_DIR/dist"
for t in "${targets[@]}"; do
    triple=${TRIPLE[$t]}
    echo "=== $triple"
    start=$SECONDS
    # The Pi build leaves out default features (the embedded broker, for demos and tests, pulls
    # C via psm): only ring is C in what ships.
    # shellcheck disable=SC2086 # FEATURES holds cargo arguments
    RUSTC="$RUSTC_DEB" "$CARGO_DEB" build --locked --release --target "$triple" --no-default-features ${FEATURES:-}
    bin="$CARGO_TARGET_DIR/$triple/release/village-gateway"
    cp "$bin" "$CARGO_TARGET_DIR/dist/village-gateway-$triple"
    echo "built $bin in $((SECONDS - start)) s"
    file "$bin" 2>/dev/null || true
    # glibc symbol versions it needs (must be <= the Pi's glibc)
    "${GCC[$t]%-gcc}-objdump" -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1 \
        | sed 's/^/needs at most /' || true
    if command -v "${QEMU[$t]%% *}" >/dev/null; then
        # shellcheck disable=SC2086 # QEMU holds a command and its arguments
        ${QEMU[$t]} "$bin" --version
        # shellcheck disable=SC2086
        ${QEMU[$t]} "$bin" check-config --config config/gateway.example.toml
    fi
done
ls -l "$CARGO_TARGET_DIR/dist"
