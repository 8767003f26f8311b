"""
Train the DeepSeek-style model: one process, or many with torchrun.

    python train.py config/deepseek_mini.py                   # 2-core CPU, minutes
    python train.py config/deepseek.py                        # one GPU (bf16, torch.compile)
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek.py
    torchrun --standalone --nproc_per_node=2 train.py config/deepseek.py --fsdp=true   # two 16 GB GPUs
    python train.py config/deepseek_mini.py --eval_only=best  # score a checkpoint on the whole val split

Every key below, and every ModelConfig field under its own name, can be set by a config file (plain
Python) and then by --key=value or --key value, as in nanoGPT. main() is the run from top to bottom:
settings, processes and devices, data, model and optimizer (fresh or resumed), the loop, the final
evaluation on the whole validation split; the steps it calls follow it in that order.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings

import numpy as np
import torch

import checkpoint
import cli
import dataset as ds
import memory
from cli import UserError
from model import DeepSeekLM, ModelConfig, max_violation
from optim import optimizer_step

# -----------------------------------------------------------------------------
# defaults
out_dir = 'out-deepseek'   # the defaults are the full-size model; sample.py and plot_log.py look here too
init_from = 'scratch'      # 'scratch' | 'resume' (continue from out_dir/ckpt.pt with its own settings)
overwrite = False          # let a fresh start replace the run already in out_dir
eval_only = ''             # '' = train; 'last', 'best' or a path: score that checkpoint on the whole val split
eval_interval = 250
final_eval = True          # at the end, score the final model on the whole validation split (every token once)
eval_iters = 20            # batches per split per evaluation (the same windows every time)
log_interval = 10
ckpt_interval = 0          # write ckpt.pt every this many iterations, at an evaluation (0 = every evaluation);
                           # ckpt.pt always at the end; ckpt_best.pt (weights only) whenever val loss improves
seed = 1337
# data: made by `python prepare.py` with the same config
dataset = 'shakespeare'
data_dir = ''              # '' = data/<dataset>
batch_size = 8             # per process, per micro-step
gradient_accumulation_steps = 1
# optimizer and learning rate: linear warmup, then cosine decay to min_lr, or ('wsd') constant
# until the last cooldown_frac of the iterations after warmup, then a linear decay to min_lr
optimizer = 'adamw'        # 'adamw' | 'muon' (Muon for the blocks' weight matrices, AdamW for the rest)
learning_rate = 3e-4
max_iters = 10000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # 0 = off
lr_schedule = 'cosine'     # 'cosine' | 'wsd' (warmup-stable-decay)
warmup_iters = 200
cooldown_frac = 0.2        # wsd only
lr_decay_iters = 0         # the decay ends here (0 = max_iters)
min_lr = 3e-5
# system
device = 'auto'            # 'auto' = cuda > mps > cpu
dtype = 'auto'             # 'auto' = bfloat16 on CUDA if supported (else float16), float32 elsewhere
compile = None             # None = on CUDA only; True / False
activation_checkpointing = None   # None = on only where a step would not fit in memory without it
fsdp = False               # under torchrun: shard weights, gradients and AdamW state over the processes
# -----------------------------------------------------------------------------
TRAIN_DEFAULTS = cli.settings_of(globals())
MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
DEFAULTS = {**MODEL_DEFAULTS, **TRAIN_DEFAULTS}

positive = (lambda v: v > 0, "> 0")
PREPARE_ONLY = ('force', 'max_download_gb')   # prepare.py's own keys, which a shared config file may set
RUN_KEYS = {'out_dir', 'init_from', 'overwrite', 'eval_only', 'device', 'compile'}   # this process's, not the recipe's
RULES = {
    'batch_size': positive, 'gradient_accumulation_steps': positive, 'max_iters': positive,
    'eval_interval': positive, 'eval_iters': positive, 'log_interval': positive, 'learning_rate': positive,
    'out_dir': (lambda v: v.strip() != '', "a folder"),
    'init_from': (lambda v: v in ('scratch', 'resume'), "'scratch' or 'resume'"),
    'seed': (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    'min_lr': (lambda v: v >= 0, ">= 0"),
    'warmup_iters': (lambda v: v >= 0, ">= 0"),
    'lr_decay_iters': (lambda v: v >= 0, ">= 0 (0 = max_iters)"),
    'weight_decay': (lambda v: v >= 0, ">= 0"),
    'beta1': (lambda v: 0 <= v < 1, "in [0, 1)"),
    'beta2': (lambda v: 0 <= v < 1, "in [0, 1)"),
    'grad_clip': (lambda v: v >= 0, ">= 0 (0 = off)"),
    'ckpt_interval': (lambda v: v >= 0, ">= 0 (0 = at every evaluation)"),
    'optimizer': (lambda v: v in ('adamw', 'muon'), "'adamw' or 'muon'"),
    'lr_schedule': (lambda v: v in ('cosine', 'wsd'), "'cosine' or 'wsd'"),
    'cooldown_frac': (lambda v: 0 < v <= 1, "in (0, 1]"),
    'n_layer': (lambda v: 1 <= v <= 1024, "in [1, 1024]"),
}


def main(argv):
    cfg, given = settings(argv)
    run = start_processes(cfg)
    with contextlib.ExitStack() as held:   # folder locks and the heartbeat, released however main ends
        heartbeat = held.enter_context(contextlib.closing(cli.Heartbeat(active=run.master)))
        ckpt = None
        if cfg['init_from'] == 'resume' or cfg['eval_only']:
            heartbeat.beat('reading the checkpoint')
            ckpt, cfg = resume_point(cfg, given, run)
        heartbeat.beat('reading the data')
        data = open_data(cfg, argv, ckpt, held)
        mconf = ModelConfig(**(ckpt['model_args'] if ckpt else {k: cfg[k] for k in MODEL_DEFAULTS}))
        check_data(data, mconf)
        if cfg['eval_only']:
            return score_checkpoint(ckpt, mconf, data, cfg, run)
        heartbeat.beat('counting the memory a step needs')
        recompute, memory_line = plan_memory(cfg, mconf, run)
        if run.master:
            claim_out_dir(cfg, held)
        heartbeat.beat('building the model')
        model, raw_model, optimizers, scaler, state = build(cfg, mconf, run, ckpt, recompute)
        ckpt = None   # free the memory-mapped file
        token_bytes = bytes_per_token(data, mconf, run)
        log = Log(cfg, run, state, mconf.block_size)
        announce(cfg, mconf, data, run, raw_model, state, memory_line, log)

        # --- the loop -------------------------------------------------------------------------------
        model.train()
        clock = Clock(cfg, state['iter'])
        while True:
            it = state['iter']
            set_lr(optimizers, get_lr(it, cfg))
            last = it == cfg['max_iters']
            if (it % cfg['eval_interval'] == 0 or last) and not (it == clock.start > 0):
                heartbeat.beat(f"evaluating at iter {it}")
                ev = evaluate(model, raw_model, data.bins, data.meta['dtype'], cfg, mconf.block_size, run.dev,
                              run.autocast, token_bytes, run.master)
                log.evaluation(it, ev)
                save_checkpoints(cfg, run, raw_model, model, optimizers, scaler, state, data, mconf, ev, last)
                clock.restart(it)   # keep evaluations out of the step timing
            if last:
                break
            heartbeat.beat(f"iter {it + 1}")
            # drawn here, not prefetched, so a checkpoint's sampler state is exactly the next batch's
            batches = [get_batch(data.bins['train'], data.meta['dtype'], cfg['batch_size'], mconf.block_size,
                                 state['data_rng'], run.dev, run.rank, run.world)
                       for _ in range(cfg['gradient_accumulation_steps'])]
            loss, grad_norm, balance = optimizer_step(model, raw_model, optimizers, scaler, batches, run.autocast,
                                                      cfg['grad_clip'])
            state['iter'] = it + 1
            if state['iter'] % cfg['log_interval'] == 0 or state['iter'] == clock.start + 1:
                log.step(state['iter'], loss, grad_norm, balance, clock.lap(state['iter']), get_lr(it, cfg))

        # --- the result: the final model on the whole validation split ------------------------------
        heartbeat.beat('scoring the whole validation split')
        final = evaluate_whole(model, raw_model, data.bins['val'], data.meta['dtype'], mconf.block_size,
                               cfg['batch_size'], run, token_bytes) if cfg['final_eval'] else None
        log.final(state['iter'], final, clock, raw_model)
        finish_processes(run, model, raw_model)
        return final


# -----------------------------------------------------------------------------
# settings, processes and devices

def settings(argv):
    """The checked settings, and where each given one came from (cli.parse_config)."""
    cfg, given = cli.parse_config(argv, DEFAULTS, skip_file_keys={*ds.DATASET_DEFAULTS, *PREPARE_ONLY})
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
    try:
        ModelConfig(**{k: cfg[k] for k in MODEL_DEFAULTS})
    except ValueError as e:
        raise UserError(f"bad model config: {e}") from None
    return cfg, given


class Run:
    """This process: its rank among world processes, device and dtype."""

    def __init__(self, cfg):
        self.distributed = 'RANK' in os.environ
        try:
            self.rank, self.local_rank, self.world = ((int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
                                                      if self.distributed else (0, 0, 1))
        except (KeyError, ValueError):
            raise UserError("RANK is set but LOCAL_RANK or WORLD_SIZE is missing or not a number: start several "
                            "processes with torchrun, or unset RANK for one") from None
        self.master = self.rank == 0
        self.dev, self.ptdtype = cli.pick_device(cfg['device'], cfg['dtype'])
        if self.distributed and self.dev.startswith('cuda'):
            self.dev = f'cuda:{self.local_rank}'
        self.device_type = self.dev.split(':')[0]
        self.autocast = cli.autocast(self.device_type, self.ptdtype)
        self.compile = self.device_type == 'cuda' if cfg['compile'] is None else cfg['compile']
        self.fsdp = cfg['fsdp']
        if self.fsdp and not self.distributed:
            raise UserError("--fsdp=true shards the model over several processes: start them with torchrun "
                            "(torchrun --standalone --nproc_per_node=2 train.py ...)")


def start_processes(cfg):
    run = Run(cfg)
    cli.keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if run.distributed:
        if run.device_type == 'cuda':
            torch.cuda.set_device(run.dev)
        try:
            torch.distributed.init_process_group(backend='nccl' if run.device_type == 'cuda' else 'gloo')
        except (ValueError, RuntimeError) as e:
            raise UserError(f"RANK is set, but the processes cannot meet ({str(e).splitlines()[0][:120]}): start "
                            f"them with torchrun, or unset RANK to train in one process") from None
    return run


def finish_processes(run, model, raw_model):
    if run.distributed:
        check_ranks_agree(raw_model, run)
        # Tear down in order: wait for every rank, then free the wrapper (it owns the process group's
        # worker threads) while Python is still alive; left to interpreter exit, gloo can abort.
        torch.distributed.barrier()
        del model
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# a resume: the checkpoint, and the recipe it goes on with

def resume_point(cfg, given, run):
    """(the checkpoint to resume or score, the settings with its recipe). A resume goes on with the
    recipe the run started with: only --key overrides change it, and each change is printed old -> new."""
    out = cfg['out_dir']
    if cfg['eval_only']:
        ckpt = checkpoint.load_checkpoint(checkpoint.named(out, cfg['eval_only']))[0]
        for k in ('dataset', 'data_dir'):   # scored on the data it was trained on, unless told otherwise
            cfg[k] = cfg[k] if k in given else ckpt['config'][k]
        return ckpt, cfg
    path = os.path.join(out, 'ckpt.pt')
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} to resume: train first without --init_from=resume")
    ckpt, _ = checkpoint.load_checkpoint(path, parts=('model', 'optimizer', 'rng', 'config'))
    args = ckpt['model_args']
    clash = [f"--{k}={cfg[k]!r} (checkpoint: {args[k]!r})" for k in MODEL_DEFAULTS if k in given and cfg[k] != args.get(k)]
    if clash:
        raise UserError(f"{path} fixes the model; these settings differ from it: {', '.join(clash)}. Drop them, "
                        f"or train a new model into another --out_dir")
    old = ckpt['config']
    changed, kept = [], []
    for k in sorted(TRAIN_DEFAULTS.keys() - RUN_KEYS):
        if given.get(k) == '--' and k in old and cfg[k] != old[k]:
            changed.append(f"{k} {old[k]!r} -> {cfg[k]!r}")
        elif k in old:
            if k in given and cfg[k] != old[k]:   # a config file given again does not change the recipe
                kept.append(f"{k} {old[k]!r} (not {given[k]}'s {cfg[k]!r}: override with --{k})")
            cfg[k] = old[k]
    if cfg['optimizer'] != old['optimizer']:
        raise UserError(f"{path} was trained with --optimizer={old['optimizer']}: resume with it")
    if ckpt['iter_num'] >= cfg['max_iters']:
        raise UserError(f"{path} is at iter {ckpt['iter_num']} and max_iters is {cfg['max_iters']}: nothing to "
                        f"train; raise --max_iters to continue")
    check_run_id(ckpt, os.path.join(out, 'log.jsonl'), path)
    if run.master and changed:
        print(f"resume changes: {'; '.join(changed)}")
    if run.master and kept:
        print(f"resume keeps the checkpoint's {'; '.join(kept)}")
    return ckpt, cfg


def check_run_id(ckpt, log_path, path):
    """The log and the checkpoint of one folder must come from one run (a checkpoint copied in from
    another run would mix two runs in one log)."""
    if not os.path.exists(log_path):
        return
    ids = {r.get('run_id') for r in read_records(log_path) if r.get('kind') == 'start'}
    if ids and ids != {ckpt.get('run_id')}:
        raise UserError(f"{path} is from another run than {log_path} beside it: move log.jsonl away to resume "
                        f"this checkpoint on a new log, or put back the checkpoint of the run it logs")


# -----------------------------------------------------------------------------
# data

@dataclasses.dataclass
class Data:
    dir: str
    meta: dict
    tok_spec: dict
    bins: dict
    prepare_cmd: str


def open_data(cfg, argv, ckpt, held):
    """The dataset, locked against a prepare.py rewriting it while it is read. A resume must find the very
    data its checkpoint was trained on: the same text, tokenizer and split."""
    ddir = ds.data_dir_of(cfg)
    if os.path.realpath(ddir) == os.path.realpath(cfg['out_dir']):
        raise UserError(f"out_dir and data_dir are the same folder ({ddir}): train into another --out_dir")
    if os.path.isdir(ddir):
        held.enter_context(contextlib.closing(checkpoint.lock_folder(ddir, 'training run', shared=True) or
                                              open(os.devnull)))
    if ckpt is None:   # how to make this data: the config files and data overrides given
        given = cli.split_argv(argv, DEFAULTS)
        cmd = ds.prepare_command(ddir, [path or f'--{key}={raw}' for key, raw, path in given
                                        if path or key in ds.DATASET_DEFAULTS])
        if not os.path.exists(os.path.join(ddir, 'meta.json')):
            check_preparable(cfg, ddir, any(path for _, _, path in given))
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
        top = int(np.memmap(cli.check_file(path, 'token file'), dtype=meta['dtype'], mode='r').max())
        if top >= meta['n_vocab']:
            raise UserError(f"{path} holds token id {top}, outside its tokenizer's {meta['n_vocab']} tokens: the "
                            f"file is damaged; run `{data.prepare_cmd}` with --force")


# -----------------------------------------------------------------------------
# memory and the output folder, checked before anything is written

def plan_memory(cfg, mconf, run):
    """Whether to use activation checkpointing, and the start-up line that says what a step needs. A step
    that cannot fit this device, or checkpoints that cannot fit the disk, are refused here."""
    low = run.ptdtype != torch.float32
    shards = run.world if run.fsdp else 1
    try:
        on, est, line = memory.plan(mconf, cfg['batch_size'], cfg['gradient_accumulation_steps'], low,
                                    memory.device_memory(run.dev), shards, cfg['activation_checkpointing'])
    except ValueError as e:
        raise UserError(f"{e} (estimate for {run.dev}, {str(run.ptdtype).removeprefix('torch.')}, "
                        f"batch {cfg['batch_size']} x {mconf.block_size})") from None
    need = 16 * memory.param_counts(mconf)[0]   # ckpt.pt 12 bytes per parameter, ckpt_best.pt 4
    out = cfg['out_dir']
    free = shutil.disk_usage(out if os.path.isdir(out) else '.').free
    if need > free:
        raise UserError(f"{out} has {free / 2**30:.1f} GiB free, the checkpoints need about {need / 2**30:.1f} GiB: "
                        f"free disk space or choose another --out_dir")
    return on, line


def claim_out_dir(cfg, held):
    """One run per out_dir at a time, and a finished run is never replaced by accident."""
    out = cfg['out_dir']
    held.enter_context(contextlib.closing(checkpoint.lock_folder(out, 'training run')))
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


# -----------------------------------------------------------------------------
# model and optimizer, fresh or resumed

def build(cfg, mconf, run, ckpt, recompute):
    """(model as trained: wrapped for DDP or FSDP, the model itself, optimizers, loss scaler, state): state
    holds the iteration, best val loss, data sampler and run id, fresh or from the checkpoint."""
    torch.manual_seed(cfg['seed'])   # the same initial weights on every rank (FSDP shards them as they are)...
    with checkpoint.weights_left_empty() if ckpt is not None else contextlib.nullcontext():   # a resume loads them all
        model = DeepSeekLM(mconf)
    if run.distributed:
        torch.manual_seed(cfg['seed'] + run.rank)   # ...and each rank its own dropout and jitter
    model.activation_checkpointing = recompute
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as e:   # well formed, but written by another version of model.py
            raise UserError(f"the checkpoint does not fit this model.py ({str(e).splitlines()[0]}): train a new "
                            f"model into another --out_dir") from None
    model.to(run.dev)
    raw_model = model
    if run.compile:
        raw_model.compile_blocks()
    if run.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in raw_model.blocks:
            fully_shard(block)
        fully_shard(raw_model)
    elif run.distributed:
        # the routers' token counters are buffers: DDP must not overwrite them with rank 0's, since
        # update_router_bias all-reduces them. Newer torch deprecates the flag, but its own warning says
        # to keep it for rank-local buffers.
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device_type == 'cuda' else None, broadcast_buffers=False)
    optimizers = raw_model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                                'fsdp' if run.fsdp else run.device_type, cfg['optimizer'])
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.ptdtype == torch.float16)   # fp16 only
    state = {'iter': 0, 'best_val': float('inf'), 'run_id': uuid.uuid4().hex[:12],
             'data_rng': np.random.default_rng(cfg['seed'])}   # the same windows on every rank: each takes its share
    if ckpt is not None:
        resume_state(ckpt, raw_model, optimizers, scaler, state, run, cfg)
    return model, raw_model, optimizers, scaler, state


def resume_state(ckpt, raw_model, optimizers, scaler, state, run, cfg):
    """Optimizer state, loss scale, iteration, best val loss and random streams from the checkpoint."""
    if not isinstance(ckpt['optimizer'], list) or len(ckpt['optimizer']) != len(optimizers):
        raise UserError(f"the checkpoint holds another optimizer state than --optimizer={cfg['optimizer']} "
                        f"needs: resume with the optimizer it was trained with")
    try:
        for opt, saved in zip(optimizers, ckpt['optimizer']):
            checkpoint.load_optimizer_state(raw_model, opt, saved, run.fsdp)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit this model ({str(e)[:100]})") from None
    state.update(iter=ckpt['iter_num'], best_val=ckpt['best_val_loss'], run_id=ckpt['run_id'])
    if scaler.is_enabled() and ckpt.get('scaler'):   # fp16: the loss scale it had learnt
        scaler.load_state_dict(ckpt['scaler'])
    rng = ckpt['rng']
    state['data_rng'].bit_generator.state = rng['data']
    if rng['world'] == run.world and run.rank < len(rng['torch']):   # exact resume: each rank's own stream
        torch.set_rng_state(rng['torch'][run.rank])
        if rng['cuda'] is not None and run.device_type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'][run.rank], device=run.dev)
    else:
        torch.manual_seed(cfg['seed'] + run.rank + state['iter'])


def save_checkpoints(cfg, run, raw_model, model, optimizers, scaler, state, data, mconf, ev, last):
    """ckpt_best.pt (weights only) when val loss improved, ckpt.pt (with everything a resume needs) at the
    checkpoint interval and at the end. Under FSDP every process gathers; the first one writes."""
    it = state['iter']
    if it == 0:
        return
    better = [ev['val_loss'] < state['best_val']]
    if run.distributed:   # every process must take the same branch: the gathers below are collective
        torch.distributed.broadcast_object_list(better, src=0)
    better = better[0]
    full = last or cfg['ckpt_interval'] == 0 or it % cfg['ckpt_interval'] == 0
    if not (better or full):
        return
    weights, opt_states = checkpoint.full_state(raw_model, optimizers if full else [], run.fsdp)
    rngs = gather_rng(run)
    if not run.master:
        return
    rngs['data'] = state['data_rng'].bit_generator.state
    ck = {'model': weights, 'model_args': dataclasses.asdict(mconf), 'iter_num': it, 'config': cfg,
          'tokenizer': data.tok_spec, 'run_id': state['run_id'],
          'data': {'dir': data.dir, 'source': data.meta['source']['sha256'], 'split': ds.split_of(data.meta),
                   'prepared_with': data.meta['config']}}
    if better:
        state['best_val'] = ev['val_loss']
        checkpoint.save_checkpoint({**ck, 'best_val_loss': state['best_val']}, os.path.join(cfg['out_dir'], 'ckpt_best.pt'))
    if full:
        checkpoint.save_checkpoint({**ck, 'best_val_loss': state['best_val'], 'optimizer': opt_states, 'rng': rngs,
                                    'scaler': scaler.state_dict() if scaler.is_enabled() else None},
                                   os.path.join(cfg['out_dir'], 'ckpt.pt'))


def gather_rng(run):
    """Every rank's torch (and CUDA) random state, and the data sampler's, which all ranks share."""
    mine = [torch.get_rng_state(), torch.cuda.get_rng_state(run.dev) if run.device_type == 'cuda' else None]
    every = [mine]
    if run.distributed:
        every = [None] * run.world
        torch.distributed.all_gather_object(every, mine)
    return {'world': run.world, 'torch': [r[0] for r in every],
            'cuda': [r[1] for r in every] if run.device_type == 'cuda' else None, 'data': None}


# -----------------------------------------------------------------------------
# pieces of the loop

def set_lr(optimizers, lr):
    for opt in optimizers:
        for group in opt.param_groups:
            group['lr'] = lr


def get_lr(it, cfg):
    lr, min_lr, warmup = cfg['learning_rate'], cfg['min_lr'], cfg['warmup_iters']
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay_iters:
        return min_lr
    if cfg['lr_schedule'] == 'wsd':
        cooldown = max(decay_iters - warmup, 1) * cfg['cooldown_frac']
        return lr - (lr - min_lr) * max(0.0, 1 - (decay_iters - it) / cooldown)
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def get_batch(path, dtype, batch_size, block_size, rng, device, rank=0, world=1):
    """This rank's share of world x batch_size random windows of block_size+1 tokens (every rank draws all
    of them from the same stream, so the global batch is the same for any number of processes). The
    memmap is opened per batch so memory never grows."""
    data = np.memmap(path, dtype=dtype, mode='r')
    ix = rng.integers(0, len(data) - block_size, size=batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
    return windows(data, ix, block_size, device)


def windows(data, starts, n, device):
    """(inputs, targets) of the windows of n tokens of data at starts, the targets one token on, on device."""
    x = torch.from_numpy(np.stack([data[s:s + n] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + n] for s in starts]).astype(np.int64))
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model, raw_model, data, dtype, cfg, block_size, dev, autocast, token_bytes, show=False):
    """Mean loss on the same fixed windows of each split every time, val bits per byte, and the expert
    load of each split: MaxVio (worst layer, mean over layers) and each layer's load fractions."""
    model.eval()
    out = {}
    for split in ('train', 'val'):
        rng = np.random.default_rng(cfg['seed'] + 10_000)
        raw_model.reset_expert_counts()
        sums = torch.zeros(4, dtype=torch.float64)   # nats, nats of text targets, bytes, tokens
        progress = cli.Progress(f"  evaluating {split}", total=cfg['eval_iters'], unit='batches') if show else None
        for i in range(cfg['eval_iters']):
            X, Y = get_batch(data[split], dtype, cfg['batch_size'], block_size, rng, dev)
            sums += score(model, X, Y, autocast, token_bytes)
            if progress:
                progress.update(i + 1)
        if progress:
            progress.close()
        out[f'{split}_loss'] = (sums[0] / sums[3]).item()
        if split == 'val':
            out['val_bpb'] = (sums[1] / math.log(2) / sums[2].clamp(min=1)).item()
        out.update(balance_figures(raw_model, split))
    raw_model.reset_expert_counts()
    model.train()
    return out


