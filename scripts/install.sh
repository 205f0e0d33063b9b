#!/usr/bin/env bash
# Installs torch first (pinned through scripts/constraints.txt), then this project.
#   bash scripts/install.sh         -> the project and its runtime dependencies
#   bash scripts/install.sh test    -> the same plus the test extra
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$py" -m pip install -q --disable-pip-version-check -c "$here/scripts/constraints.txt" torch
"$py" -m pip install -q --disable-pip-version-check -c "$here/scripts/constraints.txt" -e "$here$extra"
