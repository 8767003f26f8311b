"""The dataset format and its tokenizer: what prepare.py writes into data/<dataset>/ (train.bin, val.bin, meta.json
and the tokenizer's ranks), read back and checked for train.py, and carried in checkpoints for sample.py."""

import base64
import concurrent.futures
import contextlib
import ctypes
import errno
import itertools
import json
import os
import shutil
import time
import zlib

import numpy as np
import tiktoken

import checkpoint
import cli
from cli import UserError, show

# What a dataset is made of. prepare.py takes all of these; train.py reads dataset, data_dir and
# the model's vocab_size, and skips the others when a config file sets them.
DATASET_DEFAULTS = dict(
    dataset='tinystories',  # 'tinystories' (2.2 GB download), 'shakespeare' (offline), 'tinyshakespeare', or your own
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
DATASET_FILES = ('train.bin', 'val.bin', RANKS_FILE, 'meta.json')   # a dataset: replaced together, never in part
META_MAX_BYTES = 2**26      # ours are kilobytes (megabytes for --input folders of many files)
RANKS_MAX_BYTES = 2**30     # 2**24 tokens take under 400 MB
BATCH_CHARS = 8 * 2**20     # text tokenized at a time: memory stays bounded for any input size
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1   # encoders
ANNOUNCE_MB = 16            # a split this large is announced before it is tokenized (it takes a while)
PRETRAINED = ('gpt2', 'r50k_base', 'cl100k_base', 'o200k_base')
BUILTIN = ('tinystories', 'shakespeare', 'tinyshakespeare')   # prepare.py knows where their text is
META_TYPES = {'format': int, 'dataset': str, 'source': dict, 'tokenizer': dict, 'n_vocab': int, 'dtype': str,
              'eot_id': int, 'train_tokens': int, 'val_tokens': int, 'config': dict, 'source.sha256': str,
              'source.description': str, 'source.val_names': list, 'tokenizer.kind': str, 'tokenizer.name': str}


def data_dir_of(cfg):
    # ~ expanded: the shell leaves --data_dir=~/x as it is, which would make a folder named '~'
    path = cfg.get('data_dir') or os.path.join('data', cfg.get('dataset') or DATASET_DEFAULTS['dataset'])
    return os.path.expanduser(path)


def prepare_command(data_dir, args=None):
    """The prepare command that makes data_dir, for error messages: with prepare.py's arguments where the
    caller knows them; otherwise a guess from the folder's name."""
    if args is not None:
        return cli.repo_command('prepare.py', args)
    name = os.path.basename(os.path.normpath(data_dir))
    if os.path.normpath(data_dir) == os.path.join('data', name) and name in BUILTIN:
        return 'python prepare.py' + (f' --dataset={name}' if name != DATASET_DEFAULTS['dataset'] else '')
    return 'python prepare.py CONFIG (the config and overrides you give train.py)'


def remake_command(made_with, data_dir):
    """The prepare command that makes a dataset again into data_dir, from the settings meta.json recorded
    (meta['config']; checkpoints carry them as data['prepared_with'])."""
    settings = {**made_with, 'data_dir': data_dir}
    return prepare_command(data_dir, [f'--{k}={v}' for k, v in settings.items() if v != DATASET_DEFAULTS.get(k)])


def split_of(meta):
    """What tells two datasets of the same text and tokenizer apart: which documents went where."""
    return {'train_tokens': meta['train_tokens'], 'val_tokens': meta['val_tokens'],
            'val_names': meta['source']['val_names']}


def differences(record, tokenizer_spec, meta):
    """What differs between the data a checkpoint was trained on (its data record and tokenizer spec) and a
    dataset's meta.json: a list of 'text', 'tokenizer', 'split' (empty: the same data)."""
    same = {'text': record.get('source') == meta['source']['sha256'],
            'tokenizer': same_tokenizer(meta['tokenizer'], tokenizer_spec),
            'split': record.get('split') == split_of(meta)}
    return [what for what, ok in same.items() if not ok]


def same_tokenizer(entry, spec):
    """Whether meta.json's tokenizer entry describes the tokenizer of this tokenizer_spec()."""
    if not isinstance(spec, dict) or entry.get('kind') != spec.get('kind') or entry.get('name') != spec.get('name'):
        return False
    if entry['kind'] == 'bpe':
        ranks = spec.get('ranks')
        return (entry.get('pattern') == spec.get('pattern') and isinstance(ranks, str)
                and entry.get('ranks_crc32') == zlib.crc32(ranks.encode()))
    return entry.get('n_vocab') == spec.get('n_vocab')


def read_meta(data_dir, command=None):
    """data_dir/meta.json, checked: every field of the right type, .bin files of the promised sizes; one missing, old
    or inconsistent is a UserError that says how to redo it (command: the prepare command, where the caller knows
    it). A reader may then rely, without reading the .bin files, on each holding exactly {split}_tokens ids of dtype,
    all below n_vocab (prepare.py checked them), each document opening with eot_id; damage since is not seen."""
    redo = f"run `{command or prepare_command(data_dir)}`"
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.lexists(path):
        raise UserError(f"no dataset in {data_dir}: {redo} first")
    cli.check_file(path, fix=f"move it away, then {redo}")   # a folder, or a pipe that would hang the reader
    if os.path.getsize(path) > META_MAX_BYTES:
        raise UserError(f"{path} is {os.path.getsize(path):,} bytes, not a meta.json of prepare.py: {redo} "
                        f"with --force")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: JSON nested thousands deep
        raise UserError(f"{path} is unreadable ({type(e).__name__}): {redo} with --force") from None
    if not isinstance(meta, dict) or meta.get('format') != DATA_FORMAT:
        raise UserError(f"{path} is from another version of prepare.py: {redo} with --force")
    bpe = isinstance(meta.get('tokenizer'), dict) and meta['tokenizer'].get('kind') == 'bpe'
    for key, kind in {**META_TYPES, **({'tokenizer.pattern': str} if bpe else {})}.items():
        value = meta   # 'a.b': meta['a']['b'], after meta['a'] was found to be a dict
        for name in key.split('.'):
            value = value.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{path}: '{key}' should be {kind.__name__}, got {show(value)}: {redo} with --force")
    if not isinstance(meta.get('command', ''), str):   # the prepare command that wrote it; older data has none
        raise UserError(f"{path}: 'command' should be str, got {show(meta['command'])}: {redo} with --force")
    if meta['dtype'] not in ('uint16', 'uint32'):
        raise UserError(f"{path} has an unknown dtype {meta['dtype']!r}: {redo} with --force")
    for split in ('train', 'val'):
        bin_path = os.path.join(data_dir, f'{split}.bin')
        cli.check_file(bin_path, fix=f"move it away, then {redo}", missing_ok=True)
        want = meta[f'{split}_tokens'] * np.dtype(meta['dtype']).itemsize
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
    cli.check_file(path, fix=f"move it away, then {redo}", missing_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > RANKS_MAX_BYTES:   # not read into memory
        raise UserError(f"{path} is {os.path.getsize(path):,} bytes, not a tokenizer of prepare.py: {redo}")
    try:
        with open(path, encoding='ascii') as f:
            ranks = f.read()
    except (OSError, UnicodeDecodeError):
        raise UserError(f"{path} is missing or damaged: {redo}") from None
    if zlib.crc32(ranks.encode()) != tok.get('ranks_crc32'):
        raise UserError(f"{path} does not match meta.json (edited or damaged): {redo}")
    try:   # tiktoken compiles the pattern only when the encoding is made: checked here, where the fix is known
        tiktoken.Encoding('check', pat_str=tok['pattern'], mergeable_ranks={b'a': 0}, special_tokens={})
    except ValueError as e:
        raise UserError(f"{data_dir}/meta.json: the tokenizer's pattern is not a valid regex "
                        f"({str(e).splitlines()[0]}): {redo}") from None
    return dict(kind='bpe', name=tok['name'], pattern=tok['pattern'], ranks=ranks, n_vocab=meta['n_vocab'])


def load_tokenizer(spec):
    """tiktoken.Encoding from a tokenizer_spec() dict: our BPE's ranks, or one of tiktoken's encodings."""
    if not isinstance(spec, dict) or spec.get('kind') not in ('bpe', 'tiktoken'):
        raise UserError("not a tokenizer description: expected the dict of dataset.tokenizer_spec()")
    if spec['kind'] == 'tiktoken':
        return pretrained_encoding(spec['name'])
    try:   # a spec from a checkpoint is fingerprinted, so this fails only for a hand-made or foreign one
        ranks = parse_ranks(spec['ranks'])
        return tiktoken.Encoding(spec['name'], pat_str=spec['pattern'], mergeable_ranks=ranks,
                                 special_tokens={EOT: len(ranks)})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the tokenizer '{spec.get('name')}' is damaged ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): prepare its data again with --force") from None


def text_bytes(enc, n):
    """The bytes each token id 0..n-1 adds to the text: none for special tokens (<|endoftext|>) and ids the tokenizer
    lacks (past its end, as the model's vocabulary is padded, or in gaps: cl100k_base and o200k_base have some)."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    out = [b''] * n
    for i in range(n):
        if i not in special:
            with contextlib.suppress(KeyError):   # an id the tokenizer lacks
                out[i] = enc.decode_single_token_bytes(i)
    return out


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
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def cannot_write(error, path, then):
    """The one line for an OSError from writing path (the error's own file name first): the fix, then `then`."""
    fix = ("free some disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you can "
           "write to" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "use a shorter path"
           if error.errno == errno.ENAMETOOLONG else "check the path")
    return UserError(f"cannot write {error.filename or path} ({error.strerror or error}): {fix}{then}")


# --- Writing a dataset (for prepare.py). The new one is written in full into a folder of its own, then put in
# data_dir's place in one step: at every moment data_dir holds the whole old dataset or the whole new one,
# so a crash, Ctrl-C or a full disk midway leaves the old one as it was.

def write(data_dir, meta, splits, enc, ranks=None):
    """The dataset into data_dir (after discard_leftovers(data_dir)): splits {'train' and 'val': (a function returning
    (new_doc, text) pieces, about their size in MB or None)} tokenized by enc into train.bin and val.bin, the
    BPE's ranks text, and meta.json: meta with the vocabulary and the counts added, which it returns."""
    replace = os.path.lexists(os.path.join(data_dir, 'meta.json'))
    new = writing = staging_folder(data_dir, replace)
    kept = f"the dataset in {data_dir} is unchanged" if replace else "no dataset was written"
    dtype = 'uint16' if enc.n_vocab <= 2**16 else 'uint32'
    meta = dict(meta, n_vocab=enc.n_vocab, dtype=dtype, eot_id=enc.encode_single_token(EOT))
    try:
        os.makedirs(new)
        for split, (pieces, size_mb) in splits.items():
            writing = os.path.join(new, f'{split}.bin')
            counts = checkpoint.write_atomic(writing, lambda f: write_tokens(enc, pieces(), f, dtype, split, size_mb))
            if not counts['tokens']:
                raise UserError(f"the {split} split is empty: give more text (or more documents)")
            meta.update({f'{split}_{k}': v for k, v in counts.items()})
        for name, text in ((RANKS_FILE, ranks), ('meta.json', json.dumps(meta, indent=2) + '\n')):
            writing = os.path.join(new, name)
            if text is not None:
                checkpoint.write_atomic(writing, lambda f: f.write(text.encode('utf-8')))
        writing = data_dir
        put_in_place(new, data_dir)
    except OSError as e:   # a full disk, a quota, permissions: f.write and fsync name no file
        raise cannot_write(e, writing, f" and run again ({kept})") from None
    finally:
        discard_leftovers(data_dir)   # after put_in_place, `new` holds the old dataset
    return meta


def write_tokens(enc, pieces, f, dtype, label, size_mb=None):
    """Tokenize pieces into file f as a flat array of ids, each document after <|endoftext|>, checking that every
    id is one of enc's (train.py relies on it without looking); returns the counts of docs, tokens and bytes."""
    batch, docs, tokens, nbytes, size = [], 0, 0, 0, 0
    if size_mb is not None and size_mb >= ANNOUNCE_MB:   # minutes of work: said at once, then its progress
        print(f"encoding the {label} split ({size_mb:,} MB) ...", flush=True)
    progress = cli.Progress(f'  {label}', total=size_mb, unit='MB')
    for piece in itertools.chain(pieces, [None]):   # None: the end, so the last batch is written
        if piece:
            batch.append(EOT + piece[1] if piece[0] else piece[1])   # documents never hold EOT: it splits them
            docs, nbytes, size = docs + piece[0], nbytes + len(piece[1].encode('utf-8')), size + len(piece[1])
        if batch and (size >= BATCH_CHARS or not piece):
            # one long text per thread (tiktoken lets go of the GIL): a call per document costs more than a story
            parts = [''.join(batch[i * len(batch) // THREADS:(i + 1) * len(batch) // THREADS]) for i in range(THREADS)]
            with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
                out = np.concatenate(list(pool.map(lambda text: enc.encode_to_numpy(
                    text, allowed_special={EOT}, disallowed_special=()), parts)))   # uint32
            if out.max() >= enc.n_vocab:
                raise RuntimeError(f"{enc.name} gave token id {out.max()}, past its {enc.n_vocab} tokens")
            f.write(out.astype(dtype).tobytes())
            tokens, batch, size = tokens + out.size, [], 0
            progress.update(int(nbytes / 1e6))
    progress.close()
    return dict(docs=docs, tokens=tokens, bytes=nbytes)


def staging_folder(data_dir, replace):
    """Where prepare.py builds a dataset: beside data_dir (hidden, under a name no --dataset can have), where it
    replaces one and the two folders can be swapped; otherwise inside data_dir, to be renamed in file by file.
    With replace=None: both places, for what a killed run left there."""
    real = os.path.realpath(data_dir)
    parent, dev = os.path.dirname(real), os.stat(real).st_dev
    beside = os.path.join(parent, f'.{os.path.basename(real)}.prepare-new')
    inside = os.path.join(real, '.prepare-new')
    if replace is None:
        return beside, beside + '.old', inside
    # what else data_dir holds is hard-linked along: not across disks, and a mount point stays where it is;
    # and a working folder in data_dir would be left in the old one, which looks empty
    here = os.path.realpath(os.getcwd()) + os.sep
    if (replace and not os.path.ismount(real) and os.stat(parent).st_dev == dev and os.access(parent, os.W_OK)
            and all(os.lstat(os.path.join(real, name)).st_dev == dev for name in os.listdir(real))
            and not here.startswith(real + os.sep)):
        return beside
    return inside


def put_in_place(new, data_dir):
    """Put the complete dataset in folder `new` in data_dir's place. From beside data_dir, what else data_dir
    holds (raw/ downloads, its lock, your files) is hard-linked into new, and the two folders are swapped in
    one step: `new` then holds the old dataset, for discard_leftovers(). From inside data_dir (no dataset to
    keep, or no swap possible): the files are renamed in, meta.json last."""
    real = os.path.realpath(data_dir)
    if os.path.dirname(new) == real:
        remove_tree(os.path.join(real, 'meta.json'))   # an old dataset stops being one before any file changes
        for name in DATASET_FILES:   # meta.json last
            if os.path.exists(os.path.join(new, name)):
                os.replace(os.path.join(new, name), os.path.join(real, name))
            else:   # the old dataset's tokenizer, where the new one uses tiktoken's
                remove_tree(os.path.join(real, name))
        return
    moved = []
    try:
        for name in sorted(set(os.listdir(real)) - set(DATASET_FILES)):
            src, dst = os.path.join(real, name), os.path.join(new, name)
            try:   # hard links copy nothing, and both folders hold everything until the swap
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
                else:
                    os.link(src, dst, follow_symlinks=False)
            except OSError:   # a file system without hard links: moved over, an instant before the swap
                remove_tree(dst)
                os.rename(src, dst)
                moved.append(name)
        swap(new, real)
    except BaseException:
        for name in moved:
            os.rename(os.path.join(new, name), os.path.join(real, name))
        raise
    with contextlib.suppress(OSError):   # the swap itself reaches the disk, not only the files
        fd = os.open(os.path.dirname(real), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def discard_leftovers(data_dir):
    """Delete the staging folders, losing nothing: the old dataset put_in_place() leaves beside data_dir, or what
    a killed prepare.py left. What data_dir lacks of it goes back (a file written into raw/ during the swap, or
    what a run killed mid-way had moved); only dataset files and the hard links of data_dir's own files go."""
    def merge(src, dst, skip=()):
        for name in sorted(set(os.listdir(src)) - set(skip), key=lambda name: (name == 'meta.json', name)):
            path, there = os.path.join(src, name), os.path.join(dst, name)
            if not os.path.lexists(there):
                os.rename(path, there)
            elif os.path.isdir(path) and not os.path.islink(path) and os.path.isdir(there):
                merge(path, there)
            elif not os.path.samestat(os.lstat(path), os.lstat(there)):   # both changed meanwhile: both kept
                os.rename(path, f'{there}.{int(time.time())}.restored')
    for left in staging_folder(data_dir, None):
        if os.path.isdir(left) and not os.path.islink(left) and os.path.dirname(left) != os.path.realpath(data_dir):
            # its dataset too, where data_dir has none: a run killed amid a swap by renames (no renameat2)
            its_own = DATASET_FILES if os.path.lexists(os.path.join(data_dir, 'meta.json')) else ()
            merge(left, data_dir, skip=('.lock', *its_own, *(name + '.tmp' for name in DATASET_FILES)))
        remove_tree(left)


def swap(a, b):
    """Exchange two folders in one step: Linux renameat2(RENAME_EXCHANGE), macOS renamex_np(RENAME_SWAP).
    Elsewhere, or on a file system without it, three renames: for an instant, b is not there."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):   # Windows
        libc = None
    err = errno.ENOSYS   # each call returns 0, or -1 with the C errno set
    if hasattr(libc, 'renameat2'):   # AT_FDCWD, RENAME_EXCHANGE
        err = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) and ctypes.get_errno()
    elif hasattr(libc, 'renamex_np'):
        err = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2) and ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        os.rename(b, a + '.old')
        os.rename(a, b)
        os.rename(a + '.old', a)
    elif err:
        raise OSError(err, os.strerror(err), b)


def remove_tree(path):
    """Delete path, whatever it is (a folder with all it holds, a file, a link, a pipe), if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
