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
    raw = minimal(sample={"n_negatives": 2})
    cfg = config_from_dict(raw, ["sample.n_negatives=8", "filters.margin_rel=null", "run.progress=false"])
    assert cfg.sample.n_negatives == 8 and cfg.filters.margin_rel is None and cfg.run.progress is False
    assert raw == minimal(sample={"n_negatives": 2})  # the caller's dict is left as it was
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


# ------------------------------------------------------------------------------- every bad value, before any work

BAD_VALUES = [  # (override, what the one-line error must say)
    ("index.nprobe=0", "index.nprobe: 0 is out of range; it must be >= 1"),
    ("index.recall_floor=1.5", "index.recall_floor: 1.5 is out of range; it must be between 0 and 1"),
    ("index.memory_budget_gb=-1", "index.memory_budget_gb: -1.0 is out of range; it must be > 0"),
    ("index.memory_budget_gb=0", "index.memory_budget_gb: 0.0 is out of range; it must be > 0"),
    ("index.nlist=-4", "index.nlist: -4 is out of range; it must be >= 1"),
    ("index.num_shards=0", "index.num_shards: 0 is out of range; it must be >= 1"),
    ("index.threads=0", "index.threads: 0 is out of range"),
    ("index.hnsw_m=1", "index.hnsw_m: 1 is out of range; it must be >= 2"),
    ("index.seed=-1", "index.seed: -1 is out of range"),
    ("index.kind=''", "index.kind: '' is not allowed"),
    ("index.memory_budget_gb=.inf", "index.memory_budget_gb: inf is not allowed; give a finite number (> 0)"),
    ("filters.margin_rel=.nan", "filters.margin_rel: nan is not allowed; give a finite number (between 0 and 1)"),
    ("input.max_reject_fraction=.nan", "input.max_reject_fraction: nan is not allowed; give a finite number"),
    ("filters.min_score=-.inf", "filters.min_score: -inf is not allowed"),
    ("judge.threshold=.nan", "judge.threshold: nan is not allowed; give a finite number"),
    ("sample.temperature=.nan", "sample.temperature: nan is not allowed"),
    ("filters.max_score=1.5", "filters.max_score: 1.5 is out of range; it must be between -1 and 1"),
    ("sample.seed=-3", "sample.seed: -3 is out of range"),
    ("teacher.batch_tokens=0", "teacher.batch_tokens: 0 is out of range; it must be >= 1"),
    ("judge.teacher={model: m, max_length: 0}", "judge.teacher.max_length: 0 is out of range; it must be >= 1"),
    ("input.allowed_schemes=[s3://]", "input.allowed_schemes[0]: 's3://' is not a URI scheme"),
    ("schedule={filters.margin_rel: [0.1, .nan]}", "schedule.filters.margin_rel[1]: filters.margin_rel: nan"),
    ("teacher.device=gpu", "teacher.device: 'gpu' is not allowed; give auto, cpu, cuda, cuda:N"),
    ("teacher.cls=mypkg.Teacher", "teacher.cls: 'mypkg.Teacher' is not allowed; give 'package.module:ClassName'"),
    ("teacher.model=''", "teacher.model: '' is not allowed"),
    # keys that contradict each other
    ("sample.n_negatives=30", "sample.n_negatives (30) is larger than the rank window [filters.min_rank, "
                              "filters.max_rank or retrieve.top_k) = [0, 20) of 20 candidates"),
    ("filters.min_rank=18", "sample.n_negatives (4) is larger than the rank window"),
    ("filters.min_rank=20", "filters.min_rank (20) must be below retrieve.top_k (20)"),
    ("sample.min_negatives=5", "sample.min_negatives (5) is larger than sample.n_negatives (4)"),
    ("filters={min_score: 0.8, max_score: 0.2}", "filters.min_score (0.8) must be below filters.max_score (0.2)"),
    ("index={nlist: 64, nprobe: 128}", "index.nprobe (128) exceeds index.nlist (64)"),
    ("index={nlist: 4096, train_size: 100}", "index.train_size (100) is below index.nlist (4096)"),
    ("index={exact_below: 1000, hnsw_below: 500}", "index.hnsw_below (500) must be above index.exact_below (1000)"),
    ("schedule={filters.min_rank: [0, 10, 18]}", "sample.n_negatives (4) is larger than the rank window "
                                                 "[filters.min_rank, filters.max_rank or retrieve.top_k) = [18, 20) "
                                                 "of 2 candidates: lower sample.n_negatives or widen the window "
                                                 "(in epoch 2 of the schedule)"),
]


def small(**sections):
    return minimal(retrieve={"top_k": 20}, **sections)


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_bad_value_is_refused_at_load_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(small(), [override])
    assert message in str(err.value)


CLI_CASES = [b for b in BAD_VALUES if b[0] in ("index.nprobe=0", "index.recall_floor=1.5", "index.num_shards=0",
                                               "filters.margin_rel=.nan", "input.max_reject_fraction=.nan",
                                               "sample.n_negatives=30", "filters={min_score: 0.8, max_score: 0.2}")]


