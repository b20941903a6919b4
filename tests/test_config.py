"""The run configuration (shared.config): pyproject defaults, coercion, validation."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import ConfigError, RunConfig, parse_overrides

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
KNOWN_KEYS = tuple(f.name.replace("_", "-") for f in dataclasses.fields(RunConfig))


def _pyproject_defaults() -> dict:
    with PYPROJECT.open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


# -- defaults ---------------------------------------------------------------------------

def test_defaults_have_exactly_the_pyproject_keys():
    # Arrange
    pyproject = _pyproject_defaults()

    # Act
    ours = RunConfig().to_flower()

    # Assert
    assert sorted(ours) == sorted(pyproject)
    assert sorted(KNOWN_KEYS) == sorted(pyproject)


def test_defaults_have_the_pyproject_values_and_types():
    # Arrange
    pyproject = _pyproject_defaults()

    # Act
    ours = RunConfig().to_flower()

    # Assert: every key both ways, equal values, and the TOML scalar type (no int vs bool slip)
    for key, value in pyproject.items():
        assert ours[key] == value, key
        assert type(ours[key]) is type(value), key
    for key, value in ours.items():
        assert pyproject[key] == value, key


def test_empty_mapping_gives_the_defaults():
    # Arrange / Act
    cfg = RunConfig.from_mapping({})

    # Assert
    assert cfg == RunConfig()


def test_tiny_cfg_fixture_is_valid(tiny_cfg):
    assert tiny_cfg.model == "tiny"
    assert RunConfig.from_mapping(tiny_cfg.to_flower()) == tiny_cfg


# -- coercion -----------------------------------------------------------------------------

def test_from_mapping_coerces_strings():
    # Arrange
    raw = {"num-rounds": "3", "dp": "false", "target-delta": "1e-5", "learning-rate": " 0.5 ",
           "lora-alpha": "4", "model": "tiny"}

    # Act
    cfg = RunConfig.from_mapping(raw)

    # Assert
    assert cfg.num_rounds == 3 and type(cfg.num_rounds) is int
    assert cfg.dp is False
    assert cfg.target_delta == 1e-5
    assert cfg.learning_rate == 0.5
    assert cfg.lora_alpha == 4.0 and type(cfg.lora_alpha) is float
    assert cfg.model == "tiny"


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False),
])
def test_bool_words(text, expected):
    assert RunConfig.from_mapping({"dp": text, "noise-multiplier": "1.0"}).dp is expected


def test_snake_case_keys_are_accepted():
    cfg = RunConfig.from_mapping({"num_rounds": 2, "lora_scheme": "fedavg"})

    assert cfg.num_rounds == 2
    assert cfg.lora_scheme == "fedavg"


def test_integral_float_becomes_int_but_fraction_is_rejected():
    assert RunConfig.from_mapping({"seq-len": 32.0}).seq_len == 32
    with pytest.raises(ConfigError, match="seq-len"):
        RunConfig.from_mapping({"seq-len": 32.5})


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="'num-round'"):
        RunConfig.from_mapping({"num-round": "3"})


@pytest.mark.parametrize("key,value", [
    ("num-rounds", "0"),
    ("num-rounds", "-1"),
    ("num-rounds", "three"),
    ("num-rounds", "2.5"),
    ("test-fraction", "1.5"),
    ("test-fraction", "0"),
    ("test-fraction", "nan"),
    ("cold-start-fraction", "1"),
    ("personas", "foo"),
    ("lora-scheme", "fedprox"),
    ("server-optimizer", "sgd"),
    ("dtype", "float16"),
    ("device", "tpu"),
    ("dp", "maybe"),
    ("noise-multiplier", "nan"),
    ("noise-multiplier", "inf"),
    ("noise-multiplier", "-1"),
    ("noise-multiplier", "0"),  # with dp on (the default)
    ("learning-rate", "0"),
    ("learning-rate", "nan"),
    ("target-delta", "1"),
    ("target-delta", "0"),
    ("lora-targets", " , "),
    ("max-users", "-1"),
    ("model", 3),
    ("batch-size", True),
])
def test_bad_values_raise_config_error(key, value):
    with pytest.raises(ConfigError):
        RunConfig.from_mapping({key: value})


def test_error_names_the_setting():
    with pytest.raises(ConfigError, match="test-fraction"):
        RunConfig.from_mapping({"test-fraction": "1.5"})
    with pytest.raises(ConfigError, match="personas"):
        RunConfig.from_mapping({"personas": "foo"})


def test_zero_noise_is_fine_without_dp():
    cfg = RunConfig.from_mapping({"dp": "false", "noise-multiplier": "0"})

    assert cfg.dp is False and cfg.noise_multiplier == 0.0


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig(num_rounds=0)


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize("key", ["max-grad-norm", "lora-alpha", "learning-rate",
                                 "user-learning-rate", "server-learning-rate"])
def test_infinite_positive_settings_are_rejected(key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping({key: "inf"})


def test_huge_integer_for_a_float_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="learning-rate"):
        RunConfig.from_mapping({"learning-rate": 10**400})


# -- derived values ----------------------------------------------------------------------

def test_comma_lists_are_split_and_stripped():
    cfg = RunConfig(lora_targets=" q_proj, ,v_proj ", cold_start_plays="a,b ,")

    assert cfg.lora_target_modules == ("q_proj", "v_proj")
    assert cfg.cold_start_play_ids == ("a", "b")


def test_federation_key_depends_on_adapter_shape_not_on_rounds():
    base = RunConfig()

    assert base.federation_key == RunConfig().federation_key
    assert len(base.federation_key) == 16
    assert base.replace(num_rounds=9).federation_key == base.federation_key
    assert base.replace(lora_rank=4).federation_key != base.federation_key
    assert base.replace(seed=1).federation_key != base.federation_key


# -- overrides and round trips -----------------------------------------------------------

def test_parse_overrides():
    # Arrange
    pairs = ["num-rounds=3", " dp = false ", "lora-targets=q_proj,v_proj", "run-dir="]

    # Act
    out = parse_overrides(pairs)

    # Assert
    assert out == {"num-rounds": "3", "dp": "false", "lora-targets": "q_proj,v_proj",
                   "run-dir": ""}


def test_parse_overrides_splits_on_the_first_equals_only():
    assert parse_overrides(["data-dir=/a=b"]) == {"data-dir": "/a=b"}


@pytest.mark.parametrize("pair", ["num-rounds", "=3", " =3", ""])
def test_parse_overrides_rejects_malformed_pairs(pair):
    with pytest.raises(ConfigError):
        parse_overrides([pair])


def test_overrides_feed_from_mapping():
    cfg = RunConfig.from_mapping(parse_overrides(["num-rounds=3", "dp=false"]))

    assert (cfg.num_rounds, cfg.dp) == (3, False)


def test_to_flower_round_trip_of_non_defaults():
    # Arrange
    cfg = RunConfig(model="tiny", personas="play", num_rounds=2, dp=False, noise_multiplier=0.0,
                    lora_scheme="fedavg", server_optimizer="fedadam", target_delta=1e-6,
                    lora_targets="q_proj", seed=7, dtype="bfloat16", device="cpu")

    # Act
    flower = cfg.to_flower()
    back = RunConfig.from_mapping(flower)

    # Assert
    assert back == cfg
    assert all(isinstance(v, (str, int, float, bool)) for v in flower.values())


def test_to_flower_round_trip_through_strings():
    cfg = RunConfig(num_rounds=5, test_fraction=0.25, dp=False, target_delta=3e-7)

    back = RunConfig.from_mapping({k: str(v) for k, v in cfg.to_flower().items()})

    assert back == cfg


def _accepted_value(key, value):
    """The setting's value when ``{key: value}`` is accepted (which must then hold a value
    of the setting's declared type), else ``None``; any error but ConfigError propagates."""
    try:
        cfg = RunConfig.from_mapping({key: value})
    except ConfigError:
        return None
    field_value = getattr(cfg, key.replace("-", "_"))
    assert type(field_value) is type(getattr(RunConfig, key.replace("-", "_")))
    return field_value


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KNOWN_KEYS), value=st.text(max_size=30))
def test_from_mapping_raises_only_config_error_for_any_text(key, value):
    _accepted_value(key, value)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(KNOWN_KEYS),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=True, allow_infinity=True)))
