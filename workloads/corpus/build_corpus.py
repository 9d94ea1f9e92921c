"""Rebuild `prose.txt`, the bundled prompt corpus, from the Python standard library's docstrings.

Why docstrings: servescope may not download datasets, and the docstrings that ship
with CPython are varied English prose (many authors, topics from networking to
calendars) under the PSF License, which allows redistribution. Only prose
paragraphs are kept: no doctest lines, no indented code, no tables.

The output is one paragraph per line, ASCII only, deduplicated, in a fixed order,
so `python -m workloads.corpus.build_corpus` gives the same file on the same
Python version (the file is shipped; rebuilding is only needed to change it).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sysconfig
import warnings
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("prose.txt")
TARGET_BYTES = 900_000

_CODE_HINTS = re.compile(r">>>|\.\.\. |::|==|\{|\}|\bdef |\bimport |\breturn |^\s*[-*+|=]|\$|\\")
_WORD = re.compile(r"[A-Za-z]+")


def _paragraphs(docstring: str) -> list[str]:
    """Split a docstring into paragraphs and keep those that read like prose."""
    kept = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = block.splitlines()
        if any(line.startswith(("    ", "\t")) and not line.strip()[:1].isalpha() for line in lines[1:]):
            continue  # indented code or an argument table
        text = " ".join(line.strip() for line in lines).strip()
        if _is_prose(text):
            kept.append(text)
    return kept


def _is_prose(text: str) -> bool:
    if len(text) < 120 or not text.isascii() or _CODE_HINTS.search(text):
        return False
    words = _WORD.findall(text)
    if len(words) < 20:
        return False
    letters = sum(len(w) for w in words)
    # Prose is mostly letters and ends a sentence; identifiers and signatures are not.
    return letters / len(text) > 0.72 and text[-1] in ".!?" and text[0].isupper()


def _docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
    return found


def build_corpus(stdlib: Path, target_bytes: int = TARGET_BYTES) -> list[str]:
    """Every prose paragraph of the stdlib's docstrings, deduplicated, then a hash-ordered selection."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if "site-packages" in rel or "/test" in rel or rel.startswith(("test", "idlelib/idle_test")):
            continue
        for doc in _docstrings(path):
            for para in _paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    paragraphs.append(para)
    # A stable pseudo-random order mixes topics (modules) instead of keeping them alphabetical.
    paragraphs.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    chosen, size = [], 0
    for para in paragraphs:
        if size >= target_bytes:
            break
        chosen.append(para)
        size += len(para) + 1
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--bytes", type=int, default=TARGET_BYTES)
    parser.add_argument("--out", type=Path, default=CORPUS_PATH)
    args = parser.parse_args()
    paragraphs = build_corpus(args.stdlib, args.bytes)
    args.out.write_text("\n".join(paragraphs) + "\n", encoding="ascii")
    print(f"wrote {args.out}: {len(paragraphs)} paragraphs, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
