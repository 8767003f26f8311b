"""
Train the DeepSeek-style model. One process, or many with torchrun:

    python train.py config/deepseek_mini.py                   # 2-core CPU, minutes
    python train.py config/deepseek.py                        # one GPU (bf16, torch.compile)
    torchrun --standalone --nproc_per_node=8 train.py config/deepseek.py

Every key below (and every ModelConfig field, under its own name) can be set by a config file
(plain Python) and then by --key=value, as in nanoGPT.
"""

import ctypes
import dataclasses
import gc
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import prepare
from configurator import UserError
from model import DeepSeekLM, ModelConfig, max_violation

# -----------------------------------------------------------------------------
# defaults
out_dir = 'out'
eval_interval = 250
eval_iters = 20            # batches per split per evaluation (the same windows every time)
log_interval = 10
init_from = 'scratch'      # 'scratch' | 'resume' (from out_dir/ckpt.pt)
seed = 1337
# data (prepare.py reads these too)
dataset = 'shakespeare'
data_dir = ''              # '' = data/<dataset>
tokenizer = 'bpe'
batch_size = 8             # per process, per micro-step
gradient_accumulation_steps = 1
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 3e-4
max_iters = 10000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 200
lr_decay_iters = 0         # 0 = max_iters
min_lr = 3e-5
# system
device = 'auto'            # 'auto' = cuda > mps > cpu
dtype = 'auto'             # 'auto' = bfloat16 on CUDA if supported (else float16), float32 elsewhere
compile = None             # None = on for CUDA only; True/False
# -----------------------------------------------------------------------------
TRAIN_KEYS = {k: v for k, v in globals().items() if not k.startswith('_') and (v is None or isinstance(v, (int, float, str, bool)))}
MODEL_KEYS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
DEFAULTS = {**MODEL_KEYS, **TRAIN_KEYS}
CKPT_FORMAT = 'deepseek-nano/1'

