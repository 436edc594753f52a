"""configurator.py: config files and --key=value overrides, with errors that name key and source."""
import pytest

from configurator import ConfigError, at_least, configure, in_range, one_of, validate

DEFAULTS = dict(lr=1e-3, epochs=8, name="toy", langs=["sw"], band=(1, 2), flag=False, cfg=dict(a=1))


def test_overrides_in_order_with_sources(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("# comment\nlr = 2e-5\nepochs = 2\n_private = 3\nimport math\n")
    s, src = configure([str(f), "--epochs=3", "--name=phi", "--band=[7, 34]", "--flag=True"], DEFAULTS)
    assert s == dict(DEFAULTS, lr=2e-5, epochs=3, name="phi", band=(7, 34), flag=True)
    assert src["lr"] == f"{f}:2" and src["epochs"] == "command line" and src["cfg"] == "default"


def test_key_space_value_form():
    s, _ = configure(["--epochs", "3", "--name", "a b"], DEFAULTS)
    assert s["epochs"] == 3 and s["name"] == "a b"


def test_int_for_float_and_str_text_verbatim():
    s, _ = configure(["--lr=1", "--name=42"], DEFAULTS)
    assert s["lr"] == 1.0 and type(s["lr"]) is float and s["name"] == "42"


@pytest.mark.parametrize("arg, pattern", [
    ("--lrr=1", r"command line: unknown config key 'lrr'.*valid keys: band, cfg"),
    ("--epochs=2.5", r"epochs=2.5 is a float, expected int"),
    ("--flag=1", r"flag=1 is a int, expected bool"),
    ("--epochs", r"expected --key=value"),
    ("epochs=3", r"neither a config file"),
])
def test_errors_name_the_culprit(arg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        configure([arg], DEFAULTS)


def test_config_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = 1e-3\nepochs = (2\n")
    with pytest.raises(ConfigError, match=rf"{bad}:2: syntax error"):
        configure([str(bad)], DEFAULTS)
    boom = tmp_path / "boom.py"
    boom.write_text("lr = 1e-3\n\nepochs = 1 // 0\n")
    with pytest.raises(ConfigError, match=rf"{boom}:3: ZeroDivisionError"):
        configure([str(boom)], DEFAULTS)
    typo = tmp_path / "typo.py"
    typo.write_text("lr = 1e-3\nepoch = 2\n")
    with pytest.raises(ConfigError, match=rf"{typo}:2: unknown config key 'epoch'"):
        configure([str(typo)], DEFAULTS)
    with pytest.raises(ConfigError, match="cannot be read"):
        configure([str(tmp_path / "missing.py")], DEFAULTS)


def test_validate_reports_every_problem_with_its_source(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("name = 'bf16'\n")
    s, src = configure([str(f), "--epochs=-24", "--lr=0.0"], DEFAULTS)
    rules = dict(name=one_of("float32", "bfloat16"), epochs=at_least(1), lr=in_range(0, 1, lo_open=True))
    with pytest.raises(ConfigError) as err:
        validate(s, src, rules)
    msg = str(err.value)
    assert f"name='bf16' ({f}:1): must be one of ['float32', 'bfloat16']" in msg
    assert "epochs=-24 (command line): must be >= 1" in msg and "lr=0.0 (command line): must be in (0, 1]" in msg
    validate(DEFAULTS | dict(name="float32"), {}, rules)  # fine: no error


def test_renamed_key_says_what_to_use():
    with pytest.raises(ConfigError, match="'old' was renamed: use new"):
        configure(["--old=1"], DEFAULTS, renamed=dict(old="use new"))


# -----------------------------------------------------------------------------
# --help: the script's docstring and its settings with defaults, exit 0 (not "expected --key=value")

def test_help_lists_docstring_settings_and_comments(capsys):
    with pytest.raises(SystemExit) as err:
        configure(["--lr=2", "--help"], DEFAULTS, doc="My script.\n\n    python my.py --lr=1",
                  comments=dict(lr="the learning rate"))
    assert err.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("My script.") and "python my.py --lr=1" in text
    assert "  --lr=0.001  # the learning rate\n" in text and "  --band=(1, 2)\n" in text and "  --cfg={'a': 1}" in text


def test_inline_comments_are_read_from_the_file(tmp_path):
    from configurator import inline_comments
    f = tmp_path / "s.py"
    f.write_text('a = 1  # first\nb: int = 2  # second, with "quotes" # and a hash\nc = "#not a comment"\n# d = 4\n')
    assert inline_comments(f) == {"a": "first", "b": 'second, with "quotes" # and a hash'}


@pytest.mark.parametrize("script, expect", [
    ("train.py", ["SARA fine-tuning", "--lambda_js=1.0  # lambda_JS", "--sara_band=(1, 2)", "--method='sara'"]),
    ("sample.py", ["Chat with a checkpoint", "--checkpoint=''  # HF checkpoint directory", "--top_p=1.0"]),
])
def test_scripts_print_help(script, expect):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, script, "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for text in expect:
        assert text in res.stdout, (text, res.stdout[-3000:])
    assert "expected --key=value" not in res.stdout + res.stderr
