"""train.py on a tiny model and a few plays: learning, logs, the whole-val result, exact resume (also after
kill -9), activation checkpointing, DDP and FSDP, the memory plan, progress, and the reliability promise:
no bad input, fault or second run destroys a finished result; every rejection is one line naming the
fix, and following the fix works. Most tests call train.main in this process; a subprocess only where
it is the point (kill -9, Ctrl-C, torchrun, the exit code)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import dataset
import memory
import prepare
import devices
import preflight
import runlog
import sample
import train
from cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ['--n_layer=2', '--n_embd=64', '--n_head=4', '--n_kv_head=2', '--head_dim=16', '--n_latent=4',
        '--n_expert=4', '--n_expert_active=2', '--expert_hidden=64', '--vocab_size=512', '--block_size=32',
        '--batch_size=4', '--eval_iters=2', '--warmup_iters=5', '--learning_rate=3e-3', '--min_lr=3e-4',
        '--compile=False', '--device=cpu', '--final_eval=false']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('data') / 'tiny')
    prepare.main([f'--data_dir={d}', '--dataset=shakespeare', '--max_docs=6', '--val_docs=1', '--vocab_size=512'])
    return d


def train_here(*args):
    """train.main in this process; returns what it returns (the whole-val result, or None)."""
    return train.main(list(args))


def refused(*args, match):
    """train.main refuses with one line that contains `match`; returns the message."""
    with pytest.raises(UserError) as e:
        train.main(list(args))
    message = str(e.value)
    assert match in message and '\n' not in message, message
    return message


def train_cmd(*args, nproc=None):
    if nproc:
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                os.path.join(ROOT, 'train.py'), *args]
    return [sys.executable, os.path.join(ROOT, 'train.py'), *args]


def env_for(nproc=None):
    return {**os.environ, 'OMP_NUM_THREADS': '1' if nproc else os.environ.get('OMP_NUM_THREADS', '2')}


def run_train(*args, nproc=None, check=True):
    p = subprocess.run(train_cmd(*args, nproc=nproc), capture_output=True, text=True, cwd=ROOT, env=env_for(nproc),
                       timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r['iter']: r['loss'] for r in read_log(out_dir) if r['kind'] == 'train'}


def snapshot(folder):
    """Every file's bytes, to show that a refused command changed nothing."""
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))
            if name != '.lock' and os.path.isfile(os.path.join(folder, name))}


def copy_files(src, dst, names=None):
    """A copy of a run's or a dataset's folder: the named files, or every file in it."""
    os.makedirs(dst)
    for name in names or [n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n))]:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return dst


def one_line_error(p, message):
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


# -----------------------------------------------------------------------------
# a run: learning, its log, its result on the whole validation split

def test_loss_falls_and_log_has_fields(data_dir, tmp_path, capsys):
    out = str(tmp_path / 'out')
    result = train_here(*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=60', '--eval_interval=30',
                        '--log_interval=10', '--final_eval=true')
    stdout = capsys.readouterr().out
    assert 'MaxVio' in stdout and 'val bpb' in stdout and 'tok/s' in stdout and 'ETA' in stdout
    log = read_log(out)
    assert log[0]['kind'] == 'start' and len(log[0]['run_id']) == 12
    evals = [r for r in log if r['kind'] == 'eval']
    steps = [r for r in log if r['kind'] == 'train']
    assert [r['iter'] for r in evals] == [0, 30, 60]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5
    assert evals[-1]['train_loss'] < evals[0]['train_loss'] - 0.5
    for key in ('loss', 'lr', 'ms_per_iter', 'tokens_per_s', 'gflops', 'grad_norm', 'max_vio'):
        assert all(key in r for r in steps), key
    last = evals[-1]
    for split in ('train', 'val'):   # balance on both splits: worst layer, mean, per layer, loads
        layers, load = last[f'{split}_max_vio_layers'], np.array(last[f'{split}_load'])
        assert len(layers) == 2 and load.shape == (2, 4)
        assert np.allclose(load.sum(1), 1, atol=1e-3)
        assert last[f'{split}_max_vio'] == pytest.approx(max(layers), abs=1e-3)
        assert last[f'{split}_max_vio_mean'] == pytest.approx(sum(layers) / 2, abs=1e-3)
        # MaxVio of each layer is (max load - mean load) / mean load of its load fractions
        assert layers == pytest.approx(list((load.max(1) - 0.25) / 0.25), abs=2e-3)
    # bits per byte = nats per token / ln 2 / bytes per token; a BPE token holds more than one byte
    assert 0 < last['val_bpb'] < last['val_loss'] / 0.6931
    # the result: every val token scored once, in its own record and in the summary
    final, summary = log[-2], log[-1]
    meta = dataset.read_meta(data_dir)
    assert final['kind'] == 'final' and final['iter'] == 60 and final['val_tokens_scored'] == meta['val_tokens'] - 1
    assert result['val_loss'] == final['val_loss'] and len(final['val_max_vio_layers']) == 2
    assert summary['kind'] == 'summary' and summary['tokens_seen'] == 60 * 4 * 32
    assert summary['val_bpb'] == final['val_bpb'] and f"whole val split: loss {final['val_loss']:.4f}" in stdout
    # checkpoints: last (with optimizer) and best (weights only), verified on load, carrying the tokenizer
    ck, _ = checkpoint.load_checkpoint(os.path.join(out, 'ckpt.pt'), parts=('model', 'optimizer'))
    best, _ = checkpoint.load_checkpoint(os.path.join(out, 'ckpt_best.pt'))
    assert ck['iter_num'] == 60 and 'optimizer' not in best and ck['run_id'] == log[0]['run_id']
    assert not any(k.startswith('_orig_mod.') for k in ck['model'])
    enc = dataset.load_tokenizer(ck['tokenizer'])
    assert enc.decode(enc.encode('To be, or not')) == 'To be, or not'


