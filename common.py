"""
What the scripts (prepare.py, train.py, sample.py, bench.py, plot_log.py) share: the command line and
its one-line errors, the choice of device, datasets and tokenizers, checkpoints, and folder locks.
No script imports another script; they all import this module and model.py.
"""

import ast
import base64
import ctypes
import difflib
import inspect
import json
import math
import os
import shlex
import sys
import traceback
import zlib
from contextlib import nullcontext

import numpy as np
import tiktoken
import torch

from model import ModelConfig

try:
    import fcntl   # POSIX: Linux and macOS
except ImportError:   # Windows: folders are not locked
    fcntl = None


class UserError(Exception):
    """A mistake the user can fix (bad input, missing data, a busy folder): one line, no traceback, exit 2."""


# ----------------------------------------------------------------------------------------------
# Command line, the same for every script:
#     python SCRIPT.py [config/FILE.py ...] [--key=value | --key value ...]
# Arguments apply left to right (a malformed one is refused before any config file is read). A config
# file is plain Python whose public names override the defaults; --key=value (or --key value) overrides
# one key. Values are Python literals, or plain text for string keys, and must match the default's type.
# Bools take true/false/yes/no/1/0, and a bare --flag means --flag=true; a key whose default is None
# takes true/false/auto. --help lists the keys.

BOOL_WORDS = {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}


def settings_of(namespace):
    """A script's settings: the lowercase public names of its module that hold a plain value (imported
    constants such as EOT and helpers are left out)."""
    return {k: v for k, v in namespace.items() if k.islower() and not k.startswith('_')
            and isinstance(v, (int, float, str, bool, type(None)))}


def parse_config(argv, defaults, skip_file_keys=()):
    """Merge config files and overrides from argv into a copy of defaults. Returns (config, given): given
    is the set of keys that a file or an override set. Config files may also set keys in skip_file_keys
    (another script's; True = any), which are ignored; any other unknown key is an error."""
    config, given = dict(defaults), set()
    for key, raw, path in split_argv(argv, defaults):
        if key:
            config[key] = parse_value(key, raw, defaults[key])
            given.add(key)
            continue
        for key, value in read_config_file(path).items():
            if key not in defaults:
                # another script's key is skipped, unless it looks like a misspelling of one of ours
                typo = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.85)
                if (skip_file_keys is True or key in skip_file_keys) and not typo:
                    continue
                raise unknown_key(key, defaults, f" in {path}")
            config[key] = check_type(key, value, defaults[key], f"{show(value)} (in {path})")
            given.add(key)
    return config, given


def split_argv(argv, defaults):
    """argv as a list of (key, raw value, None) overrides and (None, None, path) config files, in order:
    --key=VALUE, --key VALUE, a bare --flag for a bool, or a path. --help prints the keys and exits."""
    items, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ('-h', '--help'):
            print_help(defaults)
            raise SystemExit(0)
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if key not in defaults:
                raise unknown_key(key, defaults, '')
            if not eq:   # --key value, or a bare bool flag
                nxt = argv[i] if i < len(argv) else None
                if isinstance(defaults[key], bool):
                    raw = 'true'
                    if nxt is not None and nxt.lower() in BOOL_WORDS:
                        raw, i = nxt, i + 1
                elif nxt is None or nxt.startswith('--'):
                    raise UserError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
                else:
                    raw, i = nxt, i + 1
            items.append((key, raw, None))
        elif arg.startswith('-') and len(arg) > 1:
            raise UserError(f"bad argument '{arg}': use --key=VALUE, --key VALUE or a config file path")
        else:
            items.append((None, None, arg))
    return items


def print_help(defaults):
    """The running script's docstring, then every key it takes with its default."""
    doc = (sys.modules['__main__'].__doc__ or '').strip()
    print(doc + '\n' if doc else '', end='')
    print(f"\nusage: python {os.path.basename(sys.argv[0])} [config/FILE.py ...] [--key=value | --key value ...]")
    print("keys (default):")
    for key in sorted(defaults):
        print(f"  --{key}={defaults[key]!r}")
    sys.stdout.flush()   # here, where run() can tell a reader that went away, not at exit


def unknown_key(key, defaults, where):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(sorted(defaults))
    return UserError(f"unknown config key '{key}'{where} ({hint})")


