#!/usr/bin/env bash
# The first GPU in one command: every CUDA path, every weight format, the VRAM budgets inside ComfyUI.
#
#   bash scripts/gpu_check.sh --out DIR                 # on a GPU machine: DIR/summary.json + DIR/summary.md
#   bash scripts/gpu_check.sh --cpu-dry-run --out DIR   # every phase on this CPU at reduced sizes (CI runs it)
#
# Options: python -m uniar_backend.tools.gpu_check --help.  The interpreter: $UNIAR_PYTHON, else .venv/bin/python
# when it imports torch, else python3.  When scripts/gpu_bundle.py packed .gpu_bundle/ (the fixtures, wheels the
# device lacks, a ComfyUI tree when it fits), its wheels are installed into a temporary folder first, offline
# (--no-index), and put on PYTHONPATH.  On the lent machine: run(command="bash scripts/gpu_check.sh --out
# $OUT/gpu_check", carry=[".gpu_bundle"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${UNIAR_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .gpu_bundle/wheels ] && ls .gpu_bundle/wheels/*.whl >/dev/null 2>&1; then
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/uniar-gpu-site.XXXXXX")"
    # the bundle holds only what the device lacks (scripts/gpu_bundle.py); --no-deps keeps the device's own torch /
    # transformers in charge
    # ... and only the wheels whose distribution the interpreter does not have already (no shadowing)
    mapfile -t lacking < <("$PY" - .gpu_bundle/wheels/*.whl <<'PYEOF'
import importlib.metadata, os, sys
for whl in sys.argv[1:]:
    name = os.path.basename(whl).split("-")[0]
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(whl)
PYEOF
)
    [ ${#lacking[@]} -eq 0 ] || "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${lacking[@]}" \
        && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE" \
        || echo "gpu_check.sh: installing the bundled wheels failed; going on with what the interpreter has" >&2
fi
# the fixtures: ../shared beside the checkout, else the bundle's copy (the device machine gets no ../shared)
if [ -z "${UNIAR_SHARED:-}" ] && [ ! -d ../shared/fixtures ] && [ -d .gpu_bundle/shared/fixtures ]; then
    export UNIAR_SHARED="$PWD/.gpu_bundle/shared"
fi
exec "$PY" -m uniar_backend.tools.gpu_check "$@"