def test_whole_val_score_matches_a_brute_force_scoring(data_dir, tmp_path, capsys):
    """--eval_only scores a checkpoint on every val token once; checked against full logits over the same
    non-overlapping windows, bytes from tiktoken itself, and MaxVio from the routers' own picks."""
    import math
    import torch.nn.functional as F
    from model import DeepSeekLM
    out = str(tmp_path / 'out')
    train_here(*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=10', '--eval_interval=10')
    got = train_here(f'--out_dir={out}', '--eval_only=last', '--device=cpu', '--batch_size=3')
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == got
    ck, mconf = checkpoint.load_checkpoint(os.path.join(out, 'ckpt.pt'))
    model = DeepSeekLM(mconf)
    model.load_state_dict(ck['model'])
    model.eval()
    enc = dataset.load_tokenizer(ck['tokenizer'])
    meta = dataset.read_meta(data_dir)
    val = np.fromfile(os.path.join(data_dir, 'val.bin'), dtype=meta['dtype']).astype(np.int64)
    starts = range(0, len(val) - 1, 32)
    xs = [torch.tensor(val[s:s + 32]) for s in starts]
    ys = [torch.tensor(val[s + 1:s + 33]) for s in starts]
    xs[-1] = xs[-1][:len(ys[-1])]   # the last window is short
    with torch.no_grad():   # all full windows in one batch, the short one alone
        logits = list(model(torch.stack(xs[:-1]))[0]) + [model(xs[-1][None])[0][0]]
    loss = torch.cat([F.cross_entropy(lg.float(), y, reduction='none') for lg, y in zip(logits, ys)])
    y = torch.cat(ys)
    text = y != meta['eot_id']
    token_bytes = torch.tensor([len(enc.decode_single_token_bytes(t)) for t in y[text].tolist()])
    assert got['val_tokens_scored'] == len(y) == len(val) - 1
    assert got['val_loss'] == pytest.approx(loss.double().mean().item(), rel=1e-5)
    assert got['val_bpb'] == pytest.approx(loss[text].double().sum().item() / math.log(2) / token_bytes.sum().item(),
                                           rel=1e-5)
    assert max(got['val_max_vio_layers']) == pytest.approx(got['val_max_vio'], abs=1e-4) and got['iter'] == 10


def test_progress_from_the_first_minute(data_dir, tmp_path, capsys, monkeypatch):
    """A run that would take days says so before anything slow starts (the first evaluation), with the
    expected step time and a pointer to the mini config; the first step's time is printed as soon as it
    is known, whatever log_interval is."""
    class Stop(Exception):
        pass

    def first_eval(*args, **kw):
        raise Stop
    monkeypatch.setattr(train, 'evaluate', first_eval)
    with pytest.raises(Stop):
        train_here(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/slow', '--max_iters=1000000000')
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0] for line in lines] == ['model', 'data', 'run', 'kernels', 'memory', 'expected', 'note',
                                                      'note']
    assert 's per step' in lines[5] and 'passes over the train split' in lines[5] and 'memorises' in lines[6]
    assert 'config/deepseek_mini.py' in lines[7] and 'days' in lines[7]
    monkeypatch.undo()
    train_here(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/first', '--max_iters=3', '--log_interval=50')
    lines = capsys.readouterr().out.splitlines()
    assert 'note' not in [line.split(':')[0] for line in lines]
    first = [line for line in lines if line.startswith('iter 1/3')]
    assert first and '(the first step)' in first[0] and 'ETA' in first[0]


def test_resume_gives_identical_losses(data_dir, tmp_path):
    args = [*TINY, f'--data_dir={data_dir}', '--log_interval=1', '--eval_interval=8', '--lr_decay_iters=16']
    full, half = str(tmp_path / 'full'), str(tmp_path / 'half')
    train_here(*args, f'--out_dir={full}', '--max_iters=16')
    train_here(*args, f'--out_dir={half}', '--max_iters=8')
    train_here(*args, f'--out_dir={half}', '--max_iters=16', '--init_from=resume')
    a, b = losses(full), losses(half)
    assert sorted(b) == list(range(1, 17))
    assert [a[i] for i in range(1, 17)] == [b[i] for i in range(1, 17)]
    ca = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)['model']
    cb = torch.load(os.path.join(half, 'ckpt.pt'), weights_only=True)['model']
    assert all(torch.equal(ca[k], cb[k]) for k in ca)   # includes the router biases


def test_fp16_resume_keeps_the_loss_scale(data_dir, tmp_path):
    """float16 trains with a loss scaler whose scale and growth counter evolve over the steps; a resumed
    run carries them on, so it ends exactly where an uninterrupted one does."""
    args = [*TINY, f'--data_dir={data_dir}', '--dtype=float16', '--log_interval=1', '--eval_interval=2',
            '--eval_iters=1']
    full, half = str(tmp_path / 'full'), str(tmp_path / 'half')
    train_here(*args, f'--out_dir={full}', '--max_iters=4')
    train_here(*args, f'--out_dir={half}', '--max_iters=2')
    train_here(*args, f'--out_dir={half}', '--max_iters=4', '--init_from=resume')
    sa = torch.load(os.path.join(full, 'ckpt.pt'), weights_only=True)['scaler']
    sb = torch.load(os.path.join(half, 'ckpt.pt'), weights_only=True)['scaler']
    assert sa == sb and sa['_growth_tracker'] > 2   # counted on across the resume, not from 0
    assert losses(full) == losses(half)


def test_activation_checkpointing_trains_the_same(data_dir, tmp_path, capsys):
    """--activation_checkpointing=true recomputes each block in backward: the same losses, step for step,
    with expert dropout, router jitter and the sequence-wise balance loss on (the recomputation draws the
    same random numbers, and its router adds no second balance term)."""
    args = [*TINY, f'--data_dir={data_dir}', '--log_interval=1', '--eval_interval=6', '--max_iters=6',
            '--expert_dropout=0.2', '--router_jitter=0.2', '--seq_balance_loss=0.3']
    train_here(*args, f'--out_dir={tmp_path}/plain', '--activation_checkpointing=false')
    assert 'activation checkpointing off' in capsys.readouterr().out
    train_here(*args, f'--out_dir={tmp_path}/recomputed', '--activation_checkpointing=true')
    assert 'activation checkpointing on' in capsys.readouterr().out
    assert losses(f'{tmp_path}/plain') == losses(f'{tmp_path}/recomputed')


def test_the_sequence_balance_loss_is_trained_on_and_left_out_of_the_logged_loss(data_dir, tmp_path):
    """--seq_balance_loss adds DeepSeek-V3's sequence-wise term to the loss that is backpropagated (the run
    goes elsewhere from step 2 on) but not to the logged loss (step 1's, the same forward, is the same)."""
    args = [*TINY, f'--data_dir={data_dir}', '--log_interval=1', '--eval_interval=4', '--max_iters=4']
    train_here(*args, f'--out_dir={tmp_path}/plain')
    train_here(*args, f'--out_dir={tmp_path}/balanced', '--seq_balance_loss=0.5')
    plain, balanced = losses(f'{tmp_path}/plain'), losses(f'{tmp_path}/balanced')
    assert plain[1] == balanced[1]
    assert plain[4] != balanced[4]


