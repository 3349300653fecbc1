"""The fault-injection hook is a test hook read from the environment, not a config section."""
import pytest

from retrieval import config, faults


def test_off_unless_the_environment_asks():
    assert faults.configured({}) is None and faults.configured({faults.ENV: "  "}) is None
    assert "faults" not in config.defaults()
    with pytest.raises(config.ConfigError, match="unknown config key 'faults.stage'.*RETRIEVAL_FAULTS"):
        config.load(sets=["faults.stage=index"])


def test_the_environment_names_stage_task_kind_and_items():
    assert faults.configured({faults.ENV: "stage=index,task=1,kind=kill,after_items=500"}) == {
        "stage": "index", "task": 1, "kind": "kill", "after_items": 500}
    assert faults.configured({faults.ENV: "stage=search,task=0"}) == {
        "stage": "search", "task": 0, "kind": "raise", "after_items": 0}


@pytest.mark.parametrize("value", ["stage=index", "task=1", "stage=fit,task=1", "stage=index,task=x",
                                   "stage=index,task=1,kind=explode", "stage=index,task=1,colour=red",
                                   "stage=index,task=1,after_items=-1", "index"])
def test_a_malformed_value_is_an_error_naming_the_variable(value):
    with pytest.raises(ValueError, match=faults.ENV):
        faults.configured({faults.ENV: value})


def test_outside_a_spark_task_nothing_fails():
    fault = faults.configured({faults.ENV: "stage=index,task=1"})
    faults.maybe_fail(fault, "index", 1, 10)      # the driver / local engine: nobody would retry
