"""Training config values outside what the trainer can use are refused when the config is read,
before any data is cached or weights loaded (they used to divide by zero after compiling, train
NaN weights, or train nothing and exit 0)."""

from __future__ import annotations

import pytest

from lens_jax.errors import InputError
from lens_jax.tools import cli
from lens_jax.training.config import RANGES, load_config


@pytest.mark.parametrize("override, words", [
    ("train.steps=-1", "train.steps=-1 must be an integer >= 1"),
    ("train.steps=0", "train.steps=0 must be an integer >= 1"),
    ("train.log_every=0", "train.log_every=0 must be an integer >= 1"),
    ("optim.learning_rate=nan", "optim.learning_rate=nan must be a finite number > 0"),
    ("optim.learning_rate=-1e-4", "optim.learning_rate=-0.0001 must be a finite number > 0"),
    ("optim.b2=1.5", "optim.b2=1.5 must be a finite number >= 0 and <= 1"),
    ("optim.clip_norm=0", "optim.clip_norm=0"),
    ("lora.multiplier=inf", "lora.multiplier=inf must be a finite number."),
    ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
    ('model.compute_dtype="float9"', "model.compute_dtype='float9' is unknown; choose one of bfloat16"),
])
def test_out_of_range_values_are_named_when_the_config_is_read(override, words):
    with pytest.raises(InputError) as e:
        load_config(None, [override])
    assert words in str(e.value), str(e.value)


def test_defaults_and_unset_optionals_pass_and_every_range_names_a_real_key():
    cfg = load_config(None, ["optim.clip_norm=none", "optim.ema_decay=none", "train.checkpoint_every=0",
                             "sample.every=0", "optim.learning_rate=3e-4"])
    assert cfg.optim.clip_norm is None and cfg.optim.learning_rate == 3e-4
    for key in RANGES:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_train_command_refuses_before_caching(tmp_path, capsys):
    # data.image_dir does not exist: had the value check come later, the error would be about the folder
    argv = ["train", "--set", "train.log_every=0", "--set", f'data.image_dir="{tmp_path / "none"}"',
            "--set", f'data.cache_dir="{tmp_path / "cache"}"']
    assert cli.main(argv) == 2
    assert "train.log_every=0" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
