"""bench.py --quick: every row runs and the last line is one JSON object with every key."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_prints_table_and_json():
    # one thread: a smoke test of the code paths, and two OpenMP threads on a busy 2-core machine can stall
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--quick', '--json', '--device=cpu'],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    for key in ('train_vs_mm', 'train_vs_mm_eager', 'step_vs_gemm_floor', 'moe_vs_dense', 'moe_step_vs_dense',
                'moe_step_vs_dense_muon', 'moe_step_vs_dense_card', 'latent_attn_vs_causal', 'cache_speedup',
                'mla_decode_vs_latent', 'mla_decode_vs_latent_ctx16', 'latent_decode_tok_s', 'mla_decode_tok_s',
                'vs_transformers', 'mfu', 'compile_speedup', 'state_gib', 'saved_gib', 'step_checkpointed_gib'):
        assert key in out, key
        assert any(line.startswith(key + ' ') for line in lines[:-1]), key   # a row of the table too
    assert out['step_checkpointed_gib'] < out['step_gib'] and out['gpus']['T4 16 GB']['checkpointing'] >= 1
    assert out['quick'] is True and out['mfu'] is None and out['train_vs_mm'] is None   # no compile in --quick
    for key in ('train_vs_mm_eager', 'step_vs_gemm_floor', 'moe_vs_dense', 'moe_step_vs_dense', 'moe_step_vs_dense_muon',
                'moe_step_vs_dense_card', 'latent_attn_vs_causal', 'cache_speedup', 'mla_decode_vs_latent'):
        assert 0 < out[key] < 1000, (key, out[key])


def test_profile_prints_the_ops_of_a_train_step():
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--profile', '--quick', '--device=cpu'],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    # the table's 25 rows by self time: at --quick sizes the loss's own row sits at the edge of it
    assert 'aten::mm' in p.stdout and 'Self CPU' in p.stdout and 'Self CPU time total' in p.stdout


def test_only_must_name_a_row():
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'bench.py'), f'--only={only}'], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for only in ('nope', ',,')]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.count('\n') == 1 and 'rows are' in err, err


def test_every_row_name_is_accepted_by_only():
    """Each row's name, as the docstring lists it, is what --only takes (compile_speedup was once refused)."""
    import bench
    names = [r.__name__[len('row_'):] for r in bench.ROWS]
    assert 'compile_speedup' in names and 'memory' in names
    for name in names:
        assert f"    {name} " in bench.__doc__, name
