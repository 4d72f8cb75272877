#!/usr/bin/env bash
# Checks the Tiltfile offline (no Tilt, no cluster, no container engine): evaluates it in
# both modes with Tilt's builtins stubbed, and asserts what infra/tilt/check.py says.
#
#   infra/tilt/check.sh [check.py's arguments]
#
# Installs check.py's Python packages (infra/tilt/requirements.txt) into a virtual
# environment of its own, target/tools/venv-tilt, rebuilt when the requirements change.
# Needs python3 (3.11 or later) with venv, and kubectl (or kustomize) to render the YAML.
set -euo pipefail

# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"
cd "$CONVOY_ROOT"

command -v python3 >/dev/null 2>&1 || die "python3 not found (apt-get install -y python3 python3-venv)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "check.py needs Python 3.11 or later (tomllib); this python3 is $(python3 -V 2>&1)"

req=infra/tilt/requirements.txt
venv="${CARGO_TARGET_DIR:-target}/tools/venv-tilt"
stamp="$venv/requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing $req into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install -y python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" || die "pip install -r $req failed"
    printf '%s\n' "$want" >"$stamp"
fi

exec "$venv/bin/python" infra/tilt/check.py "$@"
