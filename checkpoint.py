"""
Files that must survive a crash: checkpoints (written beside and renamed into place, checksummed, refused
when damaged), other files written atomically, and the locks that keep two processes out of one folder.
"""

import os
import zlib

import torch

from cli import UserError
from model import ModelConfig

try:
    import fcntl   # POSIX: Linux and macOS
except ImportError:   # Windows: folders are not locked
    fcntl = None


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
