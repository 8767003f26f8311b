"""configurator.parse_config: config files and --key=value overrides, nanoGPT style, with one-line errors."""

import pytest

from configurator import ConfigError, UserError, main_guard, parse_config

DEFAULTS = dict(learning_rate=3e-4, max_iters=100, compile=False, dataset='shakespeare', data_dir='',
                dropout=0.0, seed=None, betas=(0.9, 0.95))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_args_returns_a_copy_of_the_defaults():
    cfg = parse_config([], DEFAULTS)
    assert cfg == DEFAULTS and cfg is not DEFAULTS


def test_overrides_are_typed_and_defaults_untouched():
    before = dict(DEFAULTS)
    cfg = parse_config(['--learning_rate=1e-3', '--max_iters=5', '--dataset=tinystories', '--compile=True'], DEFAULTS)
    assert cfg['learning_rate'] == 1e-3 and cfg['max_iters'] == 5 and cfg['dataset'] == 'tinystories'
    assert cfg['compile'] is True
    assert DEFAULTS == before


def test_files_and_overrides_apply_in_order(tmp_path):
    conf = write(tmp_path, 'c.py', "import math\n_private = 1\nmax_iters = 2 * 10\n"
                                   "def helper(): pass\nclass K: pass\nlearning_rate = math.sqrt(4) / 1000\n")
    cfg = parse_config([conf, '--max_iters=7'], DEFAULTS)
    assert cfg['max_iters'] == 7 and cfg['learning_rate'] == 0.002
    cfg = parse_config(['--max_iters=7', conf], DEFAULTS)
    assert cfg['max_iters'] == 20  # a later file wins over an earlier override


def test_config_file_runs_in_a_fresh_namespace(tmp_path):
    conf = write(tmp_path, 'c.py', "max_iters = max_iters + 1\n")  # defaults are not visible inside
    with pytest.raises(ConfigError, match=r"c\.py line 1: NameError"):
        parse_config([conf], DEFAULTS)


def test_value_parsing_rules():
    # int where float expected is converted; a whole float is accepted for an int key
    assert parse_config(['--dropout=1'], DEFAULTS)['dropout'] == 1.0
    assert isinstance(parse_config(['--dropout=1'], DEFAULTS)['dropout'], float)
    assert parse_config(['--max_iters=1e4'], DEFAULTS)['max_iters'] == 10000
    # bools: the spellings people type
    for text, want in [('True', True), ('false', False), ('1', True), ('0', False), ('TRUE', True)]:
        assert parse_config([f'--compile={text}'], DEFAULTS)['compile'] is want
    # a str key takes any text, even one that parses as a number
    assert parse_config(['--data_dir=2024'], DEFAULTS)['data_dir'] == '2024'
    assert parse_config(["--dataset='quoted'"], DEFAULTS)['dataset'] == 'quoted'
    # a None default takes anything: a literal when it parses, else the raw string
    assert parse_config(['--seed=3'], DEFAULTS)['seed'] == 3
    assert parse_config(['--seed=abc'], DEFAULTS)['seed'] == 'abc'
    assert parse_config(['--betas=[0.8, 0.9]'], DEFAULTS)['betas'] == (0.8, 0.9)


@pytest.mark.parametrize('arg, pattern', [
    ('--max_iters=abc', r"config key 'max_iters' expects an int, got 'abc'"),
    ('--max_iters=1.5', r"config key 'max_iters' expects an int, got '1.5'"),
    ('--learning_rate=fast', r"config key 'learning_rate' expects a float, got 'fast'"),
    ('--compile=yes', r"config key 'compile' expects a bool \(True/False\), got 'yes'"),
    ('--max_iters=True', r"config key 'max_iters' expects an int"),
])
def test_wrong_types_name_key_type_and_value(arg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config([arg], DEFAULTS)


def test_wrong_type_in_file(tmp_path):
    conf = write(tmp_path, 'c.py', "compile = 'yes'\n")
    with pytest.raises(ConfigError, match=r"'compile' expects a bool .*'yes' \(in .*c\.py\)"):
        parse_config([conf], DEFAULTS)


def test_unknown_keys():
    with pytest.raises(ConfigError) as e:
        parse_config(['--lerning_rate=1'], DEFAULTS)
    assert str(e.value) == "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz' \(known keys: betas, compile"):
        parse_config(['--zzz=1'], DEFAULTS)
    # unknown command-line keys are an error even when unknown file keys are ignored
    with pytest.raises(ConfigError, match='unknown config key'):
        parse_config(['--batch_size=1'], DEFAULTS, ignore_unknown_file_keys=True)


def test_unknown_file_keys(tmp_path):
    conf = write(tmp_path, 'train.py', "batch_size = 8\nn_layer = 2\nmax_iters = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size' in .*train\.py"):
        parse_config([conf], DEFAULTS)
    assert parse_config([conf], DEFAULTS, ignore_unknown_file_keys=True)['max_iters'] == 3
    with pytest.raises(ConfigError, match="n_layer"):
        parse_config([conf], DEFAULTS, ignore_unknown_file_keys={'batch_size'})
    cfg = parse_config([conf], DEFAULTS, ignore_unknown_file_keys={'batch_size', 'n_layer'})
    assert 'batch_size' not in cfg and cfg['max_iters'] == 3


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(['config/x.py'], DEFAULTS)
    assert str(e.value) == "config file config/x.py not found"
    with pytest.raises(ConfigError, match=r"use --max_iters=VALUE \(with '=', not a space\)"):
        parse_config(['--max_iters', '5'], DEFAULTS)
    assert parse_config(['--compile'], DEFAULTS)['compile'] is True  # a bare bool flag means True
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        parse_config(['--nope'], DEFAULTS)
    with pytest.raises(ConfigError, match="use --key=VALUE or a config file path"):
        parse_config(['-x'], DEFAULTS)
    bad = write(tmp_path, 'bad.py', "max_iters = (\n")
    with pytest.raises(ConfigError, match=r"bad\.py line 1: syntax error"):
        parse_config([bad], DEFAULTS)


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


def test_main_guard_prints_one_line_and_exits_2(capsys):
    def fails():
        parse_config(['--lerning_rate=1'], DEFAULTS)

    with pytest.raises(SystemExit) as e:
        main_guard(fails)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unknown config key 'lerning_rate' (did you mean 'learning_rate'?)\n"
    assert main_guard(lambda x: x + 1, 1) == 2
