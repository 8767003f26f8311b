"""Train the DeepSeek-style model: one process, or many with torchrun.

    python train.py config/deepseek_mini.py                   # 2-core CPU, minutes
    python train.py config/deepseek.py                        # one GPU (bf16, torch.compile)
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek.py
    torchrun --standalone --nproc_per_node=2 train.py config/deepseek.py --fsdp=true   # two 16 GB GPUs
    python train.py config/deepseek_mini.py --eval_only=best  # score a checkpoint on the whole val split

Every key below, and every ModelConfig field under its own name, can be set by a config file (plain
Python) and then by --key=value or --key value, as in nanoGPT. The file reads as a run goes: settings;
processes and device; data; the model, torch.compile, DDP or FSDP and the optimizer; the loop, with one
optimizer step written out in it; evaluation; checkpoints; the final score on the whole validation split.
The checks that run before the first step (settings, a resume's recipe, the data's identity, the output
folder, disk and memory) are in preflight.py."""

import contextlib
import dataclasses
import json
import math
import os
import sys
import uuid
import warnings

import numpy as np
import torch

import checkpoint
import cli
import dataset as ds
import devices
import preflight
import runlog
from cli import UserError
from model import DeepSeekLM, ModelConfig, max_violation
from optim import configure_optimizers

# --- defaults ---
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
dataset = ds.DATASET_DEFAULTS['dataset']
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
dtype = 'auto'             # 'auto' = bfloat16 where the GPU computes in it, float16 on older GPUs, float32 elsewhere
compile = None             # None = on CUDA only; True / False
activation_checkpointing = None   # None = on only where a step would not fit in memory without it
fsdp = False               # under torchrun: shard weights, gradients and AdamW state over the processes
# -----------------------------------------------------------------------------
TRAIN_DEFAULTS = cli.settings_of(globals())
# DDP must not overwrite the routers' per-process counters with the first process's (update_router_bias
# all-reduces them): torch deprecates broadcast_buffers=False, but its own warning says to keep it for these
warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)}, **TRAIN_DEFAULTS}


def main(argv):
    cfg, origin = preflight.settings(argv, DEFAULTS)

    # --- processes and device: a torchrun process takes its own GPU before anything touches a GPU ----------
    rank, local_rank, world = preflight.processes(cfg['fsdp'])
    distributed, master = 'RANK' in os.environ, rank == 0
    dev = devices.plan(cfg['device'], cfg['dtype'], cfg['compile'], local_rank if distributed else None)
    cli.keep_freed_memory()
    dev.apply()   # this process's settings for the device (docs/full-size.md says which and why)
    if distributed:
        try:
            torch.distributed.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
        except (ValueError, RuntimeError) as e:
            raise UserError(f"RANK is set, but the processes cannot meet ({str(e).splitlines()[0][:120]}): start "
                            f"them with torchrun, or unset RANK to train in one process") from None

    with contextlib.ExitStack() as locks:   # the folders' locks and the heartbeat, released however the run ends
        heartbeat = locks.enter_context(contextlib.closing(cli.Heartbeat(active=master)))
        ckpt = None
        if cfg['init_from'] == 'resume' or cfg['eval_only']:
            heartbeat.beat('reading the checkpoint')
            ckpt, cfg = preflight.resume_point(cfg, origin, TRAIN_DEFAULTS.keys(), world, master)

        # --- data --------------------------------------------------------------------------------------------
        heartbeat.beat('reading the data')
        data = preflight.open_data(cfg, argv, ckpt, locks, DEFAULTS)
        mconf = ModelConfig(**ckpt['model_args']) if ckpt else preflight.model_config(cfg)
        preflight.check_data(data, mconf)
        if not cfg['eval_only']:
            heartbeat.beat('counting the memory a step needs')
            recompute, memory_line = preflight.plan_memory(cfg, mconf, dev, world)
            preflight.agree(distributed, master, lambda: preflight.claim_out_dir(cfg, locks))
        data.token_bytes = bytes_per_token(data, mconf, dev)   # (after the memory plan: a big vocabulary takes time)
        if cfg['eval_only']:
            return score_checkpoint(ckpt, mconf, data, cfg, dev, master)
        heartbeat.beat('building the model')
        return train(cfg, mconf, data, dev, (rank, world, distributed), ckpt, recompute, memory_line, heartbeat)


