"""Smoke tests of the benchmark helpers: the docstring pair builder and the agreement logic (no model, no Ray)."""
import argparse
import textwrap

import pytest

from benchmarks.textdata import describe, docstring_pairs, write_pairs
from benchmarks.vs_sentence_transformers import compare, hardneg_config
from pipeline.read import normalise_text as normalise

MODULE = '''
"""A module summary that is long enough.

The module body says more than forty characters about the module."""


def alpha(x):
    """Return the alpha of x, computed with care.

    Alpha is defined for every x; the body is long enough to be kept."""


def beta(y):
    """Return the alpha of x, computed with care.

    A second function whose summary copies alpha's: it is a duplicate query and is dropped."""


class Gamma:
    """Gamma holds   state between calls.

    Methods of Gamma are documented below and the text is long enough."""

    def delta(self):
        """Short."""

    def epsilon(self):
        """Epsilon resets the state of the object.

        Methods of Gamma are documented below and the text is long enough."""
'''


@pytest.fixture()
def fake_site(tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(MODULE))
    (pkg / "broken.py").write_text("def (:\n")  # unparsable files are skipped
    return tmp_path


def test_pairs_are_deduplicated_deterministic_and_split_summary_from_body(fake_site):
    pairs = docstring_pairs(3, root=fake_site, packages=("fakepkg",))
    assert [p["source"] for p in pairs] == ["fakepkg", "fakepkg.alpha", "fakepkg.Gamma"]
    assert pairs[1]["qry"] == "Return the alpha of x, computed with care."
    assert pairs[1]["pos_text"].startswith("Alpha is defined")
    queries = {normalise(p["qry"]) for p in pairs}
    positives = {normalise(p["pos_text"]) for p in pairs}
    assert len(queries) == len(positives) == 3 and not queries & positives
    assert [p["id"] for p in pairs] == ["d0", "d1", "d2"]
    assert docstring_pairs(3, root=fake_site, packages=("fakepkg",)) == pairs
    assert describe(pairs)["sha256_16"] == describe(docstring_pairs(3, root=fake_site, packages=("fakepkg",)))[
        "sha256_16"]
    with pytest.raises(ValueError, match="only 3 docstring pairs"):
        docstring_pairs(4, root=fake_site, packages=("fakepkg",))  # epsilon's body repeats Gamma's: dropped


def test_pairs_file_is_read_by_hardneg(fake_site, tmp_path):
    from pipeline.config import config_from_dict
    from pipeline.read import load_corpus

    path = write_pairs(docstring_pairs(3, root=fake_site, packages=("fakepkg",)), tmp_path / "pairs.parquet")
    a = argparse.Namespace(pairs=str(path), cache=str(tmp_path / "cache"), batch_size=8, range_max=2, margin=0.05,
                           k=1)
    cfg = config_from_dict(hardneg_config(a))
    assert cfg.retrieve.top_k == 3 and cfg.index.kind == "flat" and cfg.filters.near_duplicate is None
    corpus = load_corpus(cfg.input, caption_mode=False)
    assert corpus.queries.num_rows == 3 and corpus.items.num_rows == 6 and not corpus.rejects


def neg(negs, scores, pos):
    return {"negs": negs, "scores": scores, "pos_score": pos}


def test_agreement_counts_identical_sets_and_explains_differences():
    queries = ["same", "tie", "margin", "negpos", "missing-both"]
    st = {"same": neg(["a", "b"], [0.5, 0.4], 0.9),
          "tie": neg(["a", "b"], [0.5, 0.4], 0.9),
          "margin": neg(["m"], [0.9 * 0.95 + 5e-6], 0.9),
          "negpos": neg(["x"], [-0.3], -0.2)}
    hn = {"same": neg(["b", "a"], [0.4, 0.5], 0.9),           # order does not matter: a set
          "tie": neg(["a", "c"], [0.5, 0.4], 0.9),            # c and b tie at the cut
          "margin": neg([], [], 0.9),
          "negpos": neg([], [], -0.2),
          "missing-both": neg([], [], 0.5)}                   # no negative in either: agree
    out = compare(st, hn, {}, queries, k=2, margin=0.05)
    assert out["identical_sets"] == 2 and out["agreement"] == 0.4
    reasons = " | ".join(out["differences"])
    assert "tie at the cut" in reasons and "margin borderline" in reasons and "positive score < 0" in reasons
    assert out["negatives_found"] == {"st": 6, "hardneg": 4}
    assert out["queries_short"] == {"st": 3, "hardneg": 3}


def test_short_texts_are_first_paragraphs_of_a_sentence_or_two():
    from benchmarks.textdata import short_text

    assert short_text("Alpha is defined for every x.\n\nMore text follows here.") == "Alpha is defined for every x."
    assert short_text("Parameters\n----------\nx : int") is None  # a section header, not a sentence
    assert short_text("Too short.") is None and short_text("word " * 60) is None  # outside 20-200 characters
    assert short_text(">>> f(1)\n2 is what it prints") is None


def test_short_case_feeds_candidates_to_every_tool(fake_site, tmp_path):
    """hardneg gets the candidate corpus as `input.candidates`; the FlagEmbedding peer is skipped with a reason
    when its venv or hn_mine.py is absent."""
    from benchmarks.vs_sentence_transformers import fe_ready

    a = argparse.Namespace(pairs="p.parquet", candidates="c.parquet", cache="cache", batch_size=8, range_max=2,
                           margin=0.05, k=1, executor="auto")
    assert hardneg_config(a)["input"]["candidates"] == "c.parquet"
    assert "no FlagEmbedding venv" in fe_ready(argparse.Namespace(fe_venv=str(tmp_path / "none"), fe_script=""))
