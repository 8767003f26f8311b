"""The model's machinery, beside it as DeepSeek-V3's kernel.py is: the experts' grouped matmul (with a plain
per-expert fallback), the LM head and its loss in chunks of rows, the MoE's dispatch and combine, the dtype
matmuls run in under autocast, activation checkpointing, and the KV cache that generation keeps. model.py says
what is computed; this file, how."""

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def grouped_mm(a, b, offs):
    """(N, K) @ (G, K, M) -> (N, M) with rows split into G groups at offs (offs[g] = end of group g);
    or (K, N) @ (N, M) -> (G, K, M), the weight gradient. F.grouped_mm wherever it takes the dtype, else one
    matmul per group (float64; MPS). Eager calls on real tensors take the kernel and its autograd directly;
    torch.compile and the memory plan's fake tensors get it wrapped in an opaque op (below), since torch's
    own shape function for F.grouped_mm accepts only bf16."""
    if has_grouped_mm_kernel(a) and type(a) is Tensor and not torch.compiler.is_compiling():
        return F.grouped_mm(a, b, offs=offs)
    return grouped_mm_op(a, b, offs)


@torch.library.custom_op("deepseek_nano::grouped_mm", mutates_args=())
def grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if has_grouped_mm_kernel(a):
        return F.grouped_mm(a, b, offs=offs)
    return grouped_mm_loop(a, b, offs)