def train(cfg, mconf, data, dev, processes, ckpt, recompute, memory_line, heartbeat):
    """Build the model (fresh, or from the checkpoint), its optimizers and loss scaler, then train it."""
    rank, world, distributed = processes
    master = rank == 0
    torch.manual_seed(cfg['seed'])   # the model: the same initial weights on every process (each its own dropout)
    model = raw_model = build_model(mconf, ckpt, dev, recompute)
    if distributed:
        torch.manual_seed(cfg['seed'] + rank)
    if dev.compile:   # torch.compile(block) in place, block by block: one graph serves all layers, in seconds
        for block in raw_model.blocks:
            block.compile(fullgraph=True)
    if cfg['fsdp']:   # each process keeps 1/world of the weights, gradients and AdamW state
        for block in raw_model.blocks:
            fully_shard(block, **dev.fsdp)   # gathered in the run's dtype, gradients reduced in fp32
        fully_shard(raw_model)   # the embedding and head stay fp32, and so does the residual stream
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.device] if dev.type == 'cuda' else None, broadcast_buffers=False)
    optimizers = configure_optimizers(raw_model, cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']),
                                      'fsdp' if cfg['fsdp'] else dev.type, cfg['optimizer'])
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.dtype == torch.float16)   # fp16 gradients need a loss scale
    data_rng = np.random.default_rng(cfg['seed'])   # the same windows on every process: each takes its share
    iter_num, best_val_loss, run_id = resume_state(ckpt, raw_model, optimizers, scaler, data_rng, cfg, dev, rank, world)
    ckpt, start = None, iter_num   # the checkpoint's memory-mapped file is no longer needed
    log = runlog.Log(cfg, dev, master, distributed, world, mconf.block_size, start, run_id)
    log.flops_per_iter = preflight.announce(cfg, mconf, data, dev, world, raw_model, start, memory_line,
                                            log.tokens_per_iter) if master else None

    # --- the loop ------------------------------------------------------------------------------------------
    model.train()
    accum = cfg['gradient_accumulation_steps']
    while True:
        lr = get_lr(iter_num, cfg)
        for group in (group for opt in optimizers for group in opt.param_groups):
            group['lr'] = lr
        last = iter_num == cfg['max_iters']
        if (iter_num % cfg['eval_interval'] == 0 or last) and not iter_num == start > 0:
            heartbeat.beat(f"evaluating at iter {iter_num}")
            ev = evaluate(model, raw_model, data, cfg, mconf.block_size, dev, show=master)
            log.evaluation(iter_num, ev)
            best_val_loss = save_checkpoints(cfg, raw_model, optimizers, scaler, data, mconf, dev, distributed, rank,
                                             world, iter_num, best_val_loss, run_id, data_rng, ev, last, log)
            log.clock.restart(iter_num)   # keep evaluations and checkpoints out of the step timing
        if last:
            break

        # one optimizer step: forward under autocast and backward for each micro-batch, gradients crossing
        # processes after the last one only; then unscaled (fp16), clipped, applied, and the balance updated
        heartbeat.beat(f"iter {iter_num + 1}")
        step_loss = 0.0   # the mean over the micro-batches, for the log
        for micro in range(accum):
            X, Y = get_batch(data, cfg['batch_size'], mconf.block_size, data_rng, dev.device, rank, world)
            if cfg['fsdp']:
                model.set_requires_gradient_sync(micro == accum - 1)
            elif distributed:
                model.require_backward_grad_sync = micro == accum - 1
            with dev.autocast():
                _, loss = model(X, Y)
            scaler.scale((loss + raw_model.sequence_balance_loss()) / accum).backward()   # balance term: 0 if off
            step_loss += loss.detach() / accum
        for opt in optimizers:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or math.inf)
        for opt in optimizers:
            scaler.step(opt)   # skipped where fp16 gradients overflowed; the scaler then lowers its scale
            opt.zero_grad(set_to_none=True)
        scaler.update()
        balance = raw_model.update_router_bias()   # from the expert counts of every micro-batch and process
        iter_num += 1
        if iter_num % cfg['log_interval'] == 0 or iter_num == start + 1:
            log.step(iter_num, step_loss, grad_norm, balance, lr)

    # --- the result: the final model on the whole validation split ---------------------------------------------
    heartbeat.beat('scoring the whole validation split')
    final = cfg['final_eval'] and evaluate_whole(model, raw_model, data, mconf.block_size, cfg['batch_size'], dev, master)
    log.final(iter_num, final, raw_model, best_val_loss)
    del model   # DDP's wrapper owns threads of the process group: freed while the group is still there
    if distributed:
        finish_processes(raw_model, cfg['fsdp'], dev, master)
    return final


def build_model(mconf, ckpt, dev, recompute=False):
    """The model on the plan's device, its attention laid out for the device's kernel: drawn at random (on
    the CPU, so that a seed gives the same weights everywhere), or with every weight from the checkpoint
    (built on the meta device, so that nothing is drawn for nothing). recompute: activation checkpointing,
    a block keeps only its input for backward and runs its forward again there."""
    try:
        model = DeepSeekLM(mconf) if ckpt is None else DeepSeekLM.from_state_dict(mconf, ckpt['model'])
    except RuntimeError as e:   # well formed, but written by another version of model.py
        raise UserError(f"the checkpoint does not fit this model.py ({str(e).splitlines()[0]}): train a new "
                        f"model into another --out_dir") from None
    model.activation_checkpointing = recompute
    model.to(dev.device)
    dev.apply(model)
    return model


