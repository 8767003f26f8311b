"""
The dataset format and its tokenizer: what prepare.py writes into data/<dataset>/ (train.bin, val.bin,
meta.json and the tokenizer's ranks), read back and checked for train.py, and carried in checkpoints
for sample.py.
"""

import base64
import json
import os
import shlex
import zlib

import numpy as np
import tiktoken

from cli import UserError, show


# ----------------------------------------------------------------------------------------------
# Datasets and tokenizers. prepare.py writes data/<dataset>/ (train.bin, val.bin, meta.json and the
# tokenizer's ranks); train.py reads it; checkpoints carry the tokenizer for sample.py.

# What a dataset is made of. prepare.py takes all of these; train.py reads dataset, data_dir and
# the model's vocab_size, and skips the others when a config file sets them.
DATASET_DEFAULTS = dict(
    dataset='shakespeare',  # 'shakespeare' (bundled, offline), 'tinyshakespeare', 'tinystories', or your own name with url/input
    data_dir='',            # '' = data/<dataset>
    vocab_size=49152,       # target vocabulary of our BPE, <|endoftext|> included (a small corpus may stop short)
    tokenizer='bpe',        # 'bpe' trains our own with rustbpe; or tiktoken's 'gpt2', 'r50k_base', 'cl100k_base', 'o200k_base'
    url='',                 # download this UTF-8 text file as the corpus
    input='',               # or local text: comma-separated .txt/.md files or folders (one document per file)
    sha256='',              # expected sha256 of the --url file ('' = not checked)
    val_docs=4,             # whole documents (plays, files) held out for validation
    max_docs=0,             # use only the first max_docs documents (0 = all): for tests and quick runs
)
EOT = '<|endoftext|>'
DATA_FORMAT = 2             # meta.json's format; prepare.py writes it, read_meta accepts only it
RANKS_FILE = 'tokenizer.tiktoken'
PRETRAINED = ('gpt2', 'r50k_base', 'cl100k_base', 'o200k_base')


def data_dir_of(cfg):
    return cfg.get('data_dir') or os.path.join('data', cfg.get('dataset') or DATASET_DEFAULTS['dataset'])


def prepare_command(data_dir, args=None):
    """The prepare command that makes data_dir, for error messages: with prepare.py's arguments where the
    caller knows them; otherwise a guess from the folder's name."""
    if args is not None:
        return shlex.join(['python', 'prepare.py', *args])
    norm = os.path.normpath(data_dir)
    if norm == os.path.join('data', 'shakespeare'):
        return 'python prepare.py'
    if norm in (os.path.join('data', 'tinyshakespeare'), os.path.join('data', 'tinystories')):
        return f'python prepare.py --dataset={os.path.basename(norm)}'
    return 'python prepare.py CONFIG (the config and overrides you give train.py)'


META_TYPES = {'format': int, 'dataset': str, 'source': dict, 'tokenizer': dict, 'n_vocab': int, 'dtype': str,
              'eot_id': int, 'train_tokens': int, 'val_tokens': int, 'config': dict}


