#!/usr/bin/env bash
# Builds the CPU op library with Bazel, offline, against the installed TensorFlow wheel, and
# prints the absolute path of the built library as the last line of stdout.
#
#   bash kernels/build_bazel.sh          # uses $PYTHON_BIN_PATH, else `python`, else `python3`
#
# Needs Bazel 4 (Debian: apt-get install -y bazel-bootstrap); installs it when missing and
# running as root. Bazel's own chatter goes to stderr so that callers can take `tail -n 1`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON_BIN_PATH:-}" ]]; then
  python_bin=$PYTHON_BIN_PATH
elif command -v python >/dev/null 2>&1 && python -c "import tensorflow" >/dev/null 2>&1; then
  python_bin=$(command -v python)
else
  python_bin=$(command -v python3)
fi

if ! command -v bazel >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "build_bazel.sh: installing bazel-bootstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq bazel-bootstrap; } >&2
  else
    echo "build_bazel.sh: bazel is not installed (apt-get install bazel-bootstrap)" >&2
    exit 1
  fi
fi

"$python_bin" configure.py >&2

# -c opt: the copts in BUILD add -O3; local spawns avoid symlinking TensorFlow's ~20k headers
# into a sandbox for every action.
bazel build -c opt --spawn_strategy=local --show_progress_rate_limit=30 \
  //:_fineprune_ops.so >&2

library="$(bazel info -c opt bazel-bin 2>/dev/null)/_fineprune_ops.so"
if [[ ! -f $library ]]; then
  echo "build_bazel.sh: bazel reported success but $library is missing" >&2
  exit 1
fi
echo "$library"
