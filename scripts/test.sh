#!/usr/bin/env bash
# The test command: set up (fresh machine included), lint, then the test sets, each its own timed step.
#
#   ruff, mypy    lint and type checks
#   main          pytest -m "not slow and not interpreter and not cuda and not compile" (CPU, TRITON_INTERPRET unset)
#   compile       pytest -m compile: the kernels' custom ops under opcheck / torch.compile, in their own process
#   interpreter   pytest -m interpreter with TRITON_INTERPRET=1: the Triton kernels on the CPU interpreter
#   slow          pytest -m slow: the few tests that load the real SmolLM2 model
#   cuda          pytest -m cuda (compiled kernels, TRITON_INTERPRET unset) when torch.cuda.is_available(),
#                 else skipped with one line
#
# Extra arguments go to every pytest step (`bash scripts/test.sh -x`, `-k name`, a test file); a step that
# they leave without tests passes ("nothing selected"). Do not pass -m: each step has its own.
# ONESHOT_TEST_STEPS picks steps (default "ruff mypy main compile interpreter slow cuda").
# Every step runs even when an earlier one fails; a summary with each step's wall time follows, and the exit
# status is 1 if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh  # Debian's chromium, for the report's headless-browser check
export ONESHOT_DATA_DIR="${ONESHOT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

all_steps="ruff mypy main compile interpreter slow cuda"
steps="${ONESHOT_TEST_STEPS:-$all_steps}"
for name in $steps; do
  case " $all_steps " in
    *" $name "*) ;;
    *) echo "test.sh: unknown step '$name' in ONESHOT_TEST_STEPS; choose from: $all_steps" >&2; exit 2 ;;
  esac
done
pytest_=(.venv/bin/python -m pytest -q -p no:cacheprovider)
summary=()
failed=0

# pytest, with its exit status 5 (no tests selected, e.g. a file argument outside this step's set) a pass.
run_pytest() {
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "(no tests selected in this step)"
    return 0
  fi
  return "$rc"
}

# step NAME COMMAND...: run it (if NAME is in $steps), print its wall time, record the outcome.
step() {
  local name=$1 rc=0 start end
  shift
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  local shown=("$@")
  [ "$1" = run_pytest ] && shown=("${@:2}")
  echo "=== $name:$(printf ' %q' "${shown[@]}")"
  start=$(date +%s.%N)
  "$@" || rc=$?
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
  local outcome="passed"
  if [ "$rc" -ne 0 ]; then
    outcome="FAILED (exit $rc)"
    failed=1
  fi
  echo "=== $name: $outcome in ${seconds}s"
  summary+=("$(printf '%-12s %6ss  %s' "$name" "$seconds" "$outcome")")
}

step ruff .venv/bin/ruff check .
step mypy .venv/bin/mypy
step main run_pytest env -u TRITON_INTERPRET "${pytest_[@]}" -m "not slow and not interpreter and not cuda and not compile" "$@"
step compile run_pytest env -u TRITON_INTERPRET "${pytest_[@]}" -m "compile and not slow and not interpreter and not cuda" "$@"
step interpreter run_pytest env TRITON_INTERPRET=1 "${pytest_[@]}" -m interpreter "$@"
step slow run_pytest env -u TRITON_INTERPRET "${pytest_[@]}" -m "slow and not interpreter and not cuda" "$@"
case " $steps " in
  *" cuda "*)
    if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      step cuda run_pytest env -u TRITON_INTERPRET "${pytest_[@]}" -m cuda "$@"
    else
      echo "=== cuda: skipped, no CUDA device (on a GPU machine this step runs pytest -m cuda)"
      summary+=("$(printf '%-12s %6s   %s' cuda "-" "skipped (no CUDA device)")")
    fi
    ;;
esac

echo "=== summary (wall time per step)"
printf '%s\n' "${summary[@]}"
exit "$failed"
