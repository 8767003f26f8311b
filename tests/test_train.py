"""train.py end to end on a tiny model and a few plays: learning, logs, exact resume, DDP, bad input, safe saves."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402
import train  # noqa: E402

TINY = ['--n_layer=2', '--n_embd=64', '--n_head=4', '--n_kv_head=2', '--head_dim=16', '--n_latent=4',
        '--n_expert=4', '--n_expert_active=2', '--expert_hidden=64', '--vocab_size=512', '--block_size=32',
        '--batch_size=4', '--eval_iters=2', '--warmup_iters=5', '--learning_rate=3e-3', '--min_lr=3e-4',
        '--compile=False', '--device=cpu']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'tiny')
    prepare.main([f'--data_dir={d}', '--max_docs=6', '--val_docs=1', '--vocab_size=512'])
    return d


def run_train(*args, nproc=None, check=True):
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *args]
    if nproc:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               os.path.join(ROOT, 'train.py'), *args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1' if nproc else os.environ.get('OMP_NUM_THREADS', '2')}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_log_has_fields(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    p = run_train(*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=60', '--eval_interval=30',
                  '--log_interval=10')
    assert 'MaxVio' in p.stdout and 'val bpb' in p.stdout and 'tok/s' in p.stdout and 'ETA' in p.stdout
    log = read_log(out)
    evals = [r for r in log if r['kind'] == 'eval']
    steps = [r for r in log if r['kind'] == 'train']
    assert [r['iter'] for r in evals] == [0, 30, 60]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5
    assert evals[-1]['train_loss'] < evals[0]['train_loss'] - 0.5
    for key in ('loss', 'lr', 'ms_per_iter', 'tokens_per_s', 'gflops', 'grad_norm', 'max_vio'):
        assert all(key in r for r in steps), key
    for key in ('train_loss', 'val_loss', 'val_bpb', 'val_max_vio', 'val_max_vio_mean', 'val_max_vio_layers'):
        assert key in evals[-1], key
    assert len(evals[-1]['val_max_vio_layers']) == 2
    # bits per byte = nats per token / ln 2 / bytes per token; a BPE token holds more than one byte
    assert 0 < evals[-1]['val_bpb'] < evals[-1]['val_loss'] / 0.6931
    assert log[-1]['kind'] == 'summary' and log[-1]['tokens_seen'] == 60 * 4 * 32
    # checkpoints: last and best, loadable with weights_only, carrying the tokenizer
    for name in ('ckpt.pt', 'ckpt_best.pt'):
        ck = torch.load(os.path.join(out, name), weights_only=True)
        assert ck['format'] == train.CKPT_FORMAT and ck['iter_num'] == 60
        assert not any(k.startswith('_orig_mod.') for k in ck['model'])
        enc = prepare.load_tokenizer(ck['tokenizer'])
        assert enc.decode(enc.encode('To be, or not')) == 'To be, or not'


def test_resume_gives_identical_losses(data_dir, tmp_path):
    common = [*TINY, f'--data_dir={data_dir}', '--log_interval=1', '--eval_interval=8', '--lr_decay_iters=16']
    full, half = str(tmp_path / 'full'), str(tmp_path / 'half')
    run_train(*common, f'--out_dir={full}', '--max_iters=16')
    run_train(*common, f'--out_dir={half}', '--max_iters=8')
    run_train(*common, f'--out_dir={half}', '--max_iters=16', '--init_from=resume')
    losses = lambda d: {r['iter']: r['loss'] for r in read_log(d) if r['kind'] == 'train'}  # noqa: E731
    a, b = losses(full), losses(half)
    assert sorted(b) == list(range(1, 17))
    assert [a[i] for i in range(1, 17)] == [b[i] for i in range(1, 17)]
    ca = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)['model']
    cb = torch.load(os.path.join(half, 'ckpt.pt'), weights_only=True)['model']
    assert all(torch.equal(ca[k], cb[k]) for k in ca)  # includes the router biases


def test_torchrun_two_processes_stay_in_sync(data_dir, tmp_path):
    out = str(tmp_path / 'ddp')
    p = run_train(*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=6', '--eval_interval=6',
                  '--log_interval=3', '--gradient_accumulation_steps=2', nproc=2)
    assert 'ddp: 2 ranks hold identical weights and router biases' in p.stdout, p.stdout + p.stderr
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    biases = [v for k, v in ck['model'].items() if k.endswith('expert_bias')]
    assert len(biases) == 2 and any(b.abs().sum() > 0 for b in biases)  # balancing ran on all-reduced counts
    log = read_log(out)
    assert log[-1]['tokens_seen'] == 6 * 2 * 2 * 4 * 32   # iters x ranks x micro-steps x batch x block


@pytest.mark.parametrize('args, message', [
    (['--lerning_rate=1e-3'], "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
    (['--max_iters=lots'], "config key 'max_iters' expects an int"),
    (['--n_head=5'], 'n_head (5) must be divisible by n_kv_head'),
    (['--init_from=resume', '--out_dir=nowhere-xyz'], 'no checkpoint at nowhere-xyz/ckpt.pt'),
    (['--vocab_size=300'], 'vocab_size 300 is smaller than the tokenizer'),
    (['config/nope.py'], 'config file config/nope.py not found'),
    (['--dtype=float8'], "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
    pytest.param(['--device=cuda'], 'device=cuda but CUDA is not available: use --device=cpu',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')),
])
def test_bad_input_is_one_clean_line(data_dir, args, message):
    p = run_train(*TINY, f'--data_dir={data_dir}', *args, check=False)
    assert p.returncode == 2
    assert message in p.stderr
    assert 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_missing_data_says_run_prepare(tmp_path):
    p = run_train(*TINY, f'--data_dir={tmp_path}/none', check=False)
    assert p.returncode == 2 and 'run `python prepare.py' in p.stderr


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    train.save_checkpoint({'format': train.CKPT_FORMAT, 'iter_num': 1, 'w': torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        with open(f, 'r+b') as fh:   # half-written file, then the process "dies"
            fh.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({'format': train.CKPT_FORMAT, 'iter_num': 2, 'w': torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)['iter_num'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_lr_schedule():
    cfg = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_decay_iters=0)
    lrs = [train.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0                 # linear warmup
    assert abs(lrs[10] - 1.0) < 1e-9                       # peak, then cosine
    assert abs(lrs[60] - (0.1 + 0.45)) < 1e-9              # halfway down
    assert lrs[110] == lrs[119] == 0.1                     # floor after lr_decay_iters (= max_iters)


def test_divergence_stops_cleanly_and_keeps_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'nan')
    common = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--log_interval=1', '--eval_interval=4']
    run_train(*common, '--max_iters=4')
    before = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model']
    p = run_train(*common, '--max_iters=40', '--init_from=resume', '--learning_rate=1e9', '--min_lr=1e9', check=False)
    assert p.returncode == 2 and 'training diverged' in p.stderr and 'Traceback' not in p.stderr
    assert f'the last good checkpoint {out}/ckpt.pt is kept' in p.stderr
    after = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert after['iter_num'] == 4 and all(torch.equal(before[k], after['model'][k]) for k in before)
