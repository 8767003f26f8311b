"""
The memory a training step needs, and which settings fit a device: train.py asks it before the first
step (it turns activation checkpointing on where a step would not fit without it, and refuses a run that
cannot fit at all, naming settings that would); bench.py's memory row prints it for common GPUs.

A step holds:
    state        weights, gradients and AdamW's two moments: 16 bytes per parameter (fp32), divided
                 among the processes under FSDP, which also gathers one block's full weights at a time
    saved        the tensors autograd keeps for backward. They are counted, not guessed: one and two
                 blocks at the model's real widths run forward on a few tokens on the CPU under the
                 run's autocast dtype, with saved_tensors_hooks adding up what autograd keeps; that
                 gives bytes per block and per token (and the head's share), scaled to the batch.
                 With activation checkpointing a block keeps only its input, and one block at a
                 time is run again in backward.
    transient    what backward allocates beside them: about one block's saved tensors again
"""

import functools
from contextlib import nullcontext

import torch

from model import DeepSeekLM, ModelConfig

GiB = 2**30
HEADROOM = 0.9      # of the device's memory a run may plan to use: the rest for the CUDA context and fragmentation


def saved_bytes(mconf, low_precision):
    """(per block: (bytes, bytes per token), the rest: (bytes, bytes per token)) that autograd keeps for
    backward, counted on the CPU at this model's widths (once per process)."""
    return _saved_bytes(tuple(sorted(vars(mconf).items())), low_precision)


@functools.lru_cache(maxsize=8)
def _saved_bytes(fields, low_precision):
    mconf = dict(fields)
    small = dict(mconf, vocab_size=256)   # the blocks' share, counted without the cost of a big embedding
    one, two, head = (count_saved(ModelConfig(**c), low_precision)
                      for c in (dict(small, n_layer=1), dict(small, n_layer=2), dict(mconf, n_layer=1)))
    block = [b - a for a, b in zip(one, two)]                     # at T = 16 and 32
    rest = [h - b for h, b in zip(head, block)]
    per_token_block, per_token_rest = (block[1] - block[0]) / 16, (rest[1] - rest[0]) / 16
    return (block[0] - 16 * per_token_block, per_token_block), (rest[0] - 16 * per_token_rest, per_token_rest)


def param_counts(mconf):
    """(all parameters, one block's), from a model on the meta device: sizes without values."""
    return _param_counts(tuple(sorted(vars(mconf).items())))


@functools.lru_cache(maxsize=8)
def _param_counts(fields):
    with torch.device('meta'):
        model = DeepSeekLM(ModelConfig(**dict(fields)))
    return model.num_params(), sum(p.numel() for p in model.blocks[0].parameters())


def count_saved(mconf, low_precision, lengths=(16, 32)):
    """Bytes of the distinct storages autograd saves for one forward of 1 x T tokens, for each T in lengths."""
    torch.manual_seed(0)
    model = DeepSeekLM(mconf).train()
    out = []
    for T in lengths:
        x = torch.randint(mconf.vocab_size, (1, T + 1))
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        autocast = torch.autocast('cpu', dtype=torch.bfloat16) if low_precision else nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
            model(x[:, :-1], x[:, 1:])
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        out.append(sum(n for ptr, n in storages.items() if ptr not in params))
    return out


def estimate(mconf, batch_size, low_precision, checkpointing, shards=1):
    """Bytes of one micro-step of batch_size x block_size tokens: a dict of state, saved, transient, total."""
    n_params, block_params = param_counts(mconf)
    (per_block, per_token_block), (rest, per_token_rest) = saved_bytes(mconf, low_precision)
    tokens = batch_size * mconf.block_size
    one_block = per_block + tokens * per_token_block
    state = 16 * n_params / shards + (4 * block_params if shards > 1 else 0)
    head = rest + tokens * per_token_rest
    if checkpointing:   # each block keeps its fp32 input; one block at a time runs again in backward
        saved = mconf.n_layer * tokens * mconf.n_embd * 4 + one_block + head
    else:
        saved = mconf.n_layer * one_block + head
    transient = one_block
    return dict(state=state, saved=saved, transient=transient, total=state + saved + transient)