@pytest.mark.parametrize("override,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_a_bad_value_with_one_line_and_exit_2_before_any_work(override, message, tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"qry": "a", "pos_text": "b"}\n')
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(small(input={"pairs": [str(pairs)]})))
    out = tmp_path / "out"
    assert main(["mine", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hardneg: error: ") and message in err
    assert not out.exists()


def test_cli_refuses_a_negative_epoch(tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"qry": "a", "pos_text": "b"}\n')
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(small(input={"pairs": [str(pairs)]})))
    out = tmp_path / "out"
    assert main(["mine", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--epoch", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epoch: -1 is not allowed; epochs are numbered 0, 1, 2" in err
    assert not (out / "_run").exists()


@pytest.mark.parametrize("text,line,first", [
    ("input:\n  pairs: [p.jsonl]\nsample:\n  n_negatives: 4\n  n_negatives: 8\n", 5, 4),
    ("input:\n  pairs: [p.jsonl]\nsample: {n_negatives: 4}\ninput:\n  pairs: [q.jsonl]\n", 4, 1),
])
def test_a_key_given_twice_in_the_yaml_is_refused_naming_key_and_lines(tmp_path, text, line, first):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    key = "n_negatives" if "n_negatives: 8" in text else "input"
    assert f"c.yaml line {line}: key '{key}' is given twice in one mapping (first on line {first})" in str(err.value)


def test_yaml_merge_keys_still_work(tmp_path):
    (tmp_path / "c.yaml").write_text("input:\n  pairs: [p.jsonl]\n"
                                     "sample:\n  <<: {n_negatives: 2, seed: 1}\n  n_negatives: 3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.sample.n_negatives == 3 and cfg.sample.seed == 1


def test_every_numeric_key_has_a_range():
    import dataclasses
    import typing

    from pipeline.config import _RANGES, Config

    def numeric(tp):
        return tp in (int, float) or any(a in (int, float) for a in typing.get_args(tp))

    missing = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        if dataclasses.is_dataclass(cls):
            missing += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                        if numeric(typing.get_type_hints(cls)[f.name]) and f"{section.name}.{f.name}" not in _RANGES]
    assert not missing, f"give these keys their allowed range in pipeline/config.py _RANGES: {missing}"


def test_index_config_built_in_code_is_checked_by_the_same_rules():
    from pipeline.config import IndexConfig
    from pipeline.index import check_config

    with pytest.raises(ConfigError, match="index.nprobe: 0 is out of range"):
        check_config(IndexConfig(nprobe=0))
    with pytest.raises(ConfigError, match="index.recall_floor: nan is not allowed"):
        check_config(IndexConfig(recall_floor=float("nan")))
    check_config(IndexConfig(nlist=64, nprobe=64))


def test_every_key_is_classified_in_one_table():
    from pipeline.config import CLASS_MEANINGS, KEY_CLASSES, config_keys

    keys = set(config_keys())
    assert not keys - set(KEY_CLASSES), (f"classify these keys in pipeline/config.py KEY_CLASSES (run, retrieval, "
                                         f"epoch or free): {sorted(keys - set(KEY_CLASSES))}")
    assert not set(KEY_CLASSES) - keys, f"KEY_CLASSES names keys that do not exist: {set(KEY_CLASSES) - keys}"
    assert set(KEY_CLASSES.values()) <= set(CLASS_MEANINGS)


def test_run_identity_and_epoch_binding_follow_the_table():
    from pipeline.config import EPOCH, FREE, RETRIEVAL, RUN, config_view

    cfg = config_from_dict(minimal())
    run = config_view(cfg.to_dict(), (RUN,))
    assert "top_k" in run["retrieve"] and "nprobe" in run["index"] and "pairs" in run["input"]
    assert "threads" not in run["index"] and "search_clients" not in run["index"] and "batch_tokens" not in run["teacher"]
    assert "model" not in run["teacher"] and not run["filters"] and not run["embed"]
    epoch = config_view({**cfg.to_dict(), "mix_teacher": 0.5}, (RUN, RETRIEVAL, EPOCH))
    assert epoch["mix_teacher"] == 0.5 and "margin_rel" in epoch["filters"] and "model" in epoch["teacher"]
    assert "device" not in epoch["teacher"] and "progress" not in epoch["run"]
    assert config_view(cfg.to_dict(), (FREE,))["index"]["threads"] is None


def test_epoch_numbers_start_at_zero_for_library_callers_too():
    import numpy as np

    cfg = config_from_dict(small(schedule={"filters.min_rank": [0, 2]}))
    assert cfg.for_epoch(np.int64(5)).filters.min_rank == 2  # a training loop's numpy counter is fine
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ConfigError, match="epochs are numbered 0, 1, 2"):
            cfg.for_epoch(bad)


def test_a_bare_off_in_yaml_or_an_override_is_the_choice_off(tmp_path):
    """YAML 1.1 reads `off` as false: `calibrate: off` in a file and `--set filters.calibrate=off` both mean "off"."""
    path = tmp_path / "c.yaml"
    path.write_text("input: {pairs: [p.jsonl]}\nfilters: {calibrate: off}\n")
    assert load_config(path).filters.calibrate == "off"
    assert load_config(path, ["filters.calibrate=auto"]).filters.calibrate == "auto"
    assert config_from_dict({"input": {"pairs": ["p.jsonl"]}}, ["filters.calibrate=off"]).filters.calibrate == "off"
    with pytest.raises(ConfigError, match="filters.calibrate"):
        config_from_dict({"input": {"pairs": ["p.jsonl"]}}, ["filters.calibrate=yes"])
