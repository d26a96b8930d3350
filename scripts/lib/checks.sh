# shellcheck shell=bash
# The test scripts' way of reporting checks, sourced rather than copied:
# `pass` and `fail` print one line per check, `fail` remembers it, and
# `checks_summary NAME` prints the verdict and exits 1 after any failure.

failures=()
pass() { echo "  ok   $*"; }
fail() { echo "  FAIL $*"; failures+=("$*"); }

checks_summary() {
  echo
  if [ ${#failures[@]} -eq 0 ]; then
    echo "$1: all checks passed"
  else
    echo "$1: ${#failures[@]} failure(s):"
    printf '  - %s\n' "${failures[@]}"
    exit 1
  fi
}