def bytes_per_token(data, mconf, run):
    """For bits per byte: each token id's UTF-8 bytes in the text (0 for <|endoftext|>), on the device."""
    enc = ds.load_tokenizer(data.tok_spec)
    return torch.tensor([len(b) for b in ds.text_bytes(enc, mconf.vocab_size)], dtype=torch.float32, device=run.dev)


def score(model, X, Y, autocast, token_bytes):
    """(nats of all targets, nats of the targets that are text, their UTF-8 bytes, targets) of one batch."""
    with autocast:
        _, loss = model(X, Y, reduction='none')
    nb = token_bytes[Y.view(-1)]
    return torch.tensor([loss.sum().item(), (loss * (nb > 0)).sum().item(), nb.sum().item(), loss.numel()],
                        dtype=torch.float64)


def balance_figures(raw_model, split):
    counts = raw_model.expert_counts().float()
    mv = max_violation(counts)
    return {f'{split}_max_vio': mv.max().item(), f'{split}_max_vio_mean': mv.mean().item(),
            f'{split}_max_vio_layers': [round(v, 4) for v in mv.tolist()],
            f'{split}_load': [[round(v, 4) for v in row] for row in (counts / counts.sum(1, keepdim=True)).tolist()]}


@torch.no_grad()
def evaluate_whole(model, raw_model, path, dtype, block_size, batch_size, run, token_bytes):
    """The whole validation split, every token scored once: loss, bits per byte, and the expert load of
    each layer, over non-overlapping windows of block_size tokens (the last one shorter)."""
    data = np.memmap(path, dtype=dtype, mode='r')
    starts = list(range(0, len(data) - 1, block_size))
    model.eval()
    raw_model.reset_expert_counts()
    sums = torch.zeros(4, dtype=torch.float64)
    progress = cli.Progress("  scoring the whole val split", total=len(starts), unit='windows') if run.master else None
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        short = group[-1] + block_size + 1 > len(data)   # the last window: scored in a batch of its own
        for part in ((group[:-1], group[-1:]) if short else (group,)):
            if part:
                x, y = windows(data, part, min(block_size, len(data) - 1 - part[0]), run.dev)
                sums += score(model, x, y, run.autocast, token_bytes)
        if progress:
            progress.update(min(i + batch_size, len(starts)))
    if progress:
        progress.close()
    figures = balance_figures(raw_model, 'val')
    raw_model.reset_expert_counts()
    model.train()
    return {'val_loss': (sums[0] / sums[3]).item(), 'val_bpb': (sums[1] / math.log(2) / sums[2]).item(),
            'val_tokens_scored': int(sums[3].item()), **figures}


