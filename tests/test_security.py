"""Nothing untrusted is unpickled or executed: a static check of the whole package, plus the behaviours behind it.

The inspector's escaping of data is exercised end to end by tests/test_inspector_app.py
(test_pages_escape_untrusted_text_and_send_a_strict_csp); here only its script is checked statically.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# Plain-text patterns: none of these may appear in the package's code (comments and docstrings included, so that a
# commented-out unsafe call cannot slip back in unnoticed).
FORBIDDEN_TEXT = {
    r"\bpickle\.loads?\(": "unpickling",
    r"\bcloudpickle\.loads?\(": "unpickling",
    r"\bdill\.loads?\(": "unpickling",
    r"\bjoblib\.load\(": "unpickling (joblib)",
    r"\bread_pickle\(": "unpickling (pandas)",
    r"\bmarshal\.loads?\(": "unmarshalling code",
    r"\byaml\.unsafe_load\(": "unsafe YAML",
    r"\byaml\.full_load\(": "YAML that can build Python objects",
    r"trust_remote_code\s*=\s*True": "remote code from a model repository",
    r"[\"']trust_remote_code[\"']\s*:\s*True": "remote code from a model repository",
    r"allow_pickle\s*=\s*True": "unpickling through numpy",
    r"shell\s*=\s*True": "a shell command line",
    r"\bos\.system\(": "a shell command line",
}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def ast_findings(path: Path) -> list[str]:
    """Calls that run or unpickle data: eval/exec/compile, yaml.load without a safe loader, torch.load without
    weights_only=True, np.load with allow_pickle set from anything but the literal False."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for call in _calls(tree):
        name = _name(call.func)
        where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
        if name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec", "__import__"):
            found.append(f"{where}: {name}()")
        if name.endswith("yaml.load") or name == "load" and "yaml" in ast.unparse(call.func):
            loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if loader is None or not re.search(r"\b(C?SafeLoader|BaseLoader)$", ast.unparse(loader)):
                found.append(f"{where}: yaml.load without SafeLoader")
        if name.endswith("torch.load"):
            weights_only = _kw(call, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if name.endswith(("np.load", "numpy.load")):
            allow = _kw(call, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where}: np.load(allow_pickle=...)")
        trc = _kw(call, "trust_remote_code")
        if isinstance(trc, ast.Constant) and trc.value is True:
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_the_package_has_sources_to_check():
    names = {p.name for p in SOURCES}
    assert {"read.py", "config.py", "embed.py", "mine.py"} <= names and len(SOURCES) > 15


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unpickling_eval_unsafe_yaml_or_remote_code(path):
    text = path.read_text()
    hits = [f"{path.relative_to(PACKAGE.parent)}:{text[:m.start()].count(chr(10)) + 1}: {why} ({m.group(0)})"
            for pattern, why in FORBIDDEN_TEXT.items() for m in re.finditer(pattern, text)]
    hits += ast_findings(path)
    assert not hits, "\n".join(hits)


def test_the_checker_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "pipeline" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import yaml, torch, numpy as np\n"
                   "yaml.load(open('c'))\nyaml.load(open('c'), Loader=yaml.SafeLoader)\neval('1')\n"
                   "torch.load('w')\ntorch.load('w', weights_only=True)\nnp.load('a', allow_pickle=flag)\n"
                   "AutoModel.from_pretrained('m', trust_remote_code=True)\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "pipeline"
    try:
        found = ast_findings(bad)
    finally:
        PACKAGE = saved
    assert [f.split(": ", 1)[1] for f in found] == [
        "yaml.load without SafeLoader", "eval()", "torch.load without weights_only=True",
        "np.load(allow_pickle=...)", "trust_remote_code=True"]
    assert re.search(list(FORBIDDEN_TEXT)[0], "x = pickle.loads(data)")


def test_a_config_is_data_yaml_tags_cannot_run_code(tmp_path):
    from pipeline.config import ConfigError, load_config

    flag = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"input:\n  pairs: !!python/object/apply:os.system ['touch {flag}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not flag.exists()
    from pipeline.config import config_from_dict

    with pytest.raises(ConfigError):  # a --set value is YAML too, read the same safe way
        config_from_dict({"input": {"pairs": ["p.jsonl"]}},
                         [f"sample.n_negatives=!!python/object/apply:os.system ['touch {flag}']"])
    assert not flag.exists()


def test_remote_model_code_is_off_unless_the_user_opts_in():
    import inspect

    from pipeline.config import TeacherConfig

    assert getattr(TeacherConfig(), "trust_remote_code", False) is False
    import dataclasses

    import pipeline.config as config

    for cls in vars(config).values():  # every config section with the switch (teacher, judge...) has it off
        if dataclasses.is_dataclass(cls) and "trust_remote_code" in {f.name for f in dataclasses.fields(cls)}:
            assert getattr(cls(), "trust_remote_code") is False, cls.__name__
    # every trust_remote_code passed to a loader comes from the config (or a parameter defaulting to False)
    for path in (PACKAGE / "teachers").glob("*.py"):
        for call in _calls(ast.parse(path.read_text())):
            value = _kw(call, "trust_remote_code")
            if value is not None:
                assert not (isinstance(value, ast.Constant) and value.value), f"{path.name}:{call.lineno}"
    from pipeline.teachers import hf_clip

    assert "trust_remote_code=True" not in inspect.getsource(hf_clip)


def test_image_reader_never_hands_a_file_to_ghostscript(tmp_path):
    """PIL's EPS plugin runs Ghostscript on the file; the reader only opens raster formats."""
    from pipeline.read import ImageProbe

    (tmp_path / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto\nshowpage\n")
    digest, reason, detail = ImageProbe(str(tmp_path), 10_000).check("x.png")
    assert reason == "corrupt_image" and digest is None


def test_inspector_script_never_turns_data_into_markup():
    """The inspector's browser script (served from pipeline/inspector) builds no HTML from strings: data reaches the
    page only through the server's escaped templates or textContent."""
    sources = [p for p in (PACKAGE / "inspector").rglob("*") if p.suffix in (".py", ".js", ".html")]
    assert sources
    for path in sources:
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "new Function("):
            assert sink not in text, f"{path.name}: {sink}"
    from pipeline.inspector.pages import esc

    assert esc('<img src=x onerror="alert(1)">') == "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"