def fully_shard(module, **kw):
    """FSDP's sharding (torch.distributed.fsdp.fully_shard), imported on first use: the import takes a second, and
    most runs never shard."""
    from torch.distributed.fsdp import fully_shard as shard
    return shard(module, **kw)


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


def get_batch(data, batch_size, block_size, rng, device, rank=0, world=1, split='train'):
    """This process's share of world x batch_size random windows of block_size+1 tokens (every process draws
    all of them from the same stream, so the global batch is the same for any number of processes)."""
    n = data.meta[f'{split}_tokens']
    ix = rng.integers(0, n - block_size, size=batch_size * world)[rank * batch_size:(rank + 1) * batch_size]
    return windows(data, split, ix, block_size, device)


def windows(data, split, starts, n, device):
    """(inputs, targets) of the windows of n tokens of a split at starts, the targets one token on, on device.
    The file is opened per call, so memory never grows; a token id outside the vocabulary (a damaged file)
    is refused here, where it is read, instead of reading the whole file at every start."""
    ids = np.memmap(data.bins[split], dtype=data.meta['dtype'], mode='r')
    w = np.stack([ids[s:s + n + 1] for s in starts]).astype(np.int64)
    if w.max() >= data.meta['n_vocab']:
        raise UserError(f"{data.bins[split]} holds token id {w.max()}, outside its tokenizer's {data.meta['n_vocab']} "
                        f"tokens: the file is damaged; run `{data.prepare_cmd}` with --force")
    x, y = torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# --- evaluation ---

@torch.no_grad()
def evaluate(model, raw_model, data, cfg, block_size, dev, show=False):
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
            X, Y = get_batch(data, cfg['batch_size'], block_size, rng, dev.device, split=split)
            sums += score(model, X, Y, dev, data.token_bytes)
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


def bytes_per_token(data, mconf, dev):
    """For bits per byte: each token id's UTF-8 bytes in the text (0 for <|endoftext|>), on the device."""
    enc = ds.load_tokenizer(data.tok_spec)
    return torch.tensor([len(b) for b in ds.text_bytes(enc, mconf.vocab_size)], dtype=torch.float32, device=dev.device)


def score(model, X, Y, dev, token_bytes):
    """(nats of all targets, nats of the targets that are text, their UTF-8 bytes, targets) of one batch."""
    with dev.autocast():
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
def evaluate_whole(model, raw_model, data, block_size, batch_size, dev, show):
    """The whole validation split, every token scored once: loss, bits per byte, and the expert load of
    each layer, over non-overlapping windows of block_size tokens (the last one shorter)."""
    n = data.meta['val_tokens']
    starts = list(range(0, n - 1, block_size))
    model.eval()
    raw_model.reset_expert_counts()
    sums = torch.zeros(4, dtype=torch.float64)
    progress = cli.Progress("  scoring the whole val split", total=len(starts), unit='windows') if show else None
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        short = group[-1] + block_size + 1 > n   # the last window: scored in a batch of its own
        for part in ((group[:-1], group[-1:]) if short else (group,)):
            if part:
                x, y = windows(data, 'val', part, min(block_size, n - 1 - part[0]), dev.device)
                sums += score(model, x, y, dev, data.token_bytes)
        if progress:
            progress.update(min(i + batch_size, len(starts)))
    if progress:
        progress.close()
    figures = balance_figures(raw_model, 'val')
    raw_model.reset_expert_counts()
    model.train()
    return {'val_loss': (sums[0] / sums[3]).item(), 'val_bpb': (sums[1] / math.log(2) / sums[2]).item(),
            'val_tokens_scored': int(sums[3].item()), **figures}


def score_checkpoint(ckpt, mconf, data, cfg, dev, master):
    """--eval_only: the checkpoint's model on the whole validation split, printed as one JSON record."""
    model = build_model(mconf, ckpt, dev)
    result = {'kind': 'final', 'iter': ckpt['iter_num'],
              **evaluate_whole(model, model, data, mconf.block_size, cfg['batch_size'], dev, master)}
    if master:
        print(runlog.whole_val_line(result))
        print(json.dumps(result))
    return result


# --- checkpoints ---