def test_memory_plan_turns_checkpointing_on_and_refuses_what_cannot_fit(data_dir, tmp_path, capsys, monkeypatch):
    """On a device too small for the step, checkpointing comes on by itself and says so; on one too small
    even for that, the run is refused before anything is written, naming settings that fit, and those
    settings then train."""
    from model import ModelConfig
    mconf = ModelConfig(**{a[2:].split('=')[0]: int(a.split('=')[1]) for a in TINY[:11]})
    plain, recomputed = (memory.estimate(mconf, 4, False, on)['total'] for on in (False, True))
    assert recomputed < plain
    args = [*TINY, f'--data_dir={data_dir}', '--max_iters=2', '--eval_interval=2']
    monkeypatch.setattr(devices, 'ram', lambda: (plain + recomputed) / 2 / memory.HEADROOM)
    train_here(*args, f'--out_dir={tmp_path}/auto')
    assert 'activation checkpointing on (on: the step would not fit without it)' in capsys.readouterr().out
    small = memory.estimate(mconf, 1, False, True)['total'] * 1.01 / memory.HEADROOM
    monkeypatch.setattr(devices, 'ram', lambda: small)
    message = refused(*args, '--batch_size=4', f'--out_dir={tmp_path}/big', match='more than 90% of the device')
    assert not os.path.exists(f'{tmp_path}/big')
    fix = message.split('try ')[1].split(' (the same')[0].split()
    assert fix == ['--batch_size=1', '--gradient_accumulation_steps=4']
    train_here(*args, '--batch_size=4', *fix, f'--out_dir={tmp_path}/big')
    assert read_log(f'{tmp_path}/big')[-1]['tokens_seen'] == 2 * 4 * 32   # the same tokens per step