def read_meta(data_dir, command=None):
    """data_dir/meta.json, checked: every field of the right type, and .bin files of the promised sizes.
    A dataset whose meta.json is missing, old or inconsistent is a UserError that says how to redo it
    (with command, the prepare command, where the caller knows it)."""
    redo = f"run `{command or prepare_command(data_dir)}`"
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise UserError(f"no dataset in {data_dir}: {redo} first")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): {redo} with --force") from None
    if not isinstance(meta, dict) or meta.get('format') != DATA_FORMAT:
        raise UserError(f"{path} is from another version of prepare.py: {redo} with --force")
    for key, kind in META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{path}: '{key}' should be {kind.__name__}, got {meta.get(key)!r}: {redo} with --force")
    inner = {'source.sha256': str, 'source.description': str, 'source.val_names': list, 'tokenizer.kind': str,
             'tokenizer.name': str, **({'tokenizer.pattern': str} if meta['tokenizer'].get('kind') == 'bpe' else {})}
    for key, kind in inner.items():
        outer, field = key.split('.')
        if not isinstance(meta[outer].get(field), kind):
            raise UserError(f"{path}: '{key}' should be {kind.__name__}, got {show(meta[outer].get(field))}: {redo} "
                            f"with --force")
    if meta['dtype'] not in ('uint16', 'uint32'):
        raise UserError(f"{path} has an unknown dtype {meta['dtype']!r}: {redo} with --force")
    itemsize = np.dtype(meta['dtype']).itemsize
    for split in ('train', 'val'):
        bin_path = os.path.join(data_dir, f'{split}.bin')
        want = meta[f'{split}_tokens'] * itemsize
        have = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
        if have != want:
            got = 'missing' if have is None else f'{have:,} bytes'
            raise UserError(f"{bin_path} is {got}, meta.json says {want:,} bytes: {redo} with --force")
    return meta


def tokenizer_spec(data_dir, meta, command=None):
    """The dataset's tokenizer as plain values (str, int, dict): it rides in checkpoints (safe to load
    with weights_only=True), so sampling works where prepare.py never ran. Inverse: load_tokenizer()."""
    tok = meta['tokenizer']
    if tok.get('kind') == 'tiktoken':
        return dict(kind='tiktoken', name=tok['name'], n_vocab=meta['n_vocab'])
    path = os.path.join(data_dir, RANKS_FILE)
    redo = f"run `{command or prepare_command(data_dir)}` with --force"
    try:
        with open(path, encoding='ascii') as f:
            ranks = f.read()
    except (OSError, UnicodeDecodeError):
        raise UserError(f"{path} is missing or damaged: {redo}") from None
    if zlib.crc32(ranks.encode()) != tok.get('ranks_crc32'):
        raise UserError(f"{path} does not match meta.json (edited or damaged): {redo}")
    return dict(kind='bpe', name=tok['name'], pattern=tok['pattern'], ranks=ranks, n_vocab=meta['n_vocab'])


def load_tokenizer(spec):
    """tiktoken.Encoding from a tokenizer_spec() dict: our BPE's ranks, or one of tiktoken's encodings."""
    if not isinstance(spec, dict) or spec.get('kind') not in ('bpe', 'tiktoken'):
        raise UserError("not a tokenizer description: expected the dict of dataset.tokenizer_spec()")
    if spec['kind'] == 'tiktoken':
        return pretrained_encoding(spec['name'])
    ranks = parse_ranks(spec['ranks'])
    return tiktoken.Encoding(spec['name'], pat_str=spec['pattern'], mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def text_bytes(enc, n):
    """The bytes that each token id 0..n-1 adds to the text. Special tokens (<|endoftext|>) add none, nor do
    ids the tokenizer lacks: past its end (the model's vocabulary is padded) or in a gap of its numbering
    (cl100k_base and o200k_base leave some ids unused)."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}

    def of(i):
        try:
            return b'' if i in special else enc.decode_single_token_bytes(i)
        except KeyError:
            return b''
    return [of(i) for i in range(n)]


def pretrained_encoding(name):
    """tiktoken's own encodings; their ranks come from the network once, then from tiktoken's cache."""
    if name not in PRETRAINED:
        raise UserError(f"unknown tokenizer '{name}': use bpe, {', '.join(PRETRAINED)}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:   # requests' and urllib3's network errors, a broken cache file
        raise UserError(f"tokenizer '{name}' needs tiktoken to download its ranks once and that failed "
                        f"({type(e).__name__}; offline?): connect to the network, point TIKTOKEN_CACHE_DIR at a "
                        f"cache that has it, or use --tokenizer=bpe") from None


def ranks_text(ranks):
    """{token bytes: rank} in tiktoken's file format: base64 token, space, rank; one per line."""
    return ''.join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(text):
    """Inverse of ranks_text(); the format tiktoken.load.load_tiktoken_bpe reads."""
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks
