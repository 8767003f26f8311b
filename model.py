"""
A DeepSeek-style language model in one file.

    token embedding (tied with the LM head)
    n_layer x Block:
        x = x + Attention(RMSNorm(x))     latent-token GQA (the seed) or Multi-head Latent Attention
        x = x + MoE(RMSNorm(x))           top-k routed experts, auxiliary-loss-free load balancing
    RMSNorm -> LM head

Reading order: ModelConfig, RoPE, the two attention types, the MoE, Block, DeepSeekLM (forward,
balancing, generation with a KV cache). The defaults of ModelConfig are the seed's architecture card.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    n_layer: int = 24
    n_embd: int = 768
    block_size: int = 1024          # longest sequence of tokens (latents not counted)
    norm_eps: float = 1e-5
    # attention
    attention: str = 'latent'       # 'latent': GQA with learnable latent tokens (seed) | 'mla'
    n_head: int = 12
    n_kv_head: int = 4
    head_dim: int = 64
    n_latent: int = 8               # learnable latent key/value tokens per layer
    rope_theta: float = 10000.0
    # Multi-head Latent Attention (attention='mla'); 0 = derived from head_dim in __post_init__
    q_lora_rank: int = 0            # 0 = plain query projection (as DeepSeek-V2-Lite)
    kv_lora_rank: int = 0           # -> 2 * head_dim
    qk_nope_head_dim: int = 0       # -> head_dim
    qk_rope_head_dim: int = 0       # -> head_dim // 2
    v_head_dim: int = 0             # -> head_dim
    # mixture of experts
    n_expert: int = 8
    n_expert_active: int = 2        # top-k
    n_shared_expert: int = 0        # always-on experts (DeepSeek-V3 uses 1)
    expert_hidden: int = 2048
    expert_dropout: float = 0.05
    router_score: str = 'softmax'   # 'softmax' | 'sigmoid' (DeepSeek-V3)
    router_jitter: float = 0.01     # multiplicative noise on the router input, training only
    balance_rate: float = 1e-3      # bias update speed of loss-free balancing

    def __post_init__(self):
        for name in ('vocab_size', 'n_layer', 'n_embd', 'block_size', 'n_head', 'n_kv_head', 'head_dim',
                     'n_expert', 'n_expert_active', 'expert_hidden'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ('n_latent', 'n_shared_expert', 'q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim',
                     'qk_rope_head_dim', 'v_head_dim'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.attention not in ('latent', 'mla'):
            raise ValueError(f"attention must be 'latent' or 'mla', got {self.attention!r}")
        if self.router_score not in ('softmax', 'sigmoid'):
            raise ValueError(f"router_score must be 'softmax' or 'sigmoid', got {self.router_score!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.n_expert_active > self.n_expert:
            raise ValueError(f"n_expert_active ({self.n_expert_active}) must be <= n_expert ({self.n_expert})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        # grouped matmuls need 16-byte aligned rows: 8 elements in bf16
        for name in ('n_embd', 'expert_hidden'):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8 (grouped matmul alignment), got {getattr(self, name)}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        for name in ('router_jitter', 'balance_rate', 'rope_theta', 'norm_eps'):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.attention == 'mla':
            self.kv_lora_rank = self.kv_lora_rank or 2 * self.head_dim
            self.qk_nope_head_dim = self.qk_nope_head_dim or self.head_dim
            self.qk_rope_head_dim = self.qk_rope_head_dim or self.head_dim // 2
            self.v_head_dim = self.v_head_dim or self.head_dim
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")

    @property
    def rope_dim(self):
        return self.qk_rope_head_dim if self.attention == 'mla' else self.head_dim


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half convention: pairs are (i, i + D/2), not interleaved)

def rope_tables(dim, max_pos, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)   # (max_pos, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B or 1, T, 1, D/2). Rotates each (x_i, x_{i+D/2}) pair in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def attend(q, k, v, attn_mask, is_causal, scale=None):
    """Scaled dot-product attention over keys that start with the latent slots.
    q (B, T, H, Dqk), k (B, S, Hkv, Dqk), v (B, S, Hkv, Dv) -> (B, T, H*Dv).

    is_causal: the keys are exactly [S-T latents; the T query tokens]. We prepend S-T zero queries so
    that the square causal mask lets token t see every latent and tokens <= t, then drop their rows:
    SDPA's is_causal kernel skips the masked upper triangle, an explicit mask cannot (1.4x at T=1024).
    Otherwise attn_mask is None (decode: every cached key is visible) or a bool (B, 1, T, S) mask."""
    B, T = q.shape[:2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.size(1) != q.size(1)
    if is_causal:
        n_prefix = k.size(2) - T
        q = F.pad(q, (0, 0, n_prefix, 0))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)[:, :, n_prefix:]
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2).reshape(B, T, -1)


# ----------------------------------------------------------------------------------------------
# Attention type 1 (the seed): grouped-query attention with learnable latent tokens

class LatentTokenAttention(nn.Module):
    """12 query heads share 4 key/value heads. Each layer owns n_latent learnable vectors whose keys and
    values sit ahead of the sequence, unrotated, visible to every query (a learned attention sink)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.latent = nn.Parameter(torch.empty(cfg.n_latent, cfg.n_embd))

    def cache_numel_per_token(self):
        return 2 * self.n_kv_head * self.head_dim

    def forward(self, x, cos, sin, attn_mask, is_causal, cache=None, layer=0):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if cache is None or cache.len == 0:  # latent keys/values lead the sequence (and the cache)
            L = self.latent.size(0)
            k = torch.cat([self.wk(self.latent).view(1, L, self.n_kv_head, self.head_dim).expand(B, -1, -1, -1).to(k.dtype), k], 1)
            v = torch.cat([self.wv(self.latent).view(1, L, self.n_kv_head, self.head_dim).expand(B, -1, -1, -1).to(v.dtype), v], 1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.wo(attend(q, k, v, attn_mask, is_causal))


# ----------------------------------------------------------------------------------------------
# Attention type 2: DeepSeek-V2/V3 Multi-head Latent Attention

class MultiHeadLatentAttention(nn.Module):
    """Keys and values are rebuilt from a small per-token latent c_kv (kv_lora_rank numbers) plus one
    RoPE key shared by all heads; only those are cached. Queries = [q_nope | q_rope] per head.
    Decoding uses the absorbed form: W_UK folds into the query and W_UV into the output, so attention
    runs directly against the cached latents (one shared 'head' of width kv_lora_rank + rope)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.nope, self.rope, self.v_dim, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                       cfg.v_head_dim, cfg.kv_lora_rank)
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_head * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.n_embd, cfg.n_head * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.n_embd, self.rank + self.rope, bias=False)     # x -> [c_kv | k_rope]
        self.kv_norm = nn.RMSNorm(self.rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(self.rank, cfg.n_head * (self.nope + self.v_dim), bias=False)  # c_kv -> [k_nope | v]
        self.wo = nn.Linear(cfg.n_head * self.v_dim, cfg.n_embd, bias=False)
        self.latent = nn.Parameter(torch.empty(cfg.n_latent, cfg.n_embd))
        self.scale = qk_dim ** -0.5

    def cache_numel_per_token(self):
        return self.rank + self.rope

    def compress(self, x):
        """x (..., n_embd) -> normalised c_kv (..., rank), unrotated k_rope (..., rope)."""
        c_kv, k_rope = self.wkv_a(x).split([self.rank, self.rope], dim=-1)
        return self.kv_norm(c_kv.float()).type_as(c_kv), k_rope   # norm in fp32 (its weight's dtype) under autocast

    def forward(self, x, cos, sin, attn_mask, is_causal, cache=None, layer=0):
        B, T, _ = x.shape
        if hasattr(self, 'wq'):
            q = self.wq(x)
        else:
            q_a = self.wq_a(x)
            q = self.wq_b(self.q_norm(q_a.float()).type_as(q_a))
        q_nope, q_rope = q.view(B, T, self.n_head, -1).split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.compress(x)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        decoding = cache is not None and cache.len > 0
        if not decoding:  # latent tokens go through the same compression, never rotated
            L = self.latent.size(0)
            lat_c, lat_r = self.compress(self.latent)
            c_kv = torch.cat([lat_c.expand(B, L, -1).to(c_kv.dtype), c_kv], 1)
            k_rope = torch.cat([lat_r.expand(B, L, -1).to(k_rope.dtype), k_rope], 1)
        if cache is not None:
            c_kv, k_rope = cache.update(layer, c_kv, k_rope)
        attend_fn = self.attend_absorbed if decoding else self.attend_naive
        return self.wo(attend_fn(q_nope, q_rope, c_kv, k_rope, attn_mask, is_causal and not decoding))

    def attend_naive(self, q_nope, q_rope, c_kv, k_rope, attn_mask, is_causal):
        """Expand every cached latent to full per-head keys and values (training and prefill)."""
        B, S, _ = c_kv.shape
        k_nope, v = self.wkv_b(c_kv).view(B, S, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_head, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attend(q, k, v, attn_mask, is_causal, scale=self.scale)

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, attn_mask, is_causal):
        """Same result, attending to the compressed cache: q_nope·W_UK·c_kv and (p·c_kv)·W_UV.
        All heads share the one latent 'head', so they ride along the query axis, (T*H) queries against
        S keys: asking SDPA for GQA instead would copy the cache once per head (4.5x slower per layer at
        1,000 cached tokens on CPU). Decoding never needs is_causal; it becomes an explicit mask here."""
        B, T, H, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope].to(q_nope.dtype), w[:, self.nope:].to(q_nope.dtype)
        q = torch.cat([torch.einsum('bthn,hnr->bthr', q_nope, w_uk), q_rope], dim=-1)  # (B, T, H, rank+rope)
        k = torch.cat([c_kv, k_rope], dim=-1)                                           # (B, S, rank+rope)
        if is_causal:   # keys are [S - T latents; the T query tokens]
            attn_mask = torch.ones(T, k.size(1), dtype=torch.bool, device=k.device).tril(k.size(1) - T)[None, None]
        mask = None if attn_mask is None else attn_mask.repeat_interleave(H, dim=2)    # (B, 1, T*H, S)
        o = F.scaled_dot_product_attention(q.reshape(B, 1, T * H, -1), k.unsqueeze(1), c_kv.unsqueeze(1),
                                           attn_mask=mask, scale=self.scale)            # (B, 1, T*H, rank)
        return torch.einsum('bthr,hvr->bthv', o.view(B, T, H, self.rank), w_uv).reshape(B, T, H * self.v_dim)


# ----------------------------------------------------------------------------------------------
# Mixture of experts

@torch.library.custom_op("deepseek_nano::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """F.grouped_mm as an opaque op: its own compile-time shape function only accepts bf16, ours any dtype.
    (N, K) @ (G, K, M) -> (N, M), rows split into groups at offs; or (K, N) @ (N, M) -> (G, K, M)."""
    return F.grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
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


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class GatherRows(torch.autograd.Function):
    """rows[s] = x[perm[s] // k] for a permutation `perm` of the N*k (token, choice) pairs, inv = its inverse.
    Autograd's own backward for x[idx] scatter-adds (slow on CPU, nondeterministic on CUDA); knowing the
    permutation, the backward is a gather instead: grad_x[t] = sum_j grad[inv[t*k + j]]."""

    @staticmethod
    def forward(ctx, x, perm, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, perm // k)

    @staticmethod
    def backward(ctx, grad):
        inv, = ctx.saved_tensors
        grad = grad.index_select(0, inv)
        return (grad if ctx.k == 1 else grad.unflatten(0, (-1, ctx.k)).sum(1)), None, None, None


def max_violation(counts):
    """MaxVio = (max_i load_i - mean load) / mean load, per row of (..., n_expert) token counts."""
    mean = counts.float().mean(-1)
    return (counts.float().amax(-1) - mean) / mean.clamp(min=1e-9)


class MoE(nn.Module):
    """Dropless top-k MoE. Selection uses scores + expert_bias (loss-free balancing: the bias only picks
    experts, it never weights them); gates are the chosen unbiased scores renormalised to sum 1.
    Token slots are sorted by expert and each expert's contiguous run goes through one grouped matmul."""

    def __init__(self, cfg):
        super().__init__()
        self.k, self.n_expert, self.score, self.jitter = (cfg.n_expert_active, cfg.n_expert,
                                                          cfg.router_score, cfg.router_jitter)
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd, cfg.expert_hidden))  # expert up: x @ w1[e]
        self.w2 = nn.Parameter(torch.empty(cfg.n_expert, cfg.expert_hidden, cfg.n_embd))  # expert down
        self.dropout = nn.Dropout(cfg.expert_dropout)
        self.shared = None
        if cfg.n_shared_expert:
            hidden = cfg.n_shared_expert * cfg.expert_hidden
            self.shared = nn.Sequential(nn.Linear(cfg.n_embd, hidden, bias=False), nn.SiLU(),
                                        nn.Linear(hidden, cfg.n_embd, bias=False), nn.Dropout(cfg.expert_dropout))
        self.register_buffer('expert_bias', torch.zeros(cfg.n_expert))    # balancing bias, never trained by SGD
        self.register_buffer('expert_load', torch.full((cfg.n_expert,), 1.0 / cfg.n_expert))  # EMA load fraction
        self.register_buffer('expert_counts', torch.zeros(cfg.n_expert), persistent=False)   # tokens since update

    def forward(self, x):
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        # router in fp32, with multiplicative jitter on its input while training
        with torch.autocast(x.device.type, enabled=False):
            r_in = x.float()
            if self.training and self.jitter > 0:
                r_in = r_in * torch.empty_like(r_in).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(r_in, self.router.weight.float())
            scores = logits.softmax(-1) if self.score == 'softmax' else logits.sigmoid()
            expert = torch.topk(scores + self.expert_bias, self.k, dim=-1).indices        # (N, k)
            gate = scores.gather(1, expert)
            gate = gate / gate.sum(-1, keepdim=True)
        counts = torch.zeros_like(self.expert_counts).scatter_add_(0, expert.flatten(), torch.ones_like(gate).flatten())
        with torch.no_grad():
            self.expert_counts += counts
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if not self.training and expert.numel() < self.n_expert:
            out = self.decode_experts(x.to(dtype), expert, dtype)
        else:
            # dispatch: slots sorted by expert; offs[e] = end of expert e's run (no host sync anywhere)
            order = expert.flatten().argsort(stable=True)    # slot -> (token, choice) pair
            inv = order.argsort()                             # pair -> slot
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(grouped_mm(GatherRows.apply(x.to(dtype), order, inv, self.k), self.w1.to(dtype), offs))
            out = self.dropout(grouped_mm(h, self.w2.to(dtype), offs))
            out = GatherRows.apply(out, inv, order, 1)        # back to pair order: (N*k, D)
        # combine: each token's k expert outputs weighted by its gates
        y = (out.view(B * T, self.k, D).to(x.dtype) * gate.unsqueeze(-1).to(x.dtype)).sum(1)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, D)

    def decode_experts(self, x, expert, dtype):
        """Inference on fewer (token, choice) pairs than experts, as when decoding one token: run just the
        chosen experts' weights, pair by pair, instead of a grouped matmul over all of them."""
        rows = [F.silu(x[p // self.k, None] @ self.w1[e].to(dtype)) @ self.w2[e].to(dtype)
                for p, e in enumerate(expert.flatten().tolist())]   # pair p = (token p // k, its choice)
        return torch.cat(rows)                                         # (N*k, D) in pair order


# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = MultiHeadLatentAttention(cfg) if cfg.attention == 'mla' else LatentTokenAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.moe = MoE(cfg)

    def forward(self, x, cos, sin, attn_mask, is_causal, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache, layer)
        return x + self.moe(self.ffn_norm(x))


class KVCache:
    """Per-layer cached tensors for generation, all laid out (B, slot, ...). Slots hold the layer's
    n_latent latent keys first, then tokens in order. key_valid marks padding slots (left-padded
    prompts); n_tokens counts each row's real tokens, which gives the next RoPE position."""

    def __init__(self, batch_size, max_slots, n_layer, device):
        self.max_slots = max_slots
        self.buffers = [None] * n_layer
        self.len = 0
        self.padded = False
        self.key_valid = torch.ones(batch_size, max_slots, dtype=torch.bool, device=device)
        self.n_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)

    def update(self, layer, *new):
        """Write new (B, t, ...) entries after the filled slots; return everything cached so far."""
        if self.buffers[layer] is None:
            self.buffers[layer] = [t.new_empty(t.size(0), self.max_slots, *t.shape[2:]) for t in new]
        t = new[0].size(1)
        for buf, x in zip(self.buffers[layer], new):
            buf[:, self.len:self.len + t] = x
        return [buf[:, :self.len + t] for buf in self.buffers[layer]]


class DeepSeekLM(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        cos, sin = rope_tables(config.rope_dim, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """normal(0.02) everywhere; projections that write into the residual stream get 0.02/sqrt(2*n_layer)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # RMSNorm weights stay 1
            residual = name.endswith(('attn.wo.weight', 'moe.w2', 'shared.2.weight'))
            nn.init.normal_(p, mean=0.0, std=resid_std if residual else 0.02)

    # --- sizes ------------------------------------------------------------------------------------

    def num_params(self, active=False):
        """All parameters (the tied embedding once); active=True counts only the k routed experts a
        token uses. Works on the meta device."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            c = self.config
            n -= c.n_layer * (c.n_expert - c.n_expert_active) * 2 * c.n_embd * c.expert_hidden
        return n

    def kv_cache_numel_per_token(self):
        return sum(b.attn.cache_numel_per_token() for b in self.blocks)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per active weight (the tied head counts, the
        embedding lookup is free) plus causal attention: on average a token's query meets n_latent +
        (T+1)/2 keys, at 2 FLOPs per multiply-add over the q.k and p.v widths, times 3 for backward."""
        c = self.config
        if c.attention == 'mla':
            qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        else:
            qk = v = c.head_dim
        keys = c.n_latent + (seq_len + 1) / 2
        return 6 * self.num_params(active=True) + 6 * c.n_layer * c.n_head * (qk + v) * keys

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, idx, targets=None, attention_mask=None, cache=None):
        """idx (B, T) token ids; attention_mask (B, T): 1 for real tokens, 0 for (left) padding.
        Returns logits (B, T, vocab) and the mean cross-entropy over targets != -1 (or None)."""
        B, T = idx.shape
        pos, attn_mask, is_causal = self._attention_layout(B, T, attention_mask, cache, idx.device)
        cos, sin = self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)   # (B|1, T, 1, D/2)
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.len += (self.config.n_latent if cache.len == 0 else 0) + T
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _attention_layout(self, B, T, attention_mask, cache, device):
        """RoPE positions (count from 0 at each row's first real token) and how attention is masked:
        the is_causal fast path when nothing is padded and no tokens are cached yet; no mask for a
        single decoded token; otherwise an explicit (B, 1, T, S) boolean mask over the S key slots."""
        L = self.config.n_latent
        past = cache.len if cache is not None else 0
        new_latents = L if past == 0 else 0
        if T > self.config.block_size or (cache is not None and past + new_latents + T > cache.max_slots):
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size} (or the cache)")
        real = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        pos = real.long().cumsum(1) - 1
        if cache is not None:
            pos = pos + cache.n_tokens[:, None]
            cache.n_tokens += real.sum(1)
            cache.key_valid[:, past + new_latents:past + new_latents + T] = real
            cache.padded = cache.padded or attention_mask is not None
        pos = pos.clamp(min=0)
        padded = attention_mask is not None or (cache is not None and cache.padded)
        if not padded and (past == 0 or T == 1):
            return pos, None, past == 0
        S = past + new_latents + T
        if cache is not None:
            key_valid = cache.key_valid[:, :S]
        else:
            key_valid = torch.cat([torch.ones(B, L, dtype=torch.bool, device=device), real], 1)
        q_slot = past + new_latents + torch.arange(T, device=device)
        k_slot = torch.arange(S, device=device)
        allowed = (k_slot[None, :] <= q_slot[:, None]) & key_valid[:, None, :]   # (B, T, S)
        allowed |= k_slot[None, :] == q_slot[:, None]   # a padding query sees itself: no all-masked rows
        return pos, allowed.unsqueeze(1), False

    # --- loss-free load balancing -----------------------------------------------------------------

    def expert_counts(self):
        """(n_layer, n_expert) tokens routed to each expert since the last reset."""
        return torch.stack([b.moe.expert_counts for b in self.blocks])

    def reset_expert_counts(self):
        for b in self.blocks:
            b.moe.expert_counts.zero_()

    @torch.no_grad()
    def update_router_bias(self, ema=0.99):
        """Once per optimizer step: b_i += rate * sign(mean load - load_i) from the token counts of all
        ranks, then reset the counts. Returns per-layer MaxVio and load fractions of those counts."""
        counts = self.expert_counts()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        rate = self.config.balance_rate
        for layer, b in enumerate(self.blocks):
            c = counts[layer]
            b.moe.expert_bias += rate * torch.sign(c.mean() - c)
            if c.sum() > 0:
                b.moe.expert_load.mul_(ema).add_((1 - ema) * c / c.sum())
        self.reset_expert_counts()
        # tensors, not lists: converting would wait for the GPU at every step
        return {'max_vio': max_violation(counts), 'load': counts / counts.sum(1, keepdim=True).clamp(min=1)}

    # --- generation -------------------------------------------------------------------------------

    def new_cache(self, batch_size):
        c = self.config
        return KVCache(batch_size, c.n_latent + c.block_size, c.n_layer, self.wte.weight.device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, attention_mask=None,
                 eos_token_id=None, use_cache=True):
        """Extend idx (B, T) by up to max_new_tokens. Prompts of different lengths are left-padded with
        attention_mask 0. With the cache: one prefill, then one token per step; when the window reaches
        block_size, the cache is refilled from the last block_size tokens (the context is cropped).
        temperature=0 is greedy. Rows that emitted eos_token_id keep emitting it; stops when all have."""
        bs = self.config.block_size
        mask = attention_mask
        cache, step_input = None, None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.len - self.config.n_latent < bs:
                logits, _ = self(step_input, cache=cache)
            else:  # prefill (or, without the cache, a full forward) over the last block_size tokens
                if use_cache:
                    cache = self.new_cache(idx.size(0))
                logits, _ = self(idx[:, -bs:], attention_mask=None if mask is None else mask[:, -bs:], cache=cache)
            nxt = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> (B,) token ids. temperature 0 = argmax; top_k / top_p (nucleus) filter first."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p   # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, sorted_idx, sorted_logits.masked_fill(drop, float('-inf')))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
