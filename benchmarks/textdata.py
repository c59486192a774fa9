"""Real (query, positive) text pairs available offline: the docstrings of installed Python packages.

Each function, method or class with a docstring gives one pair: the query is the docstring's first line (its
summary), the positive is the rest of the docstring (the description, arguments, examples). Pairs are read with
`ast` (nothing is imported), in a fixed order (package list order, then file path, then source order), deduplicated
by normalised content on both sides (hardneg's identity: NFKC + collapsed whitespace), and a query is never equal
to any positive. The same packages at the same versions give the same pairs, byte for byte; `describe()` records
the versions and a digest.

    from benchmarks.textdata import docstring_pairs, write_pairs
    pairs = docstring_pairs(5000)            # [{"id", "dataset", "qry", "pos_text"}, ...]
    write_pairs(pairs, "pairs.parquet")      # MMEB layout for hardneg; pandas / datasets read it as well

    python -m benchmarks.textdata --n 50000 --out /tmp/pairs-50k.parquet
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import inspect
import json
import sys
import unicodedata
from pathlib import Path
from typing import Iterator, Optional

# Large, stable, docstring-rich packages of the venv, in the order they are read (a fixed list, so a package that
# another tool installs later does not change the data).
PACKAGES = ("torch", "transformers", "sympy", "scipy", "sklearn", "pandas", "numpy", "matplotlib", "ray",
            "datasets", "pyarrow", "networkx", "sentence_transformers", "huggingface_hub", "PIL", "fsspec",
            "pydantic", "jinja2", "pygments", "rich", "tqdm", "yaml", "click", "typer", "requests", "urllib3",
            "fontTools", "mpmath", "attr", "jsonschema", "pytest", "_pytest", "setuptools", "pip")
DIST_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "attr": "attrs", "_pytest": "pytest"}

MIN_QUERY_CHARS = 12
MIN_POSITIVE_CHARS = 40
MAX_POSITIVE_CHARS = 2000  # MiniLM reads 256 tokens (about 1000-1500 characters); the rest never reaches the model


def normalise(text: str) -> str:
    """hardneg's content identity (pipeline.read.normalise_text): NFKC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def site_packages() -> Path:
    import numpy  # any installed package: its parent is the venv's site-packages

    return Path(numpy.__file__).resolve().parents[1]


def _docstrings(tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(qualified name inside the module, docstring) of every documented function / class, in source order."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield name, doc
                yield from walk(child, name + ".")
    yield from walk(tree, "")


def _split(doc: str) -> Optional[tuple[str, str]]:
    lines = inspect.cleandoc(doc).strip().splitlines()
    if len(lines) < 2:
        return None
    query = lines[0].strip()
    body = "\n".join(lines[1:]).strip()
    if len(query) < MIN_QUERY_CHARS or len(body) < MIN_POSITIVE_CHARS:
        return None
    if len(body) > MAX_POSITIVE_CHARS:
        body = body[:MAX_POSITIVE_CHARS].rsplit(" ", 1)[0]
    return query, body


def iter_raw_pairs(root: Optional[Path] = None, packages: tuple[str, ...] = PACKAGES) -> Iterator[dict]:
    root = root or site_packages()
    for package in packages:
        base = root / package
        files = sorted(base.rglob("*.py")) if base.is_dir() else ([base.with_suffix(".py")]
                                                                 if base.with_suffix(".py").exists() else [])
        for path in files:
            rel = path.relative_to(root).as_posix()
            if "/tests/" in rel or "/test/" in rel or "/_vendor/" in rel:
                continue
            try:
                tree = ast.parse(path.read_bytes(), filename=rel)
            except (SyntaxError, ValueError, UnicodeDecodeError):
                continue
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            for name, doc in _docstrings(tree):
                split = _split(doc)
                if split:
                    yield {"source": f"{module}.{name}", "qry": split[0], "pos_text": split[1]}


def docstring_pairs(n: int, root: Optional[Path] = None, packages: tuple[str, ...] = PACKAGES,
                    dataset: str = "docstrings") -> list[dict]:
    """The first `n` pairs whose query and positive are both new (by normalised content) and distinct from each
    other's side: no two queries equal, no two positives equal, no query equal to a positive."""
    seen: set[str] = set()
    pairs = []
    for raw in iter_raw_pairs(root, packages):
        q, p = normalise(raw["qry"]), normalise(raw["pos_text"])
        if not q or not p or q in seen or p in seen or q == p:
            continue
        seen.add(q)
        seen.add(p)
        pairs.append({"id": f"d{len(pairs)}", "dataset": dataset, "qry": raw["qry"], "pos_text": raw["pos_text"],
                      "source": raw["source"]})
        if len(pairs) == n:
            break
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} docstring pairs available, {n} asked for")
    return pairs


def digest(pairs: list[dict]) -> str:
    h = hashlib.sha256()
    for row in pairs:
        h.update(json.dumps([row["id"], row["qry"], row["pos_text"]]).encode())
    return h.hexdigest()[:16]


def describe(pairs: list[dict], packages: tuple[str, ...] = PACKAGES) -> dict:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(DIST_NAMES.get(package, package))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    chars = [len(r["pos_text"]) for r in pairs]
    return {"pairs": len(pairs), "sha256_16": digest(pairs), "python": sys.version.split()[0],
            "packages": versions, "mean_positive_chars": round(sum(chars) / max(len(chars), 1), 1),
            "mean_query_chars": round(sum(len(r["qry"]) for r in pairs) / max(len(pairs), 1), 1)}


def write_pairs(pairs: list[dict], path: str | Path) -> Path:
    """Parquet (or JSONL by suffix) in the MMEB layout hardneg reads: id, dataset, qry, pos_text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ("id", "dataset", "qry", "pos_text")
    if path.suffix == ".jsonl":
        with open(path, "w") as f:
            for row in pairs:
                f.write(json.dumps({c: row[c] for c in cols}) + "\n")
        return path
    pq.write_table(pa.table({c: pa.array([r[c] for r in pairs], pa.string()) for c in cols}), path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pairs = docstring_pairs(args.n)
    write_pairs(pairs, args.out)
    print(json.dumps(describe(pairs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