def score_checkpoint(ckpt, mconf, data, cfg, run):
    """--eval_only: the checkpoint's model on the whole validation split, printed as one JSON record."""
    with checkpoint.weights_left_empty():   # every weight comes from the checkpoint
        model = DeepSeekLM(mconf)
    model.load_state_dict(ckpt['model'])
    model.to(run.dev)
    result = {'kind': 'final', 'iter': ckpt['iter_num'],
              **evaluate_whole(model, model, data.bins['val'], data.meta['dtype'], mconf.block_size,
                               cfg['batch_size'], run, bytes_per_token(data, mconf, run))}
    if run.master:
        print(whole_val_line(result))
        print(json.dumps(result))
    return result


def whole_val_line(r):
    return (f"whole val split ({r['val_tokens_scored']:,} tokens) at iter {r['iter']}: loss {r['val_loss']:.4f} | "
            f"bpb {r['val_bpb']:.4f} | MaxVio per layer {' '.join(f'{v:.3f}' for v in r['val_max_vio_layers'])}")


class Clock:
    """Seconds per step between log lines, with the ETA from the median of the last few intervals: robust
    to the first one (compilation) and to hiccups."""

    def __init__(self, cfg, start):
        self.cfg, self.start = cfg, start
        self.t_start = self.t0 = time.time()
        self.t0_iter, self.recent = start, []

    def restart(self, it):
        self.t0, self.t0_iter = time.time(), it

    def lap(self, it):
        t1 = time.time()
        step_s, self.t0, self.t0_iter = (t1 - self.t0) / max(it - self.t0_iter, 1), t1, it
        self.recent = (self.recent + [step_s])[-5:]
        eta = sorted(self.recent)[len(self.recent) // 2] * (self.cfg['max_iters'] - it)
        return step_s, eta


class Log:
    """Console lines and log.jsonl records, from the first process only."""

    def __init__(self, cfg, run, state, block_size):
        self.cfg, self.run, self.path = cfg, run, os.path.join(cfg['out_dir'], 'log.jsonl')
        self.best_val = lambda: state['best_val']
        self.tokens_per_iter = cfg['batch_size'] * block_size * cfg['gradient_accumulation_steps'] * run.world
        self.peak = cli.gpu_peak_flops(run.device_type)
        if run.master:
            if state['iter']:
                keep_log_until(self.path, state['iter'])   # a killed run logged steps past its checkpoint
            else:   # --overwrite: a new run starts a new record
                checkpoint.remove(*(os.path.join(cfg['out_dir'], f) for f in ('ckpt.pt', 'ckpt_best.pt', 'log.jsonl')))
                self.write({'kind': 'start', 'iter': 0, 'run_id': state['run_id'], 'config': cfg}, None)

    def write(self, record, line):
        if not self.run.master:
            return
        if line:
            print(line, flush=True)
            cli.said()
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:   # a full disk: say which file, and that the checkpoints stand
            raise UserError(f"cannot write {self.path} ({e.strerror}): free disk space, then resume with "
                            f"--init_from=resume (the last checkpoint is kept)") from None

    def evaluation(self, it, ev):
        if self.run.device_type == 'cuda':
            ev['peak_mem_gb'] = torch.cuda.max_memory_allocated(self.run.dev) / 2**30
        if not math.isfinite(ev['val_loss']):
            raise diverged(f"val loss is {ev['val_loss']} at iter {it}", self.cfg['out_dir'])
        self.write({'kind': 'eval', 'iter': it, **ev},
                   f"eval {it}: train loss {ev['train_loss']:.4f} | val loss {ev['val_loss']:.4f} | "
                   f"val bpb {ev['val_bpb']:.4f} | MaxVio val {ev['val_max_vio']:.3f} (mean {ev['val_max_vio_mean']:.3f}) "
                   f"train {ev['train_max_vio']:.3f} (mean {ev['train_max_vio_mean']:.3f})"
                   + (f" | peak memory {ev['peak_mem_gb']:.1f} GiB" if 'peak_mem_gb' in ev else ''))

    def step(self, it, loss, grad_norm, balance, timing, lr):
        step_s, eta = timing
        if self.run.distributed:   # the mean over ranks of each one's last micro-batch loss
            torch.distributed.all_reduce(loss)
            loss = loss / self.run.world
        lossf = loss.item()
        if not math.isfinite(lossf):
            raise diverged(f"loss is {lossf} at iter {it}", self.cfg['out_dir'])
        grad = float(grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm)
        flops = self.flops_per_iter / step_s
        speed = f"MFU {100 * flops / self.peak:.1f}%" if self.peak else f"{flops / 1e9:.1f} GFLOP/s"
        vio = balance['max_vio'].max().item()
        first = ' (the first step' + (', compilation included)' if self.run.compile else ')') if it == self.first else ''
        self.write({'kind': 'train', 'iter': it, 'loss': lossf, 'lr': lr, 'ms_per_iter': 1000 * step_s,
                    'tokens_per_s': self.tokens_per_iter / step_s, 'mfu': flops / self.peak if self.peak else None,
                    'gflops': flops / 1e9, 'grad_norm': grad, 'max_vio': vio},
                   f"iter {it}/{self.cfg['max_iters']} | loss {lossf:.4f} | lr {lr:.2e} | {1000 * step_s:.1f} ms{first} | "
                   f"{self.tokens_per_iter / step_s:,.0f} tok/s | {speed} | grad {grad:.2f} | MaxVio {vio:.3f} | "
                   f"ETA {cli.fmt_time(eta)}")

    def final(self, it, final, clock, raw_model):
        elapsed = time.time() - clock.t_start
        summary = {'kind': 'summary', 'iter': it, 'time_s': elapsed, 'tokens_seen': (it - clock.start) * self.tokens_per_iter,
                   'params': raw_model.num_params(), 'active_params': raw_model.num_params(active=True)}
        result = 'best val loss ' + f"{summary.setdefault('best_val_loss', self.best_val()):.4f}"
        if final:
            record = {'kind': 'final', 'iter': it, **final}
            self.write(record, whole_val_line(record))
            summary.update({k: final[k] for k in ('val_loss', 'val_bpb', 'val_tokens_scored')})
            result = f"whole val split: loss {final['val_loss']:.4f}, bpb {final['val_bpb']:.4f}"
        if self.run.device_type == 'cuda':
            summary['peak_mem_gb'] = torch.cuda.max_memory_allocated(self.run.dev) / 2**30
        self.write(summary, f"done: {it - clock.start} iters in {cli.fmt_time(elapsed)}, {summary['tokens_seen']:,} tokens; "
                            f"{result}; checkpoints in {self.cfg['out_dir']}/")


def announce(cfg, mconf, data, run, raw_model, state, memory_line, log):
    """The start-up lines: model, data, run, memory, and what the run should take on this device."""
    block_size = mconf.block_size
    flops_per_token = raw_model.flops_per_token(block_size)
    log.flops_per_iter = flops_per_token * log.tokens_per_iter / run.world   # per process
    log.first = state['iter'] + 1
    if not run.master:
        return
    print(f"model: {raw_model.num_params():,} parameters, {raw_model.num_params(active=True):,} active per token | "
          f"{mconf.attention} attention, {mconf.n_layer} layers, {mconf.n_expert} experts top-{mconf.n_expert_active}")
    print(f"data: {data.dir} ({data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens, "
          f"vocab {data.meta['n_vocab']})")
    sharding = ', FSDP' if run.fsdp else ''
    print(f"run: {run.dev}, {str(run.ptdtype).removeprefix('torch.')}, compile={run.compile}, {run.world} process(es)"
          f"{sharding}, {log.tokens_per_iter:,} tokens/iter, {flops_per_token / 1e9:.3f} GFLOP/token, "
          f"{'resuming at iter ' + str(state['iter']) if state['iter'] else 'from scratch'}")
    print(memory_line, flush=True)
    cli.said()
    rate = cli.matmul_flops(run.dev, run.ptdtype)
    step_s = log.flops_per_iter / (0.5 * rate)   # a training step runs at about half the matmul rate (bench.py)
    evals = (cfg['max_iters'] - state['iter']) // cfg['eval_interval'] + 1
    eval_s = 2 * cfg['eval_iters'] * cfg['batch_size'] * block_size * flops_per_token / 3 / (0.5 * rate)
    total = (cfg['max_iters'] - state['iter']) * step_s + evals * eval_s
    print(f"expected: about {step_s:.3g} s per step and {cli.fmt_time(total)} for the {cfg['max_iters'] - state['iter']:,} "
          f"steps and {evals} evaluations (from the FLOP count and this {run.device_type}'s measured matmul rate, "
          f"{rate / 1e9:,.0f} GFLOP/s; the first step's time follows it)", flush=True)
    if total > 86400:
        fix = ("config/deepseek_mini.py is the model for a CPU: python prepare.py config/deepseek_mini.py && "
               "python train.py config/deepseek_mini.py" if run.device_type == 'cpu' else
               "a GPU with more FLOP/s, fewer --max_iters, or a smaller model")
        print(f"note: that is about {total / 86400:.1f} days here; {fix}", flush=True)
    cli.said()


def read_records(path):
    """The whole JSON records of a log.jsonl; a line cut short by a kill, or not a record, is skipped."""
    records = []
    with open(cli.check_file(path, 'log'), encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(r, dict) and isinstance(r.get('iter', 0), int):
                records.append(r)
    return records


def keep_log_until(path, iter_num):
    """Drop the log records after the checkpoint being resumed (and the finished run's result), so that
    log.jsonl holds every iteration once."""
    if os.path.exists(path):
        kept = [r for r in read_records(path) if r.get('iter', 0) <= iter_num and r.get('kind') not in ('summary', 'final')]
        checkpoint.write_atomic(path, lambda f: f.write(''.join(json.dumps(r) + '\n' for r in kept).encode()))


def diverged(what, out):
    ckpt_path = os.path.join(out, 'ckpt.pt')
    kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
    return UserError(f"{what}: training diverged; lower --learning_rate ({kept})")


def check_ranks_agree(raw_model, run):
    """Every rank must end with the same router biases, and under DDP the same weights: compare per-tensor
    sums across ranks (FSDP's weights are shards of one copy)."""
    tensors = [t for k, t in raw_model.state_dict().items() if not run.fsdp or k.endswith('expert_bias')]
    fp = torch.stack([t.detach().double().sum() for t in tensors]).to(run.dev)
    lo, hi = fp.clone(), fp.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if run.master:
        same = bool(torch.equal(lo, hi))
        what = 'router biases' if run.fsdp else 'weights and router biases'
        print(f"{'fsdp' if run.fsdp else 'ddp'}: {run.world} ranks {'hold identical' if same else 'DIVERGED in'} {what}")


if __name__ == '__main__':
    cli.run(main, sys.argv[1:])
