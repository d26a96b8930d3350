#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time (FUZZ_SECONDS each,
# default 60), on the machine's stable toolchain: cargo-fuzz needs nightly
# flags (-Z sanitizer), so RUSTC_BOOTSTRAP=1 lets stable accept them. When the
# address-sanitizer runtime is unavailable it falls back to `-s none` (still
# coverage-guided; panics and failed assertions are still found).
# Installs cargo-fuzz from crates.io when it is missing.
#
# Env: FUZZ_SECONDS (per target, default 60), FUZZ_TARGETS (space-separated,
# default: all of `cargo fuzz list`), FUZZ_SANITIZER (address|none; default:
# try address, then none).
# Exit status: non-zero when a target crashes (the input is kept under
# fuzz/artifacts/<target>/) or cannot be built.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
for target in $targets; do
  mkdir -p "fuzz/corpus/$target"
  sanitizer="${FUZZ_SANITIZER:-}"
  if [ -z "$sanitizer" ]; then
    if cargo fuzz build -O "$target" >/dev/null 2>&1; then sanitizer=address; else sanitizer=none; fi
  fi
  echo "fuzz: $target for ${SECONDS_PER_TARGET}s (sanitizer: $sanitizer)"
  cargo fuzz run -O -s "$sanitizer" "$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 -print_final_stats=1
done
echo "fuzz: no crash in: $(echo $targets)"
