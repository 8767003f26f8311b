"""The memory a training step needs, and which settings fit a device: preflight.py asks it before train.py's first
step (it turns activation checkpointing on where a step would not fit without it, and refuses a run that cannot fit
at all, naming settings that would); bench.py's memory row prints it for common GPUs. A step holds:
    state      weights, gradients and AdamW's two moments: 16 bytes per parameter (fp32), divided among the processes
               under FSDP, which also holds two blocks' gathered weights (the one running and the next) and one
               block's unsharded gradient at a time
    saved      what forward leaves for backward, counted, not guessed: one and two blocks at the model's real widths
               run forward on 16 and 32 tokens as the device plan runs them (autocast dtype, key/value heads), and
               saved_tensors_hooks add up what autograd keeps: per block, per token and the head's share, scaled to
               the batch. Checkpointed, a block keeps only its input.
    transient  what backward allocates beside them: about one block's saved tensors again, twice that with
               checkpointing (the block whose forward runs again, and its backward)"""

import functools
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from model import DeepSeekLM, ModelConfig

GiB = 2**30
HEADROOM = 0.9      # of the device's memory a run may plan to use: the rest for the CUDA context and fragmentation
PROBE = (16, 32)    # the sequence lengths the count runs


def per_config(count):
    """count(mconf, *args), remembered for the last few configs (by their fields: a ModelConfig is not hashable)."""
    remembered = functools.lru_cache(maxsize=8)(lambda fields, *args: count(ModelConfig(**dict(fields)), *args))
    return lambda mconf, *args: remembered(tuple(sorted(vars(mconf).items())), *args)


@per_config
def saved_bytes(mconf, low_precision, expand_kv):
    """(per block, the rest: the head and embedding), each (bytes, bytes per token) that autograd keeps for backward.
    They do not depend on block_size: the count's model takes one that holds the probe's sequences."""
    full = dict(vars(mconf), block_size=PROBE[-1], n_layer=1)
    small = dict(full, vocab_size=256)   # the blocks' share, counted without the head of a big vocabulary
    one, two, head = (count_saved(ModelConfig(**c), low_precision, expand_kv)
                      for c in (small, dict(small, n_layer=2), full))
    block = [b - a for a, b in zip(one, two)]
    rest = [h - b for h, b in zip(head, block)]
    # each a line through the counts at T = 16 and 32: (bytes at T = 0, bytes per token)
    return tuple((2 * y[0] - y[1], (y[1] - y[0]) / 16) for y in (block, rest))


@per_config
def param_counts(mconf):
    """(all parameters, one block's), from a model on the meta device: sizes without values."""
    with torch.device('meta'):
        model = DeepSeekLM(mconf)
    return model.num_params(), sum(p.numel() for p in model.blocks[0].parameters())


def count_saved(mconf, low_precision, expand_kv):
    """Bytes of the distinct storages autograd saves for one forward of 1 x T tokens, for each T in PROBE. The model
    runs under FakeTensorMode: its tensors have shapes, dtypes and a device (the CPU, whose SDPA saves what a GPU's
    fused kernels save) but no data, so nothing is computed and the full-size model is counted in a second."""
    out = []
    with FakeTensorMode():
        model = DeepSeekLM(mconf).train()
        for m in model.modules():
            if hasattr(m, 'expand_kv'):
                m.expand_kv = expand_kv
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        for T in PROBE:
            x = torch.randint(mconf.vocab_size, (1, T + 1))
            storages = {}

            def keep(t):
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
                return t
            autocast = torch.autocast('cpu', dtype=torch.bfloat16) if low_precision else nullcontext()
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
                model(x[:, :-1], x[:, 1:])
            out.append(sum(n for ptr, n in storages.items() if ptr not in params))
    return out


