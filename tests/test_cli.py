"""cli.py: the command line every script shares (config files, --key=value and --key value, strict
bools, one-line errors), checkpoints that refuse damage, and folder locks."""

import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import cli
from cli import UserError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(learning_rate=3e-4, max_iters=100, force=False, dataset='shakespeare', data_dir='',
                dropout=0.0, compile=None)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cfg_of(argv, defaults=DEFAULTS, **kw):
    return parse_config(argv, defaults, **kw)[0]


# ----------------------------------------------------------------------------------------------
# the command line

def test_a_scripts_settings_are_its_lowercase_plain_values():
    namespace = {'EOT': '<|endoftext|>', 'lr': 3e-4, 'name': 'x', 'compile': None, 'on': True, '_private': 1,
                 'os': os, 'helper': print, 'shapes': [1, 2]}
    assert cli.settings_of(namespace) == {'lr': 3e-4, 'name': 'x', 'compile': None, 'on': True}


def test_no_args_returns_a_copy_of_the_defaults():
    cfg, given = parse_config([], DEFAULTS)
    assert cfg == DEFAULTS and cfg is not DEFAULTS and given == {}


def test_both_spellings_give_the_same_config_and_defaults_stay_untouched():
    before = dict(DEFAULTS)
    eq = ['--learning_rate=1e-3', '--max_iters=5', '--dataset=tinystories', '--force=true']
    space = ['--learning_rate', '1e-3', '--max_iters', '5', '--dataset', 'tinystories', '--force', 'true']
    a, given = parse_config(eq, DEFAULTS)
    assert a == cfg_of(space)
    assert (a['learning_rate'], a['max_iters'], a['dataset'], a['force']) == (1e-3, 5, 'tinystories', True)
    assert set(given) == {'learning_rate', 'max_iters', 'dataset', 'force'}
    assert cfg_of(['--learning_rate', '-1']) ['learning_rate'] == -1.0   # a negative number is a value
    assert DEFAULTS == before


def test_split_argv_tells_config_files_from_values():
    """A value given as --key VALUE is never taken for a config file, even where a file of that name exists."""
    argv = ['a.py', '--dataset', 'README.md', '--force', 'b.py', '--max_iters=3', 'c']
    assert cli.split_argv(argv, DEFAULTS) == [(None, None, 'a.py'), ('dataset', 'README.md', None),
                                                 ('force', 'true', None), (None, None, 'b.py'),
                                                 ('max_iters', '3', None), (None, None, 'c')]


def test_files_apply_in_order_then_the_overrides_wherever_they_stand(tmp_path):
    conf = write(tmp_path, 'c.py', "import math\n_private = 1\nmax_iters = 2 * 10\n"
                                   "def helper(): pass\nclass K: pass\nlearning_rate = math.sqrt(4) / 1000\n")
    later = write(tmp_path, 'd.py', "max_iters = 30\n")
    cfg, given = parse_config([conf, '--max_iters=7'], DEFAULTS)
    assert cfg['max_iters'] == 7 and cfg['learning_rate'] == 0.002
    assert given == {'max_iters': '--', 'learning_rate': conf}
    assert cfg_of(['--max_iters', '7', conf])['max_iters'] == 7   # the README's order: files, then overrides
    assert cfg_of([conf, later])['max_iters'] == 30                # a later file wins over an earlier one


def test_a_config_file_that_exits_is_refused(tmp_path):
    conf = write(tmp_path, 'c.py', "max_iters = 3\nraise SystemExit(0)\n")
    with pytest.raises(UserError, match=r"c\.py calls exit\(\): a config file only sets values"):
        parse_config([conf], DEFAULTS)


def test_a_folder_or_pipe_given_as_a_config_file_is_named_as_such(tmp_path):
    os.mkfifo(tmp_path / 'pipe.py')
    with pytest.raises(UserError, match="is not a regular file \\(a pipe or a device\\)"):
        parse_config([str(tmp_path / 'pipe.py')], DEFAULTS)   # opening it would wait for a writer forever
    with pytest.raises(UserError, match="is a folder, not a file"):
        parse_config([str(tmp_path)], DEFAULTS)


