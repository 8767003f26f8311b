"""The guard rails of train.py: every check and reconciliation that runs before the first step. A run that cannot
succeed is refused here, in one line that names the fix, before anything is written: settings out of range, a
resume whose recipe or data do not match its checkpoint, an output folder that holds another run, a step that does
not fit the device's memory or checkpoints that do not fit the disk. What passes is announced in a few start-up
lines: the model, the data and how often the run reads it, the device, the memory, the expected time."""

import contextlib
import dataclasses
import os
import shutil
import uuid

import torch

import checkpoint
import cli
import dataset as ds
import memory
import runlog
from cli import UserError
from model import ModelConfig

MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]
PREPARE_ONLY = ('force', 'max_download_gb')   # prepare.py's own keys, which a shared config file may set
RUN_KEYS = {'out_dir', 'init_from', 'overwrite', 'eval_only', 'device', 'compile'}   # this process's, not the recipe's
MANY = 2**31   # a bound for counts: far above any real run, far below what overflows the arithmetic


def between(lo, hi, what=None):
    return (lambda v: lo <= v <= hi), what or f"in [{lo}, {hi}]"


RULES = {
    'batch_size': between(1, 2**20), 'gradient_accumulation_steps': between(1, 2**20),
    'max_iters': between(1, MANY), 'eval_interval': between(1, MANY), 'eval_iters': between(1, 2**20),
    'log_interval': between(1, MANY), 'seed': between(0, 2**32 - 1, "in [0, 2**32)"),
    'warmup_iters': between(0, MANY), 'lr_decay_iters': between(0, MANY, f"in [0, {MANY}] (0 = max_iters)"),
    'ckpt_interval': between(0, MANY, f"in [0, {MANY}] (0 = at every evaluation)"),
    'learning_rate': (lambda v: v > 0, "> 0"),
    'min_lr': (lambda v: v >= 0, ">= 0"),
    'weight_decay': (lambda v: v >= 0, ">= 0"),
    'beta1': (lambda v: 0 <= v < 1, "in [0, 1)"),
    'beta2': (lambda v: 0 <= v < 1, "in [0, 1)"),
    'grad_clip': (lambda v: v >= 0, ">= 0 (0 = off)"),
    'cooldown_frac': (lambda v: 0 < v <= 1, "in (0, 1]"),
    'out_dir': (lambda v: v.strip() != '', "a folder"),
    'init_from': (lambda v: v in ('scratch', 'resume'), "'scratch' or 'resume'"),
    'optimizer': (lambda v: v in ('adamw', 'muon'), "'adamw' or 'muon'"),
    'lr_schedule': (lambda v: v in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
}


def settings(argv, defaults):
    """The checked settings, and where each given one came from (cli.parse_config's origin)."""
    cfg, origin = cli.parse_config(argv, defaults, skip_file_keys={*ds.DATASET_DEFAULTS, *PREPARE_ONLY})
    cli.check_ranges(cfg, RULES)
    if cfg['min_lr'] > cfg['learning_rate']:
        raise UserError(f"min_lr {cfg['min_lr']} is above learning_rate {cfg['learning_rate']}: lower --min_lr")
    if cfg['ckpt_interval'] % cfg['eval_interval']:
        raise UserError(f"ckpt_interval {cfg['ckpt_interval']} is not a multiple of eval_interval "
                        f"{cfg['eval_interval']}: checkpoints are written at evaluations; set --ckpt_interval="
                        f"{cfg['eval_interval'] * max(1, round(cfg['ckpt_interval'] / cfg['eval_interval']))}")
    if cfg['fsdp'] and cfg['optimizer'] == 'muon':
        raise UserError("--optimizer=muon orthogonalises whole weight matrices, which --fsdp splits across "
                        "processes: use --optimizer=adamw with --fsdp")
    model_config(cfg)
    return cfg, origin


def model_config(cfg):
    try:
        return ModelConfig(**{k: cfg[k] for k in MODEL_KEYS})
    except ValueError as e:
        raise UserError(f"bad model config: {e}") from None


def processes(fsdp):
    """(rank, local_rank, world) of this process: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE."""
    if 'RANK' not in os.environ:
        if fsdp:
            raise UserError("--fsdp=true shards the model over several processes: start them with torchrun "
                            "(torchrun --standalone --nproc_per_node=2 train.py ...)")
        return 0, 0, 1
    try:
        return tuple(int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    except (KeyError, ValueError):
        raise UserError("RANK is set but LOCAL_RANK or WORLD_SIZE is missing or not a number: start several "
                        "processes with torchrun, or unset RANK for one") from None


def agree(distributed, master, check):
    """Run check() on the first process only (it holds a lock, or reads what only it writes) and let every
    process raise the same UserError, so that none goes on alone into a collective that never completes."""
    message = [None]
    if master:
        try:
            check()
        except UserError as e:
            message = [str(e)]
    if distributed:
        torch.distributed.broadcast_object_list(message, src=0)
    if message[0]:
        raise UserError(message[0])


# --- a resume: the checkpoint, and the recipe it goes on with ---

def resume_point(cfg, origin, recipe_keys, world, master):
    """(the checkpoint to resume or score, the settings with its recipe). A resume keeps the run's recipe but for
    --key overrides, each printed old -> new, and its tokens per iteration under another number of processes."""
    out = cfg['out_dir']
    if cfg['eval_only']:
        ckpt = checkpoint.load_checkpoint(checkpoint_file(out, cfg['eval_only']))[0]
        for k in ('dataset', 'data_dir'):   # scored on the data it was trained on, unless told otherwise
            cfg[k] = cfg[k] if k in origin else ckpt['config'][k]
        return ckpt, cfg
    path = os.path.join(out, 'ckpt.pt')
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} to resume: train first without --init_from=resume")
    ckpt, _ = checkpoint.load_checkpoint(path, parts=('model', 'optimizer', 'rng', 'config'))
    args = ckpt['model_args']
    clash = [f"--{k}={cfg[k]!r} (checkpoint: {args[k]!r})" for k in MODEL_KEYS if k in origin and cfg[k] != args.get(k)]
    if clash:
        raise UserError(f"{path} fixes the model; these settings differ from it: {', '.join(clash)}. Drop them, "
                        f"or train a new model into another --out_dir")
    old, changed, kept = ckpt['config'], [], []
    for k in sorted(recipe_keys - RUN_KEYS):
        if origin.get(k) == '--' and k in old and cfg[k] != old[k]:
            changed.append(f"{k} {old[k]!r} -> {cfg[k]!r}")
        elif k in old:
            if k in origin and cfg[k] != old[k]:   # a config file given again does not change the recipe
                kept.append(f"{k} {old[k]!r} (not {origin[k]}'s {cfg[k]!r}: override with --{k})")
            cfg[k] = old[k]
    changed += same_tokens_per_iter(cfg, origin, ckpt['rng']['world'], world)
    if cfg['optimizer'] != old['optimizer']:
        raise UserError(f"{path} was trained with --optimizer={old['optimizer']}: resume with it")
    if ckpt['iter_num'] >= cfg['max_iters']:
        raise UserError(f"{path} is at iter {ckpt['iter_num']} and max_iters is {cfg['max_iters']}: nothing to "
                        f"train; raise --max_iters to continue")
    check_run_id(ckpt, os.path.join(out, 'log.jsonl'), path)
    if master and changed:
        print(f"resume changes: {'; '.join(changed)}")
    if master and kept:
        print(f"resume keeps the checkpoint's {'; '.join(kept)}")
    return ckpt, cfg


def same_tokens_per_iter(cfg, origin, old_world, world):
    """Under another number of processes, keep the tokens of an iteration (and so the schedule's meaning): more
    accumulation where there are fewer processes, a smaller batch where there are more. Returns what to print."""
    if world == old_world:
        return []
    batch, accum = cfg['batch_size'], cfg['gradient_accumulation_steps']
    before = batch * accum * old_world
    note = f" ({world} process{'es' if world > 1 else ''} instead of {old_world}"
    if 'batch_size' not in origin and 'gradient_accumulation_steps' not in origin:
        if accum * old_world % world == 0:
            cfg['gradient_accumulation_steps'] = accum * old_world // world
            return [f"gradient_accumulation_steps {accum} -> {cfg['gradient_accumulation_steps']}{note}: the same "
                    f"{before:,} windows per iteration)"]
        if batch * old_world % world == 0:
            cfg['batch_size'] = batch * old_world // world
            return [f"batch_size {batch} -> {cfg['batch_size']}{note}: the same {before:,} windows per iteration)"]
    after = cfg['batch_size'] * cfg['gradient_accumulation_steps'] * world
    return [] if after == before else [f"windows per iteration {before:,} -> {after:,}{note})"]


def check_run_id(ckpt, log_path, path):
    """One folder's log and checkpoint must be one run's (a checkpoint copied in would mix two runs in one log)."""
    if not os.path.exists(log_path):
        return
    ids = {r.get('run_id') for r in runlog.read_records(log_path) if r.get('kind') == 'start'}
    if ids and ids != {ckpt.get('run_id')}:
        raise UserError(f"{path} is from another run than {log_path} beside it: move log.jsonl away to resume "
                        f"this checkpoint on a new log, or put back the checkpoint of the run it logs")


def checkpoint_file(out_dir, which):
    """The checkpoint that which ('best', 'last' or a path, as --eval_only and --ckpt take) names for the run in
    out_dir: a regular file, or a UserError saying what is there instead (a folder, a pipe) or how to make it."""
    names = checkpoint.NAMES
    path = os.path.join(out_dir, names[which]) if which in names else which
    if which == 'best' and not os.path.lexists(path) and os.path.lexists(os.path.join(out_dir, names['last'])):
        path = os.path.join(out_dir, names['last'])   # a run that has not yet written its best: its last
    if which in names and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} is not a folder: give the folder a training run wrote (--out_dir=FOLDER)")
    if not os.path.exists(path):
        if which in names:
            raise UserError(f"no checkpoint at {path}: train first with `{train_command(out_dir)}`")
        raise UserError(f"no checkpoint at {path} (--ckpt is 'last', 'best' or a path)")
    if which not in names and os.path.isdir(path) and os.path.isfile(os.path.join(path, 'ckpt.pt')):
        raise UserError(f"checkpoint {path} is a folder, not a file: give --ckpt={os.path.join(path, 'ckpt.pt')}, "
                        f"or --out_dir={path} without --ckpt")
    return cli.check_file(path, 'checkpoint')


