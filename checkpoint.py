"""Files that must survive a crash: checkpoints (written beside and renamed into place, checksummed, refused when
damaged), other files written atomically, and the locks that keep two processes out of one folder. (The run's log,
log.jsonl, is runlog.py's.) torch is imported where a function needs it: prepare.py, which uses only the files and
folders part, starts without it."""

import os
import zlib

from cli import UserError, check_file

try:
    import fcntl   # POSIX: Linux and macOS
except ImportError:   # Windows: folders are not locked
    fcntl = None


# --- Checkpoints ---

CKPT_FORMAT = 'deepseek-nano/3'
NAMES = {'last': 'ckpt.pt', 'best': 'ckpt_best.pt'}   # the files train.py writes, as --ckpt and --eval_only name them


def save_checkpoint(ckpt, path):
    """torch.save ckpt (a dict) with the checksum of each part, written whole or not at all (write_atomic)."""
    import torch
    ckpt = {**ckpt, 'format': CKPT_FORMAT, 'checksum': {k: checksum(v) for k, v in ckpt.items()}}
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        kept = f"{path} is unchanged" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"cannot write {path}.tmp ({reason}): free disk space or choose another --out_dir "
                        f"({kept})") from None


def load_checkpoint(path, parts=('model',)):
    """The checkpoint dict and its ModelConfig. The given parts (and the small ones: config, tokenizer, iteration)
    must match their checksum; a file that is not one of ours, or damaged, is a UserError."""
    import torch
    from model import ModelConfig
    check_file(path, 'checkpoint')
    try:
        # mmap: tensors are read on demand, so the optimizer state (twice the model) never fills memory
        ck = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is truncated, damaged "
                        f"or not a PyTorch file") from None
    if not isinstance(ck, dict) or ck.get('format') != CKPT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this version of the repo (format {CKPT_FORMAT}): "
                        f"train a new one, or use the version of the repo that wrote it")
    missing = [k for k in ('model', 'model_args', 'tokenizer', 'checksum', *parts) if k not in ck]
    if missing:
        raise UserError(f"{path} is incomplete: it has no {', '.join(missing)}")
    small = [k for k in ck if k not in ('model', 'optimizer', 'checksum', 'format')]
    for part in (*parts, *small):
        if not isinstance(ck['checksum'], dict) or checksum(ck[part]) != ck['checksum'].get(part):
            raise UserError(f"{path} is damaged ('{part}' does not match its checksum): use an intact copy")
    try:
        mconf = ModelConfig(**ck['model_args'])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has model_args that model.py does not accept ({e})") from None
    return ck, mconf


def checksum(obj, crc=0):
    """CRC-32 of every byte of obj, in order: tensors (their dtype, shape and raw bytes), nested dicts, lists,
    numbers and strings. Any changed, swapped or missing byte changes it."""
    import torch
    if isinstance(obj, torch.Tensor):
        t = obj.detach().reshape(-1).contiguous().cpu()
        crc = zlib.crc32(f"{t.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy(), crc) if t.numel() else crc
    if isinstance(obj, dict):
        for k, v in obj.items():
            crc = checksum(v, zlib.crc32(repr(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for v in obj:
            crc = checksum(v, zlib.crc32(b',', crc))
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


# --- Folders ---

def lock_folder(path, what, shared=False):
    """Hold a lock on path/.lock for the life of the process; returns the open lock file. Exclusive (a writer:
    creates path if needed): any other holder makes it refuse at once. Shared (a reader of a folder that exists):
    other readers are welcome, a writer is refused, and so is this reader while a writer holds it."""
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
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
    return f


def remove(*paths):
    """Delete those of the files that exist."""
    for path in filter(os.path.exists, paths):
        os.remove(path)


def write_atomic(path, write):
    """A file written whole or not at all: write(f) fills path + '.tmp', which is flushed to disk and renamed
    over path (a crash or a full disk leaves path as it was). Returns what write returns."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return result
    finally:
        remove(tmp)


# --- Model and optimizer state as one ordinary file, from one process or from FSDP's shards: tensors keyed
# by parameter name, so that a run sharded over N processes resumes in one, and the other way round.

def full_state(model, optimizers, sharded):
    """(model state dict, [optimizer state dicts keyed by parameter name]) on the CPU. Sharded (FSDP): every process
    must call this, and each gets the whole of it gathered."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=options),
                [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers])
    names = {id(p): name for name, p in model.named_parameters()}
    opt_states = []
    for opt in optimizers:
        sd, order = opt.state_dict(), [names[id(p)] for g in opt.param_groups for p in g['params']]
        opt_states.append({'state': {order[i]: s for i, s in sd['state'].items()},
                           'param_groups': [{**g, 'params': [order[i] for i in g['params']]} for g in sd['param_groups']]})
    return model.state_dict(), opt_states


def load_optimizer_state(model, optimizer, state, sharded):
    """Load an optimizer state written by full_state into optimizer (which must hold the same parameters)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): name for name, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g['params'])}
    optimizer.load_state_dict({'state': {index[name]: s for name, s in state['state'].items()},
                               'param_groups': [{**g, 'params': [index[n] for n in g['params']]}
                                                for g in state['param_groups']]})