# peak dense bf16 tensor FLOP/s by GPU name, for MFU
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'H800': 989e12, 'GH200': 989e12, 'B200': 2250e12, 'A100': 312e12,
              'A800': 312e12, 'A6000': 155e12, 'L40S': 362e12, 'L40': 181e12, 'L4': 121e12, 'A10': 125e12,
              '4090': 165e12, '3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def gpu_peak_flops(device_type):
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def pick_device(device, dtype):
    """(device, torch dtype) for the device/dtype keys: 'auto' is cuda > mps > cpu, and bf16 autocast on
    CUDA (fp16 on GPUs without bf16), fp32 elsewhere. Shared with sample.py."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device={device} but CUDA is not available: use --device=cpu")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device.startswith('cuda') else 'float32'
    return device, getattr(torch, dtype)


def keep_freed_memory():
    """On Linux/glibc, keep freed memory in the process instead of handing it back to the OS. glibc maps
    every block over 32 MB (the logits, their gradient) fresh and unmaps it on free, so each CPU step
    page-faults through them again: about a fifth of a mini step. A no-op elsewhere."""
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: serve blocks under 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap top untrimmed
    except (OSError, AttributeError):   # musl and other libcs: nothing to tune
        pass


def get_lr(it, cfg):
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])


def get_batch(path, dtype, batch_size, block_size, rng, device):
    """Random windows of block_size+1 tokens. The memmap is opened per batch so memory never grows."""
    data = np.memmap(path, dtype=dtype, mode='r')
    ix = rng.integers(0, len(data) - block_size - 1, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def save_checkpoint(obj, path):
    """torch.save to a temporary name, then rename: a crash mid-write leaves the previous file intact."""
    tmp = path + '.tmp'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """The checkpoint dict and its ModelConfig, or a one-line UserError for a file that is not one of ours."""
    try:
        # mmap: tensors are read on demand, so the optimizer state (2x the model) never fills memory
        ck = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is truncated, corrupted "
                        f"or not a PyTorch file") from None
    if not isinstance(ck, dict) or ck.get('format') != CKPT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this repo (format {CKPT_FORMAT})")
    missing = [k for k in ('model', 'model_args', 'tokenizer') if k not in ck]
    if missing:
        raise UserError(f"{path} is incomplete: no {', '.join(missing)}")
    try:
        mconf = ModelConfig(**ck['model_args'])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has model_args that model.py does not accept ({e})") from None
    return ck, mconf


def token_byte_lengths(enc, n):
    """UTF-8 bytes of each token id (0 for special tokens), for bits per byte."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    return torch.tensor([0 if i in special or i >= enc.n_vocab else len(enc.decode_single_token_bytes(i))
                         for i in range(n)], dtype=torch.float32)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv):
    keep_freed_memory()
    cfg = configurator.parse_config(argv, DEFAULTS, ignore_unknown_file_keys=set(prepare.DEFAULTS))
    for key in ('batch_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval', 'eval_iters',
                'log_interval'):
        if cfg[key] <= 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg['init_from'] not in ('scratch', 'resume'):
        raise UserError(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")

    # --- processes and devices -------------------------------------------------------------------
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev, ptdtype = pick_device(cfg['device'], cfg['dtype'])
    if ddp:
        rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        torch.distributed.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
    else:
        rank, world = 0, 1
    master = rank == 0
    device_type = 'cuda' if dev.startswith('cuda') else dev
    dt = str(ptdtype).removeprefix('torch.')
    autocast = nullcontext() if dt == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
    use_compile = device_type == 'cuda' if cfg['compile'] is None else bool(cfg['compile'])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # --- data ------------------------------------------------------------------------------------
    ddir = prepare.resolve_data_dir(cfg)
    meta = prepare.read_meta(ddir)
    if cfg['vocab_size'] < meta['n_vocab']:
        raise UserError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {meta['n_vocab']} tokens "
                        f"in {ddir}: set --vocab_size={meta['n_vocab']} or more")
    tok_spec = prepare.tokenizer_spec(ddir)
    block_size = cfg['block_size']
    for split in ('train', 'val'):
        if meta[f'{split}_tokens'] <= block_size + 1:
            raise UserError(f"{ddir}/{split}.bin has {meta[f'{split}_tokens']} tokens, fewer than block_size "
                            f"{block_size} + 1: lower --block_size")
    bin_path = {s: os.path.join(ddir, f'{s}.bin') for s in ('train', 'val')}
    data_rng = np.random.default_rng(cfg['seed'] + rank)   # each rank its own stream of windows
    torch.manual_seed(cfg['seed'] + rank)
    random.seed(cfg['seed'] + rank)

    # --- model, optimizer, resume ----------------------------------------------------------------
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    iter_num, best_val = 0, float('inf')
    ckpt = None
    if cfg['init_from'] == 'resume':
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint at {ckpt_path} to resume: train first without --init_from=resume")
        ckpt, _ = load_checkpoint(ckpt_path)
        model_args = ckpt['model_args']   # the architecture comes from the checkpoint
        iter_num, best_val = ckpt['iter_num'], ckpt['best_val_loss']
    else:
        model_args = {k: cfg[k] for k in MODEL_KEYS}
    try:
        mconf = ModelConfig(**model_args)
    except ValueError as e:
        raise UserError(f"bad model config: {e}")
    model = DeepSeekLM(mconf)
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
    model.to(dev)
    raw_model = model

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and 'latent' not in n]  # matmul weights
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or 'latent' in n]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg['weight_decay']},
                                   {'params': no_decay, 'weight_decay': 0.0}],
                                  lr=cfg['learning_rate'], betas=(cfg['beta1'], cfg['beta2']),
                                  fused=device_type in ('cuda', 'cpu'))   # one kernel for all parameters
    scaler = torch.amp.GradScaler(device_type, enabled=dt == 'float16')
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['rng'].get('rank') == rank:   # exact resume (single process, or this rank's own state)
            torch.set_rng_state(ckpt['rng']['torch'])
            if ckpt['rng'].get('cuda') is not None and device_type == 'cuda':
                torch.cuda.set_rng_state(ckpt['rng']['cuda'], device=dev)
            name, keys, *rest = ckpt['rng']['numpy']
            np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
            random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in ckpt['rng']['python']))
            data_rng.bit_generator.state = ckpt['rng']['data']
        else:
            data_rng = np.random.default_rng([cfg['seed'], rank, iter_num])
        ckpt = None  # free memory

    if use_compile:
        model = torch.compile(model)
    if ddp:
        # the MoE's token counters are buffers: DDP must not overwrite them with rank 0's (counts are all-reduced
        # in update_router_bias, which keeps every rank's expert_bias identical). Newer torch deprecates the
        # flag, but its own warning says to keep it for rank-local buffers until a replacement lands.
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == 'cuda' else None,
                                                          broadcast_buffers=False)

    enc = prepare.load_tokenizer(tok_spec)
    token_bytes = token_byte_lengths(enc, mconf.vocab_size).to(dev)
    n_params, n_active = raw_model.num_params(), raw_model.num_params(active=True)
    tokens_per_iter = cfg['batch_size'] * block_size * cfg['gradient_accumulation_steps'] * world
    flops_per_iter = raw_model.flops_per_token(block_size) * tokens_per_iter / world   # per process
    peak = gpu_peak_flops(device_type)

    os.makedirs(cfg['out_dir'], exist_ok=True)
    log_path = os.path.join(cfg['out_dir'], 'log.jsonl')

    def log(record, line):
        if master:
            print(line, flush=True)
            with open(log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')

    if master:
        if cfg['init_from'] == 'scratch' and os.path.exists(log_path):
            os.remove(log_path)   # a new run starts a new log
        print(f"model: {n_params:,} parameters, {n_active:,} active per token | {mconf.attention} attention, "
              f"{mconf.n_layer} layers, {mconf.n_expert} experts top-{mconf.n_expert_active}")
        print(f"data: {ddir} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, vocab {meta['n_vocab']})")
        print(f"run: {dev}, {dt}, compile={use_compile}, {world} process(es), {tokens_per_iter:,} tokens/iter, "
              f"{raw_model.flops_per_token(block_size) / 1e9:.3f} GFLOP/token, "
              f"{'resuming at iter ' + str(iter_num) if iter_num else 'from scratch'}")

    @torch.no_grad()
    def evaluate():
        """Mean loss on fixed windows of each split, val bits per byte, val expert load (MaxVio)."""
        model.eval()
        out = {}
        for split in ('train', 'val'):
            rng = np.random.default_rng(cfg['seed'] + 10_000)   # the same windows at every evaluation
            raw_model.reset_expert_counts()
            nats = nbytes = ntok = 0.0
            for _ in range(cfg['eval_iters']):
                X, Y = get_batch(bin_path[split], meta['dtype'], cfg['batch_size'], block_size, rng, dev)
                with autocast:
                    logits, _ = model(X)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), Y.view(-1), reduction='none')
                nb = token_bytes[Y.view(-1)]
                ntok += loss.numel()
                out[f'{split}_loss'] = out.get(f'{split}_loss', 0.0) + loss.sum().item()
                nats += (loss * (nb > 0)).sum().item()
                nbytes += nb.sum().item()
            out[f'{split}_loss'] /= ntok
            if split == 'val':
                out['val_bpb'] = nats / math.log(2) / max(nbytes, 1.0)
                mv = max_violation(raw_model.expert_counts())
                out['val_max_vio'], out['val_max_vio_mean'] = mv.max().item(), mv.mean().item()
                out['val_max_vio_layers'] = [round(v, 4) for v in mv.tolist()]
        raw_model.reset_expert_counts()
        model.train()
        return out

    def checkpoint(path):
        save_checkpoint({
            'format': CKPT_FORMAT, 'model': raw_model.state_dict(), 'model_args': dataclasses.asdict(mconf),
            'optimizer': optimizer.state_dict(), 'iter_num': iter_num, 'best_val_loss': best_val,
            'config': cfg, 'tokenizer': tok_spec,
            'rng': {'rank': rank, 'torch': torch.get_rng_state(),
                    'cuda': torch.cuda.get_rng_state(dev) if device_type == 'cuda' else None,
                    'numpy': [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
                    'python': list(random.getstate()),
                    'data': data_rng.bit_generator.state},
        }, path)

    def diverged(what):
        kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
        return UserError(f"{what}: training diverged; lower --learning_rate ({kept})")

    # --- the loop --------------------------------------------------------------------------------
    model.train()
    start_iter, t_start = iter_num, time.time()
    t0, t0_iter, recent = time.time(), iter_num, []   # recent: seconds per step of the last few log intervals
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr

        last = iter_num == cfg['max_iters']
        if (iter_num % cfg['eval_interval'] == 0 or last) and not (iter_num == start_iter and start_iter > 0):
            ev = evaluate()
            if not math.isfinite(ev['val_loss']):
                raise diverged(f"val loss is {ev['val_loss']} at iter {iter_num}")
            log({'kind': 'eval', 'iter': iter_num, **ev},
                f"eval {iter_num}: train loss {ev['train_loss']:.4f} | val loss {ev['val_loss']:.4f} | "
                f"val bpb {ev['val_bpb']:.4f} | val MaxVio max {ev['val_max_vio']:.3f} mean {ev['val_max_vio_mean']:.3f}")
            if master and iter_num > start_iter:
                if ev['val_loss'] < best_val:
                    best_val = ev['val_loss']
                    checkpoint(os.path.join(cfg['out_dir'], 'ckpt_best.pt'))
                checkpoint(ckpt_path)
            t0, t0_iter = time.time(), iter_num   # keep evaluation out of the step timing
        if last:
            break

        # one optimizer step over gradient_accumulation_steps micro-batches
        for micro in range(cfg['gradient_accumulation_steps']):
            if ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == cfg['gradient_accumulation_steps'] - 1
            # drawn here, not prefetched, so a checkpoint's data-sampler state is exactly the next batch's
            X, Y = get_batch(bin_path['train'], meta['dtype'], cfg['batch_size'], block_size, data_rng, dev)
            with autocast:
                _, loss = model(X, Y)
                loss = loss / cfg['gradient_accumulation_steps']
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        balance = raw_model.update_router_bias()   # once per optimizer step, counts of all micro-steps and ranks
        iter_num += 1

        if iter_num % cfg['log_interval'] == 0:
            lossf = loss.item() * cfg['gradient_accumulation_steps']
            if not math.isfinite(lossf):
                raise diverged(f"loss is {lossf} at iter {iter_num}")
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
               'tokens_seen': (iter_num - start_iter) * tokens_per_iter, 'params': n_params, 'active_params': n_active}
    if torch.cuda.is_available() and device_type == 'cuda':
        summary['peak_gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 1e9
    log(summary, f"done: {iter_num - start_iter} iters in {fmt_time(elapsed)}, {summary['tokens_seen']:,} tokens, "
                 f"best val loss {best_val:.4f}; checkpoints in {cfg['out_dir']}/")
    if ddp:
        # every rank must end with the same weights and router biases: compare per-tensor sums across ranks
        fp = torch.stack([t.detach().double().sum() for t in raw_model.state_dict().values()])
        lo, hi = fp.clone(), fp.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        if master:
            same = bool(torch.equal(lo, hi))
            print(f"ddp: {world} ranks {'hold identical' if same else 'DIVERGED in'} weights and router biases")
        # Tear down in order: wait for every rank, then free the DDP wrapper (it owns the process group's
        # worker threads) while Python is still alive. Left to interpreter exit, gloo sometimes aborts with
        # "terminate called without an active exception" (2 of 110 torchrun runs on a loaded 2-core CPU).
        torch.distributed.barrier()
        del model
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    configurator.main_guard(main, sys.argv[1:])
