#!/usr/bin/env bash
# Makes sure cargo-deny, at the version the project's deny.toml is written for, can be run: prints
# the path of the binary. Order: CARGO_DENY_BIN, a `cargo-deny` on PATH of that version, the
# install below, then it installs one from crates.io with `cargo install --locked`.
#
# The install goes under CARGO_HOME rather than into the work tree, in a folder named by the
# version: a fresh clone (CI clones afresh on the same machine) finds it there instead of
# building it again, and it does not replace a cargo-deny of another version that the developer
# keeps in CARGO_HOME/bin. Building it takes some minutes on two cores; only the first run pays.
set -euo pipefail
version="0.20.2"
install_root="${CARGO_HOME:-$HOME/.cargo}/ecwid-events-tools/cargo-deny-$version"
bin="$install_root/bin/cargo-deny"

is_pinned() { "$1" --version 2>/dev/null | grep -qx "cargo-deny $version"; }

if [ -n "${CARGO_DENY_BIN:-}" ] && [ -x "$CARGO_DENY_BIN" ]; then echo "$CARGO_DENY_BIN"; exit 0; fi
if command -v cargo-deny >/dev/null 2>&1 && is_pinned "$(command -v cargo-deny)"; then
  command -v cargo-deny; exit 0
fi
if [ -x "$bin" ] && is_pinned "$bin"; then echo "$bin"; exit 0; fi

echo "installing cargo-deny $version from crates.io into $install_root (a few minutes, once)" >&2
"${CARGO:-cargo}" install --locked --quiet --version "$version" --root "$install_root" cargo-deny >&2
if ! is_pinned "$bin"; then echo "could not install cargo-deny $version" >&2; exit 1; fi
echo "$bin"