def train_command(out_dir):
    """The command that trains into out_dir from here: with the repo config naming that folder, else --out_dir."""
    configs = os.path.join(cli.ROOT, 'config')
    for name in sorted(n for n in os.listdir(configs) if n.endswith('.py')):
        try:
            cfg, _ = cli.parse_config([os.path.join(configs, name)], {'out_dir': ''}, skip_file_keys=True)
        except UserError:
            continue
        if cfg['out_dir'] and os.path.abspath(cfg['out_dir']) == os.path.abspath(out_dir):
            here = os.path.abspath('.') == cli.ROOT
            return cli.repo_command('train.py', [os.path.join('config', name) if here else os.path.join(configs, name)])
    return cli.repo_command('train.py', [f'--out_dir={out_dir}'])


# --- data ---

@dataclasses.dataclass
class Data:
    dir: str
    meta: dict          # its meta.json (dataset.read_meta)
    tok_spec: dict      # its tokenizer (dataset.tokenizer_spec), as checkpoints carry it
    bins: dict          # 'train' and 'val': the token files
    prepare_cmd: str    # the command that makes it, for advice
    token_bytes: torch.Tensor = None   # each token id's UTF-8 bytes, for bits per byte (train.py fills it in)


def open_data(cfg, argv, ckpt, locks, defaults):
    """The dataset, locked against a prepare.py rewriting it while it is read. A resume must find the very
    data its checkpoint was trained on: the same text, tokenizer and split."""
    ddir = ds.data_dir_of(cfg)
    if os.path.realpath(ddir) == os.path.realpath(cfg['out_dir']):
        raise UserError(f"out_dir and data_dir are the same folder ({ddir}): train into another --out_dir")
    if os.path.isdir(ddir):   # None: a folder this process cannot write, which nobody prepares into from here
        locks.enter_context(checkpoint.lock_folder(ddir, 'training run', shared=True) or contextlib.nullcontext())
    if ckpt is None:   # how to make this data: the config files and data overrides given
        arguments = cli.split_argv(argv, defaults)
        cmd = ds.prepare_command(ddir, [path or f'--{key}={raw}' for key, raw, path in arguments
                                        if path or key in ds.DATASET_DEFAULTS])
        if not os.path.exists(os.path.join(ddir, 'meta.json')):
            check_preparable(cfg, ddir, any(path for _, _, path in arguments))
    else:   # the settings that made the checkpoint's data, into this folder
        cmd = ds.remake_command(ckpt['data']['prepared_with'], ddir)
    meta = ds.read_meta(ddir, cmd)
    tok_spec = ds.tokenizer_spec(ddir, meta, cmd)
    differs = ckpt and ds.differences(ckpt['data'], ckpt['tokenizer'], meta)
    if differs:
        fresh = f"{os.path.normpath(ddir)}-{uuid.uuid4().hex[:6]}"
        raise UserError(f"{ddir} is not the data the checkpoint was trained on (its {' and '.join(differs)} "
                        f"differ{'s' if len(differs) == 1 else ''}): make that data with "
                        f"`{ds.remake_command(ckpt['data']['prepared_with'], fresh)}` and resume with --data_dir={fresh}")
    return Data(ddir, meta, tok_spec, {s: os.path.join(ddir, f'{s}.bin') for s in ('train', 'val')}, cmd)