def parse_value(key, raw, default):
    """The text after --key= as a value of the default's type (a default of None: a bool or 'auto')."""
    if default is None:
        if raw.lower() in ('auto', 'none'):
            return None
        if raw.lower() in BOOL_WORDS:
            return BOOL_WORDS[raw.lower()]
        raise UserError(f"config key '{key}' expects true/false/auto, got {raw!r}")
    if isinstance(default, bool):
        if raw.lower() in BOOL_WORDS:
            return BOOL_WORDS[raw.lower()]
        raise UserError(f"config key '{key}' expects a bool (true/false/yes/no/1/0), got {raw!r}")
    if isinstance(default, str):
        return raw   # any text, e.g. --data_dir=2024 stays '2024'
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return check_type(key, value, default, show(raw))


def show(value, limit=60):
    """repr() for an error message, cut short: a config may hold a value too long to print."""
    try:
        text = repr(value)
    except ValueError:   # an int of more digits than Python will print
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit] + '...'


def check_type(key, value, default, shown):
    """value as the default's type, or a UserError naming key, the expected type and what was given."""
    want = type(default)
    if default is None and (value is None or isinstance(value, bool)):
        return value
    if want is bool and isinstance(value, bool):
        return value
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)   # --learning_rate=1 means 1.0
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' expects a finite number, got {shown}")
        return value
    if want is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():   # --max_iters=1e4
            return int(value)
    if want is str and isinstance(value, str):
        return value
    names = {int: "an int", float: "a number", bool: "a bool (True/False)", str: "a string",
             type(None): "True, False or None (automatic)"}
    raise UserError(f"config key '{key}' expects {names.get(want, want.__name__)}, got {shown}")


def read_config_file(path):
    """Run a config file in a fresh namespace; its public names, without modules, functions and classes."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: is it a Python config file?") from None
    namespace = {'__file__': path}   # lets a config build on another one beside it
    try:
        exec(compile(source, path, 'exec'), namespace)
    except SyntaxError as e:
        raise UserError(f"config file {path} line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
        where = f" line {lines[-1]}" if lines else ""
        raise UserError(f"config file {path}{where}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not (inspect.ismodule(v) or inspect.isfunction(v) or inspect.isclass(v))}


def check_ranges(cfg, rules):
    """rules: {key: (test, what it must be)}. The first key whose value fails its test is a UserError."""
    for key, (ok, must) in rules.items():
        if not ok(cfg[key]):
            raise UserError(f"{key} must be {must}, got {show(cfg[key])}")


SMALLER = "ask for less at once (a smaller --batch_size, --block_size or --num_samples) or a smaller model"


def run(main, *args):
    """Call main(*args) the way every script's command line does: a UserError, an OS error (a path that
    is a file, no permission, a full disk) or running out of memory is one line on stderr and exit code
    2; Ctrl-C is exit code 130. Programming errors keep their traceback."""
    try:
        return main(*args)
    except UserError as e:
        message = str(e)
    except torch.OutOfMemoryError:
        message = f"out of memory on the device: {SMALLER}"
    except MemoryError:
        message = f"out of memory: {SMALLER}"
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):   # the CPU allocator's own out-of-memory error
            raise
        message = f"out of memory: {SMALLER}"
    except BrokenPipeError:   # the reader of stdout went away (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        message = f"{e.strerror or e}{where} (check the path, its permissions and the free disk space)"
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Devices

def pick_device(device, dtype):
    """(device, torch dtype) for the device/dtype keys: 'auto' is cuda > mps > cpu, and bf16 autocast on
    CUDA (fp16 on GPUs without bf16), fp32 elsewhere."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind, _, index = device.partition(':')
    if kind not in ('cuda', 'mps', 'cpu') or (index and (kind != 'cuda' or not index.isdigit())):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device={device} but CUDA is not available: use --device=cpu")
    if kind == 'cuda' and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device={device} but there are {torch.cuda.device_count()} CUDA devices: use cuda:0 ...")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise UserError("device=mps but this torch has no MPS (Apple GPU) support: use --device=cpu")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device.startswith('cuda') else 'float32'
    return device, getattr(torch, dtype)


