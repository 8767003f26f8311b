"""The README's commands end to end, small: prepare -> train -> sample for the shipped configs."""

import json
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
    run('prepare.py', 'config/deepseek_mini.py', f'--data_dir={data}', '--max_docs=8', '--val_docs=1')   # small, quick
    p = run('train.py', 'config/deepseek_mini.py', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=10',
            '--eval_interval=5', '--log_interval=5', '--eval_iters=2')
    assert 'iter 10/10' in p.stdout and 'eval 10:' in p.stdout and 'whole val split (' in p.stdout
    s = run('sample.py', f'--out_dir={out}', '--num_samples', '5', '--max_new_tokens=20', '--seed=7')
    assert [line for line in s.stdout.splitlines() if line.startswith('--- sample')] == \
        [f'--- sample {i} ---' for i in range(1, 6)]
    assert 'tokens/s' in s.stderr


def test_full_size_configs_run_on_cpu_with_small_overrides(tmp_path, tinystories_mirror):
    """The card's three commands as the README gives them, run from a folder of their own: `python prepare.py`
    (TinyStories, in miniature on 127.0.0.1), `python train.py config/deepseek.py` with the reference
    vocabulary, width, heads and experts but one of the 24 layers (the checkpoint of two would be twice as
    large to write) and tiny batches, and `python sample.py --num_samples 5`; then the MLA config on the
    same data, which `python prepare.py config/deepseek_mla.py` finds already prepared."""
    def here(script, *args):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        return p
    here('prepare.py')
    for config in ('config/deepseek.py', 'config/deepseek_mla.py'):
        if config != 'config/deepseek.py':
            assert 'already prepared' in here('prepare.py', os.path.join(ROOT, config)).stdout
        p = here('train.py', os.path.join(ROOT, config), '--device=cpu', '--n_layer=1', '--batch_size=1',
                 '--block_size=64', '--max_iters=2', '--eval_iters=1', '--eval_interval=2', '--log_interval=1',
                 '--warmup_iters=1', '--final_eval=false')
        assert 'iter 2/2' in p.stdout and 'data/tinystories' in p.stdout
        out = tmp_path / ('out-deepseek-mla' if 'mla' in config else 'out-deepseek')
        ck = torch.load(out / 'ckpt.pt', weights_only=True)
        args = ck['model_args']
        assert (args['vocab_size'], args['n_embd'], args['n_head'], args['n_kv_head'], args['head_dim'],
                args['n_expert'], args['n_expert_active'], args['expert_hidden']) == (49152, 768, 12, 4, 64, 8, 2, 2048)
        assert args['attention'] == ('mla' if 'mla' in config else 'latent')
        if config == 'config/deepseek.py':
            s = here('sample.py', '--num_samples', '5', '--max_new_tokens=3')
            assert s.stdout.count('--- sample') == 5 and 'out-deepseek/ckpt_best.pt' in s.stderr


@pytest.mark.skipif(not os.environ.get('SLOW'), reason='minutes on a CPU: SLOW=1 python -m pytest tests/test_e2e.py')
def test_card_model_fp16_path_end_to_end_on_cpu(tmp_path, monkeypatch, capsys, tinystories_mirror):
    """What a T4 user runs, at the card's shapes (all 24 layers, 49,152 tokens) with a small batch, on the
    CPU: fp16 autocast with the GradScaler, the per-expert fallback (no grouped-matmul kernel), activation
    checkpointing; a few steps with finite, falling loss, a resume, and five samples."""
    import math
    import kernel
    import prepare
    import sample
    import train
    monkeypatch.setattr(kernel, 'has_grouped_mm_kernel', lambda a: False)   # a T4 has none for fp16
    data, out = str(tmp_path / 'data'), str(tmp_path / 'out')
    prepare.main(['config/deepseek.py', f'--data_dir={data}'])
    args = ['config/deepseek.py', f'--data_dir={data}', f'--out_dir={out}', '--device=cpu', '--dtype=float16',
            '--activation_checkpointing=true', '--batch_size=1', '--block_size=64', '--eval_iters=1',
            '--eval_interval=4', '--log_interval=1', '--warmup_iters=1', '--learning_rate=1e-3', '--final_eval=false']
    train.main([*args, '--max_iters=4'])
    train.main([*args, '--max_iters=6', '--init_from=resume'])
    printed = capsys.readouterr().out
    assert 'float16' in printed and 'activation checkpointing on' in printed
    log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    steps = [r['loss'] for r in log if r['kind'] == 'train']
    assert len(steps) == 6 and all(math.isfinite(x) for x in steps) and steps[-1] < steps[0]
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ck['scaler'] is not None and ck['iter_num'] == 6
    texts = sample.main([f'--out_dir={out}', '--num_samples=5', '--max_new_tokens=8', '--device=cpu',
                         '--dtype=float16'])
    assert len(texts) == 5
