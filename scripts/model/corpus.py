"""Kernel documentation text from Debian's linux-doc-6.1 (extracted by setup_env.sh).

Documents are named by their path under Documentation/ without the .gz suffix,
e.g. "admin-guide/reporting-issues.rst".
"""

import gzip
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT_DIR = REPO / ".cache" / "text"
PACKAGE = "linux-doc-6.1"
DOCS_DIR = TEXT_DIR / PACKAGE / "usr" / "share" / "doc" / PACKAGE / "Documentation"
# Plain English prose (not register tables or driver parameter lists).
PROSE_DIRS = ("admin-guide", "process")
DEFAULT_SOURCE = "admin-guide/reporting-issues.rst"


def _check():
    if not DOCS_DIR.is_dir():
        sys.exit(f"error: {DOCS_DIR} not found; run scripts/model/setup_env.sh first")


def package_version():
    """e.g. 'linux-doc-6.1 6.1.192-2', from the .deb that setup_env.sh downloaded."""
    debs = sorted(TEXT_DIR.glob(f"{PACKAGE}_*.deb"))
    return f"{PACKAGE} {debs[-1].name.split('_')[1]}" if debs else PACKAGE


def source_path(name):
    """Path of the document inside the package, as recorded in KV file metadata."""
    return f"usr/share/doc/{PACKAGE}/Documentation/{name}.gz"


def read_document(name):
    _check()
    path = DOCS_DIR / f"{name}.gz"
    if not path.is_file():
        sys.exit(f"error: no document {name!r} (looked for {path})")
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def prose_documents(min_tokens, encode):
    """Sorted names of the .rst documents under PROSE_DIRS with at least min_tokens tokens."""
    _check()
    names = sorted(str(p.relative_to(DOCS_DIR))[:-len(".gz")]
                   for d in PROSE_DIRS for p in (DOCS_DIR / d).rglob("*.rst.gz"))
    return [n for n in names if len(encode(read_document(n))) >= min_tokens]


def resolve_source(source, min_tokens, encode):
    """A document name, or an integer index into prose_documents(min_tokens)."""
    if source.isdigit():
        docs = prose_documents(min_tokens, encode)
        if int(source) >= len(docs):
            sys.exit(f"error: --source {source}: only {len(docs)} prose documents have >= {min_tokens} tokens")
        return docs[int(source)]
    return source[:-len(".gz")] if source.endswith(".gz") else source


def pick_documents(k, min_tokens, encode):
    """k documents spread evenly over prose_documents(min_tokens); deterministic."""
    docs = prose_documents(min_tokens, encode)
    if k > len(docs):
        sys.exit(f"error: asked for {k} documents, only {len(docs)} have >= {min_tokens} tokens")
    return [docs[(2 * i + 1) * len(docs) // (2 * k)] for i in range(k)]
