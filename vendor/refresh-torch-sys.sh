#!/usr/bin/env bash
# Re-creates vendor/torch-sys from a crates.io release of torch-sys plus vendor/torch-sys.patch,
# and records the release's files (vendor/torch-sys.release.sha256, which tests/test_build.py
# checks the vendored copy against). See vendor/README.md.
#
#   vendor/refresh-torch-sys.sh [VERSION]     # default: the version vendored now
#
# For a new tch release: bump tch and pyo3-tch in Cargo.toml, run this with the torch-sys version
# that release depends on, fix the patch where it no longer applies (or drop it where the release
# fixed the same thing), and regenerate it with `git diff` as vendor/README.md says.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=${1:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/torch-sys/Cargo.toml" | head -n 1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# cargo fetches the release into its registry (the project's own manifest patches it away).
mkdir -p "$work/fetch/src" && touch "$work/fetch/src/lib.rs"
printf '[package]\nname = "fetch-torch-sys"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\ntorch-sys = "=%s"\n' \
    "$version" >"$work/fetch/Cargo.toml"
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml"
release=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"torch-sys-$version" | head -n 1)

rm -rf "$here/torch-sys"
cp -r "$release" "$here/torch-sys"
rm -f "$here/torch-sys/.cargo-ok"
(cd "$here/torch-sys" && find . -type f | sed 's|^\./||' | LC_ALL=C sort | xargs sha256sum) >"$here/torch-sys.release.sha256"
patch --quiet --forward -p1 -d "$here/torch-sys" <"$here/torch-sys.patch"
echo "vendor/torch-sys: torch-sys $version from crates.io with vendor/torch-sys.patch applied"
