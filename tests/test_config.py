"""Run configuration: YAML + overrides, defaults, and one-line errors that name the key."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from llamaforge.config import (
    DEFAULT_TARGETS,
    ConfigError,
    RunConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_resolved,
    validate,
)
from llamaforge.model.config import ConfigError as ModelConfigError

MINIMAL = """\
model: tiny-llama2
method: full
data:
  path: data/train.jsonl
  format: alpaca
output_dir: runs/test
max_steps: 10
"""


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_file_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert (cfg.model, cfg.method, cfg.output_dir, cfg.max_steps) == (
        "tiny-llama2",
        "full",
        "runs/test",
        10,
    )
    assert (cfg.data.path, cfg.data.format, cfg.data.max_seq_len) == (
        "data/train.jsonl",
        "alpaca",
        1024,
    )
    assert (cfg.stage, cfg.precision, cfg.seed, cfg.epochs) == ("sft", "auto", 0, 1.0)
    assert (
        cfg.optim.lr == 2e-4 and cfg.optim.betas == [0.9, 0.999] and cfg.optim.schedule == "cosine"
    )
    assert cfg.lora.targets == DEFAULT_TARGETS and cfg.lora.targets is not DEFAULT_TARGETS
    assert cfg.eval.every is None and cfg.eval.generate.metrics == ["exact_match", "rouge_l"]
    assert (cfg.checkpoint.keep, cfg.checkpoint.resume) == (2, "auto")
    assert cfg.logging.tensorboard and cfg.data.columns == {} and cfg.freeze.train_layers == []


def test_default_output_dir_is_timestamped():
    cfg = config_from_dict({"model": "m", "data": {"path": "d"}})
    assert cfg.output_dir.startswith("runs/") and len(cfg.output_dir) > len("runs/")


def test_overrides_reach_nested_keys(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "optim.lr=1e-3",
            "data.packing=true",
            "lora.targets=[q_proj, v_proj]",
            "eval.generate.max_new_tokens=64",
            "max_steps=null",
            "qlora.blocksize=128",
            "data.columns={instruction: question}",
            "model=other",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.packing is True and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.eval.generate.max_new_tokens == 64 and cfg.max_steps is None
    assert cfg.qlora.blocksize == 128 and cfg.data.columns == {"instruction": "question"}
    assert cfg.model == "other" and cfg.data.path == "data/train.jsonl"  # siblings kept


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  format: alpaca", "  pth: x"))
    assert error_of(path) == f"{path}:5: unknown key 'data.pth' (did you mean 'data.path'?)"
    top = write(tmp_path, MINIMAL + "max_step: 3\n", "top.yaml")
    assert error_of(top) == f"{top}:8: unknown key 'max_step' (did you mean 'max_steps'?)"


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, MINIMAL + "optim:\n  grad_accum: 2\n  lr: fast\n")
    assert error_of(path) == f"{path}:10: key 'optim.lr': expected a number, got 'fast'"


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, MINIMAL + "optim:\n  lr: [1, 2\n  eps: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}:") and "YAML syntax error" in message
    line = int(message.split(":")[1])
    assert line in (10, 11)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL + "max_steps: 3\n")
    assert error_of(path) == f"{path}:8: duplicate key 'max_steps' (first at line 7)"


def test_missing_required_keys(tmp_path):
    assert "missing required key 'model'" in error_of(write(tmp_path, "data: {path: x}\n"))
    message = error_of(write(tmp_path, "model: m\ndata:\n  format: text\n", "b.yaml"))
    assert message.endswith(":2: missing required key 'data.path'")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=fast", "key 'optim.lr': expected a number, got 'fast'"),
        ("data.pth=x", "unknown key 'data.pth' (did you mean 'data.path'?)"),
        ("stage=kto", "key 'stage': expected one of pt, sft, rm, dpo, ppo, rs, got 'kto'"),
        ("lora.r=2.5", "key 'lora.r': expected an integer, got 2.5"),
        ("seed=true", "key 'seed': expected an integer, got true"),
        ("logging.plot=maybe", "key 'logging.plot': expected true or false, got 'maybe'"),
        ("checkpoint.keep=0", "key 'checkpoint.keep': must be >= 1, got 0"),
        ("optim.betas=[0.9]", "key 'optim.betas': must be two numbers in [0, 1)"),
        ("eval.every=null", None),
        ("max_steps=ten", "key 'max_steps': expected an integer or null, got 'ten'"),
        ("lora.targets=q_proj", "key 'lora.targets': expected a list, got 'q_proj'"),
        ("freeze.train_layers=[1, x]", "key 'freeze.train_layers[1]': expected an integer"),
        ("data=3", "key 'data': expected a mapping, got 3"),
        ("device=gpu", "key 'device': must be cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("data.val_size=0.7", None),
        ("noequals", "override 'noequals': expected key=value"),
    ],
)
def test_override_errors_name_the_key(tmp_path, override, expected):
    path = write(tmp_path, MINIMAL)
    if expected is None:
        load_config(path, [override])
        return
    message = error_of(path, [override])
    assert expected in message
    if "=" in override:
        assert message.startswith(f"override '{override}': ")


def test_cross_key_rule_names_keys(tmp_path):
    path = write(tmp_path, MINIMAL)
    message = error_of(path, ["data.val_size=0.6", "data.test_size=0.5"])
    assert "'data.val_size' + 'data.test_size' must be < 1" in message


def test_yaml_quirks_are_accepted(tmp_path):
    # PyYAML reads 2e-4 (no dot) as a string; an int is fine where a float is expected.
    cfg = load_config(write(tmp_path, MINIMAL + "optim:\n  lr: 2e-4\n  max_grad_norm: 1\n"))
    assert cfg.optim.lr == 2e-4 and cfg.optim.max_grad_norm == 1.0


def test_top_level_must_be_a_mapping_and_file_must_exist(tmp_path):
    assert "expected a mapping of keys at the top level" in error_of(write(tmp_path, "- a\n"))
    assert "no such config file" in error_of(tmp_path / "nope.yaml")


def test_config_error_is_caught_by_the_cli_handler():
    assert issubclass(ConfigError, ModelConfigError) and issubclass(ConfigError, ValueError)


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["optim.lr=0.001", "eval.patience=3"])
    out = save_resolved(cfg, tmp_path / "out")
    assert out == tmp_path / "out" / "config.yaml"
    assert yaml.safe_load(out.read_text()) == cfg.to_dict()
    assert load_config(out) == cfg


def test_train_config_view():
    cfg = config_from_dict({"model": "m", "data": {"path": "d"}, "max_steps": 5, "seed": 3})
    view = cfg.train_config()
    assert isinstance(view, TrainConfig) and isinstance(cfg, RunConfig)
    assert (view.max_steps, view.seed, view.optim) == (5, 3, cfg.optim)


def test_validate_checks_configs_built_in_code():
    cfg = TrainConfig()
    validate(cfg)
    cfg.optim.grad_accum = 0
    with pytest.raises(ConfigError, match="<TrainConfig>: key 'optim.grad_accum': must be >= 1"):
        validate(cfg)
