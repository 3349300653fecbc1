import pytest

from retrieval import config, registry


def test_defaults_load_and_dotted_access():
    cfg = config.load()
    assert cfg["extract.batch_size"] == cfg.extract.batch_size > 0
    assert cfg.preprocess.size_hi == 224 and cfg.preprocess.size_lo == 160
    assert cfg["model.checkpoint"] is None or isinstance(cfg["model.checkpoint"], str)


def test_overlays_and_sets_apply_in_order(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("extract:\n  num_shards: 3\n  batch_size: 7\n")
    cfg = config.load([str(f)], ["extract.num_shards=5", "spark.conf={spark.x: '1'}"])
    assert cfg.extract.num_shards == 5 and cfg.extract.batch_size == 7
    assert cfg["spark.conf"]["spark.x"] == "1"


def test_repository_overlays_are_valid():
    import glob

    for f in glob.glob("conf/*.yaml"):
        config.load([f])


@pytest.mark.parametrize("item, message", [
    ("extract.nonsense=1", "unknown config key 'extract.nonsense'"),
    ("extract.batch_size=abc", "must be int"),
    ("extract.batch_size=0", "must be > 0"),
    ("extract.storage=float16", "must be one of float32, int8"),
    ("preprocess.size_lo=512", "must be <= preprocess.size_hi"),
    ("model.backbone=vgg", "must be one of"),
    ("extract=3", "is a section"),
    ("novalue", "expected key=value"),
])
def test_bad_values_are_clear_errors(item, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        config.load(sets=[item])


def test_stage_value_rules_come_from_the_registry():
    """Each stage declares the checks of its own section; every load applies them (the registry
    installs its rules in the core config module, which does not import it); without them only the
    types and the shared sections are checked."""
    assert "extract.batch_size" not in config.CHECKS and "extract.batch_size" in registry.get("extract").checks
    assert config.load(sets=["extract.batch_size=0"], rules=config.CORE)["extract.batch_size"] == 0
    with pytest.raises(config.ConfigError, match="must be > 0"):
        registry.load_config(sets=["extract.batch_size=0"])
    with pytest.raises(config.ConfigError, match="must be > 0"):    # kept by with_overrides
        registry.load_config().with_overrides({"extract.batch_size": 0})
    with pytest.raises(config.ConfigError, match="unknown augmentation"):
        registry.load_config(sets=["train.augmentations=[blur, nonsense]"])


def test_bad_files(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract: [1, 2\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load([str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("extrct:\n  batch_size: 3\n")
    with pytest.raises(config.ConfigError, match=r"unknown.yaml: unknown config key 'extrct'"):
        config.load([str(unknown)])


def test_choose_for_me_is_spelled_auto_in_every_key():
    cfg = config.load()
    for key in config.AUTO_OLD_SPELLING:
        assert cfg[key] == ("auto" if key != "search.nprobe" else 16), key   # nprobe 16 is a choice
    # a number (or a column name) still sets the key
    cfg = config.load(sets=["index.nlist=1024", "search.shortlist=500", "extract.key_column=name",
                            "search.threads=2", "search.nprobe=auto"])
    assert (cfg["index.nlist"], cfg["search.shortlist"], cfg["extract.key_column"]) == (1024, 500, "name")
    assert cfg["search.threads"] == 2 and cfg["search.nprobe"] == "auto"


@pytest.mark.parametrize("key, old", [(k, v) for k, v in config.AUTO_OLD_SPELLING.items()])
def test_old_spellings_of_auto_are_read_as_auto_with_a_warning(key, old, tmp_path):
    item = f"{key}={'null' if old is None else old}"
    with pytest.warns(FutureWarning, match=rf"{key}.*deprecated.*removed in 0\.3.*{key}: auto"):
        cfg = config.load(sets=[item])
    assert cfg[key] == "auto"
    section, name = key.split(".")
    f = tmp_path / "old.yaml"
    f.write_text(f"{section}:\n  {name}: {'null' if old is None else old}\n")
    with pytest.warns(FutureWarning, match=str(f)):
        assert config.load([str(f)])[key] == "auto"
    with pytest.warns(FutureWarning, match=key):
        assert config.load().with_overrides({key: old})[key] == "auto"


@pytest.mark.parametrize("item, message", [
    ("index.nlist=-4", "must be 'auto' or > 0"),
    ("search.shortlist=many", "must be 'auto' or int"),
    ("search.threads=1.5", "must be 'auto' or int"),
    ("index.nprobe=true", "must be 'auto' or int"),
    ("extract.key_column=3", "must be 'auto' or str"),
])
def test_auto_keys_refuse_other_values(item, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(sets=[item])


def test_auto_resolves_where_the_keys_are_read():
    import pyarrow as pa

    from retrieval.engine import task_threads
    from retrieval.extract.inputs import parquet_columns
    from retrieval.index.params import choose_nlist, choose_params
    from retrieval.search.coarse import shard_shortlist

    cfg = config.load()
    assert choose_params(1_000_000, 128, cfg).nlist == choose_nlist(1_000_000)
    assert choose_params(1_000_000, 128, cfg.with_overrides({"index.nlist": 256})).nlist == 256
    assert task_threads("auto") >= 1 and task_threads(3) == 3
    assert shard_shortlist(200, 2, "auto") == shard_shortlist(200, 2, 0) < 200
    assert shard_shortlist(200, 2, 150) == 150
    schema = pa.schema([("image_id", pa.string()), ("jpg", pa.binary()), ("name", pa.string())])
    assert parquet_columns(schema, "auto", "auto", "x") == ("image_id", "jpg")
    assert parquet_columns(schema, "name", "auto", "x") == ("name", "jpg")
