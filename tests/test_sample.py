"""sample.py on a tiny random model: the output format, streaming, seeds, greedy = a plain uncached decode,
file prompts, stopping at <|endoftext|>, no data folder needed, and every user mistake as one line with
exit code 2."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import cli
import dataset
import model as model_module
import prepare
import sample
from dataset import EOT
from model import DeepSeekLM, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 32


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A checkpoint in train.py's format: random tiny model, the tokenizer of two plays. The data folder the
    tokenizer came from is deleted, so only the checkpoint is left. Returns (ckpt path, model, tokenizer)."""
    data_dir = str(tmp_path_factory.mktemp('data') / 'tiny')
    prepare.main([f'--data_dir={data_dir}', '--max_docs=2', '--val_docs=1', '--vocab_size=300'])
    spec = dataset.tokenizer_spec(data_dir, dataset.read_meta(data_dir))
    shutil.rmtree(data_dir)
    enc = dataset.load_tokenizer(spec)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=enc.n_vocab, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, head_dim=16, n_latent=4,
                      n_expert=4, n_expert_active=2, expert_hidden=32, block_size=BLOCK)
    model = DeepSeekLM(cfg).eval()
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    checkpoint.save_checkpoint({'model': model.state_dict(), 'model_args': dataclasses.asdict(cfg), 'iter_num': 100,
                            'best_val_loss': 5.0, 'config': {'out_dir': 'out-tiny'}, 'tokenizer': spec}, path)
    return path, model, enc


def run(capsys, *args):
    """sample.main in this process: (returned texts, stdout, stderr)."""
    texts = sample.main(list(args))
    out, err = capsys.readouterr()
    return texts, out, err


def headers(stdout):
    return [line for line in stdout.splitlines() if line.startswith('--- sample ')]


def greedy_reference(model, enc, prompt_ids, max_new_tokens):
    """Greedy decoding the plain way: a full forward over the last block_size tokens for every new token."""
    eot = enc.encode_single_token(EOT)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids[-BLOCK:]]))
            nxt = int(logits[0, -1].argmax())
            if nxt == eot:
                break
            ids.append(nxt)
    return enc.decode([t for t in ids if t != eot])


# -----------------------------------------------------------------------------
# output

def test_cli_prints_five_numbered_samples(tiny, tmp_path):
    ckpt, _, _ = tiny
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--ckpt', ckpt, '--num_samples', '5',
                        '--max_new_tokens', '8'], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert headers(p.stdout) == [f'--- sample {i} ---' for i in range(1, 6)]
    assert p.stdout.startswith('--- sample 1 ---\n')
    assert 'tokens/s' in p.stderr and 'tokens/s' not in p.stdout   # stdout holds only the samples


def test_same_seed_same_samples(tiny, capsys):
    args = ['--ckpt=' + tiny[0], '--num_samples=3', '--max_new_tokens=12', '--temperature=1.0']
    _, a, _ = run(capsys, *args, '--seed=7')
    _, b, _ = run(capsys, *args, '--seed=7')
    _, c, _ = run(capsys, *args, '--seed=8')
    assert a == b
    assert a != c


def test_greedy_equals_uncached_decode(tiny, capsys):
    ckpt, model, enc = tiny
    # 40 new tokens after the prompt run past block_size 32: the window slides in both decodes
    texts, out, _ = run(capsys, f'--ckpt={ckpt}', '--start=ROMEO:', '--temperature=0', '--num_samples=2',
                        '--max_new_tokens=40')
    want = greedy_reference(model, enc, enc.encode('ROMEO:'), 40)
    assert texts == [want, want]
    assert out == f'--- sample 1 ---\n{want}\n--- sample 2 ---\n{want}\n'


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny, capsys):
    ckpt, model, enc = tiny
    greedy, _, _ = run(capsys, f'--ckpt={ckpt}', '--start=ROMEO:', '--temperature=0', '--num_samples=1',
                       '--max_new_tokens=12')
    for t in ('1e-30', '1e-45', '5e-324'):   # 1/t overflows fp32, or t itself rounds to 0 in fp32
        texts, _, _ = run(capsys, f'--ckpt={ckpt}', '--start=ROMEO:', f'--temperature={t}', '--num_samples=1',
                          '--max_new_tokens=12')
        assert texts == greedy, t


def test_file_prompts_give_one_sample_each(tiny, capsys, tmp_path):
    ckpt, model, enc = tiny
    prompts = ['ROMEO:', 'Good morrow, my lord, and what news', '<|endoftext|>KING']
    path = tmp_path / 'prompts.txt'
    path.write_text(prompts[0] + '\n' + prompts[1] + '\n\n' + prompts[2] + '\n')   # a blank line is skipped
    texts, out, _ = run(capsys, f'--ckpt={ckpt}', f'--start=FILE:{path}', '--temperature=0', '--max_new_tokens=10')
    want = [greedy_reference(model, enc, enc.encode(p, allowed_special={EOT}), 10) for p in prompts]
    assert texts == want
    assert len(headers(out)) == 3
    assert texts[2].startswith('KING')   # the <|endoftext|> of the prompt is a token, and is not printed


