"""The README's commands end to end, small: prepare -> train -> sample for the shipped configs."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_mini_config_prepare_train_sample(tmp_path):
    data, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    run('prepare.py', 'config/deepseek_mini.py', f'--data_dir={data}')
    p = run('train.py', 'config/deepseek_mini.py', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=30',
            '--eval_interval=15', '--log_interval=10', '--eval_iters=2')
    assert 'iter 30/30' in p.stdout and 'eval 30:' in p.stdout
    s = run('sample.py', f'--out_dir={out}', '--num_samples', '5', '--max_new_tokens=20', '--seed=7')
    assert [line for line in s.stdout.splitlines() if line.startswith('--- sample')] == \
        [f'--- sample {i} ---' for i in range(1, 6)]
    assert 'tokens/s' in s.stderr
    again = run('sample.py', f'--out_dir={out}', '--num_samples', '5', '--max_new_tokens=20', '--seed=7')
    assert again.stdout == s.stdout


@pytest.mark.parametrize('config', ['config/deepseek.py', 'config/deepseek_mla.py'])
def test_full_size_configs_run_on_cpu_with_small_overrides(tmp_path, config):
    """The reference vocabulary, width, heads and experts, with 2 of the 24 layers and tiny batches."""
    data, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    run('prepare.py', config, f'--data_dir={data}')
    p = run('train.py', config, f'--data_dir={data}', f'--out_dir={out}', '--device=cpu', '--n_layer=2',
            '--batch_size=1', '--block_size=64', '--max_iters=2', '--eval_iters=1', '--eval_interval=2',
            '--log_interval=1', '--warmup_iters=1')
    assert 'iter 2/2' in p.stdout
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    args = ck['model_args']
    assert (args['vocab_size'], args['n_embd'], args['n_head'], args['n_kv_head'], args['head_dim'],
            args['n_expert'], args['n_expert_active'], args['expert_hidden']) == (49152, 768, 12, 4, 64, 8, 2, 2048)
    assert args['attention'] == ('mla' if 'mla' in config else 'latent')