def test_progress_prints_plain_lines_in_a_file_and_nothing_for_quick_work(tmp_path):
    import io
    import cli
    out = io.StringIO()
    p = cli.Progress('encode', total=4, unit='MB', after=0, every=0, stream=out)
    for i in range(1, 5):
        p.update(i)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith('encode: 1/4 MB (25%') and lines[-1].startswith('encode: 4/4 MB (100%')
    quiet = io.StringIO()
    q = cli.Progress('encode', total=4, stream=quiet)   # done within `after` seconds: silent
    q.update(4)
    q.close()
    assert quiet.getvalue() == ''


def test_config_file_runs_in_a_fresh_namespace_that_knows_its_path(tmp_path, monkeypatch):
    conf = write(tmp_path, 'c.py', "max_iters = max_iters + 1\n")   # defaults are not visible inside
    with pytest.raises(UserError, match=r"c\.py line 1: NameError"):
        parse_config([conf], DEFAULTS)
    write(tmp_path, 'base.py', "max_iters = 11\n")
    child = write(tmp_path, 'child.py', "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
                                        "dataset = 'x'\n")
    assert cfg_of([child])['max_iters'] == 11 and cfg_of([child])['dataset'] == 'x'
    # the shipped MLA config builds on config/deepseek.py the same way, from any working folder
    monkeypatch.chdir(tmp_path)
    mla = cli.read_config_file(os.path.join(ROOT, 'config', 'deepseek_mla.py'))
    assert mla['attention'] == 'mla' and mla['batch_size'] == 8 and mla['out_dir'] == 'out-deepseek-mla'


@pytest.mark.parametrize('text, want', [('True', True), ('false', False), ('1', True), ('0', False),
                                        ('yes', True), ('NO', False)])
def test_bool_spellings(text, want):
    assert cfg_of([f'--force={text}'])['force'] is want
    assert cfg_of(['--force', text])['force'] is want


def test_value_parsing_rules():
    assert cfg_of(['--dropout=1'])['dropout'] == 1.0 and isinstance(cfg_of(['--dropout=1'])['dropout'], float)
    assert cfg_of(['--max_iters=1e4'])['max_iters'] == 10000
    assert cfg_of(['--data_dir=2024'])['data_dir'] == '2024'       # a str key takes any text
    assert cfg_of(['--force'])['force'] is True                     # a bare bool flag means true
    assert cfg_of(['--force', '--max_iters=3'])['force'] is True    # ...also before another flag
    assert cfg_of(['--compile=auto'])['compile'] is None            # a None default: true/false/auto
    assert cfg_of(['--compile', 'no'])['compile'] is False