def check_preparable(cfg, ddir, from_files):
    """Missing data is met with a prepare command: make sure prepare.py would take it."""
    if cfg['vocab_size'] < 257:
        raise UserError(f"no dataset in {ddir}, and vocab_size {cfg['vocab_size']} is below the 257 tokens a byte-level "
                        f"BPE starts from: set --vocab_size=257 or more")
    if cfg['dataset'] not in ds.BUILTIN and not from_files:   # its text comes from --url or --input
        raise UserError(f"no dataset in {ddir}: prepare the text of '{cfg['dataset']}' first, `python prepare.py "
                        f"--dataset={cfg['dataset']} --input=YOUR_FILES` (or --url=URL), then train with the same "
                        f"--dataset")


def check_data(data, mconf):
    meta = data.meta
    if mconf.vocab_size < meta['n_vocab']:
        raise UserError(f"vocab_size {mconf.vocab_size} is smaller than the tokenizer's {meta['n_vocab']} "
                        f"tokens in {data.dir}: set --vocab_size={meta['n_vocab']} or more")
    for split, path in data.bins.items():
        if meta[f'{split}_tokens'] <= mconf.block_size + 1:
            raise UserError(f"{path} has {meta[f'{split}_tokens']} tokens, fewer than block_size {mconf.block_size} "
                            f"+ 1: lower --block_size")
        cli.check_file(path, 'token file')   # its size is read_meta's to check; its ids, get_batch's