def test_from_mapping_raises_only_config_error_for_scalars(key, value):
    field_value = _accepted_value(key, value)
    # an accepted number is the number given (a bool or string setting reads it its way)
    if field_value is not None and isinstance(value, (int, float)) and \
            not isinstance(value, bool) and not isinstance(field_value, (bool, str)):
        assert field_value == value


@given(value=st.floats(min_value=1e-9, max_value=1e9))
def test_float_settings_survive_a_string_round_trip(value):
    cfg = RunConfig.from_mapping({"learning-rate": repr(value)})

    assert cfg.learning_rate == value
    assert math.isfinite(cfg.learning_rate)


@pytest.mark.parametrize("seed", [-1, 2**31])
def test_seed_out_of_range_is_rejected(seed):
    with pytest.raises(ConfigError, match="seed"):
        RunConfig(seed=seed)


def test_infinite_budget_means_no_budget():
    assert RunConfig(target_epsilon=float("inf")).target_epsilon == float("inf")


# -- sections ---------------------------------------------------------------------------

def test_every_setting_belongs_to_a_known_section():
    from shared.config import SECTIONS

    sections = {spec.name: spec.metadata.get("section") for spec in dataclasses.fields(RunConfig)}

    assert set(sections.values()) <= set(SECTIONS)
    assert None not in sections.values()
    assert set(SECTIONS) <= set(sections.values())  # no section left empty


def test_training_and_other_keys_partition_the_settings():
    training = RunConfig.section_keys(training_input=True)
    other = RunConfig.section_keys(training_input=False)

    assert training.isdisjoint(other)
    assert training | other == set(RunConfig().to_flower())
    # what a device computes with is hashed; where the run lives and what the server does
    # with the replies are not
    assert {"lora-rank", "noise-multiplier", "learning-rate", "seed", "model"} <= training
    assert {"run-dir", "num-rounds", "server-learning-rate", "user-steps",
            "round-eval-users"} <= other


def test_the_instruction_digest_follows_the_sections():
    from flwr.app import ConfigRecord, RecordDict

    from client.replay import NOT_TRAINING_INPUTS, content_digest

    def digest(cfg):
        return content_digest(RecordDict({"config": ConfigRecord(cfg.to_flower())}),
                              config_ignore=NOT_TRAINING_INPUTS)

    base = RunConfig()
    assert digest(base.replace(round_eval_users=0)) == digest(base)
    assert digest(base.replace(server_learning_rate=0.5)) == digest(base)
    assert digest(base.replace(lora_rank=4)) != digest(base)
    assert digest(base.replace(secagg_max_weight=512)) != digest(base)