@pytest.mark.parametrize('argv, pattern', [
    (['--max_iters=abc'], r"config key 'max_iters' expects an int, got 'abc'"),
    (['--max_iters=1.5'], r"config key 'max_iters' expects an int, got '1.5'"),
    (['--learning_rate=fast'], r"config key 'learning_rate' expects a number, got 'fast'"),
    (['--force=maybe'], r"config key 'force' expects a bool \(true/false/yes/no/1/0\), got 'maybe'"),
    (['--compile=sometimes'], r"config key 'compile' expects true/false/auto, got 'sometimes'"),
    (['--max_iters=True'], r"config key 'max_iters' expects an int"),
    (['--max_iters'], r"--max_iters needs a value: --max_iters=VALUE or --max_iters VALUE"),
    (['--max_iters', '--force'], r"--max_iters needs a value"),
    (['--lerning_rate=1'], r"unknown config key 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
    (['--zzz=1'], r"unknown config key 'zzz' \(known keys: compile, data_dir"),
    (['-x'], r"bad argument '-x': use --key=VALUE, --key VALUE or a config file path"),
    (['config/x.py'], r"config file config/x.py not found"),
])
def test_mistakes_name_the_key_and_the_fix(argv, pattern):
    with pytest.raises(UserError, match=pattern):
        parse_config(argv, DEFAULTS)


def test_config_file_mistakes(tmp_path):
    with pytest.raises(UserError, match=r"'force' expects a bool .*'yes' \(in .*c\.py\)"):
        parse_config([write(tmp_path, 'c.py', "force = 'yes'\n")], DEFAULTS)
    with pytest.raises(UserError, match=r"bad\.py line 1: syntax error"):
        parse_config([write(tmp_path, 'bad.py', "max_iters = (\n")], DEFAULTS)
    conf = write(tmp_path, 'train.py', "batch_size = 8\nn_layer = 2\nmax_iters = 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'batch_size' in .*train\.py"):
        parse_config([conf], DEFAULTS)
    assert cfg_of([conf], skip_file_keys=True)['max_iters'] == 3
    with pytest.raises(UserError, match="n_layer"):
        parse_config([conf], DEFAULTS, skip_file_keys={'batch_size'})
    assert 'batch_size' not in cfg_of([conf], skip_file_keys={'batch_size', 'n_layer'})
    with pytest.raises(UserError, match='unknown config key'):   # never on the command line
        parse_config(['--batch_size=1'], DEFAULTS, skip_file_keys=True)
    # another script's keys are skipped, but a near miss of one of ours is a typo, not another script's key
    typo = write(tmp_path, 'typo.py', "batch_size = 8\nlearning_rte = 0.1\n")
    with pytest.raises(UserError, match=r"unknown config key 'learning_rte' in .*typo\.py \(did you mean 'learning_rate'"):
        parse_config([typo], DEFAULTS, skip_file_keys=True)
    (tmp_path / 'latin1.py').write_bytes(b'max_iters = 3  # caf\xe9\n')
    with pytest.raises(UserError, match=r"latin1\.py is not UTF-8 text"):
        parse_config([str(tmp_path / 'latin1.py')], DEFAULTS)
    huge = write(tmp_path, 'huge.py', "max_iters = 10**100000\n")   # too many digits for repr()
    with pytest.raises(UserError, match=r"^max_iters must be < 10\*\*9, got an int of 332193 bits$"):
        cli.check_ranges(cfg_of([huge]), {'max_iters': (lambda v: v < 10**9, "< 10**9")})
    with pytest.raises(UserError, match=r"'learning_rate' expects a finite number, got an int of 332193 bits"):
        parse_config([write(tmp_path, 'huge_lr.py', "learning_rate = 10**100000\n")], DEFAULTS)


@pytest.mark.parametrize('text', ['nan', 'inf', '-inf', '1e999'])
def test_floats_must_be_finite(text, tmp_path):
    with pytest.raises(UserError, match=r"'learning_rate' expects (a finite number|a number)"):
        parse_config([f'--learning_rate={text}'], DEFAULTS)
    with pytest.raises(UserError, match=r"'learning_rate' expects (a finite number|a number)"):
        parse_config([write(tmp_path, 'c.py', f"learning_rate = float('{text}')\n")], DEFAULTS)


def test_check_ranges_names_the_key_and_the_range():
    rules = {'max_iters': (lambda v: v > 0, "> 0")}
    cli.check_ranges({'max_iters': 3}, rules)
    with pytest.raises(UserError, match=r"max_iters must be > 0, got -1"):
        cli.check_ranges({'max_iters': -1}, rules)


def test_run_prints_one_line_and_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.call_main(parse_config, ['--lerning_rate=1'], DEFAULTS)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: unknown config key 'lerning_rate' (did you mean 'learning_rate'?)\n"

    def read_only():
        raise PermissionError(13, 'Permission denied', str(tmp_path / 'x'))
    with pytest.raises(SystemExit) as e:
        cli.call_main(read_only)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Permission denied' in err and 'x' in err
    assert cli.call_main(lambda x: x + 1, 1) == 2

    def cpu_out_of_memory():   # what torch's CPU allocator raises: not a MemoryError
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(SystemExit) as e:
        cli.call_main(cpu_out_of_memory)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: out of memory: ask for less at once') and err.count('\n') == 1

    def bug():
        raise RuntimeError("a bug keeps its traceback")
    with pytest.raises(RuntimeError, match='a bug'):
        cli.call_main(bug)


SCRIPTS = {   # script: (a flag of each kind it takes, a value it refuses, the error naming it)
    'prepare.py': ['--max_docs', '-3', 'max_docs'],
    'train.py': ['--max_iters', '-3', 'max_iters must be in [1, 2147483648]'],
    'sample.py': ['--num_samples', '-3', 'num_samples must be in [1, 2**20]'],
    'bench.py': ['--only', 'nope', "unknown rows ['nope']"],
    'plot_log.py': ['--out_dir', 'nowhere-xyz', 'nowhere-xyz/log.jsonl'],
}


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_every_script_takes_both_spellings_and_strict_bools(script, tmp_path):
    """The same command line everywhere: `--key value` reaches the value check exactly as `--key=value`
    does, and a bool that is not true/false/yes/no/1/0 is refused in one line."""
    flag, bad, message = SCRIPTS[script]
    bool_flag = {'prepare.py': '--force', 'train.py': '--overwrite', 'sample.py': '--compile',
                 'bench.py': '--quick', 'plot_log.py': None}[script]
    runs = [[f'{flag}={bad}'], [flag, bad]] + ([[f'{bool_flag}=maybe']] if bool_flag else [])
    for argv, p in zip(runs, run_together([[sys.executable, os.path.join(ROOT, script), *argv] for argv in runs],
                                          tmp_path)):
        assert p.returncode == 2, (argv, p.stdout, p.stderr)
        assert p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr, (argv, p.stderr)
        assert (message if argv != runs[-1] or not bool_flag else 'expects a bool') in p.stderr, (argv, p.stderr)


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_every_script_lists_its_keys_on_help(script, tmp_path):
    """--help prints the script's own docstring and each key it takes with its default, exit 0, and
    nothing else (no data read, no folder locked); only lowercase settings are keys."""
    flag = SCRIPTS[script][0]
    p, head = run_together([[sys.executable, os.path.join(ROOT, script), '--help'],
                            f'{sys.executable} {os.path.join(ROOT, script)} --help | head -1'], tmp_path)
    assert p.returncode == 0 and p.stderr == '', p.stderr
    assert f'usage: python {script}' in p.stdout and f'\n  {flag}=' in p.stdout
    assert 'python ' + script in p.stdout.split('usage:')[0]   # the docstring's examples come first
    assert '--EOT' not in p.stdout and os.listdir(tmp_path) == []
    # a reader that stops early (`| head -1`) costs no error message
    assert head.stdout.count('\n') == 1 and head.stderr == '', head.stderr


def run_together(commands, cwd):
    """Run the commands (argv lists, or shell lines) side by side; their CompletedProcess, in order."""
    procs = [subprocess.Popen(c, shell=isinstance(c, str), cwd=cwd, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for c in commands]
    outputs = [p.communicate(timeout=120) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


# ----------------------------------------------------------------------------------------------
# checkpoints and locks

def small_checkpoint():
    from model import ModelConfig
    import dataclasses
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, head_dim=8, n_latent=2,
                      n_expert=2, n_expert_active=1, expert_hidden=16, block_size=8)
    return {'model': {'w': torch.randn(50, 40), 'b': torch.arange(7)}, 'optimizer': {'state': {0: torch.ones(3)}},
            'model_args': dataclasses.asdict(cfg), 'tokenizer': {'kind': 'tiktoken', 'name': 'gpt2'},
            'iter_num': 5, 'best_val_loss': float('inf')}


def test_checkpoint_round_trip_and_damage_is_refused(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    ck = small_checkpoint()
    checkpoint.save_checkpoint(ck, path)
    loaded, mconf = checkpoint.load_checkpoint(path, parts=('model', 'optimizer'))
    assert torch.equal(loaded['model']['w'], ck['model']['w']) and loaded['iter_num'] == 5 and mconf.n_layer == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']
    data = bytearray(open(path, 'rb').read())
    raw = ck['model']['w'].numpy().tobytes()
    at = bytes(data).find(raw[:64])   # the tensor's bytes inside the zip
    assert at > 0
    data[at + 100:at + 104] = b'\x12\x34\x56\x78'
    open(path, 'wb').write(bytes(data))
    with pytest.raises(UserError, match=r"is damaged \('model' does not match its checksum\)"):
        checkpoint.load_checkpoint(path)
    open(path, 'wb').write(bytes(data[:len(data) // 2]))
    with pytest.raises(UserError, match="truncated, damaged or not a PyTorch file"):
        checkpoint.load_checkpoint(path)
    del ck['optimizer']
    checkpoint.save_checkpoint(ck, path)
    with pytest.raises(UserError, match="incomplete: it has no optimizer"):
        checkpoint.load_checkpoint(path, parts=('model', 'optimizer'))


def test_checksum_sees_every_byte_every_value_and_their_order():
    """A real checksum: a changed value, a changed key, and values swapped inside a tensor (which a plain
    sum of the bits would miss) all change it; checked against zlib's CRC-32 of the raw bytes."""
    import zlib
    t = torch.randn(100)
    base = checkpoint.checksum({'a': t, 'n': 3, 's': 'x'})
    swapped = t.clone()
    swapped[[3, 70]] = t[[70, 3]]
    for change in ({'a': t.clone().index_fill_(0, torch.tensor([57]), 9.0), 'n': 3, 's': 'x'},
                   {'a': swapped, 'n': 3, 's': 'x'}, {'a': t.view(10, 10), 'n': 3, 's': 'x'},
                   {'a': t, 'n': 4, 's': 'x'}, {'a': t, 'n': 3, 's': 'y'}, {'b': t, 'n': 3, 's': 'x'}):
        assert checkpoint.checksum(change) != base
    assert checkpoint.checksum({'a': t.clone(), 'n': 3, 's': 'x'}) == base
    x = torch.arange(10, dtype=torch.int16)
    assert checkpoint.checksum(x) == zlib.crc32(x.numpy().tobytes(), zlib.crc32(b"torch.int16(10,)"))
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool):
        x = (torch.rand(64) > 0.5).to(dtype)
        assert checkpoint.checksum(x) != checkpoint.checksum(x.flip(0)) or torch.equal(x, x.flip(0))


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint({**small_checkpoint(), 'iter_num': 1}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)   # half-written file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({**small_checkpoint(), 'iter_num': 2}, path)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)[0]['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint({**small_checkpoint(), 'iter_num': 1}, path)
    before = open(path, 'rb').read()

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(UserError, match=r"cannot write .*ckpt.pt.tmp \(.*file write failed\): free disk space .*"
                                        r"ckpt.pt is unchanged"):
        checkpoint.save_checkpoint({**small_checkpoint(), 'iter_num': 2}, path)
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['ckpt.pt']


def test_lock_folder_refuses_a_second_process_and_bad_paths(tmp_path):
    held = checkpoint.lock_folder(str(tmp_path / 'run'), 'training run')
    code = ("import checkpoint, cli, sys\n"
            f"cli.call_main(checkpoint.lock_folder, {str(tmp_path / 'run')!r}, 'training run')\n")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and f'is in use by another training run (pid {os.getpid()})' in p.stderr
    held.close()   # released: the next process gets it
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UserError, match="is a file, not a folder"):
        checkpoint.lock_folder(str(tmp_path / 'file'), 'training run')
    if os.geteuid() != 0:   # root writes anywhere
        ro = tmp_path / 'ro'
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(UserError, match="cannot write in"):
            checkpoint.lock_folder(str(ro / 'run'), 'training run')