def save_checkpoints(cfg, raw_model, optimizers, scaler, data, mconf, dev, distributed, rank, world, it, best_val_loss,
                     run_id, data_rng, ev, last, log):
    """ckpt_best.pt (weights only) when val loss improved, ckpt.pt (with everything a resume needs) at the
    checkpoint interval and at the end. Under FSDP every process gathers; the first one writes. Returns the
    best val loss so far."""
    if it == 0:
        return best_val_loss
    better = [ev['val_loss'] < best_val_loss]
    if distributed:   # every process must take the same branch: the gathers below are collective
        torch.distributed.broadcast_object_list(better, src=0)
    better = better[0]
    full = last or cfg['ckpt_interval'] == 0 or it % cfg['ckpt_interval'] == 0
    if not (better or full):
        return best_val_loss
    weights, opt_states = checkpoint.full_state(raw_model, optimizers if full else [], cfg['fsdp'])
    rngs = gather_rng(dev, distributed, world)
    best_val_loss = min(best_val_loss, ev['val_loss'])
    if rank != 0:
        return best_val_loss
    rngs['data'] = data_rng.bit_generator.state
    ck = {'model': weights, 'model_args': dataclasses.asdict(mconf), 'iter_num': it, 'config': cfg,
          'tokenizer': data.tok_spec, 'run_id': run_id, 'val_loss': ev['val_loss'], 'best_val_loss': best_val_loss,
          'data': {'dir': data.dir, 'source': data.meta['source']['sha256'], 'split': ds.split_of(data.meta),
                   'prepared_with': data.meta['config']}}
    if better:
        checkpoint.save_checkpoint(ck, os.path.join(cfg['out_dir'], 'ckpt_best.pt'))
    if full:
        checkpoint.save_checkpoint({**ck, 'optimizer': opt_states, 'rng': rngs,
                                    'scaler': scaler.state_dict() if scaler.is_enabled() else None},
                                   os.path.join(cfg['out_dir'], 'ckpt.pt'))
        log.checkpointed()
    return best_val_loss


def gather_rng(dev, distributed, world):
    """Every process's torch (and CUDA) random state, and the data sampler's, which all processes share."""
    mine = [torch.get_rng_state(), torch.cuda.get_rng_state(dev.device) if dev.type == 'cuda' else None]
    every = [mine]
    if distributed:
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
    return {'world': world, 'torch': [r[0] for r in every],
            'cuda': [r[1] for r in every] if dev.type == 'cuda' else None, 'data': None}


def resume_state(ckpt, raw_model, optimizers, scaler, data_rng, cfg, dev, rank, world):
    """Optimizer state, loss scale and random streams from the checkpoint; returns (iteration, best val loss,
    run id), of a new run where there is no checkpoint."""
    if ckpt is None:
        return 0, math.inf, uuid.uuid4().hex[:12]
    if not isinstance(ckpt['optimizer'], list) or len(ckpt['optimizer']) != len(optimizers):
        raise UserError(f"the checkpoint holds another optimizer state than --optimizer={cfg['optimizer']} "
                        f"needs: resume with the optimizer it was trained with")
    try:
        for opt, saved in zip(optimizers, ckpt['optimizer']):
            checkpoint.load_optimizer_state(raw_model, opt, saved, cfg['fsdp'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"the checkpoint's optimizer state does not fit this model ({str(e)[:100]})") from None
    if scaler.is_enabled() and ckpt.get('scaler'):   # fp16: the loss scale it had learnt
        scaler.load_state_dict(ckpt['scaler'])
    rng = ckpt['rng']
    data_rng.bit_generator.state = rng['data']
    if rng['world'] == world and rank < len(rng['torch']):   # exact resume: each process's own stream
        torch.set_rng_state(rng['torch'][rank])
        if rng['cuda'] is not None and dev.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'][rank], device=dev.device)
    else:
        torch.manual_seed(cfg['seed'] + rank + ckpt['iter_num'])
    return ckpt['iter_num'], ckpt['best_val_loss'], ckpt['run_id']


def finish_processes(raw_model, fsdp, dev, master):
    """Check that every process ends with the same router biases (and under DDP the same weights: FSDP's
    are shards of one copy), then wait for every process and tear the process group down."""
    tensors = [t for k, t in raw_model.state_dict().items() if not fsdp or k.endswith('expert_bias')]
    fp = torch.stack([t.detach().double().sum() for t in tensors]).to(dev.device)
    lo, hi = fp.clone(), fp.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if master:
        same = bool(torch.equal(lo, hi))
        what = 'router biases' if fsdp else 'weights and router biases'
        print(f"{'fsdp' if fsdp else 'ddp'}: {torch.distributed.get_world_size()} ranks "
              f"{'hold identical' if same else 'DIVERGED in'} {what}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    cli.call_main(main, sys.argv[1:], going_on_without_stdout='training goes on; its records are in log.jsonl')
