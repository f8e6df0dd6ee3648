#!/usr/bin/env bash
# Creates (or reuses) the venv that tests the vLLM connector: vLLM 0.33.0
# installed the slim way (no triton/flashinfer/...: enough for vLLM's real
# scheduler, connector factory and worker-side hooks on a CPU-only machine,
# not for a model forward), plus the cachegen and cachegen_vllm packages
# (editable). Idempotent: a marker holding the pinned versions skips the
# heavy install; downloaded wheels are kept in .cache/pip/wheels,
# so rebuilding the venv needs no download.
#
#   scripts/vllm_env.sh            # then: .cache/vllm-venv/bin/python -m pytest tests/python/test_vllm_connector.py
#
# Environment: VLLM_VENV (default .cache/vllm-venv), VLLM_WHEELHOUSE (default
# .cache/pip/wheels), PYTHON (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VLLM_VENV:-$ROOT/.cache/vllm-venv}
PY=${PYTHON:-python3.11}
REQ=integrations/vllm/requirements-cpu-test.txt
WHEELS=${VLLM_WHEELHOUSE:-$ROOT/.cache/pip/wheels}
export PIP_DISABLE_PIP_VERSION_CHECK=1
VLLM_VERSION=0.33.0
TORCH_VERSION=2.14.0
t0=$(date +%s)

want="vllm==$VLLM_VERSION torch==$TORCH_VERSION python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') req=$(sha256sum "$REQ" | cut -c1-16)"
marker=$VENV/.cachegen-vllm-env
if [[ -f $marker && $(cat "$marker") == "$want" && -x $VENV/bin/python ]]; then
    echo "vllm_env: $VENV is up to date ($want)"
else
    echo "vllm_env: installing $want into $VENV (wheelhouse: $WHEELS)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # pip's HTTP cache does not keep these downloads here, so keep a wheelhouse
    # instead, filled once per pinned set (.complete), which the install then
    # reads alone (no index access). --no-deps for vllm and torch: their full dependency
    # sets bring ~3.5 GB more (triton, flashinfer, cutlass-dsl, ...) that
    # nothing here uses.
    mkdir -p "$WHEELS"
    if [[ $(cat "$WHEELS/.complete" 2>/dev/null) != "$want" ]]; then
        "$VENV/bin/pip" download -q -d "$WHEELS" --no-deps "vllm==$VLLM_VERSION" "torch==$TORCH_VERSION"
        "$VENV/bin/pip" download -q -d "$WHEELS" -r "$REQ" "torch==$TORCH_VERSION"
        echo "$want" > "$WHEELS/.complete"
        echo "vllm_env: wheelhouse filled in $(( $(date +%s) - t0 )) s ($(du -sh "$WHEELS" | cut -f1))"
    fi
    "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" --no-deps "vllm==$VLLM_VERSION" "torch==$TORCH_VERSION"
    "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" -r "$REQ" 2>&1 \
        | grep -v "which is not installed\|^ERROR: pip's dependency resolver\|requires .*, but you have" || true
    # xgrammar pulls triton in (0.9 GB); the scheduler path does not need it.
    "$VENV/bin/pip" uninstall -q -y triton 2>/dev/null || true
    "$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__"
    echo "$want" > "$marker"
    echo "vllm_env: heavy install took $(( $(date +%s) - t0 )) s"
fi

# The project's own packages: editable, no dependencies (the venv has them).
for pkg in integrations/python integrations/vllm; do
    if [[ ! -f $pkg/pyproject.toml ]]; then
        echo "vllm_env: $pkg/pyproject.toml is missing" >&2
        exit 1
    fi
done
where=$("$VENV/bin/python" -c 'import cachegen, cachegen_vllm; print(cachegen.__file__, cachegen_vllm.__file__)' 2>/dev/null || true)
if [[ $where != "$ROOT/integrations/python/cachegen/__init__.py $ROOT/integrations/vllm/cachegen_vllm/__init__.py" ]]; then
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e integrations/python -e integrations/vllm
fi
echo "vllm_env: ready in $(( $(date +%s) - t0 )) s; venv $(du -sh "$VENV" | cut -f1)"
