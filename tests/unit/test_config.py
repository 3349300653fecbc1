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
