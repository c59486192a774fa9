import pytest

from pipeline.config import ConfigError, config_from_dict, load_config


def minimal(**extra):
    return {"input": {"pairs": ["p.jsonl"]}, **extra}


def test_unknown_key_names_its_path_and_suggests():
    with pytest.raises(ConfigError) as err:
        config_from_dict(minimal(sample={"n_negativs": 3}))
    msg = str(err.value)
    assert "sample.n_negativs: unknown key" in msg and "Did you mean 'n_negatives'" in msg


def test_unknown_section_lists_allowed_sections():
    with pytest.raises(ConfigError, match="samples: unknown key.*Allowed keys here: input, teacher"):
        config_from_dict(minimal(samples={}))


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"sample.strategy: 'best' is not allowed; choose one of 'hardest', 'top'"):
        config_from_dict(minimal(sample={"strategy": "best"}))


def test_bad_type_and_range():
    with pytest.raises(ConfigError, match="retrieve.top_k: expected an integer, got 'many'"):
        config_from_dict(minimal(retrieve={"top_k": "many"}))
    with pytest.raises(ConfigError, match="filters.margin_rel: 1.5 is out of range"):
        config_from_dict(minimal(filters={"margin_rel": 1.5}))
    with pytest.raises(ConfigError, match="filters.same_group: expected true or false"):
        config_from_dict(minimal(filters={"same_group": "yes"}))


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="filters.max_rank .* exceeds retrieve.top_k"):
        config_from_dict(minimal(retrieve={"top_k": 10}, filters={"max_rank": 20}))
    with pytest.raises(ConfigError, match="input.captions: required"):
        config_from_dict(minimal(teacher={"image_mode": "caption"}))
    with pytest.raises(ConfigError, match="input.pairs"):
        config_from_dict({})


def test_overrides_are_yaml_values():
    cfg = config_from_dict(minimal(), ["sample.n_negatives=8", "filters.margin_rel=null", "run.progress=false"])
    assert cfg.sample.n_negatives == 8 and cfg.filters.margin_rel is None and cfg.run.progress is False
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config_from_dict(minimal(), ["sample.n_negatives"])
    with pytest.raises(ConfigError, match="sample.n_negativs: unknown key"):
        config_from_dict(minimal(), ["sample.n_negativs=3"])


def test_load_resolves_paths_against_the_config_and_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("input:\n  pairs: data/p.jsonl\n  image_root: imgs\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.input.pairs == [str(tmp_path / "data" / "p.jsonl")]
    assert cfg.input.image_root == str(tmp_path / "imgs")
    (tmp_path / "bad.yaml").write_text("input:\n  pairs: [a]\nteacher:\n  kind: clip\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: teacher.kind: 'clip' is not allowed"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_bundled_configs_load():
    for name in ("configs/demo.yaml", "configs/demo-clip.yaml"):
        cfg = load_config(name)
        assert cfg.input.pairs and cfg.retrieve.top_k >= cfg.sample.n_negatives


def test_configuration_reference_is_current():
    from pathlib import Path

    from pipeline.config import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "regenerate docs/configuration.md (command in its header)"