def estimate(mconf, batch_size, low_precision, checkpointing, shards=1, expand_kv=False):
    """Bytes of one micro-step of batch_size x block_size tokens: a dict of state, saved, transient, total."""
    n_params, block_params = param_counts(mconf)
    (per_block, per_token_block), (rest, per_token_rest) = saved_bytes(mconf, low_precision, expand_kv)
    tokens = batch_size * mconf.block_size
    one_block = per_block + tokens * per_token_block
    state = 16 * n_params / shards
    if shards > 1:   # gathered: two blocks' weights and one block's gradient in the run's dtype, + fp32 to reduce
        state += block_params * (3 * 2 + 4 if low_precision else 3 * 4)
    head = rest + tokens * per_token_rest
    if checkpointing:   # each block keeps its fp32 input; in backward one block at a time runs again
        saved, transient = mconf.n_layer * tokens * mconf.n_embd * 4 + head, 2 * one_block
    else:
        saved, transient = mconf.n_layer * one_block + head, one_block
    return dict(state=state, saved=saved, transient=transient, total=state + saved + transient)


def largest_batch(mconf, memory, low_precision, checkpointing, shards=1, limit=1024, expand_kv=False):
    """The largest batch_size (per process) whose step fits HEADROOM of memory bytes; 0 if none does."""
    best, b = 0, 1
    while b <= limit and estimate(mconf, b, low_precision, checkpointing, shards, expand_kv)['total'] <= HEADROOM * memory:
        best, b = b, b * 2
    return best


def plan(mconf, batch_size, accum, low_precision, memory, shards, checkpointing, expand_kv=False):
    """(activation checkpointing on?, the estimate, a line that says so). memory: the device plan's bytes;
    low_precision and expand_kv: how it runs the step. checkpointing None = automatic: on only where the step would
    not fit without it. A step that cannot fit is a ValueError naming the settings that would: a smaller batch with
    more accumulation (same tokens per step), checkpointing, sharding over more GPUs."""
    step = lambda b, on: estimate(mconf, b, low_precision, on, shards, expand_kv)
    if memory is None:   # a device that does not say (MPS): no automatic choice, no refusal
        on = bool(checkpointing)
        return on, step(batch_size, on), 'memory: the device does not report its size'
    state = 16 * param_counts(mconf)[0] / shards
    if state > HEADROOM * memory:   # refused before anything is counted: the weights alone do not fit
        raise ValueError(refusal(mconf, batch_size, accum, low_precision, memory, shards, True,
                                 {'total': state}, weights_only=True, expand_kv=expand_kv))
    on = checkpointing if checkpointing is not None else step(batch_size, False)['total'] > HEADROOM * memory
    est = step(batch_size, on)
    if est['total'] > HEADROOM * memory:
        raise ValueError(refusal(mconf, batch_size, accum, low_precision, memory, shards, on, est,
                                 expand_kv=expand_kv))
    why = ' (on: the step would not fit without it)' if on and checkpointing is None else ''
    line = (f"memory: a step needs about {size(est['total'])} of the device's {size(memory)} (weights, gradients, "
            f"AdamW {size(est['state'])}; saved for backward {size(est['saved'])}; temporaries {size(est['transient'])}); "
            f"activation checkpointing {'on' if on else 'off'}{why}")
    return on, est, line


def size(n):
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def refusal(mconf, batch_size, accum, low_precision, memory, shards, on, est, weights_only=False, expand_kv=False):
    fixes = []
    b = 0 if weights_only else largest_batch(mconf, memory, low_precision, True, shards, batch_size, expand_kv)
    if b and b < batch_size:
        extra = '' if on else ' --activation_checkpointing=true'
        fixes.append(f"--batch_size={b} --gradient_accumulation_steps={accum * batch_size // b}{extra} (the same "
                     f"tokens per step{'' if batch_size % b == 0 else ', about'})")
    elif b == batch_size and not on:
        fixes.append("--activation_checkpointing=true")
    for n in (2, 4, 8):   # sharded: the weights' state alone must fit first (cheap to tell), then a step
        if n > shards and est['total'] * shards / n <= HEADROOM * memory and (
                weights_only or largest_batch(mconf, memory, low_precision, True, n, 1, expand_kv) >= 1):
            fixes.append(f"--fsdp=true under torchrun over {n} GPUs")
            break
    fix = '; or '.join(fixes) if fixes else "a smaller model (--n_layer, --n_embd, --expert_hidden)"
    what = "the weights, gradients and AdamW state alone need" if weights_only else "a step needs about"
    return f"{what} {size(est['total'])}, more than {HEADROOM:.0%} of the device's {size(memory)}: try {fix}"