def test_generation_stops_at_endoftext_and_streams(tiny, capsys, monkeypatch):
    """Sample 1 emits <|endoftext|> as its 3rd token, sample 2 as its 6th: each stops there, and each token's
    text reaches stdout before the next token is drawn."""
    ckpt, _, enc = tiny
    eot, word = enc.encode_single_token(EOT), enc.encode(' la')[0]
    state = {'sample': 0, 'drawn': 0}   # sample 0: the warm-up
    events = []

    def scripted(logits, *args):
        state['drawn'] += 1
        events.append('draw')
        stop_at = {1: 3, 2: 6}.get(state['sample'], 99)
        return torch.tensor([eot if state['drawn'] >= stop_at else word])

    class Recorder:
        def write(self, text):
            if text.startswith('--- sample'):
                state['sample'], state['drawn'] = state['sample'] + 1, 0
            events.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(model_module, 'sample_next_token', scripted)
    monkeypatch.setattr(sys, 'stdout', Recorder())
    texts = sample.main([f'--ckpt={ckpt}', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=50'])
    assert texts == ['ROMEO:' + enc.decode([word] * 2), 'ROMEO:' + enc.decode([word] * 5)]
    after = events[next(i for i, e in enumerate(events) if e.startswith('--- sample 1')):]
    assert after.count('draw') == 3 + 6   # stopped at each <|endoftext|>, not after 50
    draws = [i for i, e in enumerate(after) if e == 'draw']
    assert enc.decode([word]) in after[draws[0]:draws[1]]   # streamed: printed before the next token is drawn
    assert '9 tokens in' in capsys.readouterr().err


def test_runs_from_the_checkpoint_alone(tiny, capsys, tmp_path, monkeypatch):
    """Defaults: out-deepseek/ckpt.pt, five samples, each a new document. No data folder anywhere."""
    os.makedirs(tmp_path / 'out-deepseek')
    shutil.copy(tiny[0], tmp_path / 'out-deepseek' / 'ckpt.pt')
    monkeypatch.chdir(tmp_path)
    texts, out, err = run(capsys, '--max_new_tokens=6')
    assert len(texts) == 5 and len(headers(out)) == 5
    assert 'loaded out-deepseek/ckpt.pt' in err
    assert os.listdir(tmp_path) == ['out-deepseek']
    # --ckpt=best picks ckpt_best.pt
    shutil.copy(tiny[0], tmp_path / 'out-deepseek' / 'ckpt_best.pt')
    _, _, err = run(capsys, '--ckpt', 'best', '--max_new_tokens=2')
    assert 'loaded out-deepseek/ckpt_best.pt' in err


def test_long_prompt_is_cropped_with_a_warning(tiny, capsys):
    ckpt, model, enc = tiny
    prompt = ' '.join(['and the king'] * 20)
    ids = enc.encode(prompt)
    assert len(ids) > BLOCK
    texts, _, err = run(capsys, f'--ckpt={ckpt}', f'--start={prompt}', '--temperature=0', '--num_samples=1',
                        '--max_new_tokens=5')
    assert (f'warning: the prompt is {len(ids)} tokens, the model sees at most {BLOCK}: '
            f'keeping its last {BLOCK - 1}') in err
    assert texts == [greedy_reference(model, enc, ids[-(BLOCK - 1):], 5)]


# -----------------------------------------------------------------------------
# mistakes: one line on stderr, exit code 2, no traceback

def test_missing_checkpoint_cli(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), '--num_samples', '5'], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert p.returncode == 2
    assert p.stdout == ''
    assert p.stderr == ("error: no checkpoint at out-deepseek/ckpt.pt: "
                        "train first with `python train.py config/deepseek.py`\n")


def damaged(path):
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(8 * [0x5A])
    return bytes(data)


def write_truncated(tiny, path):
    with open(tiny[0], 'rb') as f:
        data = f.read()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('make, args, message', [
    (None, ['--out_dir=nowhere'],
     'no checkpoint at nowhere/ckpt.pt: train first with `python train.py --out_dir=nowhere`'),
    (None, ['--ckpt=nowhere.pt'], 'no checkpoint at nowhere.pt'),
    (lambda tiny, p: torch.save({'model': {}}, p), [], 'is not a checkpoint of this version of the repo'),
    (lambda tiny, p: torch.save({'format': 'nanogpt/0'}, p), [], 'is not a checkpoint of this version of the repo'),
    (lambda tiny, p: p.write_bytes(damaged(tiny[0])), [], "is damaged ('model' does not match its fingerprint)"),
    (write_truncated, [], 'cannot read checkpoint'),
    (lambda tiny, p: p.write_bytes(b'not a checkpoint at all'), [], 'cannot read checkpoint'),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--num_sample=5'],
     "unknown config key 'num_sample' (did you mean 'num_samples'?)"),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--start=FILE:no-such-prompts.txt'],
     'prompt file no-such-prompts.txt not found'),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--temperature=-1'], 'temperature must be >= 0'),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--max_new_tokens'], '--max_new_tokens needs a value'),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--dtype=float8'], "dtype must be auto, float32, bfloat16 or float16"),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--seed=18446744073709551616'], 'seed must be in [0, 2**32)'),
    (lambda tiny, p: shutil.copy(tiny[0], p), ['--device=cpu:x'], "device must be auto, cpu, cuda, cuda:N or mps"),
])
def test_mistakes_are_one_line(tiny, capsys, tmp_path, monkeypatch, make, args, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'ckpt.pt'
    if make:
        make(tiny, path)
        args = [f'--ckpt={path}', *args]
    with pytest.raises(SystemExit) as e:
        cli.run(sample.main, args)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out == ''
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err


def test_printer_skips_ids_the_tokenizer_lacks(capsys):
    """A model may sample an id with no bytes: <|endoftext|>, a padded vocabulary's tail, or a gap in a
    tokenizer's numbering (cl100k_base has some); they print nothing, and a UTF-8 character split over two
    tokens prints whole."""
    import tiktoken
    enc = tiktoken.Encoding('bytes', pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={EOT: 300})
    printer = sample.Printer(dataset.text_bytes(enc, 401))
    for ids in ([ord('c'), ord('a'), 0xC3], [270, 300, 0xA9, 299, 400], [ord('!')]):
        printer.add(ids)
    assert capsys.readouterr().out == 'caé!' and ''.join(printer.parts) == 'caé!'

