"""
Train the DeepSeek-style model: one process, or many with torchrun.

    python train.py config/deepseek_mini.py                   # 2-core CPU, minutes
    python train.py config/deepseek.py                        # one GPU (bf16, torch.compile)
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek.py

Every key below, and every ModelConfig field under its own name, can be set by a config file (plain
Python) and then by --key=value or --key value, as in nanoGPT.
"""

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch

import checkpoint
import cli
import dataset as ds
from cli import UserError
from model import DeepSeekLM, ModelConfig, max_violation

# -----------------------------------------------------------------------------
# defaults
out_dir = 'out-deepseek'   # the defaults are the full-size model; sample.py and plot_log.py look here too
init_from = 'scratch'      # 'scratch' | 'resume' (continue from out_dir/ckpt.pt)
overwrite = False          # let a fresh start replace the run already in out_dir
eval_interval = 250
eval_iters = 20            # batches per split per evaluation (the same windows every time)
log_interval = 10
ckpt_interval = 0          # write ckpt.pt every this many iterations, at an evaluation (0 = every evaluation);
                           # ckpt_best.pt (weights only) whenever val loss improves; both at the end
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
# -----------------------------------------------------------------------------
TRAIN_DEFAULTS = cli.settings_of(globals())
MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
DEFAULTS = {**MODEL_DEFAULTS, **TRAIN_DEFAULTS}