# --- memory, disk and the output folder ---

def plan_memory(cfg, mconf, dev, world):
    """Whether to use activation checkpointing, and the start-up line that says what a step needs. A step
    that cannot fit this device, or checkpoints that cannot fit the disk, are refused here."""
    low = dev.dtype != torch.float32
    shards = world if cfg['fsdp'] else 1
    try:
        on, est, line = memory.plan(mconf, cfg['batch_size'], cfg['gradient_accumulation_steps'], low, dev.memory,
                                    shards, cfg['activation_checkpointing'], dev.attention(mconf)[1])
    except ValueError as e:
        raise UserError(f"{e} (estimate for {dev.device}, {str(dev.dtype).removeprefix('torch.')}, "
                        f"batch {cfg['batch_size']} x {mconf.block_size})") from None
    need = 16 * memory.param_counts(mconf)[0]   # ckpt.pt 12 bytes per parameter, ckpt_best.pt 4
    out = cfg['out_dir']
    free = shutil.disk_usage(out if os.path.isdir(out) else '.').free
    if need > free:
        raise UserError(f"{out} has {free / 2**30:.1f} GiB free, the checkpoints need about {need / 2**30:.1f} GiB: "
                        f"free disk space or choose another --out_dir")
    return on, line


def claim_out_dir(cfg, locks):
    """One run per out_dir at a time, and a finished run is never replaced by accident."""
    out = cfg['out_dir']
    locks.enter_context(contextlib.closing(checkpoint.lock_folder(out, 'training run')))
    ckpt_path, best_path, log_path = (os.path.join(out, f) for f in ('ckpt.pt', 'ckpt_best.pt', 'log.jsonl'))
    if cfg['init_from'] == 'scratch' and not cfg['overwrite']:
        if os.path.exists(ckpt_path):
            raise UserError(f"{out} already holds a run: continue it with --init_from=resume, train into another "
                            f"--out_dir, or replace it with --overwrite=true")
        if os.path.exists(best_path):   # --overwrite would delete it, and there is nothing to resume
            raise UserError(f"{out} holds {best_path} but no ckpt.pt to resume: train into another --out_dir "
                            f"(--overwrite=true would delete ckpt_best.pt)")
        if os.path.exists(log_path):   # stopped before its first checkpoint: nothing to resume
            raise UserError(f"{out} holds a run that wrote no checkpoint yet: start it over with "
                            f"--overwrite=true, or train into another --out_dir")


