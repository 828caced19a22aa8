"""The CLI names every verb it has; validate() applies the loop's cross-checks to TrainConfig."""

from __future__ import annotations

import pytest

from llamaforge import cli
from llamaforge.config import ConfigError, TrainConfig, validate
from llamaforge.errors import UserError


def test_docstring_lists_every_verb():
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    assert set(verbs) == set(cli.COMMANDS)
    listed = cli.__doc__.split("Verbs:", 1)[1]
    for verb in verbs:
        assert verb in listed, verb


def test_train_config_cross_checks_run_in_validate():
    with pytest.raises(ConfigError, match="activation_offload"):
        validate(TrainConfig(activation_offload=True))
    validate(TrainConfig(activation_checkpointing=True, activation_offload=True))


def test_user_errors_share_one_base_class():
    from llamaforge.data.sources import DataError
    from llamaforge.data.templates import TemplateError
    from llamaforge.io.peft import AdapterError
    from llamaforge.train.loop import NonFiniteLossError

    for cls in (ConfigError, DataError, TemplateError, AdapterError, NonFiniteLossError):
        assert issubclass(cls, UserError)
