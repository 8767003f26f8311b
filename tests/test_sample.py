"""sample.py on a tiny random model: the output format, streaming, seeds, greedy = a plain uncached decode,
file prompts, stopping at <|endoftext|>, no data folder needed, the copy check against the training text,
and every user mistake (a folder, pipe or device for a file among them) as one line with exit code 2."""

import contextlib
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import checkpoint
import cli
import dataset
import model as model_module
import preflight
import prepare
import sample
import train
from dataset import EOT
from model import DeepSeekLM, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 32


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A checkpoint in train.py's format: random tiny model, the tokenizer of two plays. The data folder the
    tokenizer came from is deleted, so only the checkpoint is left. Returns (ckpt path, model, tokenizer)."""
    data_dir = str(tmp_path_factory.mktemp('data') / 'tiny')
    prepare.main([f'--data_dir={data_dir}', '--dataset=shakespeare', '--max_docs=2', '--val_docs=1', '--vocab_size=300'])
    spec = dataset.tokenizer_spec(data_dir, dataset.read_meta(data_dir))
    shutil.rmtree(data_dir)
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    model, enc = save_tiny(path, spec)
    return path, model, enc


def save_tiny(path, spec, data=None):
    """A random tiny model saved as train.py would (with ck['data'] where given): (model, tokenizer)."""
    enc = dataset.load_tokenizer(spec)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=enc.n_vocab, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, head_dim=16, n_latent=4,
                      n_expert=4, n_expert_active=2, expert_hidden=32, block_size=BLOCK)
    model = DeepSeekLM(cfg).eval()
    checkpoint.save_checkpoint({'model': model.state_dict(), 'model_args': dataclasses.asdict(cfg), 'iter_num': 100,
                                'best_val_loss': 5.0, 'config': {'out_dir': 'out-tiny'}, 'tokenizer': spec,
                                **({'data': data} if data else {})}, path)
    return model, enc


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
    """Defaults: out-deepseek/ckpt_best.pt (the lowest val loss), five samples, each a new document. No data
    folder anywhere."""
    os.makedirs(tmp_path / 'out-deepseek')
    shutil.copy(tiny[0], tmp_path / 'out-deepseek' / 'ckpt_best.pt')
    monkeypatch.chdir(tmp_path)
    texts, out, err = run(capsys, '--max_new_tokens=6')
    assert len(texts) == 5 and len(headers(out)) == 5
    assert 'loading' not in err and 'loaded out-deepseek/ckpt_best.pt in ' in err   # small: loads at once
    assert 'copy check skipped: the checkpoint does not record its training data\n' in err
    assert os.listdir(tmp_path) == ['out-deepseek']
    # a big checkpoint: a line before the (maybe long) load, and one after it
    monkeypatch.setattr(sample, 'SAY_LOADING', 1000)
    size = sample.size_text(os.path.getsize(tmp_path / 'out-deepseek' / 'ckpt_best.pt'))
    _, _, err = run(capsys, '--max_new_tokens=2')
    assert err.startswith(f'loading out-deepseek/ckpt_best.pt ({size}) ...\nloaded out-deepseek/ckpt_best.pt in ')
    # --ckpt=last picks ckpt.pt
    shutil.copy(tiny[0], tmp_path / 'out-deepseek' / 'ckpt.pt')
    _, _, err = run(capsys, '--ckpt', 'last', '--max_new_tokens=2')
    assert 'loaded out-deepseek/ckpt.pt' in err


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
    command = shlex.join(['python', os.path.join(ROOT, 'train.py'), os.path.join(ROOT, 'config', 'deepseek.py')])
    assert p.stderr == f"error: no checkpoint at out-deepseek/ckpt_best.pt: train first with `{command}`\n"


def damaged(path):
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(8 * [0x5A])
    return bytes(data)


def write_truncated(tiny, path):
    with open(tiny[0], 'rb') as f:
        data = f.read()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('make, args, message', [
    (None, ['--out_dir=nowhere'],   # the tests run elsewhere than the repo's folder: full paths
     f"no checkpoint at nowhere/ckpt_best.pt: train first with `python {os.path.join(ROOT, 'train.py')} --out_dir=nowhere`"),
    (None, ['--ckpt=nowhere.pt'], 'no checkpoint at nowhere.pt'),
    (lambda tiny, p: torch.save({'model': {}}, p), [], 'is not a checkpoint of this version of the repo'),
    (lambda tiny, p: torch.save({'format': 'nanogpt/0'}, p), [], 'is not a checkpoint of this version of the repo'),
    (lambda tiny, p: p.write_bytes(damaged(tiny[0])), [], "is damaged ('model' does not match its"),
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
        cli.call_main(sample.main, args)
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out == ''
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err


def test_every_weight_comes_from_the_checkpoint(tiny, capsys, tmp_path):
    """The model is built on the meta device and filled from the checkpoint: no weight is drawn at random
    (slow for big models), the tied head stays tied, and a checkpoint that lacks a weight is refused, never
    sampled from with memory left as it was."""
    ckpt, model, _ = tiny
    ck, mconf = checkpoint.load_checkpoint(ckpt)
    rng = torch.get_rng_state()
    loaded = DeepSeekLM.from_state_dict(mconf, ck['model'])
    assert torch.equal(torch.get_rng_state(), rng)   # not one random number drawn
    assert loaded.lm_head.weight is loaded.wte.weight and loaded.num_params() == model.num_params()
    x = torch.randint(mconf.vocab_size, (2, 8))
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x)[0], model(x)[0])   # RoPE tables and the routers' state made as a fresh model has them
    weights = {k: v for k, v in ck['model'].items() if k != 'norm_f.weight'}
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save_checkpoint({**{k: v for k, v in ck.items() if k not in ('format', 'checksum', 'fingerprint')},
                                'model': weights}, path)
    assert 'does not fit model.py' in refused(capsys, [f'--ckpt={path}'])


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



# -----------------------------------------------------------------------------
# a folder, pipe or device where a file is read: refused by name, never a hang

@contextlib.contextmanager
def fifo(path):
    """A named pipe at path. Opening one to read waits for a writer: so that code that wrongly opens it fails
    the test instead of hanging it, a thread opens it to write whenever a reader waits, and closes it at once."""
    os.mkfifo(path)
    done = threading.Event()

    def writer():
        while not done.wait(0.05):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)   # fails (ENXIO) while no reader waits
            except OSError:
                continue
            os.close(fd)
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield str(path)
    finally:
        done.set()
        thread.join()


def refused(capsys, args):
    with pytest.raises(SystemExit) as e:
        cli.call_main(sample.main, args)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ''
    assert err.startswith('error: ') and err.count('\n') == 1, err
    return err


def test_a_pipe_folder_or_device_is_refused_by_name(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = f'--ckpt={tiny[0]}'
    with fifo(tmp_path / 'pipe') as pipe:
        assert f'checkpoint {pipe} is not a regular file' in refused(capsys, [f'--ckpt={pipe}'])
        assert f'prompt file {pipe} is not a regular file' in refused(capsys, [ckpt, f'--start=FILE:{pipe}'])
    os.mkdir('run')
    os.mkfifo('run/ckpt.pt')   # out_dir/ckpt.pt, found by --out_dir: the same check
    assert 'checkpoint run/ckpt.pt is not a regular file' in refused(capsys, ['--out_dir=run'])
    assert 'checkpoint /dev/null is not a regular file' in refused(capsys, ['--ckpt=/dev/null'])
    assert 'prompt file /dev/null is not a regular file' in refused(capsys, [ckpt, '--start=FILE:/dev/null'])
    assert f'checkpoint {tmp_path} is a folder, not a file' in refused(capsys, [f'--ckpt={tmp_path}'])
    assert f'prompt file {tmp_path} is a folder, not a file' in refused(capsys, [ckpt, f'--start=FILE:{tmp_path}'])
    assert '--start=FILE: needs the path of a prompt file' in refused(capsys, [ckpt, '--start=FILE:'])
    open('a-file', 'w').close()
    assert 'out_dir a-file is not a folder' in refused(capsys, ['--out_dir=a-file'])


def test_a_run_folder_given_as_ckpt_says_how_to_use_it(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir('run')
    shutil.copy(tiny[0], 'run/ckpt.pt')
    err = refused(capsys, ['--ckpt=run'])
    assert 'checkpoint run is a folder, not a file: give --ckpt=run/ckpt.pt, or --out_dir=run without --ckpt' in err
    for advice in (['--ckpt=run/ckpt.pt'], ['--out_dir=run']):   # both work
        texts, _, _ = run(capsys, *advice, '--num_samples=1', '--max_new_tokens=2')
        assert len(texts) == 1


def test_a_pipe_as_checkpoint_cli(tmp_path):
    """The command line itself: exit code 2 and one line, and no hang (the pipe has no writer)."""
    os.mkfifo(tmp_path / 'ckpt.pt')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--ckpt={tmp_path}/ckpt.pt'],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                       timeout=60)
    assert p.returncode == 2 and p.stdout == '' and p.stderr.count('\n') == 1
    assert p.stderr.startswith(f'error: checkpoint {tmp_path}/ckpt.pt is not a regular file')


# -----------------------------------------------------------------------------
# advice that works when followed

@pytest.mark.parametrize('where', ['repo', 'elsewhere'])
def test_the_train_command_trains_into_that_out_dir(where, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT if where == 'repo' else tmp_path)
    for out_dir in ('out-deepseek', 'out-mini', './out-mini/', 'out-deepseek-mla', 'nowhere', 'two words',
                    str(tmp_path / 'out-mini')):
        command = shlex.split(preflight.train_command(out_dir))
        assert command[0] == 'python' and os.path.samefile(command[1], os.path.join(ROOT, 'train.py'))
        cfg, _ = cli.parse_config(command[2:], train.DEFAULTS, skip_file_keys=dataset.DATASET_DEFAULTS)   # as train.py
        assert os.path.abspath(cfg['out_dir']) == os.path.abspath(out_dir), (out_dir, command)
    if where == 'repo':
        assert preflight.train_command('out-mini') == 'python train.py config/deepseek_mini.py'


# -----------------------------------------------------------------------------
# the copy check: each sample's longest span shared with the training text

@pytest.fixture(scope='module')
def trained_on(tmp_path_factory):
    """A tiny checkpoint that records its training data as train.py does, and that data: (ckpt path, tokenizer,
    the training text's documents, ck['data'])."""
    data_dir = str(tmp_path_factory.mktemp('data') / 'plays')
    data = prepared(data_dir)
    path = str(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')
    _, enc = save_tiny(path, dataset.tokenizer_spec(data_dir, dataset.read_meta(data_dir)), data)
    return path, enc, training_documents(data_dir, enc), data


def prepared(data_dir):
    """Prepare two plays into data_dir; returns the ck['data'] that train.py records for them."""
    prepare.main([f'--data_dir={data_dir}', '--dataset=shakespeare', '--max_docs=2', '--val_docs=1', '--vocab_size=300'])
    meta = dataset.read_meta(data_dir)
    return {'dir': data_dir, 'source': meta['source']['sha256'], 'split': dataset.split_of(meta),
            'prepared_with': meta['config']}


def training_documents(data_dir, enc):
    meta = dataset.read_meta(data_dir)
    ids = np.fromfile(os.path.join(data_dir, 'train.bin'), dtype=meta['dtype']).tolist()
    return enc.decode(ids).split(EOT)[1:]   # every document starts with <|endoftext|>


def longest(text, documents):
    """Brute force: the length of the longest substring of text inside one of the documents."""
    for n in range(len(text), 0, -1):
        if any(text[i:i + n] in doc for i in range(len(text) - n + 1) for doc in documents):
            return n
    return 0


def recite(monkeypatch, enc, completions):
    """Sample i's completion is completions[i], then <|endoftext|>: the model's draws replaced by their tokens."""
    eot = enc.encode_single_token(EOT)
    state = {'sample': -1, 'drawn': 0}

    def scripted(logits, *args):
        script = enc.encode(completions[state['sample']]) + [eot] if state['sample'] >= 0 else [eot]
        state['drawn'] += 1
        return torch.tensor([script[min(state['drawn'], len(script)) - 1]])

    class Counting(sample.Printer):   # one per sample
        def __init__(self, *args):
            super().__init__(*args)
            state['sample'], state['drawn'] = state['sample'] + 1, 0
    monkeypatch.setattr(model_module, 'sample_next_token', scripted)
    monkeypatch.setattr(sample, 'Printer', Counting)


def copy_lines(err):
    return [line for line in err.splitlines() if line.startswith('copy check')]


def test_copy_check_reports_the_recited_span_after_the_prompt(trained_on, capsys, monkeypatch):
    """A model made to recite the training text right after a prompt taken from it too: the span is the
    completion alone (the prompt is left out), and stdout holds only the samples."""
    ckpt, enc, documents, data = trained_on
    play = documents[0]
    at = play.index('\n', len(play) // 2) + 1
    prompt, short, long = play[at - 30:at], play[at:at + 60], play[at:at + 200]
    recite(monkeypatch, enc, [short, long, 'qqqq'])
    texts, out, err = run(capsys, f'--ckpt={ckpt}', f'--start={prompt}', '--num_samples=3', '--max_new_tokens=200')
    assert texts == [prompt + short, prompt + long, prompt + 'qqqq']
    assert out == ''.join(f'--- sample {i + 1} ---\n{text}\n' for i, text in enumerate(texts))
    lines = copy_lines(err)
    assert lines[:3] == [
        f'copy check, sample 1: longest span shared with the training text is 60 characters: {sample.quoted(short)}',
        f'copy check, sample 2: longest span shared with the training text is 200 characters: {sample.quoted(long)}',
        'copy check, sample 3: longest span shared with the training text is 1 character: "q"']
    assert sample.quoted(long) == '"' + long[:80].replace('\n', '\\n') + '"...'   # escaped, cut after 80
    chars = sum(map(len, documents))
    assert lines[3].startswith(f"copy check: longest span shared with the training text over 3 samples is 200 "
                               f"characters (sample 2); training text {data['dir']}/train.bin: {chars:,} "
                               f"characters, checked in ")
    assert len(lines) == 4


def test_copy_check_agrees_with_brute_force(trained_on, capsys, monkeypatch):
    ckpt, enc, documents, _ = trained_on
    found = []
    check = sample.report_copies
    monkeypatch.setattr(sample, 'report_copies', lambda *args: found.extend(check(*args)))
    texts, _, err = run(capsys, f'--ckpt={ckpt}', '--num_samples=3', '--max_new_tokens=24', '--temperature=1.5')
    assert [n for n, _ in found] == [longest(text, documents) for text in texts]   # the default prompt prints nothing
    for i, (n, span) in enumerate(found):
        assert span in texts[i] and len(span) == n
        assert f'copy check, sample {i + 1}: longest span shared with the training text is {sample.characters(n)}: ' \
               f'{sample.quoted(span)}' in err


def test_copy_check_off(trained_on, capsys):
    _, _, err = run(capsys, f'--ckpt={trained_on[0]}', '--num_samples=1', '--max_new_tokens=4', '--copy_check=false')
    assert 'copy check' not in err


def test_copy_check_skipped_where_the_data_is_another(trained_on, capsys, tmp_path):
    _, enc, _, data = trained_on
    spec = dataset.tokenizer_spec(data['dir'], dataset.read_meta(data['dir']))
    for other, why in (({**data, 'source': '0' * 64}, f"{data['dir']} is not this checkpoint's training data"),
                       ({**data, 'split': {**data['split'], 'train_tokens': 1}}, "is not this checkpoint's training"),
                       ({'dir': 42}, 'the checkpoint does not record its training data')):
        save_tiny(str(tmp_path / 'ckpt.pt'), spec, other)
        texts, out, err = run(capsys, f'--ckpt={tmp_path}/ckpt.pt', '--num_samples=2', '--max_new_tokens=4')
        assert len(texts) == 2 and len(headers(out)) == 2
        [line] = copy_lines(err)
        assert line.startswith('copy check skipped: ') and why in line, line


def test_copy_check_advice_remakes_missing_data(capsys, tmp_path, monkeypatch):
    """The training data gone: one line that says how to make it again, which works when followed."""
    monkeypatch.chdir(tmp_path)
    data = prepared('plays')   # a relative folder, as train.py records the usual data/<dataset>
    save_tiny('ckpt.pt', dataset.tokenizer_spec('plays', dataset.read_meta('plays')), data)
    shutil.rmtree('plays')
    _, _, err = run(capsys, '--ckpt=ckpt.pt', '--num_samples=1', '--max_new_tokens=4')
    [line] = copy_lines(err)
    assert line.startswith('copy check skipped: no dataset in plays: run `')
    command = shlex.split(line.split('`')[1])
    assert command[0] == 'python' and os.path.samefile(command[1], os.path.join(ROOT, 'prepare.py'))
    prepare.main(command[2:])
    _, _, err = run(capsys, '--ckpt=ckpt.pt', '--num_samples=1', '--max_new_tokens=4')
    assert copy_lines(err)[0].startswith('copy check, sample 1: longest span shared with the training text is ')


def test_copy_check_never_reads_a_pipe(trained_on, capsys, tmp_path):
    """train.bin a named pipe: the copy check is skipped with a line naming it, without a hang."""
    ckpt, _, _, data = trained_on
    copy = tmp_path / 'plays'
    shutil.copytree(data['dir'], copy)
    os.remove(copy / 'train.bin')
    with fifo(copy / 'train.bin'):
        spec = dataset.tokenizer_spec(data['dir'], dataset.read_meta(data['dir']))
        save_tiny(str(tmp_path / 'ckpt.pt'), spec, {**data, 'dir': str(copy)})
        texts, _, err = run(capsys, f'--ckpt={tmp_path}/ckpt.pt', '--num_samples=1', '--max_new_tokens=4')
    [line] = copy_lines(err)
    assert line.startswith('copy check skipped: ') and 'train.bin' in line
