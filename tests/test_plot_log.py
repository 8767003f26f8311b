"""plot_log.py: the expert-load picture's numbers, and the picture itself where matplotlib is installed."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from plot_log import load_over_training  # noqa: E402


def eval_record(it, val_load):
    return {'kind': 'eval', 'iter': it, 'train_loss': 5.0, 'val_loss': 5.5, 'val_max_vio': 0.2, 'val_load': val_load}


def test_load_over_training_is_each_layers_share_per_expert_per_evaluation():
    """Layer l's matrix has one row per expert and one column per evaluation, scaled so that 1.0 is an even
    share; evaluations without per-layer loads (older logs) are skipped."""
    evals = [eval_record(0, [[0.5, 0.5], [1.0, 0.0]]), {'kind': 'eval', 'iter': 5, 'val_loss': 5.0},
             eval_record(10, [[0.25, 0.75], [0.5, 0.5]])]
    iters, loads = load_over_training(evals, 'val_load')
    assert iters == [0, 10]
    assert loads == [[[1.0, 0.5], [1.0, 1.5]],    # layer 0: expert 0 over time, expert 1 over time
                     [[2.0, 1.0], [0.0, 1.0]]]    # layer 1 collapsed onto expert 0 at iteration 0
    assert load_over_training([{'kind': 'eval', 'iter': 0}], 'val_load') == ([], [])
    damaged = [eval_record(20, []), eval_record(30, [[0.5, 0.5], [0.3]]), eval_record(40, [[0.5, 'x'], [1, 0]]),
               eval_record(50, [[0.5, 0.5, 0.0]])]   # empty, ragged, not numbers, another shape
    assert load_over_training(evals + damaged, 'val_load') == (iters, loads)


def test_never_writes_over_anything_but_a_png(tmp_path):
    """--png names the picture: a checkpoint, the log itself or a folder is refused before anything is drawn."""
    (tmp_path / 'log.jsonl').write_text(json.dumps({'kind': 'train', 'iter': 1, 'loss': 5.0, 'max_vio': 0.1}) + '\n')
    (tmp_path / 'ckpt.pt').write_bytes(b'weights')
    (tmp_path / 'pics.png').mkdir()
    for png in ('ckpt.pt', 'log.jsonl', 'pics.png'):
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'plot_log.py'), f'--out_dir={tmp_path}',
                            f'--png={tmp_path / png}'], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 2 and p.stderr.count('\n') == 1 and 'is not a .png file name' in p.stderr, p.stderr
    assert (tmp_path / 'ckpt.pt').read_bytes() == b'weights' and sorted(os.listdir(tmp_path)) == [
        'ckpt.pt', 'log.jsonl', 'pics.png']


def test_draws_loss_balance_and_load_per_layer(tmp_path):
    pytest.importorskip('matplotlib')
    log = tmp_path / 'log.jsonl'
    records = [{'kind': 'train', 'iter': i, 'loss': 6.0 - i / 10, 'max_vio': 0.3} for i in range(1, 20)]
    records += [eval_record(i, [[0.1] * 8 + [0.2], [1 / 9] * 9, [0.3] + [0.7 / 8] * 8]) for i in (0, 10, 20)]
    log.write_text(''.join(json.dumps(r) + '\n' for r in records))
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'plot_log.py'), f'--out_dir={tmp_path}', '--title=t'],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    png = tmp_path / 'run.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and sorted(os.listdir(tmp_path)) == ['log.jsonl', 'run.png']


def test_a_pipe_a_folder_or_deep_json_as_the_log_is_one_line(tmp_path):
    """A FIFO as the log would hang the reader; JSON nested 100,000 deep overflows the parser: both are
    named in one line, and a missing log's advice names the run folder."""
    import plot_log
    from cli import UserError
    os.mkfifo(tmp_path / 'pipe.jsonl')
    (tmp_path / 'deep.jsonl').write_text('[' * 100_000 + '\n')
    for log, message in (('pipe.jsonl', 'is not a regular file (a pipe or a device)'),
                         ('.', 'is a folder, not a file'), ('deep.jsonl', 'is not a log of train.py (RecursionError)'),
                         ('none.jsonl', f'train first with `python train.py --out_dir={tmp_path}`')):
        with pytest.raises(UserError, match=re.escape(message)):
            plot_log.main([f'--out_dir={tmp_path}', f'--log={tmp_path / log}'])