def device_memory(device):
    """Bytes of memory of a torch device: the GPU's, or the machine's RAM for the CPU (None if unknown)."""
    if device.startswith('cuda'):
        return torch.cuda.get_device_properties(device).total_memory
    if device.startswith('cpu') and hasattr(__import__('os'), 'sysconf'):
        import os
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return None


def largest_batch(mconf, memory, low_precision, checkpointing, shards=1, limit=1024):
    """The largest batch_size (per process) whose step fits HEADROOM of memory bytes; 0 if none does."""
    best, b = 0, 1
    while b <= limit and estimate(mconf, b, low_precision, checkpointing, shards)['total'] <= HEADROOM * memory:
        best, b = b, b * 2
    return best


def plan(mconf, batch_size, accum, low_precision, memory, shards, checkpointing):
    """(activation checkpointing on?, the estimate, a line that says so). checkpointing None = automatic:
    on only where the step would not fit without it. A step that cannot fit is a ValueError naming the
    settings that would: a smaller batch with more accumulation (same tokens per step), checkpointing,
    sharding over more GPUs."""
    if memory is None:   # a device that does not say (MPS): no automatic choice, no refusal
        on = bool(checkpointing)
        return on, estimate(mconf, batch_size, low_precision, on, shards), 'memory: the device does not report its size'
    state = 16 * param_counts(mconf)[0] / shards
    if state > HEADROOM * memory:   # refused before anything is counted: the weights alone do not fit
        raise ValueError(refusal(mconf, batch_size, accum, low_precision, memory, shards, True,
                                 {'total': state}, weights_only=True))
    fits = lambda on: estimate(mconf, batch_size, low_precision, on, shards)['total'] <= HEADROOM * memory
    on = checkpointing if checkpointing is not None else not fits(False)
    est = estimate(mconf, batch_size, low_precision, on, shards)
    if est['total'] > HEADROOM * memory:
        raise ValueError(refusal(mconf, batch_size, accum, low_precision, memory, shards, on, est))
    why = (' (on: the step would not fit without it)' if on and checkpointing is None else '')
    line = (f"memory: a step needs about {size(est['total'])} of the device's {size(memory)} (weights, gradients, "
            f"AdamW {size(est['state'])}; saved for backward {size(est['saved'])}; temporaries {size(est['transient'])}); "
            f"activation checkpointing {'on' if on else 'off'}{why}")
    return on, est, line


def size(n):
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def refusal(mconf, batch_size, accum, low_precision, memory, shards, on, est, weights_only=False):
    fixes = []
    b = 0 if weights_only else largest_batch(mconf, memory, low_precision, True, shards, limit=batch_size)
    if b and b < batch_size:
        extra = '' if on else ' --activation_checkpointing=true'
        fixes.append(f"--batch_size={b} --gradient_accumulation_steps={accum * batch_size // b}{extra} (the same "
                     f"tokens per step{'' if batch_size % b == 0 else ', about'})")
    elif b == batch_size and not on:
        fixes.append("--activation_checkpointing=true")
    for n in (2, 4, 8):   # sharded: the weights' state alone must fit first (cheap to tell), then a step
        if n > shards and est['total'] * shards / n <= HEADROOM * memory and (
                weights_only or largest_batch(mconf, memory, low_precision, True, n, limit=1) >= 1):
            fixes.append(f"--fsdp=true under torchrun over {n} GPUs")
            break
    fix = '; or '.join(fixes) if fixes else "a smaller model (--n_layer, --n_embd, --expert_hidden)"
    what = "the weights, gradients and AdamW state alone need" if weights_only else "a step needs about"
    return f"{what} {size(est['total'])}, more than {HEADROOM:.0%} of the device's {size(memory)}: try {fix}"