# --- what the run will do, said before it starts ---

PASSES_THAT_STILL_TEACH = 4   # repeating data beyond about 4 passes helps less and less (Muennighoff et al. 2023)


def announce(cfg, mconf, data, dev, world, model, start, memory_line, tokens_per_iter):
    """The start-up lines: model, data (and how many times the run reads it), device, memory, and the time
    the run should take here. Returns the model FLOPs of one iteration of this process."""
    flops_per_token = model.flops_per_token(mconf.block_size)
    flops_per_iter = flops_per_token * tokens_per_iter / world
    steps = cfg['max_iters'] - start
    passes = steps * tokens_per_iter / data.meta['train_tokens']
    params = model.num_params()
    print(f"model: {params:,} parameters, {model.num_params(active=True):,} active per token | "
          f"{mconf.attention} attention, {mconf.n_layer} layers, {mconf.n_expert} experts top-{mconf.n_expert_active}")
    print(f"data: {data.dir} ({data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens, "
          f"vocab {data.meta['n_vocab']})")
    print(f"run: {dev.line}, {world} process(es){', FSDP' if cfg['fsdp'] else ''}, {tokens_per_iter:,} tokens/iter, "
          f"{flops_per_token / 1e9:.3f} GFLOP/token, {'resuming at iter ' + str(start) if start else 'from scratch'}")
    print(dev.kernels(mconf, cfg['fsdp']))
    print(memory_line, flush=True)
    rate = dev.matmul_flops()
    step_s = flops_per_iter / (0.5 * rate)   # a training step runs at about half the matmul rate (bench.py)
    evals = steps // cfg['eval_interval'] + 1
    eval_s = 2 * cfg['eval_iters'] * cfg['batch_size'] * mconf.block_size * flops_per_token / 3 / (0.5 * rate)
    total = steps * step_s + evals * eval_s
    print(f"expected: about {step_s:.3g} s per step and {cli.fmt_time(total)} for the {steps:,} steps ({passes:,.2f} "
          f"passes over the train split) and {evals} evaluations (from the FLOP count and this {dev.type}'s measured "
          f"matmul rate, {rate / 1e9:,.0f} GFLOP/s; the first step's time follows it)", flush=True)
    if passes > PASSES_THAT_STILL_TEACH:
        print(f"note: {passes:,.0f} passes over {data.meta['train_tokens']:,} tokens for {params:,} parameters: past "
              f"about {PASSES_THAT_STILL_TEACH} passes a model memorises its data and val loss turns upward "
              f"(train.py says when; ckpt_best.pt keeps the best model). More data: the full-size configs train "
              f"on --dataset=tinystories (python prepare.py)", flush=True)
    if total > 86400:
        fix = ("config/deepseek_mini.py is the model for a CPU: python prepare.py config/deepseek_mini.py && "
               "python train.py config/deepseek_mini.py" if dev.type == 'cpu' else
               "a GPU with more FLOP/s, fewer --max_iters, or a smaller model")
        print(f"note: that is about {total / 86400:.1f} days here; {fix}", flush=True)
    return flops_per_iter
