"""settings.TrainSettings.from_argv: settings that would silently mean something else are errors (or, for a
partial model_config, merged with the defaults), each naming the key and where it came from. No run starts."""
import dataclasses
import os

import pytest

from configurator import ConfigError
from model import MoEConfig
from settings import TrainSettings


def parse(*argv):
    return TrainSettings.from_argv(list(argv))


def error(*argv):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    return str(err.value)


def test_a_partial_model_config_changes_only_the_keys_it_names():
    s, sources = parse("--model_config={'n_layers': 2}")
    default = TrainSettings().model_config
    assert s.model_config == {**default, "n_layers": 2}
    assert s.model_config["hidden_size"] == 128 and s.model_config["vocab_size"] == 4096  # not MoEConfig's defaults
    assert sources["model_config"] == "command line"


def test_model_config_merge_is_said_in_help(capsys):
    with pytest.raises(SystemExit) as err:
        parse("--help")
    assert err.value.code == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("  --model_config="))
    assert "changes the keys it names" in line


def test_unknown_model_config_key_lists_the_moe_config_fields():
    msg = error("--model_config={'n_layer': 2}")
    assert "['n_layer'] are not MoEConfig fields" in msg and "model_config (command line)" in msg
    assert all(f.name in msg for f in dataclasses.fields(MoEConfig))


def test_anchor_lang_among_the_training_languages_is_an_error():
    msg = error("--anchor_lang=sw")
    assert "anchor_lang='sw' (command line) is one of train_langs=" in msg


@pytest.mark.parametrize("arg", ["--model_config={'n_layers': 2}", "--pretrain_iters=10", "--pretrain_lr=1e-3",
                                 "--pretrain_target_fraction=0.5"])
def test_scratch_only_settings_with_a_checkpoint_are_an_error(arg):
    key = arg[2:].split("=")[0]
    msg = error("--init_from=/some/ckpt", arg)
    assert f"{key} (command line) apply to init_from='scratch' only" in msg


def test_scratch_only_settings_left_at_their_defaults_are_fine_with_a_checkpoint():
    s, _ = parse("--init_from=/some/ckpt")  # (the dir is read later, by train.py)
    assert s.init_from == "/some/ckpt"


def test_scratch_only_setting_from_a_config_file_names_its_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text('init_from = "/ckpt"\n\npretrain_iters = 5\n')
    assert f"pretrain_iters ({cfg}:3) apply to init_from='scratch' only" in error(str(cfg))


def test_out_dir_tilde_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    s, _ = parse("--out_dir=~/runs/x", "--data_path=~/d.jsonl", "--tokenizer_path=~/t.tiktoken")
    assert s.out_dir == os.path.join(str(tmp_path), "runs", "x")
    assert (s.data_path, s.tokenizer_path) == (f"{tmp_path}/d.jsonl", f"{tmp_path}/t.tiktoken")
    assert parse("--init_from=~/ckpt")[0].init_from == f"{tmp_path}/ckpt"


def test_out_dir_empty_or_a_file_is_an_error(tmp_path):
    assert "out_dir='' (command line): is empty" in error("--out_dir=")
    f = tmp_path / "file"
    f.write_text("x")
    assert f"out_dir='{f}' (command line): exists and is a file" in error(f"--out_dir={f}")


@pytest.mark.parametrize("key", ["weight_decay", "lambda_js", "lr", "grad_clip", "warmup_frac", "peak_tflops"])
@pytest.mark.parametrize("value", ["1e999", "-1e999"])
def test_every_float_setting_must_be_finite(key, value):
    msg = error(f"--{key}={value}")
    assert f"{key}={float(value)!r} (command line): must be finite" in msg


def test_nan_from_a_config_file_is_an_error_naming_its_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text('lr = float("nan")\n')
    assert f"lr=nan ({cfg}:1): must be finite" in error(str(cfg))


def test_every_float_setting_is_covered_by_the_finite_rule():
    """A float setting added later is covered too: the rule is over the dataclass, not a list."""
    floats = [f.name for f in dataclasses.fields(TrainSettings) if isinstance(getattr(TrainSettings(), f.name), float)]
    assert len(floats) >= 10
    for key in floats:
        assert "must be finite" in error(f"--{key}=1e999"), key


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 2 ** 64])
def test_seed_out_of_torch_range_is_an_error(seed):
    assert f"seed={seed} (command line): must be in [0, " in error(f"--seed={seed}")


def test_largest_seed_is_usable_by_torch():
    import torch
    s, _ = parse(f"--seed={2 ** 63 - 1}")
    torch.manual_seed(s.seed + 7)  # + rank
    torch.Generator().manual_seed(s.seed + 1000)  # + epoch (data.parallel.step_batches)
