"""Real (query, positive) text pairs available offline: the docstrings of installed Python packages.

Each module, function, method or class with a docstring gives one pair: the query is the docstring's summary (its first
paragraph, or its first line when it has no blank line; at most 300 characters), the positive is the rest of the docstring (the description, arguments,
examples; cut at 2000 characters, beyond what MiniLM reads). Pairs are read with
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
from pathlib import Path
from typing import Iterator, Optional

from pipeline.read import normalise_text

# Large, stable, docstring-rich packages of the venv, in the order they are read (a fixed list, so a package that
# another tool installs later does not change the data).
PACKAGES = ("torch", "transformers", "sympy", "scipy", "sklearn", "pandas", "numpy", "matplotlib", "ray",
            "datasets", "pyarrow", "networkx", "sentence_transformers", "huggingface_hub", "PIL", "fsspec",
            "pydantic", "jinja2", "pygments", "rich", "tqdm", "yaml", "click", "typer", "requests", "urllib3",
            "fontTools", "mpmath", "attr", "jsonschema", "_pytest", "setuptools", "pip", "playwright", "narwhals",
            "faiss", "google", "anyio", "packaging", "mpl_toolkits", "pyparsing", "joblib", "psutil", "dateutil",
            "markdown_it", "dill", "filelock", "tokenizers", "safetensors", "msgpack", "STDLIB")
STDLIB = "STDLIB"  # the Python standard library of the running interpreter (its own folder, not site-packages)
STDLIB_SKIP = ("site-packages/", "dist-packages/", "test/", "tests/", "idlelib/", "lib2to3/", "turtledemo/", "ensurepip/")
DIST_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "attr": "attrs", "_pytest": "pytest"}

MIN_QUERY_CHARS = 12
MIN_POSITIVE_CHARS = 40
MAX_QUERY_CHARS = 300
MAX_POSITIVE_CHARS = 2000  # MiniLM reads 256 tokens (about 1000-1500 characters); the rest never reaches the model


def site_packages() -> Path:
    import numpy  # any installed package: its parent is the venv's site-packages

    return Path(numpy.__file__).resolve().parents[1]


def _docstrings(tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(qualified name inside the module, docstring) of the module and of every documented function / class, in
    source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "", doc
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
    """(summary, body): the first paragraph (its lines joined; the first line when there is no blank line) and the
    rest of the docstring."""
    text = inspect.cleandoc(doc).strip()
    head, sep, body = text.partition("\n\n")
    if not sep:  # no blank line: the first line is the summary
        head, _, body = text.partition("\n")
    query, body = " ".join(head.split()), body.strip()
    if len(query) < MIN_QUERY_CHARS or len(query) > MAX_QUERY_CHARS or len(body) < MIN_POSITIVE_CHARS:
        return None
    if len(body) > MAX_POSITIVE_CHARS:
        body = body[:MAX_POSITIVE_CHARS].rsplit(" ", 1)[0]
    return query, body


def iter_raw_pairs(root: Optional[Path] = None, packages: tuple[str, ...] = PACKAGES) -> Iterator[dict]:
    site = root or site_packages()
    for package in packages:
        if package == STDLIB:
            root = Path(inspect.__file__).resolve().parent
            files = [p for p in sorted(root.rglob("*.py"))
                     if not p.relative_to(root).as_posix().startswith(STDLIB_SKIP)]
        else:
            root, base = site, site / package
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
                    yield {"source": f"{module}.{name}".rstrip("."), "qry": split[0], "pos_text": split[1]}


def docstring_pairs(n: int, root: Optional[Path] = None, packages: tuple[str, ...] = PACKAGES,
                    dataset: str = "docstrings") -> list[dict]:
    """The first `n` pairs whose query and positive are both new (by normalised content) and distinct from each
    other's side: no two queries equal, no two positives equal, no query equal to a positive."""
    seen: set[str] = set()
    pairs = []
    for raw in iter_raw_pairs(root, packages):
        q, p = normalise_text(raw["qry"]), normalise_text(raw["pos_text"])
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
        if package == STDLIB:
            versions[package] = sys.version.split()[0]
            continue
        try:
            versions[package] = importlib.metadata.version(DIST_NAMES.get(package, package))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    chars = [len(r["pos_text"]) for r in pairs]
    return {"pairs": len(pairs), "sha256_16": digest(pairs), "python": sys.version.split()[0],
            "packages": versions, "mean_positive_chars": round(sum(chars) / max(len(chars), 1), 1),
            "mean_query_chars": round(sum(len(r["qry"]) for r in pairs) / max(len(pairs), 1), 1)}