def test_a_run_that_overfits_says_so_and_sample_takes_its_best_model(tmp_path, capsys):
    """Three short documents of random letters, read 35 times: the start-up says how many passes the run
    makes and what to expect; once val loss has risen for three evaluations while train loss fell, the
    evaluation line and its record say so; sample.py then samples the best model, and says so when asked
    for the last."""
    docs = tmp_path / 'docs'
    docs.mkdir()
    for i in range(3):
        rng = np.random.default_rng(i)
        (docs / f'{i}.txt').write_text(''.join(rng.choice(list('abcdefgh '), size=300)))
    d, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    prepare.main(['--dataset=letters', f'--input={docs}', f'--data_dir={d}', '--vocab_size=300', '--val_docs=1'])
    capsys.readouterr()
    train_here(*TINY, '--vocab_size=300', f'--data_dir={d}', f'--out_dir={out}', '--max_iters=100',
               '--eval_interval=10', '--learning_rate=1e-2', '--min_lr=1e-2', '--warmup_iters=0', '--log_interval=50')
    printed = capsys.readouterr().out
    passes = 100 * 4 * 32 / dataset.read_meta(d)['train_tokens']
    assert f'({passes:.2f} passes over the train split)' in printed and 'a model memorises its data' in printed
    evals = [r for r in read_log(out) if r['kind'] == 'eval']
    flagged = [r['iter'] for r in evals if r.get('overfitting')]
    assert flagged and 'overfitting: val loss has risen for 3 evaluations while train loss fell' in printed
    first = next(r for r in evals if r['iter'] == flagged[0])
    before = [r['val_loss'] for r in evals if flagged[0] - 30 <= r['iter'] <= flagged[0]]
    assert before == sorted(before) and first['val_loss'] > min(r['val_loss'] for r in evals)
    best = torch.load(os.path.join(out, 'ckpt_best.pt'), weights_only=True)
    assert best['iter_num'] < 100 and best['val_loss'] == min(r['val_loss'] for r in evals if r['iter'])
    sample.main([f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=2'])
    assert f"loaded {out}/ckpt_best.pt" in capsys.readouterr().err
    sample.main([f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=2', '--ckpt=last'])
    assert f"the run's best was {best['val_loss']:.4f}: --ckpt=best samples that model" in capsys.readouterr().err


def test_the_cards_run_says_how_many_passes_it_makes(tmp_path, capsys):
    """The card's 10,000 steps of 8 x 1,024 tokens: 78 passes over the bundled plays' 1,051,866 training
    tokens (and a note on what to expect), a fraction of one over TinyStories' (about 470M)."""
    from model import DeepSeekLM, ModelConfig
    with torch.device('meta'):
        model = DeepSeekLM(ModelConfig())
    cfg = {**train.DEFAULTS, 'fsdp': False}
    dev = devices.plan('cpu', 'float32', False)
    for train_tokens, passes in ((1_051_866, '77.88 passes'), (470_000_000, '0.17 passes')):
        data = preflight.Data('data/x', {'train_tokens': train_tokens, 'val_tokens': 1, 'n_vocab': 49152}, {}, {}, '')
        preflight.announce(cfg, model.config, data, dev, 1, model, 0, 'memory: ...', 8 * 1024)
        printed = capsys.readouterr().out
        assert f'({passes} over the train split)' in printed
        assert ('note: 78 passes over 1,051,866 tokens for 679,809,792 parameters' in printed) == (passes[0] == '7')


def test_the_start_of_a_run_does_not_read_its_whole_token_file(data_dir, tmp_path):
    """A start or a resume reads only the windows it trains and evaluates on: a 2 GB (sparse) train split with
    a token id outside the vocabulary at its very end starts and resumes at once; only the windows read are
    checked for such ids."""
    big = copy_files(data_dir, str(tmp_path / 'big'))
    meta = json.load(open(os.path.join(big, 'meta.json')))
    n = 2**30
    with open(os.path.join(big, 'train.bin'), 'wb') as f:
        f.truncate(2 * n)   # n zero tokens, no disk used
        f.seek(2 * n - 2)
        f.write(np.array([meta['n_vocab'] + 5], dtype=meta['dtype']).tobytes())
    meta['train_tokens'] = n
    json.dump(meta, open(os.path.join(big, 'meta.json'), 'w'))
    args = [*TINY, f'--data_dir={big}', f'--out_dir={tmp_path}/out', '--eval_interval=2', '--log_interval=1']
    train_here(*args, '--max_iters=2')
    train_here(*args, '--max_iters=4', '--init_from=resume')
    assert max(losses(f'{tmp_path}/out')) == 4


def test_a_resume_that_fails_keeps_the_finished_runs_result(data_dir, tmp_path, monkeypatch):
    """A finished run's log keeps its records, the whole-val result included, through a resume that
    diverges or is interrupted before it writes a checkpoint of its own; the resume that does checkpoint
    cuts the log back to the checkpoint it started from, so each iteration is logged once."""
    out = str(tmp_path / 'done')
    args = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--log_interval=1', '--eval_interval=4']
    train_here(*args, '--max_iters=4', '--final_eval=true')
    finished = read_log(out)
    assert [r['kind'] for r in finished[-2:]] == ['final', 'summary']
    refused(*args, '--max_iters=8', '--init_from=resume', '--learning_rate=1e10', '--min_lr=1e10',
            match='training diverged')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'get_batch', interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_here(*args, '--max_iters=8', '--init_from=resume')
    monkeypatch.undo()
    assert read_log(out)[:len(finished)] == finished   # the result is still there
    train_here(*args, '--max_iters=8', '--init_from=resume')
    log = read_log(out)
    assert [r['iter'] for r in log if r['kind'] == 'train'] == list(range(1, 9))
    assert [r['iter'] for r in log if r['kind'] == 'eval'] == [0, 4, 8] and 'final' not in [r['kind'] for r in log]


def test_training_outlives_its_standard_output(data_dir, tmp_path):
    """`python train.py ... | head -3`, standard output on a full disk, or closed from the start (`>&-`): the
    run goes on to its end with its work saved, says once on stderr that its output is gone, and exits 0."""
    procs = {}
    for name, stdout in (('head', subprocess.PIPE), ('full', open('/dev/full', 'w')), ('closed', None)):
        procs[name] = subprocess.Popen(train_cmd(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/{name}',
                                                 '--max_iters=6', '--eval_interval=3', '--log_interval=1'),
                                       cwd=ROOT, env=env_for(1), stdout=stdout, stderr=subprocess.PIPE, text=True,
                                       preexec_fn=(lambda: os.close(1)) if name == 'closed' else None)   # >&-
    assert [procs['head'].stdout.readline() for _ in range(3)][0].startswith('model:')
    procs['head'].stdout.close()   # as `head -3` does
    for name, reason in (('head', 'its reader went away'), ('full', 'No space left on device'), ('closed', 'closed')):
        _, err = procs[name].communicate(timeout=300)
        assert procs[name].returncode == 0, err
        assert err == f"note: standard output is gone ({reason}); training goes on; its records are in log.jsonl\n"
        assert max(losses(f'{tmp_path}/{name}')) == 6
        assert torch.load(f'{tmp_path}/{name}/ckpt.pt', weights_only=True)['iter_num'] == 6


# -----------------------------------------------------------------------------
# processes: kill -9, Ctrl-C, torchrun

def test_kill_9_then_resume_matches_and_logs_each_iteration_once(data_dir, tmp_path):
    args = [*TINY, f'--data_dir={data_dir}', '--log_interval=1', '--eval_interval=10', '--max_iters=40']
    ref, killed = str(tmp_path / 'ref'), str(tmp_path / 'killed')
    train_here(*args, f'--out_dir={ref}')
    proc = subprocess.Popen(train_cmd(*args, f'--out_dir={killed}'), cwd=ROOT, env=env_for(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, 'ckpt.pt')
    deadline = time.time() + 300
    while time.time() < deadline:   # kill it between checkpoints, after it logged steps past one
        if os.path.exists(ckpt) and max(losses(killed), default=0) % 10 >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    iter_at_kill = torch.load(ckpt, weights_only=True)['iter_num']
    assert iter_at_kill < 40 and max(losses(killed)) > iter_at_kill   # there are records to drop
    train_here(*args, f'--out_dir={killed}', '--init_from=resume')
    train_iters = [r['iter'] for r in read_log(killed) if r['kind'] == 'train']
    assert train_iters == list(range(1, 41))   # each iteration once, in order
    assert [r['iter'] for r in read_log(killed) if r['kind'] == 'eval'] == [0, 10, 20, 30, 40]
    assert losses(killed) == losses(ref)


def test_ctrl_c_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'out')
    # a shell's background job starts with Ctrl-C ignored, which the child would inherit: restore it
    proc = subprocess.Popen(train_cmd(*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=5',
                                      '--log_interval=1', '--max_iters=100000'),
                            cwd=ROOT, env=env_for(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = os.path.join(out, 'ckpt.pt')
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()   # never outlive the test: it would hold the shared data folder's lock
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == 'interrupted'
    assert checkpoint.load_checkpoint(ckpt, parts=('model', 'optimizer'))[0]['iter_num'] % 5 == 0


def test_torchrun_ddp_and_fsdp_train_as_one_process_does(data_dir, tmp_path, capsys):
    """Two processes over batch 2 each see the same global batch as one process over batch 4: DDP and
    FSDP (weights, gradients and AdamW state sharded) log the same losses to 1e-5, keep the balancing
    biases identical on every rank, and FSDP's checkpoint is one ordinary file that a single process
    resumes and sample.py reads."""
    args = [*TINY, f'--data_dir={data_dir}', '--max_iters=6', '--eval_interval=3', '--log_interval=1',
            '--expert_dropout=0', '--router_jitter=0']   # no per-rank random numbers
    one = str(tmp_path / 'one')
    procs = {kind: subprocess.Popen(train_cmd(*args, f'--out_dir={tmp_path / kind}', '--batch_size=2', *extra, nproc=2),
                                    cwd=ROOT, env=env_for(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for kind, extra in (('ddp', []), ('fsdp', ['--fsdp=true']))}   # side by side: each waits on its start-up
    train_here(*args, f'--out_dir={one}', '--batch_size=4')
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0 and f'{kind}: 2 ranks hold identical' in stdout, stdout + stderr
        out = str(tmp_path / kind)
        a, b = losses(one), losses(out)
        assert sorted(a) == sorted(b) and all(abs(a[i] - b[i]) < 1e-5 for i in a), (a, b)
        ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
        biases = [v for k, v in ck['model'].items() if k.endswith('expert_bias')]
        assert len(biases) == 2 and any(bias.abs().sum() > 0 for bias in biases)   # all-reduced counts
        assert read_log(out)[-1]['tokens_seen'] == 6 * 2 * 2 * 32
    train_here(f'--out_dir={tmp_path}/fsdp', '--init_from=resume', '--max_iters=8', '--device=cpu', '--fsdp=false',
               '--batch_size=4')
    assert max(losses(f'{tmp_path}/fsdp')) == 8
    # a resume in one process keeps the tokens of an iteration: twice the accumulation, the same losses
    capsys.readouterr()
    for out in (one, f'{tmp_path}/ddp'):
        train_here(f'--out_dir={out}', '--init_from=resume', '--max_iters=8', '--device=cpu')
    assert ('resume changes: max_iters 6 -> 8; gradient_accumulation_steps 1 -> 2 (1 process instead of 2: the '
            'same 4 windows per iteration)') in capsys.readouterr().out
    a, b = losses(one), losses(f'{tmp_path}/ddp')
    assert sorted(b) == list(range(1, 9)) and all(abs(a[i] - b[i]) < 1e-5 for i in a), (a, b)
    assert read_log(f'{tmp_path}/ddp')[-1]['tokens_seen'] == 2 * 4 * 32


def test_under_torchrun_the_first_process_speaks_for_all(finished, data_dir):
    """A setting every process refuses, and a refusal only the first process can make (its output folder
    holds a finished run), are each one error line, from the first process; the others print nothing."""
    out, args = finished
    procs = [subprocess.Popen(train_cmd(*argv, nproc=2), cwd=ROOT, env=env_for(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for argv in ([*TINY, f'--data_dir={data_dir}', '--batch_size=0'], args)]
    for p, message in zip(procs, ('error: batch_size must be in [1, 1048576], got 0',
                                  f'error: {out} already holds a run')):
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0 and [line for line in err.splitlines() if 'error' in line.lower()
                                      and 'torch.distributed' not in line][:1] == [line for line in err.splitlines()
                                                                                   if line.startswith(message)], err
        assert err.count('error: ') == 1 and os.path.join(ROOT, 'train.py') + '", line' not in err, err


# -----------------------------------------------------------------------------
# a finished run is never overwritten; a resume is checked against its checkpoint

@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
    """A finished 8-step run: (out_dir, its command-line arguments)."""
    out = str(tmp_path_factory.mktemp('runs') / 'done')
    args = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=8', '--eval_interval=4',
            '--log_interval=1']
    train_here(*args)
    return out, args


@pytest.mark.parametrize('extra, message', [
    ([], 'already holds a run: continue it with --init_from=resume, train into another --out_dir, '
         'or replace it with --overwrite=true'),
    (['--init_from=resume'], 'is at iter 8 and max_iters is 8: nothing to train; raise --max_iters to continue'),
    (['--init_from=resume', '--max_iters=4'], 'is at iter 8 and max_iters is 4'),
    (['--init_from=resume', '--max_iters=12', '--n_layer=3'], "these settings differ from it: --n_layer=3 "
                                                              "(checkpoint: 2)"),
    (['--init_from=resume', '--max_iters=12', '--block_size=64'], '--block_size=64 (checkpoint: 32)'),
])
def test_a_finished_run_is_left_alone(finished, extra, message):
    out, args = finished
    before = snapshot(out)
    refused(*args, *extra, match=message)
    assert snapshot(out) == before


def test_resume_onto_other_data_is_refused_with_the_command_that_makes_its_own(tmp_path):
    """Data prepared again in place with another vocab_size is refused, naming what differs and the prepare
    command the checkpoint recorded, into a folder of its own; following it, the resume works. The same
    data under another folder name is accepted. Nothing is written before a refusal."""
    d, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    data_args = [f'--data_dir={d}', '--dataset=shakespeare', '--max_docs=4', '--val_docs=1']
    prepare.main([*data_args, '--vocab_size=400'])
    train_here(*TINY, f'--data_dir={d}', f'--out_dir={out}', '--vocab_size=400', '--max_iters=2', '--eval_interval=2')
    resume = [f'--out_dir={out}', '--init_from=resume', '--max_iters=4', '--device=cpu', '--compile=False']
    os.rename(d, d + '-away')   # gone: the command makes the checkpoint's data, not the defaults'
    refused(*resume, match=f"no dataset in {d}: run `python prepare.py --dataset=shakespeare --vocab_size=400 --val_docs=1 --max_docs=4 "
                           f"--data_dir={d}` first")
    shutil.copytree(d + '-away', str(tmp_path / 'renamed'))
    train_here(*resume, f'--data_dir={tmp_path}/renamed')   # the same data under another name
    os.rename(d + '-away', d)
    prepare.main([*data_args, '--vocab_size=300', '--force'])
    before = snapshot(out)
    message = refused(*resume, '--max_iters=6', f'--data_dir={d}',
                      match=f"{d} is not the data the checkpoint was trained on (its tokenizer")
    assert snapshot(out) == before and dataset.read_meta(d)['n_vocab'] <= 300   # nothing written, the other data kept
    command = message.split('`')[1].split()
    assert command[:2] == ['python', 'prepare.py'] and '--vocab_size=400' in command
    prepare.main(command[2:])
    train_here(*resume, '--max_iters=6', message.split(' and resume with ')[1].strip())   # --data_dir=that folder
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 6


def test_resume_refuses_damaged_or_incomplete_checkpoints(finished, tmp_path):
    out, args = finished
    copy = copy_files(out, str(tmp_path / 'copy'), ['ckpt.pt', 'log.jsonl'])
    resume = [*args, f'--out_dir={copy}', '--init_from=resume', '--max_iters=12']
    ckpt = os.path.join(copy, 'ckpt.pt')
    data = bytearray(open(ckpt, 'rb').read())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(8 * [0x5A])   # bytes overwritten in the middle
    open(ckpt, 'wb').write(bytes(data))
    message = refused(*resume, match='is damaged')
    assert 'ckpt_best' not in message   # it holds no optimizer state: no resume from it
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    del ck['optimizer']
    checkpoint.save_checkpoint({k: v for k, v in ck.items() if k not in ('format', 'checksum')}, ckpt)
    refused(*resume, match='incomplete: it has no optimizer')
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)   # well formed, but not this model's
    ck['model']['wte.weight_renamed'] = ck['model'].pop('wte.weight')
    checkpoint.save_checkpoint({k: v for k, v in ck.items() if k not in ('format', 'checksum')}, ckpt)
    refused(*resume, match='does not fit this model.py')
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)   # two optimizers' states for AdamW's one
    ck['optimizer'] = ck['optimizer'] * 2
    checkpoint.save_checkpoint({k: v for k, v in ck.items() if k not in ('format', 'checksum')}, ckpt)
    refused(*resume, match='holds another optimizer state than --optimizer=adamw needs')
    os.remove(ckpt)
    os.mkfifo(ckpt)   # would hang a reader
    refused(*resume, match='is not a regular file (a pipe or a device)')


def test_resume_goes_on_with_the_recipe_it_started_with(finished, tmp_path, capsys):
    """Settings not given again are the checkpoint's; a config file given again does not change them
    (its other values are named); an override does, and is printed old -> new. The resumed run matches
    one that was given every flag again."""
    out, args = finished
    copies = [copy_files(out, str(tmp_path / name), ['ckpt.pt', 'log.jsonl']) for name in ('given', 'bare', 'file')]
    train_here(*args, f'--out_dir={copies[0]}', '--init_from=resume', '--max_iters=12')
    train_here(f'--out_dir={copies[1]}', '--init_from=resume', '--max_iters=12', '--device=cpu')
    lrs = [{r['iter']: (r['lr'], r['loss']) for r in read_log(c) if r['kind'] == 'train'} for c in copies[:2]]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 12
    conf = tmp_path / 'conf.py'
    conf.write_text("learning_rate = 1e-2\nmin_lr = 1e-3\n")
    capsys.readouterr()
    train_here(str(conf), f'--out_dir={copies[2]}', '--init_from=resume', '--max_iters=12', '--device=cpu',
               '--weight_decay=0.05')
    printed = capsys.readouterr().out
    assert "resume changes: max_iters 8 -> 12; weight_decay 0.1 -> 0.05" in printed
    assert f"learning_rate 0.003 (not {conf}'s 0.01: override with --learning_rate)" in printed
    assert all(r['lr'] <= 3e-3 for r in read_log(copies[2]) if r['kind'] == 'train')


def test_overrides_win_wherever_they_stand(data_dir, tmp_path):
    """The README's order: config files, then overrides, even when an override comes first."""
    conf = tmp_path / 'conf.py'
    conf.write_text(f"max_iters = 50\nout_dir = {str(tmp_path / 'from-file')!r}\n")
    train_here('--max_iters=3', f'--out_dir={tmp_path}/flag', str(conf), *TINY, f'--data_dir={data_dir}',
               '--eval_interval=3')
    assert read_log(f'{tmp_path}/flag')[-1]['iter'] == 3 and not os.path.exists(tmp_path / 'from-file')


def test_a_checkpoint_from_another_run_is_not_resumed_into_this_runs_log(finished, tmp_path):
    out, args = finished
    other = str(tmp_path / 'other')
    train_here(*args, f'--out_dir={other}', '--max_iters=4', '--eval_interval=4')
    mixed = copy_files(out, str(tmp_path / 'mixed'), ['log.jsonl'])
    shutil.copyfile(os.path.join(other, 'ckpt.pt'), os.path.join(mixed, 'ckpt.pt'))
    before = snapshot(mixed)
    refused(*args, f'--out_dir={mixed}', '--init_from=resume', '--max_iters=8',
            match='is from another run than')
    assert snapshot(mixed) == before
    os.rename(os.path.join(mixed, 'log.jsonl'), os.path.join(tmp_path, 'log-of-the-first-run.jsonl'))   # the advice
    train_here(*args, f'--out_dir={mixed}', '--init_from=resume', '--max_iters=8')
    assert sorted(losses(mixed)) == [5, 6, 7, 8]


def test_a_run_stopped_before_its_first_checkpoint_is_started_over(finished, tmp_path):
    out, args = finished
    copy = copy_files(out, str(tmp_path / 'early'), ['log.jsonl'])
    refused(*args, f'--out_dir={copy}', match='holds a run that wrote no checkpoint yet: start it over with '
                                              '--overwrite=true')
    best_only = copy_files(out, str(tmp_path / 'best'), ['ckpt_best.pt', 'log.jsonl'])
    message = refused(*args, f'--out_dir={best_only}', match='but no ckpt.pt to resume: train into another --out_dir')
    assert '--overwrite=true would delete' in message and os.path.exists(os.path.join(best_only, 'ckpt_best.pt'))


def test_resume_drops_damaged_log_lines(tmp_path):
    """A kill can cut the last record short; resuming keeps the whole records up to the checkpoint."""
    path = str(tmp_path / 'log.jsonl')
    with open(path, 'wb') as f:
        f.write(b'{"kind": "eval", "iter": 0}\n{"kind": "train", "iter": 5}\n[1, 2]\n\xff\xfe\n'
                b'{"kind": "train", "iter": "x"}\n{"kind": "train", "iter": 15}\n' + b'[' * 100_000 + b'\n'
                b'{"kind": "train", "it')
    runlog.keep_log_until(path, 10)
    assert read_log(str(tmp_path)) == [{'kind': 'eval', 'iter': 0}, {'kind': 'train', 'iter': 5}]


def test_overwrite_starts_over(finished, tmp_path):
    out, args = finished
    copy = copy_files(out, str(tmp_path / 'copy'))
    train_here(*args, f'--out_dir={copy}', '--max_iters=4', '--overwrite=yes')
    assert [r['iter'] for r in read_log(copy) if r['kind'] == 'eval'] == [0, 4]
    assert torch.load(os.path.join(copy, 'ckpt.pt'), weights_only=True)['iter_num'] == 4


def test_data_being_read_is_not_prepared_over_and_data_being_written_is_not_read(data_dir, tmp_path):
    with checkpoint.lock_folder(data_dir, 'training run', shared=True):   # as a training run holds it
        checkpoint.lock_folder(data_dir, 'training run', shared=True).close()   # other readers are welcome
        with pytest.raises(UserError, match=f'{data_dir} is in use by a training run reading it'):
            prepare.main([f'--data_dir={data_dir}', '--dataset=shakespeare', '--max_docs=6', '--val_docs=1', '--vocab_size=512',
                          '--force'])
    with checkpoint.lock_folder(data_dir, 'prepare run'):   # another process: the lock is the point
        p = run_train(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', '--max_iters=2', check=False)
    one_line_error(p, f'{data_dir} is in use by a process writing it (pid {os.getpid()})')


def test_a_second_training_into_the_same_out_dir_refuses(data_dir, tmp_path):
    out = str(tmp_path / 'busy')
    with checkpoint.lock_folder(out, 'training run'):
        refused(*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2',
                match=f'{out} is in use by another training run (pid {os.getpid()})')


# -----------------------------------------------------------------------------
# bad input: one line, nothing written

@pytest.mark.parametrize('args, message', [
    (['--lerning_rate=1e-3'], "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
    (['--max_iters=lots'], "config key 'max_iters' expects an int"),
    (['--n_head=5'], 'n_head (5) must be divisible by n_kv_head'),
    (['--init_from=resume', '--out_dir=nowhere-xyz'], 'no checkpoint at nowhere-xyz/ckpt.pt'),
    (['--init_from=restart'], "init_from must be 'scratch' or 'resume'"),
    (['--vocab_size=300'], 'vocab_size 300 is smaller than the tokenizer'),
    (['config/nope.py'], 'config file config/nope.py not found'),
    (['--dtype=float8'], "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
    (['--device=tpu'], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (['--compile=maybe'], "config key 'compile' expects true/false/auto"),
    (['--grad_clip=-1'], 'grad_clip must be >= 0 (0 = off), got -1.0'),
    (['--lr_decay_iters=-1'], 'lr_decay_iters must be in [0, 2147483648] (0 = max_iters)'),
    (['--weight_decay=-5'], 'weight_decay must be >= 0'),
    (['--learning_rate=-1'], 'learning_rate must be > 0'),
    (['--beta1=2'], 'beta1 must be in [0, 1)'),
    (['--seed=-1'], 'seed must be in [0, 2**32)'),
    (['--expert_dropout=1.5'], 'expert_dropout must be in [0, 1)'),
    (['--block_size=100000'], 'fewer than block_size 100000 + 1: lower --block_size'),
    (['--vocab_size=16777216', '--n_embd=65536', '--n_layer=1'], 'the weights, gradients and AdamW state alone need'),
    (['--vocab_size=1000000000000000000000000000000'], 'vocab_size must be an integer in [1, 16777216]'),
    (['--out_dir=README.md'], 'README.md is a file, not a folder'),
    (['--out_dir='], "out_dir must be a folder, got ''"),
    (['--min_lr=5'], 'min_lr 5.0 is above learning_rate 0.003: lower --min_lr'),
    (['--n_layer=100000'], 'n_layer must be an integer in [1, 1024]'),
    (['--learning_rate=1e999'], "config key 'learning_rate' expects a finite number"),
    (['--device=cpu:x'], "device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:x'"),
    (['--ckpt_interval=7', '--eval_interval=10'], 'ckpt_interval 7 is not a multiple of eval_interval 10'),
    (['--fsdp=true'], '--fsdp=true shards the model over several processes: start them with torchrun'),
    (['--fsdp=true', '--optimizer=muon'], '--optimizer=muon orthogonalises whole weight matrices'),
    pytest.param(['--device=mps'], 'device=mps but this torch has no MPS',
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason='this machine has MPS')),
    pytest.param(['--device=cuda'], 'device=cuda but CUDA is not available: use --device=cpu',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')),
])
def test_bad_input_is_one_clean_line(data_dir, args, message, tmp_path):
    before = snapshot(ROOT)
    refused(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out', *args, match=message)
    assert not os.path.exists(f'{tmp_path}/out') and snapshot(ROOT) == before   # nothing was written


def test_advice_that_names_a_setting_works_when_followed(data_dir, tmp_path):
    message = refused(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/o', '--ckpt_interval=7',
                      '--eval_interval=5', '--max_iters=10', match='set --ckpt_interval=')
    train_here(*TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}/o', '--eval_interval=5', '--max_iters=10',
               message.split('set ')[1])
    assert torch.load(f'{tmp_path}/o/ckpt.pt', weights_only=True)['iter_num'] == 10
    refused(*TINY, f'--data_dir={data_dir}', f'--out_dir={data_dir}', match='out_dir and data_dir are the same folder')


def test_the_command_line_says_no_in_one_line_with_exit_code_2(data_dir, tmp_path):
    one_line_error(run_train(*TINY, f'--data_dir={data_dir}', '--max_iters=lots', check=False),
                   "config key 'max_iters' expects an int")
    env = {k: v for k, v in os.environ.items() if k not in ('LOCAL_RANK', 'WORLD_SIZE')}
    p = subprocess.run(train_cmd(*TINY, f'--data_dir={data_dir}'), capture_output=True, text=True, cwd=ROOT,
                       env={**env, 'RANK': '0'}, timeout=120)
    one_line_error(p, 'RANK is set but LOCAL_RANK or WORLD_SIZE is missing')


def test_bad_data_is_one_clean_line(data_dir, tmp_path, monkeypatch):
    # no data: the prepare command that makes it, from the run's config files and data settings
    refused(*TINY, f'--data_dir={tmp_path}/none', match=f"no dataset in {tmp_path}/none: run `python prepare.py "
                                                        f"--vocab_size=512 --data_dir={tmp_path}/none` first")
    refused('config/deepseek_mini.py', f'--data_dir={tmp_path}/none', '--max_iters', '5',
            match=f"run `python prepare.py config/deepseek_mini.py --data_dir={tmp_path}/none` first")
    # a suggestion prepare.py would refuse is never made: the advice names what to change instead
    refused(*TINY, f'--data_dir={tmp_path}/none', '--vocab_size=100', match='set --vocab_size=257 or more')
    with pytest.raises(UserError, match='at least 257'):
        prepare.main([f'--data_dir={tmp_path}/none', '--vocab_size=100'])   # what the old advice led to
    monkeypatch.chdir(tmp_path)   # data/mybook is made here, not in the repo
    message = refused(*TINY, '--dataset=mybook', match="prepare the text of 'mybook' first")
    notes = tmp_path / 'notes'
    notes.mkdir()
    for i in range(3):
        (notes / f'{i}.txt').write_text(f"note {i}: " + "words of my own, " * 400)
    command = message.split('`')[1].replace('YOUR_FILES', str(notes)).split()
    prepare.main([*command[2:], '--vocab_size=512', '--val_docs=1'])
    train_here(*TINY, '--dataset=mybook', '--max_iters=2', '--eval_interval=2', f'--out_dir={tmp_path}/book')
    bad = copy_files(data_dir, str(tmp_path / 'bad'))
    meta = json.load(open(os.path.join(bad, 'meta.json')))
    ids = np.memmap(os.path.join(bad, 'train.bin'), dtype=meta['dtype'], mode='r+')
    ids[::7] = meta['n_vocab'] + 5   # token ids outside the vocabulary, in every window read
    ids.flush()
    del ids
    refused(*TINY, f'--data_dir={bad}', f'--out_dir={tmp_path}/o1', match=f"holds token id {meta['n_vocab'] + 5}, "
                                                                          f"outside its tokenizer's")
    meta['train_tokens'] = 'many'
    json.dump(meta, open(os.path.join(bad, 'meta.json'), 'w'))
    refused(*TINY, f'--data_dir={bad}', f'--out_dir={tmp_path}/o2', match="'train_tokens' should be int, got 'many'")


def test_lr_schedule():
    cfg = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_decay_iters=0, lr_schedule='cosine')
    lrs = [train.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0                 # linear warmup
    assert abs(lrs[10] - 1.0) < 1e-9                       # peak, then cosine
    assert abs(lrs[60] - (0.1 + 0.45)) < 1e-9              # halfway down
    assert lrs[110] == lrs[119] == 0.1                     # floor after lr_decay_iters (= max_iters)


def test_bits_per_byte_is_nats_over_the_text_bytes(tmp_path):
    """val_bpb = the loss summed over targets that are text, in bits, over those targets' UTF-8 bytes,
    computed here from full logits and tiktoken's own bytes; <|endoftext|> targets have no bytes, so
    they count in val_loss but not in bits per byte."""
    import math
    import tiktoken
    import torch.nn.functional as F
    from model import DeepSeekLM, ModelConfig
    # byte-level ranks, a gap at 256..299, <|endoftext|> = 300: a padded, gapped vocabulary
    enc = tiktoken.Encoding('bytes', pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={dataset.EOT: 300})
    rng = np.random.default_rng(0)
    tokens = rng.choice(np.r_[np.arange(97, 123), 0xC3, 0xA9, 32, 300], size=4000).astype(np.uint16)
    for split in ('train', 'val'):
        tokens.tofile(tmp_path / f'{split}.bin')
    data = {s: str(tmp_path / f'{s}.bin') for s in ('train', 'val')}
    torch.manual_seed(0)
    model = DeepSeekLM(ModelConfig(vocab_size=320, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                                   n_latent=2, n_expert=2, n_expert_active=1, expert_hidden=32, block_size=16))
    cfg = {'seed': 3, 'eval_iters': 2, 'batch_size': 3}
    token_bytes = torch.tensor([len(b) for b in dataset.text_bytes(enc, 320)], dtype=torch.float32)
    assert token_bytes[300] == 0 and token_bytes[270] == 0 and token_bytes[0xC3] == 1
    meta = {'dtype': 'uint16', 'n_vocab': 320, 'train_tokens': len(tokens), 'val_tokens': len(tokens)}
    data = preflight.Data(str(tmp_path), meta, {}, data, '', token_bytes)
    out = train.evaluate(model, model, data, cfg, 16, devices.plan('cpu', 'float32', False))
    # the reference: the same windows, full logits, tiktoken's bytes
    win = np.random.default_rng(cfg['seed'] + 10_000)
    nats = nbytes = total = count = 0.0
    model.eval()
    for _ in range(cfg['eval_iters']):
        ix = win.integers(0, len(tokens) - 16, size=3)
        x = torch.tensor(np.stack([tokens[i:i + 16] for i in ix]).astype(np.int64))
        y = torch.tensor(np.stack([tokens[i + 1:i + 17] for i in ix]).astype(np.int64))
        with torch.no_grad():
            loss = F.cross_entropy(model(x)[0].flatten(0, 1).float(), y.flatten(), reduction='none')
        for l, t in zip(loss.tolist(), y.flatten().tolist()):
            total, count = total + l, count + 1
            if t != 300:
                nats, nbytes = nats + l, nbytes + len(enc.decode_single_token_bytes(t))
    assert out['val_loss'] == pytest.approx(total / count, rel=1e-5)
    assert out['val_bpb'] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert nbytes < count   # some targets were <|endoftext|>


def test_wsd_schedule():
    cfg = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_decay_iters=0,
               lr_schedule='wsd', cooldown_frac=0.2)
    lrs = [train.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[9] <= 1.0                                  # linear warmup
    assert all(lr == 1.0 for lr in lrs[10:90])                     # stable until the last 20% of 100 steps
    assert lrs[100] == pytest.approx(1.0 - 0.9 * 0.5)              # halfway through the linear cooldown
    assert lrs[90] > lrs[95] > lrs[105] > 0.1 and lrs[110] == lrs[119] == 0.1


def test_divergence_stops_cleanly_and_keeps_last_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / 'nan')
    args = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--log_interval=1', '--eval_interval=4']
    train_here(*args, '--max_iters=4')
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    message = refused(*args, '--max_iters=40', '--init_from=resume', '--learning_rate=1e9', '--min_lr=1e9',
                      match='training diverged')
    assert f'the last good checkpoint {out}/ckpt.pt is kept' in message
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before


def test_a_full_disk_while_logging_names_the_log_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    import builtins
    import errno
    out = str(tmp_path / 'out')
    args = [*TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--eval_interval=4', '--log_interval=1']
    train_here(*args, '--max_iters=4')

    def full(path, *a, **kw):
        if str(path).endswith('log.jsonl') and a and a[0] == 'a':
            raise OSError(errno.ENOSPC, 'No space left on device')
        return builtins.open(path, *a, **kw)
    monkeypatch.setattr(runlog, 'open', full, raising=False)
    refused(*args, '--max_iters=8', '--init_from=resume',
            match=f"cannot write {out}/log.jsonl (No space left on device): free disk space, then resume")
    monkeypatch.undo()
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 4
    train_here(*args, '--max_iters=8', '--init_from=resume')   # the advice, once there is space
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 8