def has_grouped_mm_kernel(a):
    """F.grouped_mm takes fp32, bf16 and fp16 on the CPU and on CUDA. On CUDA its one grouped kernel needs
    bf16 on compute capability 9.x or 10.x; elsewhere torch runs its own loop, the same as grouped_mm_loop
    (the group sizes copied to the host, then one matmul per group), writing into one output."""
    return a.device.type in ('cpu', 'cuda') and a.dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_loop(a, b, offs):
    """grouped_mm by plain matmuls, one per group: the fallback, and a reference for the kernel."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = a.new_zeros(a.size(0), b.size(2))
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = a[s:e] @ b[g]
        return out
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)])


@grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.size(0), b.size(2))
    return a.new_empty(offs.size(0), a.size(0), b.size(1))


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # the kernel rejects stride-0 gradients (e.g. from y.sum())
    return grouped_mm(grad, b.transpose(1, 2), offs), grouped_mm(a.t(), grad, offs), None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def matmul_dtype(t):
    """The dtype matmuls on t run in: autocast's where it is on, else t's own. For the code that calls
    custom ops or torch.autograd.Functions, which autocast does not see."""
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def chunk_rows(h, w):
    """Rows of the head's output per chunk: on a CPU few enough that a chunk's logits stay in cache; on a
    GPU many, since big matmuls run best there and chunking only bounds memory."""
    return max(1, (2**21 if h.device.type == 'cpu' else 2**26) // w.size(0))


def linear_cross_entropy(h, w, targets, dtype, reduction='mean'):
    """cross_entropy(h @ w.T, targets) over targets != -1, in chunks of rows, never holding the (N, vocab)
    logits: the mean (differentiable), or with reduction='none' each row's loss, 0 where targets == -1
    (no gradient). The matmuls run in dtype (autocast's, see matmul_dtype); logits and softmax in fp32."""
    need_grad = reduction == 'mean' and torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    return LinearCrossEntropy.apply(h, w, targets, dtype, reduction, need_grad)


class LinearCrossEntropy(torch.autograd.Function):
    """The loss of linear_cross_entropy. Rows go through in chunks; when gradients are wanted, each
    chunk's gradients (softmax - one-hot, times w and times h) are computed right away, in the forward
    pass, while its logits are at hand, and backward only scales them. The weight's gradient is summed
    in fp32 and divided by the count before it takes the weight's dtype: in fp16 one chunk's sum would
    overflow, whatever the loss scale."""

    @staticmethod
    def forward(ctx, h, w, targets, dtype, reduction, need_grad):
        valid = targets != -1
        n = valid.sum().clamp(min=1)
        hd, wd = h.to(dtype), w.to(dtype)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        per_row = torch.empty(h.size(0), dtype=torch.float32, device=h.device) if reduction == 'none' else None
        rows = chunk_rows(h, w)
        for start in range(0, h.size(0), rows):
            hc, tc, vc = hd[start:start + rows], targets[start:start + rows], valid[start:start + rows]
            logits = (hc @ wd.t()).float()
            lse = logits.logsumexp(-1)
            tc = tc.clamp(min=0)
            nll = (lse - logits.gather(1, tc[:, None]).squeeze(1)) * vc
            if per_row is not None:
                per_row[start:start + rows] = nll
            loss += nll.sum()
            if need_grad:
                p = logits.sub_(lse[:, None]).exp_()                  # softmax, in place of the logits
                p[torch.arange(len(tc), device=p.device), tc] -= 1   # minus the one-hot target
                p *= vc[:, None]
                p = p.to(dtype)
                grad_h[start:start + rows] = p @ wd
                grad_w += mm_fp32(p.t(), hc)   # a frequent target sums over a whole chunk: too much for fp16
        if need_grad:
            ctx.save_for_backward(grad_h / n, (grad_w / n).to(w.dtype))
        return per_row if per_row is not None else loss / n

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad, None, None, None, None


def mm_fp32(a, b):
    """a @ b with an fp32 result. On CUDA a low-precision matmul keeps its fp32 accumulator (mm's out_dtype,
    CUDA only); elsewhere the operands go to fp32."""
    if a.device.type == 'cuda' and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class GatherRows(torch.autograd.Function):
    """The MoE's dispatch: rows[s] = x[order[s] // k], where slot s holds the (token, choice) pair order[s]
    (pair t*k + j is token t's j-th choice; slots sorted by expert) and inv, the inverse permutation, maps a
    pair to its slot. Autograd's own backward for an index scatter-adds (nondeterministic on CUDA);
    knowing the permutation, the backward is a gather instead: grad_x[t] = sum_j grad[inv[t*k + j]]."""

    @staticmethod
    def forward(ctx, x, order, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        inv, = ctx.saved_tensors
        return pair_sum(grad.index_select(0, inv).unflatten(0, (-1, ctx.k))), None, None, None


class Combine(torch.autograd.Function):
    """The MoE's combine: y[t] = sum_j gate[t, j] * rows[inv[t*k + j]], each token's k expert outputs read
    from their slots and weighted by its gates (k = gate.size(1)). Its backward gathers too, no scatter:
    grad_rows[s] = gate of pair order[s] * grad_y[order[s] // k], grad_gate[t, j] = grad_y[t] . its row."""

    @staticmethod
    def forward(ctx, rows, gate, order, inv):
        pairs = rows.index_select(0, inv).unflatten(0, (-1, gate.size(1)))   # (N, k, D), token order
        ctx.save_for_backward(pairs, gate, order)
        return pair_sum(pairs, gate)

    @staticmethod
    def backward(ctx, grad):
        pairs, gate, order = ctx.saved_tensors
        grad_gate = torch.linalg.vecdot(pairs.to(grad.dtype), grad.unsqueeze(1))
        grad_rows = grad.index_select(0, order // gate.size(1)) * gate.flatten()[order, None]
        return grad_rows.to(pairs.dtype), grad_gate, None, None


def pair_sum(pairs, gate=None):
    """(N, k, D) -> (N, D): the sum over k, each term weighted by gate (N, k) if given, as a running sum
    of the k slices (on a CPU, faster than a reduction over the middle axis). Out of place: torch.compile in
    torch 2.11 drops the gradients of an autograd Function whose output was written in place."""
    y = pairs[:, 0] if gate is None else pairs[:, 0] * gate[:, :1]
    for j in range(1, pairs.size(1)):
        y = y + pairs[:, j] if gate is None else torch.addcmul(y, pairs[:, j], gate[:, j:j + 1])
    return y


# --- Activation checkpointing: a block keeps only its input for backward, and runs its forward again there ---

RECOMPUTING = [False]   # True while a block's forward runs again for its backward


def checkpointed(block, *args):
    """block(*args), saving only the inputs for backward (torch.utils.checkpoint, non-reentrant). The
    random numbers (router jitter, expert dropout) repeat in the second forward, since checkpoint restores
    the RNG state; RECOMPUTING tells the routers not to count their picks twice."""
    return checkpoint(block, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recomputing()))


@contextmanager
def recomputing():
    RECOMPUTING[0] = True
    try:
        yield
    finally:
        RECOMPUTING[0] = False


# --- The KV cache that generation threads through the blocks, and how new tokens attend to its slots ---

class KVCache:
    """Keys and values of every layer for generation, laid out (B, slot, ...): the n_latent latent slots,
    then the tokens in order; which slots are padding (left-padded prompts); each row's count of real
    tokens (the next RoPE position); and per layer the running sums of the routers' inputs."""

    def __init__(self, batch_size, n_latent, max_tokens, n_layer, device):
        self.n_latent, self.max_slots = n_latent, n_latent + max_tokens
        self.buffers = [None] * n_layer
        self.router_sums = [None] * n_layer   # (sum, count) of each row's router inputs so far
        self.start = self.len = 0      # this forward's new slots are [start, len)
        self.padded = False
        self.key_valid = torch.ones(batch_size, self.max_slots, dtype=torch.bool, device=device)
        self.n_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def first(self):   # the forward that fills an empty cache: its latent slots come first
        return self.start == 0

    @property
    def tokens(self):
        return max(self.len - self.n_latent, 0)

    def advance(self, is_token, padded):
        """Reserve the slots of a forward over is_token (B, T) (False = padding): the latents first if the cache
        is empty, then T token slots. Returns the tokens' RoPE positions (B, T)."""
        T = is_token.size(1)
        first_token = self.len + (self.n_latent if self.len == 0 else 0)
        if first_token + T > self.max_slots:
            raise ValueError(f"{T} more tokens overflow the cache ({self.tokens} of {self.max_slots - self.n_latent} used)")
        pos = self.n_tokens[:, None] + is_token.long().cumsum(1) - 1
        self.n_tokens += is_token.sum(1)
        self.key_valid[:, first_token:first_token + T] = is_token
        self.padded = self.padded or padded
        self.start, self.len = self.len, first_token + T
        return pos

    def update(self, layer, *new):
        """Write a layer's new entries (B, len - start, ...) into their slots; return all filled slots."""
        if self.buffers[layer] is None:
            self.buffers[layer] = [t.new_empty(t.size(0), self.max_slots, *t.shape[2:]) for t in new]
        for buf, x in zip(self.buffers[layer], new):
            buf[:, self.start:self.len] = x
        return [buf[:, :self.len] for buf in self.buffers[layer]]

    def mark(self):
        """The point to rewind to: decode several continuations of one prefilled prompt."""
        return self.len, self.padded, self.n_tokens.clone(), list(self.router_sums)

    def rewind(self, mark):
        """Forget every token added since mark(); their slots are overwritten by the next ones."""
        self.len, self.padded, n_tokens, sums = mark
        self.start, self.n_tokens, self.router_sums = self.len, n_tokens.clone(), list(sums)


def attention_layout(key_valid, T, padded, first):
    """How T new tokens attend to S = key_valid.size(1) key slots (latents, earlier tokens, themselves):
    the is_causal fast path when nothing is padded and nothing was cached before; no mask for a single
    decoded token; otherwise an explicit (B, 1, T, S) mask: every valid earlier slot and itself."""
    if not padded and (first or T == 1):
        return None, first
    S = key_valid.size(1)
    q_slot = S - T + torch.arange(T, device=key_valid.device)
    k_slot = torch.arange(S, device=key_valid.device)
    allowed = (k_slot[None, :] <= q_slot[:, None]) & key_valid[:, None, :]   # (B, T, S)
    allowed |= k_slot[None, :] == q_slot[:, None]   # a padding query sees itself: no all-masked rows
    return allowed.unsqueeze(1), False