def cached_pairs(n: int, cache_dir: str | Path) -> list[dict]:
    """`docstring_pairs(n)`, kept in `cache_dir` (the walk takes minutes). The file is keyed by the package
    versions and n; a smaller n is the prefix of a larger one, so any cached larger set serves it too."""
    import pyarrow.parquet as pq

    key = hashlib.sha256(json.dumps(describe([])["packages"], sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    for path in sorted(cache_dir.glob(f"docstrings-{key}-*.parquet")):
        size = int(path.stem.rsplit("-", 1)[1])
        if size >= n:
            rows = pq.read_table(path).slice(0, n).to_pylist()
            return rows
    pairs = docstring_pairs(n)
    cache_dir.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa

    tmp = cache_dir / f".docstrings-{key}-{n}.tmp"
    pq.write_table(pa.Table.from_pylist(pairs), tmp)
    tmp.replace(cache_dir / f"docstrings-{key}-{n}.parquet")
    return pairs


SHORT_MIN_CHARS, SHORT_MAX_CHARS = 20, 200


def short_text(body: str) -> Optional[str]:
    """A docstring body's first paragraph, whitespace collapsed, when it is a short sentence (20-200 characters,
    at least 4 words, not a section header or an example): the short positive of `short_pairs`."""
    text = " ".join(body.strip().split("\n\n", 1)[0].split())
    if not SHORT_MIN_CHARS <= len(text) <= SHORT_MAX_CHARS or len(text.split()) < 4:
        return None
    if text.startswith((">>>", "..", "-", "=", ":", "Parameters", "Args", "Returns", "Example", "See also")):
        return None
    return text


def short_pairs(n_pairs: int, n_candidates: int, cache_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Short-text pairs and a larger short-text candidate corpus, from the same docstrings (`iter_raw_pairs`):
    query = the summary line, positive = the first paragraph of the rest when it is short (`short_text`),
    deduplicated by normalised content on both sides, in the walk's fixed order. Returns (the first `n_pairs`
    pairs, the positives of the first `n_candidates` pairs as candidates `{"id", "dataset", "text"}`): every pair's
    positive is among the candidates, the other candidates are positives of queries that are not asked. Kept in
    `cache_dir` like `cached_pairs`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = max(n_pairs, n_candidates)
    key = hashlib.sha256(json.dumps(describe([])["packages"], sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    rows = None
    for path in sorted(cache_dir.glob(f"short-{key}-*.parquet")):
        if int(path.stem.rsplit("-", 1)[1]) >= want:
            rows = pq.read_table(path).slice(0, want).to_pylist()
            break
    if rows is None:
        seen: set[str] = set()
        rows = []
        for raw in iter_raw_pairs():
            text = short_text(raw["pos_text"])
            if text is None:
                continue
            q, p = normalise_text(raw["qry"]), normalise_text(text)
            if not q or not p or q in seen or p in seen or q == p:
                continue
            seen.update((q, p))
            rows.append({"id": f"s{len(rows)}", "dataset": "short", "qry": raw["qry"], "pos_text": text,
                         "source": raw["source"]})
            if len(rows) == want:
                break
        if len(rows) < want:
            raise ValueError(f"only {len(rows)} short docstring pairs available, {want} asked for")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".short-{key}-{want}.tmp"
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(cache_dir / f"short-{key}-{want}.parquet")
    candidates = [{"id": f"c{i}", "dataset": "short", "text": r["pos_text"]} for i, r in enumerate(rows[:n_candidates])]
    return rows[:n_pairs], candidates


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
