#!/usr/bin/env bash
# Set up a virtual environment and run the whole test suite, then re-run it with transformers 4.57
# (the suite runs on the newest transformers 5.x first; both lines must work).
#
#   bash scripts/test.sh            # from the repository root, on a fresh machine
#
# Environment: UNIAR_VENV (default .venv), UNIAR_TORCH (default torch==2.13.0, the CPU wheel these machines
# carry; set UNIAR_TORCH=torch for the registry's default build), UNIAR_SKIP_TF457=1 to skip the second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UNIAR_VENV:-.venv}"
TORCH_SPEC="${UNIAR_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_SPEC" || "$PY" -m pip install -q torch
fi
"$PY" -m pip install -q -r requirements.txt -r requirements-dev.txt

echo "== test suite (transformers $("$PY" -c 'import transformers; print(transformers.__version__)'))"
"$PY" -m pytest -q

if [ "${UNIAR_SKIP_TF457:-0}" != "1" ]; then
    # transformers 4.57 + the tokenizers / huggingface_hub it needs, overlaid on the same environment, with the
    # diffusers of that era (0.37, the version the goldens were made with; newer diffusers need huggingface_hub 1.x).
    OVERLAY="$VENV/tf457-overlay"
    if [ ! -d "$OVERLAY/transformers" ]; then
        "$PY" -m pip install -q --no-deps --target "$OVERLAY" "transformers==4.57.*" "tokenizers>=0.22,<0.23" \
            "huggingface_hub>=0.34,<1.0" "diffusers==0.37.*"
    fi
    echo "== test suite again with transformers $(PYTHONPATH="$OVERLAY" "$PY" -c 'import transformers, diffusers; print(transformers.__version__, "/ diffusers", diffusers.__version__)')"
    # the tests that exercise transformers (tokenizer, chat template, the decoder's text encoders)
    # and the downloader on huggingface_hub 0.x (requests; the first pass runs it on 1.x / 2.x, httpx)
    PYTHONPATH="$OVERLAY" "$PY" -m pytest -q -m "not slow" tests/test_ar_parity.py tests/test_cli.py \
        tests/test_bad_inputs.py tests/test_loader.py tests/test_decoder.py tests/test_download.py
fi