def autocast(device_type, dtype):
    """Mixed precision for the forward pass: nothing in fp32, autocast otherwise."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device_type, dtype=dtype)


def sync(device_type):
    """Wait for the device, so that a timing covers the work and not just its launch."""
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


# dense bf16 tensor-core FLOP/s by GPU name, for MFU
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'H800': 989e12, 'GH200': 989e12, 'B200': 2250e12, 'A100': 312e12,
              'A800': 312e12, 'A6000': 155e12, 'L40S': 362e12, 'L40': 181e12, 'L4': 121e12, 'A10': 125e12,
              '4090': 165e12, '3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def gpu_peak_flops(device_type):
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def keep_freed_memory():
    """On Linux/glibc, keep freed memory in the process instead of handing it back to the OS. glibc maps
    large blocks (all over 32 MB: a layer's activations at a large batch) fresh and unmaps them on free, so
    each CPU step would page-fault through them again. A no-op elsewhere."""
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: serve blocks under 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap top untrimmed
    except (OSError, AttributeError):   # musl and other libcs: nothing to tune
        pass


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
        raise UserError("not a tokenizer description: expected the dict of common.tokenizer_spec()")
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


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary name and renamed, so a crash or a full disk never leaves a
# half-written file in place of the last good one; fingerprinted, so a damaged file is refused.

CKPT_FORMAT = 'deepseek-nano/2'


def save_checkpoint(ckpt, path):
    """torch.save ckpt (a dict) with its fingerprint, to path + '.tmp', flushed to disk, then renamed."""
    ckpt = {**ckpt, 'format': CKPT_FORMAT, 'fingerprint': {k: fingerprint(v) for k, v in ckpt.items()}}
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        kept = f"{path} is unchanged" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"cannot write {tmp} ({reason}): free disk space or choose another --out_dir ({kept})") from None
    finally:
        remove(tmp)


def load_checkpoint(path, parts=('model',)):
    """The checkpoint dict and its ModelConfig. The given parts (and the small ones: config, tokenizer,
    iteration) must match their fingerprint; a file that is not one of ours, or damaged, is a UserError."""
    try:
        # mmap: tensors are read on demand, so the optimizer state (twice the model) never fills memory
        ck = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is truncated, damaged "
                        f"or not a PyTorch file") from None
    if not isinstance(ck, dict) or ck.get('format') != CKPT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this version of the repo (format {CKPT_FORMAT})")
    missing = [k for k in ('model', 'model_args', 'tokenizer', 'fingerprint', *parts) if k not in ck]
    if missing:
        raise UserError(f"{path} is incomplete: it has no {', '.join(missing)}")
    small = [k for k, v in ck.items() if k not in ('model', 'optimizer', 'fingerprint', 'format')]
    for part in (*parts, *small):
        if fingerprint(ck[part]) != ck['fingerprint'].get(part):
            raise UserError(f"{path} is damaged ('{part}' does not match its fingerprint): use an intact copy, "
                            f"or ckpt_best.pt / ckpt.pt beside it")
    try:
        mconf = ModelConfig(**ck['model_args'])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has model_args that model.py does not accept ({e})") from None
    return ck, mconf


INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(obj):
    """An integer that changes when any byte of obj changes: the sum of every tensor's raw bits read
    as integers, plus a CRC of everything else (nested dicts, lists, numbers, strings). Computed where
    the tensors live, so saving from a GPU costs no copy."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().reshape(-1)
        if t.numel() == 0:
            return 0
        return int(t.view(INT_VIEW[t.element_size()]).sum(dtype=torch.int64))
    if isinstance(obj, dict):
        return sum(zlib.crc32(repr(k).encode()) + fingerprint(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum((i + 1) * fingerprint(v) for i, v in enumerate(obj))
    return zlib.crc32(repr(obj).encode())


# ----------------------------------------------------------------------------------------------
# Folders

def lock_folder(path, what, shared=False):
    """Hold a lock on path/.lock for the life of the process; returns the open lock file. Exclusive (a
    writer: creates path if needed): any other holder makes it refuse at once. Shared (a reader of a
    folder that exists): other readers are welcome, a writer is refused, and so is this reader while a
    writer holds it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} is a file, not a folder: choose another folder for the {what}")
    try:
        if not shared:
            os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, '.lock'), 'a+')
    except OSError as e:
        if shared:   # a folder this process cannot write: nobody prepares into it from here either
            return None
        raise UserError(f"cannot write in {path} ({e.strerror}): choose a folder you can write to") from None
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or '?'
        try:   # who holds it: readers only (a shared lock is still granted) or a writer
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            holder = "a training run reading it"
        except OSError:
            holder = f"a process writing it (pid {pid})" if shared else f"another {what} (pid {pid})"
        f.close()
        raise UserError(f"{path} is in use by {holder}: wait for it to finish, or use another folder") from None
    if not shared:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
    return f


def remove(*paths):
    """Delete those of the files that exist."""
    for path in filter(os.path.exists, paths):
        os.remove(path)


def write_atomic(path, data):
    """Write bytes to path + '.tmp', flush it to disk, rename it over path."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        remove(tmp)