positive = (lambda v: v > 0, "> 0")
RUN_KEYS = {'out_dir', 'init_from', 'overwrite', 'device', 'compile'}   # of this process, not of the run's recipe
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
    cfg, given = cli.parse_config(argv, DEFAULTS, skip_file_keys=ds.DATASET_DEFAULTS)
    cli.check_ranges(cfg, RULES)
    if cfg['min_lr'] > cfg['learning_rate']:
        raise UserError(f"min_lr {cfg['min_lr']} is above learning_rate {cfg['learning_rate']}: lower --min_lr")
    try:
        model_args = {k: cfg[k] for k in MODEL_DEFAULTS}
        ModelConfig(**model_args)
    except ValueError as e:
        raise UserError(f"bad model config: {e}") from None
    cli.keep_freed_memory()

    # --- processes and devices -------------------------------------------------------------------
    ddp = 'RANK' in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    master = rank == 0
    dev, ptdtype = cli.pick_device(cfg['device'], cfg['dtype'])
    if ddp and dev.startswith('cuda'):
        dev = f'cuda:{local_rank}'
        torch.cuda.set_device(dev)
    device_type = dev.split(':')[0]
    autocast = cli.autocast(device_type, ptdtype)
    use_compile = device_type == 'cuda' if cfg['compile'] is None else cfg['compile']
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # --- everything is checked before anything is written ------------------------------------------
    out = cfg['out_dir']
    ckpt_path, best_path, log_path = (os.path.join(out, f) for f in ('ckpt.pt', 'ckpt_best.pt', 'log.jsonl'))
    ckpt = None
    if cfg['init_from'] == 'resume':
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint at {ckpt_path} to resume: train first without --init_from=resume")
        ckpt, _ = checkpoint.load_checkpoint(ckpt_path, parts=('model', 'optimizer', 'rng', 'config'))
        for k in TRAIN_DEFAULTS.keys() - given - RUN_KEYS:   # the run goes on with the recipe it started with
            cfg[k] = ckpt['config'].get(k, cfg[k])
        model_args = check_resume(ckpt, ckpt_path, cfg, given)
    ddir = ds.data_dir_of(cfg)
    data_lock = checkpoint.lock_folder(ddir, 'training run', shared=True) if os.path.isdir(ddir) else None  # noqa: F841
    if ckpt is None:   # for the messages, how to make this data: the config files and data overrides given
        data_args = [path or f'--{key}={raw}' for key, raw, path in cli.split_argv(argv, DEFAULTS)
                     if path or key in ds.DATASET_DEFAULTS]
        prepare_cmd = ds.prepare_command(ddir, data_args)
        meta = ds.read_meta(ddir, prepare_cmd)
        tok_spec = ds.tokenizer_spec(ddir, meta, prepare_cmd)
    else:   # a resume reads the very data it was trained on
        prepare_cmd = remake_command(ckpt, ddir)
        meta, tok_spec = checkpoint_data(ckpt, ckpt_path, ddir, prepare_cmd)
    data = {s: os.path.join(ddir, f'{s}.bin') for s in ('train', 'val')}
    check_data(ddir, meta, data, model_args, prepare_cmd)
    mconf = ModelConfig(**model_args)
    check_memory(mconf, dev, device_type, out)
    if master:   # one run per out_dir at a time, and a finished run is never replaced by accident
        lock = checkpoint.lock_folder(out, 'training run')   # noqa: F841 (held until the process ends)
        holds_run = any(os.path.exists(p) for p in (ckpt_path, best_path, log_path))
        if cfg['init_from'] == 'scratch' and holds_run and not cfg['overwrite']:
            if not os.path.exists(ckpt_path):   # stopped before its first checkpoint: nothing to resume
                raise UserError(f"{out} holds a run that wrote no checkpoint yet: start it over with "
                                f"--overwrite=true, or train into another --out_dir")
            raise UserError(f"{out} already holds a run: continue it with --init_from=resume, train into another "
                            f"--out_dir, or replace it with --overwrite=true")

    # --- model and optimizer -----------------------------------------------------------------------
    torch.manual_seed(cfg['seed'] + rank)
    model = DeepSeekLM(mconf)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as e:   # well formed, but written by another version of model.py
            raise UserError(f"{ckpt_path} does not fit this model.py ({str(e).splitlines()[0]}): train a new "
                            f"model into another --out_dir") from None
    model.to(dev)
    optimizers = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                            device_type, cfg['optimizer'])
    data_rng = np.random.default_rng(cfg['seed'] + rank)   # each rank its own stream of windows
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)   # fp16 only
    iter_num, best_val = 0, float('inf')
    if ckpt is not None:
        if not isinstance(ckpt['optimizer'], list) or len(ckpt['optimizer']) != len(optimizers):
            raise UserError(f"{ckpt_path} holds another optimizer state than --optimizer={cfg['optimizer']} "
                            f"needs: resume with the optimizer it was trained with")
        try:
            for opt, state in zip(optimizers, ckpt['optimizer']):
                opt.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{ckpt_path}: its optimizer state does not fit this model ({e})") from None
        iter_num, best_val = ckpt['iter_num'], ckpt['best_val_loss']
        if scaler.is_enabled() and ckpt.get('scaler'):   # fp16: the loss scale it had learnt
            scaler.load_state_dict(ckpt['scaler'])
        if ckpt['rng']['rank'] == rank:   # exact resume: this rank's own random streams
            torch.set_rng_state(ckpt['rng']['torch'])
            if ckpt['rng']['cuda'] is not None and device_type == 'cuda':
                torch.cuda.set_rng_state(ckpt['rng']['cuda'], device=dev)
            data_rng.bit_generator.state = ckpt['rng']['data']
        else:
            data_rng = np.random.default_rng([cfg['seed'], rank, iter_num])
        ckpt = None   # free the memory-mapped file
    raw_model = model
    if use_compile:
        raw_model.compile_blocks()
    if ddp:
        torch.distributed.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
        # the routers' token counters are buffers: DDP must not overwrite them with rank 0's, since
        # update_router_bias all-reduces them. Newer torch deprecates the flag, but its own warning says
        # to keep it for rank-local buffers.
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device_type == 'cuda' else None, broadcast_buffers=False)

    enc = ds.load_tokenizer(tok_spec)
    # bits per byte: each target's UTF-8 bytes, 0 for <|endoftext|>
    token_bytes = torch.tensor([len(b) for b in ds.text_bytes(enc, mconf.vocab_size)], dtype=torch.float32,
                               device=dev)
    block_size = mconf.block_size
    tokens_per_iter = cfg['batch_size'] * block_size * cfg['gradient_accumulation_steps'] * world
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter / world   # per process
    peak = cli.gpu_peak_flops(device_type)
    start_iter = iter_num

    def log(record, line):
        if master:
            print(line, flush=True)
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    def save(path, with_optimizer):
        ck = {'model': raw_model.state_dict(), 'model_args': dataclasses.asdict(mconf), 'iter_num': iter_num,
              'best_val_loss': best_val, 'config': cfg, 'tokenizer': tok_spec,
              'data': {'dir': ddir, 'source': meta['source']['sha256'], 'split': split_of(meta),
                       'prepared_with': meta['config']}}
        if with_optimizer:
            ck['optimizer'] = [opt.state_dict() for opt in optimizers]
            ck['scaler'] = scaler.state_dict() if scaler.is_enabled() else None
            ck['rng'] = {'rank': rank, 'torch': torch.get_rng_state(), 'data': data_rng.bit_generator.state,
                         'cuda': torch.cuda.get_rng_state(dev) if device_type == 'cuda' else None}
        checkpoint.save_checkpoint(ck, path)

    if master:
        if start_iter:
            keep_log_until(log_path, start_iter)   # a killed run logged steps past its checkpoint
        else:
            checkpoint.remove(ckpt_path, best_path, log_path)   # --overwrite: a new run starts a new record
        print(f"model: {raw_model.num_params():,} parameters, {raw_model.num_params(active=True):,} active per token | "
              f"{mconf.attention} attention, {mconf.n_layer} layers, {mconf.n_expert} experts top-{mconf.n_expert_active}")
        print(f"data: {ddir} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {meta['n_vocab']})")
        print(f"run: {dev}, {str(ptdtype).removeprefix('torch.')}, compile={use_compile}, {world} process(es), "
              f"{tokens_per_iter:,} tokens/iter, {raw_model.flops_per_token(block_size) / 1e9:.3f} GFLOP/token, "
              f"{f'resuming at iter {start_iter}' if start_iter else 'from scratch'}")

    # --- the loop --------------------------------------------------------------------------------
    model.train()
    t_start = t0 = time.time()
    t0_iter, recent = iter_num, []   # recent: seconds per step of the last few log intervals
    while True:
        lr = get_lr(iter_num, cfg)
        for opt in optimizers:
            for group in opt.param_groups:
                group['lr'] = lr

        last = iter_num == cfg['max_iters']
        if (iter_num % cfg['eval_interval'] == 0 or last) and not (iter_num == start_iter and start_iter > 0):
            ev = evaluate(model, raw_model, data, meta['dtype'], cfg, block_size, dev, autocast, token_bytes)
            if not math.isfinite(ev['val_loss']):
                raise diverged(f"val loss is {ev['val_loss']} at iter {iter_num}", ckpt_path)
            if device_type == 'cuda':
                ev['peak_mem_gb'] = torch.cuda.max_memory_allocated(dev) / 2**30
            log({'kind': 'eval', 'iter': iter_num, **ev},
                f"eval {iter_num}: train loss {ev['train_loss']:.4f} | val loss {ev['val_loss']:.4f} | "
                f"val bpb {ev['val_bpb']:.4f} | MaxVio val {ev['val_max_vio']:.3f} (mean {ev['val_max_vio_mean']:.3f}) "
                f"train {ev['train_max_vio']:.3f} (mean {ev['train_max_vio_mean']:.3f})"
                + (f" | peak memory {ev['peak_mem_gb']:.1f} GiB" if 'peak_mem_gb' in ev else ''))
            if master and iter_num > start_iter:
                if ev['val_loss'] < best_val:
                    best_val = ev['val_loss']
                    save(best_path, with_optimizer=False)
                if last or cfg['ckpt_interval'] == 0 or iter_num % cfg['ckpt_interval'] == 0:
                    save(ckpt_path, with_optimizer=True)
            t0, t0_iter = time.time(), iter_num   # keep evaluation out of the step timing
        if last:
            break

        # one optimizer step over gradient_accumulation_steps micro-batches
        for micro in range(cfg['gradient_accumulation_steps']):
            if ddp:   # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == cfg['gradient_accumulation_steps'] - 1
            # drawn here, not prefetched, so a checkpoint's sampler state is exactly the next batch's
            X, Y = get_batch(data['train'], meta['dtype'], cfg['batch_size'], block_size, data_rng, dev)
            with autocast:
                _, loss = model(X, Y)
                loss = loss / cfg['gradient_accumulation_steps']
            scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or float('inf'))
        for opt in optimizers:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        balance = raw_model.update_router_bias()   # once per optimizer step: counts of all micro-steps and ranks
        iter_num += 1

        if iter_num % cfg['log_interval'] == 0:
            lossf = loss.item() * cfg['gradient_accumulation_steps']
            if not math.isfinite(lossf):
                raise diverged(f"loss is {lossf} at iter {iter_num}", ckpt_path)
            t1 = time.time()
            step_s, t0, t0_iter = (t1 - t0) / (iter_num - t0_iter), t1, iter_num
            # ETA from the median of the last 5 intervals: robust to the first one (compilation) and to hiccups
            recent = (recent + [step_s])[-5:]
            eta = fmt_time(sorted(recent)[len(recent) // 2] * (cfg['max_iters'] - iter_num))
            flops = flops_per_iter / step_s
            speed = f"MFU {100 * flops / peak:.1f}%" if peak else f"{flops / 1e9:.1f} GFLOP/s"
            vio = balance['max_vio'].max().item()
            log({'kind': 'train', 'iter': iter_num, 'loss': lossf, 'lr': lr, 'ms_per_iter': 1000 * step_s,
                 'tokens_per_s': tokens_per_iter / step_s, 'mfu': flops / peak if peak else None,
                 'gflops': flops / 1e9, 'grad_norm': grad_norm.item(), 'max_vio': vio},
                f"iter {iter_num}/{cfg['max_iters']} | loss {lossf:.4f} | lr {lr:.2e} | {1000 * step_s:.1f} ms | "
                f"{tokens_per_iter / step_s:,.0f} tok/s | {speed} | grad {grad_norm.item():.2f} | MaxVio {vio:.3f} | "
                f"ETA {eta}")

    elapsed = time.time() - t_start
    summary = {'kind': 'summary', 'iter': iter_num, 'best_val_loss': best_val, 'time_s': elapsed,
               'tokens_seen': (iter_num - start_iter) * tokens_per_iter, 'params': raw_model.num_params(),
               'active_params': raw_model.num_params(active=True)}
    if device_type == 'cuda':
        summary['peak_mem_gb'] = torch.cuda.max_memory_allocated(dev) / 2**30
    log(summary, f"done: {iter_num - start_iter} iters in {fmt_time(elapsed)}, {summary['tokens_seen']:,} tokens, "
                 f"best val loss {best_val:.4f}; checkpoints in {out}/")
    if ddp:
        check_ranks_agree(raw_model, world, master)
        # Tear down in order: wait for every rank, then free the DDP wrapper (it owns the process group's
        # worker threads) while Python is still alive; left to interpreter exit, gloo can abort.
        torch.distributed.barrier()
        del model
        gc.collect()
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# checks before anything is written

def check_resume(ckpt, path, cfg, given):
    """The checkpoint's model arguments. The model's shape comes from the checkpoint: an override that
    asks for another is refused by name; so is a checkpoint already at max_iters."""
    args = ckpt['model_args']
    clash = [f"--{k}={cfg[k]!r} (checkpoint: {args[k]!r})" for k in MODEL_DEFAULTS if k in given and cfg[k] != args.get(k)]
    if clash:
        raise UserError(f"{path} fixes the model; these overrides differ from it: {', '.join(clash)}. Drop them, "
                        f"or train a new model into another --out_dir")
    if ckpt['config']['optimizer'] != cfg['optimizer']:
        raise UserError(f"{path} was trained with --optimizer={ckpt['config']['optimizer']}: resume with it")
    if ckpt['iter_num'] >= cfg['max_iters']:
        raise UserError(f"{path} is at iter {ckpt['iter_num']} and max_iters is {cfg['max_iters']}: nothing to "
                        f"train; raise --max_iters to continue")
    return args


def split_of(meta):
    """What tells two datasets of the same text and tokenizer apart: which documents went where."""
    return {'train_tokens': meta['train_tokens'], 'val_tokens': meta['val_tokens'],
            'val_names': meta['source']['val_names']}


def remake_command(ckpt, ddir):
    """The prepare command that makes a checkpoint's data again in ddir, from the settings it recorded
    (None for a checkpoint without them: read_meta then guesses from the folder's name)."""
    made_with = ckpt['data'].get('prepared_with')
    if made_with is None:
        return None
    settings = {**made_with, 'data_dir': ddir}
    return ds.prepare_command(ddir, [f'--{k}={v}' for k, v in settings.items()
                                         if v != ds.DATASET_DEFAULTS.get(k)])


def checkpoint_data(ckpt, path, ddir, prepare_cmd):
    """(meta, tokenizer spec) of ddir, which must hold the data the checkpoint was trained on; where it
    does not, the error says which folder does, or how to make that data again."""
    found = data_of_checkpoint_in(ckpt, ddir)
    if found:
        return found
    trained_on = ckpt['data']['dir']
    elsewhere = os.path.realpath(trained_on) != os.path.realpath(ddir)
    if elsewhere and data_of_checkpoint_in(ckpt, trained_on):
        raise UserError(f"{ddir} does not hold the data {path} was trained on: resume with --data_dir={trained_on}")
    meta = ds.read_meta(ddir, prepare_cmd)   # missing or damaged data: these say how to make it again
    ds.tokenizer_spec(ddir, meta, prepare_cmd)
    made_with, new_model = ckpt['data'].get('prepared_with'), "or train a new model into another --out_dir"
    if made_with is None:   # a checkpoint that did not record how its data was made
        fix = f"prepare it again with the settings it was trained on, {new_model}"
    elif elsewhere:   # ddir holds other data: leave it be
        fix = (f"make it again in its own folder (`{remake_advice(ckpt, trained_on)}`) and resume with "
               f"--data_dir={trained_on}, {new_model}")
    elif not same_text(made_with, meta['config']) or (made_with != meta['config']
                                                     and ckpt['data']['source'] == meta['source']['sha256']):
        fix = f"prepare it as it was (`{remake_advice(ckpt, ddir)}`), {new_model}"   # e.g. another vocab_size
    else:   # the same text settings, and yet other text or tokens: remaking it would make the same
        fix = (f"the same text settings now make other data (edited files, a new download, another prepare.py): "
               f"restore it, {new_model}")
    raise UserError(f"{ddir} is not the data {path} was trained on (another tokenizer, text or split): {fix}")


def same_text(settings, other):
    return all(settings.get(k) == other.get(k) for k in ('dataset', 'url', 'input'))


def remake_advice(ckpt, folder):
    """The prepare command that makes the checkpoint's data again in folder, with --force where prepare
    needs it: where the folder holds another text."""
    try:
        held = ds.read_meta(folder)['config']
    except UserError:   # nothing there, or nothing intact: prepare writes it without asking
        held = ckpt['data']['prepared_with']
    return remake_command(ckpt, folder) + ('' if same_text(held, ckpt['data']['prepared_with']) else ' --force')


def data_of_checkpoint_in(ckpt, ddir):
    """(meta, tokenizer spec) of ddir where it holds the very data the checkpoint was trained on, else None."""
    try:
        meta = ds.read_meta(ddir)
        tok_spec = ds.tokenizer_spec(ddir, meta)
    except UserError:
        return None
    if (ckpt['tokenizer'] == tok_spec and ckpt['data']['source'] == meta['source']['sha256']
            and ckpt['data'].get('split', split_of(meta)) == split_of(meta)):
        return meta, tok_spec
    return None


def check_data(ddir, meta, data, model_args, prepare_cmd):
    if model_args['vocab_size'] < meta['n_vocab']:
        raise UserError(f"vocab_size {model_args['vocab_size']} is smaller than the tokenizer's {meta['n_vocab']} "
                        f"tokens in {ddir}: set --vocab_size={meta['n_vocab']} or more")
    block_size = model_args['block_size']
    for split, path in data.items():
        if meta[f'{split}_tokens'] <= block_size + 1:
            raise UserError(f"{path} has {meta[f'{split}_tokens']} tokens, fewer than block_size {block_size} + 1: "
                            f"lower --block_size")
        top = int(np.memmap(path, dtype=meta['dtype'], mode='r').max())
        if top >= meta['n_vocab']:
            raise UserError(f"{path} holds token id {top}, outside its tokenizer's {meta['n_vocab']} tokens: the "
                            f"file is damaged; run `{prepare_cmd}` with --force")


def check_memory(mconf, dev, device_type, out):
    """Refuse a model whose weights, gradients and AdamW state (16 bytes per parameter) cannot fit the
    device, or whose checkpoints (16 bytes per parameter: ckpt.pt 12, ckpt_best.pt 4) cannot fit the disk."""
    with torch.device('meta'):
        n = DeepSeekLM(mconf).num_params()
    need = 16 * n
    if device_type == 'cuda':
        have = torch.cuda.get_device_properties(dev).total_memory
    else:
        have = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') if hasattr(os, 'sysconf') else float('inf')
    if need > have:
        raise UserError(f"the model has {n:,} parameters: its weights, gradients and AdamW state need "
                        f"{fmt_bytes(need)}, more than the {fmt_bytes(have)} of {device_type} memory; "
                        f"use a smaller model")
    free = shutil.disk_usage(out if os.path.isdir(out) else '.').free
    if need > free:
        raise UserError(f"{out} has {fmt_bytes(free)} free, the checkpoints need about {fmt_bytes(need)}: "
                        f"free disk space or choose another --out_dir")


# -----------------------------------------------------------------------------
# pieces of the loop

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


def get_batch(path, dtype, batch_size, block_size, rng, device):
    """Random windows of block_size+1 tokens. The memmap is opened per batch so memory never grows."""
    data = np.memmap(path, dtype=dtype, mode='r')
    ix = rng.integers(0, len(data) - block_size, size=batch_size)   # i + block_size is the last target
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model, raw_model, data, dtype, cfg, block_size, dev, autocast, token_bytes):
    """Mean loss on the same fixed windows of each split every time, val bits per byte, and the expert
    load of each split: MaxVio (worst layer, mean over layers) and each layer's load fractions."""
    model.eval()
    out = {}
    for split in ('train', 'val'):
        rng = np.random.default_rng(cfg['seed'] + 10_000)
        raw_model.reset_expert_counts()
        nats = nbytes = ntok = total = 0.0
        for _ in range(cfg['eval_iters']):
            X, Y = get_batch(data[split], dtype, cfg['batch_size'], block_size, rng, dev)
            with autocast:
                _, loss = model(X, Y, reduction='none')
            nb = token_bytes[Y.view(-1)]
            ntok += loss.numel()
            total += loss.sum().item()
            nats += (loss * (nb > 0)).sum().item()
            nbytes += nb.sum().item()
        out[f'{split}_loss'] = total / ntok
        if split == 'val':
            out['val_bpb'] = nats / math.log(2) / max(nbytes, 1.0)
        counts = raw_model.expert_counts().float()
        mv = max_violation(counts)
        out[f'{split}_max_vio'], out[f'{split}_max_vio_mean'] = mv.max().item(), mv.mean().item()
        out[f'{split}_max_vio_layers'] = [round(v, 4) for v in mv.tolist()]
        out[f'{split}_load'] = [[round(v, 4) for v in row] for row in (counts / counts.sum(1, keepdim=True)).tolist()]
    raw_model.reset_expert_counts()
    model.train()
    return out


def keep_log_until(path, iter_num):
    """Drop the log records after the checkpoint being resumed (and the finished run's summary), so that
    log.jsonl holds every iteration once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:   # a line cut short by a kill, or not a record at all
                continue
            if isinstance(r, dict) and isinstance(r.get('iter', 0), int) and r.get('iter', 0) <= iter_num \
                    and r.get('kind') != 'summary':
                kept.append(r)
    checkpoint.write_atomic(path, ''.join(json.dumps(r) + '\n' for r in kept).encode())


def diverged(what, ckpt_path):
    kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
    return UserError(f"{what}: training diverged; lower --learning_rate ({kept})")


def check_ranks_agree(raw_model, world, master):
    """Every rank must end with the same weights and router biases: compare per-tensor sums across ranks."""
    fp = torch.stack([t.detach().double().sum() for t in raw_model.state_dict().values()])
    lo, hi = fp.clone(), fp.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if master:
        same = bool(torch.equal(lo, hi))
        print(f"ddp: {world} ranks {'hold identical' if same else 'DIVERGED in'} weights and router biases")


def fmt_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


if __name__ == '__main__':
    cli.run(main, sys.argv[1:])
