"""Config validation: every mistake is a one-line error naming the key, what was given and what is allowed."""

import pytest

import kdkit
from kdkit.api import validate
from kdkit.config import dump_config, load_config
from kdkit.errors import KdkitError


def _msg(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_defaults_and_overrides():
    cfg = load_config({"out_dir": "x"}, ["method.temperature=2", "train.epochs=3", "data.batch_size=32"])
    assert cfg.method.options() == {"temperature": 2}
    assert cfg.train.epochs == 3 and cfg.data.batch_size == 32


def test_unknown_top_level_key():
    with pytest.raises(KdkitError) as e:
        load_config({"trian": {}})
    assert "trian" in _msg(e) and "train" in _msg(e)


def test_unknown_nested_key_lists_allowed():
    with pytest.raises(KdkitError) as e:
        load_config({"train": {"lrr": 0.1}})
    msg = _msg(e)
    assert "train.lrr" in msg and "lr" in msg and "epochs" in msg


def test_wrong_type_names_path_and_value():
    with pytest.raises(KdkitError) as e:
        load_config({}, ["train.epochs=many"])
    msg = _msg(e)
    assert "train.epochs" in msg and "many" in msg


def test_bad_value_and_choice():
    with pytest.raises(KdkitError) as e:
        load_config({"train": {"lr": -1}})
    assert "train.lr" in _msg(e)
    with pytest.raises(KdkitError) as e:
        load_config({"train": {"optimizer": "rmsprop"}})
    assert "train.optimizer" in _msg(e) and "sgd" in _msg(e)


def test_unknown_method_option_fails_before_work(tmp_path):
    cfg = load_config({"out_dir": str(tmp_path / "r"), "student": {"name": "mlp"},
                       "teacher": {"name": "mlp", "checkpoint": str(tmp_path)},
                       "method": {"name": "kd", "temprature": 2}})
    with pytest.raises(KdkitError) as e:
        validate(cfg, "distill")
    msg = _msg(e)
    assert "temprature" in msg and "temperature" in msg
    assert not (tmp_path / "r").exists()


def test_unknown_model_option_and_name():
    cfg = load_config({"out_dir": "x", "model": {"name": "mlp", "hiden": [3]}})
    with pytest.raises(KdkitError) as e:
        validate(cfg, "train")
    assert "hiden" in _msg(e) and "hidden" in _msg(e)
    cfg = load_config({"out_dir": "x", "model": {"name": "mpl"}})
    with pytest.raises(KdkitError) as e:
        validate(cfg, "train")
    assert "mpl" in _msg(e) and _msg(e).index("mlp") < _msg(e).index("cnn_large")  # closest first


def test_unknown_dataset_lists_known():
    cfg = load_config({"out_dir": "x", "model": {"name": "mlp"}, "data": {"name": "cifar"}})
    with pytest.raises(KdkitError) as e:
        validate(cfg, "train")
    assert "cifar" in _msg(e) and "digits" in _msg(e) and "fashion_mnist" in _msg(e)


def test_missing_and_invalid_yaml_file(tmp_path):
    with pytest.raises(KdkitError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(KdkitError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config({"out_dir": "x", "model": {"name": "mlp", "hidden": [8]}}, ["train.lr=0.5"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = kdkit.load_config(path)
    assert again == cfg and again.model.options() == {"hidden": [8]}
