"""A DeepSeek-style language model in one file.

    token embedding (tied with the LM head)
    n_layer x Block:
        x = x + Attention(RMSNorm(x))     latent-token GQA (the reference) or Multi-head Latent Attention
        x = x + MoE(RMSNorm(x))           Router -> top-k of n_expert experts, auxiliary-loss-free balancing
    RMSNorm -> LM head

Reading order: ModelConfig; RoPE and the two attention types; the MoE (Router, experts); Block; DeepSeekLM
(forward, balancing, generation). How the matmuls, the loss and the KV cache run: kernel.py; the
optimizers: optim.py. ModelConfig's defaults are the architecture card's model, 679.8M parameters."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel import (RECOMPUTING, Combine, GatherRows, KVCache, attention_layout, checkpointed, grouped_mm,
                    linear_cross_entropy, matmul_dtype)


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    n_layer: int = 24
    n_embd: int = 768
    block_size: int = 1024          # longest sequence of tokens (latents not counted)
    norm_eps: float = 1e-5
    # attention
    attention: str = 'latent'       # 'latent': GQA with learnable latent tokens (the card's) | 'mla'
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
    balance_update: str = 'sign'    # 'sign': each bias moves by the full rate (DeepSeek-V3) | 'proportional':
                                    # by rate * its load's relative error, settling near balance (docs/balancing.md)
    router_center: bool = True      # route each token on its input minus its sequence's running mean (Router)
    seq_balance_loss: float = 0.0   # weight of DeepSeek-V3's sequence-wise balance loss (0: the card's, bias alone)

    def __post_init__(self):
        # sizes far beyond any model a machine can hold are refused here, before arithmetic on them overflows
        for names, lo, hi in ((('vocab_size', 'block_size', 'expert_hidden'), 1, 2**24), (('n_layer',), 1, 1024),
                              (('n_embd', 'n_head', 'n_kv_head', 'head_dim', 'n_expert', 'n_expert_active'), 1, 2**16),
                              (('n_latent', 'n_shared_expert', 'q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim',
                                'qk_rope_head_dim', 'v_head_dim'), 0, 2**16)):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                    raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, choices in (('attention', ('latent', 'mla')), ('router_score', ('softmax', 'sigmoid')),
                              ('balance_update', ('sign', 'proportional'))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be '{choices[0]}' or '{choices[1]}', got {getattr(self, name)!r}")
        for bad, message in ((self.n_head % self.n_kv_head, f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"),
                             (self.n_expert_active > self.n_expert, f"n_expert_active ({self.n_expert_active}) must be <= n_expert ({self.n_expert})"),
                             (self.head_dim % 2, f"head_dim must be even for RoPE, got {self.head_dim}"),
                             (not self.rope_theta > 1, f"rope_theta must be > 1, got {self.rope_theta}"),
                             *((getattr(self, name) % 8, f"{name} must be a multiple of 8 (grouped matmul alignment), got "
                                f"{getattr(self, name)}") for name in ('n_embd', 'expert_hidden')),
                             *((not 0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
                               for name in ('expert_dropout', 'router_jitter', 'balance_rate', 'norm_eps',
                                            'seq_balance_loss'))):
            if bad:
                raise ValueError(message)
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


# --- Rotary position embedding (rotate-half convention: pairs are (i, i + D/2), not interleaved) ---

def rope_tables(dim, max_pos, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)   # (max_pos, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B or 1, T, 1, D/2). Rotates each (x_i, x_{i+D/2}) pair in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def attend(q, k, v, attn_mask, is_causal, scale=None, expand_kv=False):
    """Attention over keys that start with the latent slots: q (B, T, H, Dqk), k (B, S, Hkv, Dqk),
    v (B, S, Hkv, Dv) -> (B, T, H*Dv). is_causal: the keys are exactly [S-T latents; the T query tokens]. We prepend S-T zero queries so
    that the square causal mask lets token t see every latent and tokens <= t, then drop their rows:
    SDPA's is_causal kernel skips the masked upper triangle, which an explicit mask cannot.
    Otherwise attn_mask is None (decode: every cached key is visible) or a bool (B, 1, T, S) mask.
    expand_kv: copy each key/value head out to the query heads that share it, for the GPUs whose fused
    attention kernel takes no grouped heads (devices.DevicePlan.attention); the result is the same."""
    B, T = q.shape[:2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if expand_kv and k.size(1) != q.size(1):   # head h reads key/value head h // (H / Hkv), as enable_gqa does
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    gqa = k.size(1) != q.size(1)
    if is_causal:
        n_prefix = k.size(2) - T
        q = F.pad(q, (0, 0, n_prefix, 0))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)[:, :, n_prefix:]
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2).reshape(B, T, -1)


# --- Attention type 1 (the card's): grouped-query attention with learnable latent tokens ---

class LatentTokenAttention(nn.Module):
    """Grouped-query attention: n_head query heads share n_kv_head key/value heads (the card: 12 and 4).
    Each layer owns n_latent learnable vectors whose keys and values sit ahead of the sequence,
    unrotated, visible to every query (a learned attention sink)."""
    expand_kv = False   # hand SDPA one key/value head per query head: set per GPU by devices.DevicePlan.apply

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.latent = nn.Parameter(torch.empty(cfg.n_latent, cfg.n_embd))

    def cache_numel_per_token(self):
        return 2 * self.n_kv_head * self.head_dim

    def forward(self, x, cos, sin, attn_mask, is_causal, cache=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if cache is None or cache.first:  # latent keys/values lead the sequence (and the cache)
            L = self.latent.size(0)
            k_lat = self.wk(self.latent).view(1, L, self.n_kv_head, self.head_dim).expand(B, -1, -1, -1)
            v_lat = self.wv(self.latent).view(1, L, self.n_kv_head, self.head_dim).expand(B, -1, -1, -1)
            k, v = torch.cat([k_lat.to(k.dtype), k], 1), torch.cat([v_lat.to(v.dtype), v], 1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return self.wo(attend(q, k, v, attn_mask, is_causal, expand_kv=self.expand_kv))


# --- Attention type 2: DeepSeek-V2/V3 Multi-head Latent Attention ---

class MultiHeadLatentAttention(nn.Module):
    """Keys and values are rebuilt from a small per-token latent c_kv (kv_lora_rank numbers) plus one
    RoPE key shared by all heads; only those are cached. Queries = [q_nope | q_rope] per head.
    Decoding uses the absorbed form: W_UK folds into the query and W_UV into the output, so attention
    runs directly against the cached latents (one shared 'head' of width kv_lora_rank + rope)."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
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

    def forward(self, x, cos, sin, attn_mask, is_causal, cache=None):
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
        decoding = cache is not None and not cache.first
        if not decoding:  # latent tokens go through the same compression, never rotated
            L = self.latent.size(0)
            lat_c, lat_r = self.compress(self.latent)
            c_kv = torch.cat([lat_c.expand(B, L, -1).to(c_kv.dtype), c_kv], 1)
            k_rope = torch.cat([lat_r.expand(B, L, -1).to(k_rope.dtype), k_rope], 1)
        if cache is not None:
            c_kv, k_rope = cache.update(self.layer_idx, c_kv, k_rope)
        if decoding:
            return self.wo(self.attend_absorbed(q_nope, q_rope, c_kv, k_rope, attn_mask))
        return self.wo(self.attend_naive(q_nope, q_rope, c_kv, k_rope, attn_mask, is_causal))

    def attend_naive(self, q_nope, q_rope, c_kv, k_rope, attn_mask, is_causal):
        """Expand every cached latent to full per-head keys and values (training and prefill)."""
        B, S, _ = c_kv.shape
        k_nope, v = self.wkv_b(c_kv).view(B, S, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.n_head, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return attend(q, k, v, attn_mask, is_causal, scale=self.scale)

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, attn_mask):
        """Same result, against the compressed cache: q_nope·W_UK·c_kv and (p·c_kv)·W_UV. All heads share
        the one latent 'head', so they ride along the query axis, (T*H) queries against S keys (SDPA's GQA
        would copy the cache once per head). attn_mask (B, 1, T, S) or None (one new token sees all)."""
        B, T, H, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope].to(q_nope.dtype), w[:, self.nope:].to(q_nope.dtype)
        q = torch.cat([torch.einsum('bthn,hnr->bthr', q_nope, w_uk), q_rope], dim=-1)  # (B, T, H, rank+rope)
        k = torch.cat([c_kv, k_rope], dim=-1)                                           # (B, S, rank+rope)
        mask = None if attn_mask is None else attn_mask.repeat_interleave(H, dim=2)    # (B, 1, T*H, S)
        o = F.scaled_dot_product_attention(q.reshape(B, 1, T * H, -1), k.unsqueeze(1), c_kv.unsqueeze(1),
                                           attn_mask=mask, scale=self.scale)            # (B, 1, T*H, rank)
        return torch.einsum('bthr,hvr->bthv', o.view(B, T, H, self.rank), w_uv).reshape(B, T, H * self.v_dim)


# --- Mixture of experts: a Router picks k experts per token; the experts run as grouped matmuls ---

class Router(nn.Module):
    """Scores every expert, picks the top k of score + expert_bias, and counts the picks.

    Auxiliary-loss-free balancing (Wang et al. 2024, used by DeepSeek-V3): expert_bias only decides
    which experts a token goes to, never how much their outputs weigh, so balancing does not bend the
    gradient as an auxiliary loss does; DeepSeekLM.update_router_bias moves each bias against its
    expert's load after every optimizer step. With router_center, the router sees each token minus the
    running mean of its sequence: a document's shared topic and style would otherwise lean all of it
    towards the same experts, a lean one global bias cannot cancel (docs/balancing.md). With
    seq_balance_loss > 0, training forwards also keep DeepSeek-V3's sequence-wise balance loss in seq_loss."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx, self.center = layer_idx, cfg.router_center
        self.k, self.score, self.jitter = cfg.n_expert_active, cfg.router_score, cfg.router_jitter
        self.seq_weight, self.seq_loss = cfg.seq_balance_loss, None
        self.weight = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd))
        self.register_buffer('expert_bias', torch.zeros(cfg.n_expert))    # balancing state, never trained by SGD
        # each expert's load fraction averaged over steps, for inspecting a checkpoint (the bias reacts to counts)
        self.register_buffer('expert_load', torch.full((cfg.n_expert,), 1.0 / cfg.n_expert))
        # picks since the last balancing update; an integer, so that counts stay exact in any model dtype
        self.register_buffer('expert_counts', torch.zeros(cfg.n_expert, dtype=torch.long), persistent=False)

    def forward(self, x, is_token=None, cache=None):
        """x (B, T, D) -> gates (B*T, k) fp32 summing to 1, chosen experts (B*T, k), tokens per expert.
        is_token (B, T): False for left padding, which the sequence means leave out."""
        with torch.autocast(x.device.type, enabled=False):   # routing decisions in fp32
            r_in, weight = x.float(), self.weight.float()
            if self.training and self.jitter > 0:   # multiplicative noise on the (centred) input: explores
                if self.center:
                    r_in = self.centered(r_in, is_token, cache)
                logits = F.linear(r_in * torch.empty_like(r_in).uniform_(1.0 - self.jitter, 1.0 + self.jitter), weight)
            else:   # centring commutes with the projection: centre the n_expert logits, not the n_embd inputs
                logits = F.linear(r_in, weight)
                if self.center:
                    logits = self.centered(logits, is_token, cache)
            logits = logits.flatten(0, 1)
            scores = logits.softmax(-1) if self.score == 'softmax' else logits.sigmoid()
            expert = torch.topk(scores + self.expert_bias.float(), self.k, dim=-1).indices   # bias picks...
            gate = scores.gather(1, expert)                                                  # ...never weighs
            gate = gate / gate.sum(-1, keepdim=True)
            if self.seq_weight > 0 and self.training and torch.is_grad_enabled():
                # kept by a checkpointed block's second forward too (the next forward replaces it): that forward
                # must save what the first saved, and a compiled block saves only what reaches an output
                self.seq_loss = self.sequence_balance_loss(scores, expert, *x.shape[:2])
        flat = expert.flatten()
        counts = torch.zeros_like(self.expert_counts).scatter_add_(0, flat, torch.ones_like(flat))
        if not RECOMPUTING[0]:   # a checkpointed block's second forward picks the same experts again
            self.expert_counts.add_(counts)
        return gate, expert, counts

    def sequence_balance_loss(self, scores, expert, B, T):
        """DeepSeek-V3's complementary balance loss: weight * sum_i f_i * P_i, averaged over the sequences (every
        token counts: training forwards carry no padding), f_i being expert i's share of a sequence's picks times
        n_expert / k (1 at balance), P_i its mean normalised score. Its gradient spreads each document, not only
        the training mix, so held-out plays balance too."""
        E = scores.size(-1)
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)                      # (B, E)
        picks = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, expert.view(B, T * self.k), torch.ones(B, T * self.k, device=scores.device))   # (B, E)
        return self.seq_weight * (picks * (E / (self.k * T)) * p).sum(1).mean()

    def centered(self, x, is_token, cache):
        """x (B, T, C) minus the mean of its sequence's tokens up to and including each one. With a cache,
        each row's running (sum, count) carries over from earlier forwards, so decoding routes exactly
        as a full forward over the same tokens does."""
        if is_token is None:
            total, count = x.cumsum(1), torch.arange(1, x.size(1) + 1, device=x.device, dtype=x.dtype)[None, :, None]
        else:
            m = is_token[..., None].to(x.dtype)
            total, count = (x * m).cumsum(1), m.cumsum(1)
        if cache is not None:
            if cache.router_sums[self.layer_idx] is not None:
                prev_total, prev_count = cache.router_sums[self.layer_idx]
                total, count = total + prev_total[:, None], count + prev_count[:, None]
            cache.router_sums[self.layer_idx] = (total[:, -1], count[:, -1])
        return x - total / count.clamp(min=1)


class MoE(nn.Module):
    """Dropless top-k mixture of experts, each expert Linear(n_embd, expert_hidden) -> SiLU ->
    Linear(expert_hidden, n_embd) -> dropout. Training and prefill sort the (token, choice) pairs by
    expert into contiguous runs and run all experts as one grouped matmul, which never waits for the
    device; decoding a few tokens runs just the chosen experts, and it and the per-expert fallback of fp16
    GPUs read the choices back to the host (.tolist())."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.k, self.n_expert = cfg.n_expert_active, cfg.n_expert
        self.router = Router(cfg, layer_idx)
        self.w1 = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd, cfg.expert_hidden))  # expert up: x @ w1[e]
        self.w2 = nn.Parameter(torch.empty(cfg.n_expert, cfg.expert_hidden, cfg.n_embd))  # expert down
        self.dropout = nn.Dropout(cfg.expert_dropout)
        if cfg.n_expert == 1:   # a dense feed-forward: nothing to route, its gate is always 1 (forward)
            self.router.weight.requires_grad_(False)
        self.shared = None
        if cfg.n_shared_expert:
            hidden = cfg.n_shared_expert * cfg.expert_hidden
            self.shared = nn.Sequential(nn.Linear(cfg.n_embd, hidden, bias=False), nn.SiLU(),
                                        nn.Linear(hidden, cfg.n_embd, bias=False), nn.Dropout(cfg.expert_dropout))

    def forward(self, x, is_token=None, cache=None):
        if self.n_expert == 1:   # the dense baseline (docs/moe_vs_dense.md): no router, sort or gather
            y = self.dropout(F.silu(x @ self.w1[0]) @ self.w2[0])
            return y if self.shared is None else y + self.shared(x)
        B, T, D = x.shape
        gate, expert, counts = self.router(x, is_token, cache)
        x = x.reshape(B * T, D)
        dtype, gate = matmul_dtype(x), gate.to(x.dtype)   # matmuls in autocast's dtype, the weighted sum in x's
        if not self.training and expert.numel() < self.n_expert:
            y = self.experts_by_pair(x.to(dtype), gate, expert, dtype)
        else:
            y = self.experts_grouped(x.to(dtype), gate, expert, counts, dtype)
        return (y if self.shared is None else y + self.shared(x)).view(B, T, D)

    def experts_grouped(self, x, gate, expert, counts, dtype):
        """x (N, D), gates and experts (N, k) -> (N, D): the (token, choice) pairs sorted by expert into
        contiguous runs of slots, each run through its expert as one grouped matmul, then each token's k
        outputs weighted by its gates and summed (kernel.py's GatherRows and Combine)."""
        order = expert.flatten().argsort(stable=True)   # slot -> pair
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))  # pair -> slot
        offs = counts.cumsum(0, dtype=torch.int32)      # offs[e] = end of expert e's run of slots
        h = F.silu(grouped_mm(GatherRows.apply(x, order, inv, self.k), self.w1.to(dtype), offs))
        return Combine.apply(self.dropout(grouped_mm(h, self.w2.to(dtype), offs)), gate, order, inv)

    def experts_by_pair(self, x, gate, expert, dtype):
        """Inference on fewer (token, choice) pairs than experts, as when decoding one token: run just the
        chosen experts' weights, pair by pair, instead of a grouped matmul over all of them."""
        rows = [F.silu(x[p // self.k, None] @ self.w1[e].to(dtype)) @ self.w2[e].to(dtype)
                for p, e in enumerate(expert.flatten().tolist())]   # pair p = (token p // k, its choice)
        return (torch.cat(rows).view(-1, self.k, x.size(1)).to(gate.dtype) * gate.unsqueeze(-1)).sum(1)


def max_violation(counts):
    """MaxVio = (max_i load_i - mean load) / mean load, per row of (..., n_expert) token counts."""
    mean = counts.float().mean(-1)
    return (counts.float().amax(-1) - mean) / mean.clamp(min=1e-9)


# --- A block ---

class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = (MultiHeadLatentAttention if cfg.attention == 'mla' else LatentTokenAttention)(cfg, layer_idx)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.moe = MoE(cfg, layer_idx)

    def forward(self, x, cos, sin, attn_mask, is_causal, cache=None, is_token=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache)
        return x + self.moe(self.ffn_norm(x), is_token, cache)


# --- The language model ---

class DeepSeekLM(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        cos, sin = rope_tables(config.rope_dim, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        # Activation checkpointing (train.py's --activation_checkpointing): a block saves only its input for
        # backward and runs its forward again there, trading a third more compute for most of the memory.
        self.activation_checkpointing = False
        if not self.wte.weight.is_meta:   # sizes without values (from_state_dict, memory.py) need no draws
            self.reset_parameters()

    @classmethod
    def from_state_dict(cls, config, state, device='cpu'):
        """The model with every weight from state (a checkpoint's), on device. It is built on the meta device
        and filled, so none of its weights is drawn at random only to be overwritten; the buffers that
        checkpoints do not hold (the RoPE tables, the routers' counters) are made afresh."""
        with torch.device('meta'):
            model = cls(config)
        model.to_empty(device=device)
        model.lm_head.weight = model.wte.weight   # to_empty gives each module its own tensor: tie them again
        model.load_state_dict(state)
        cos, sin = rope_tables(config.rope_dim, config.block_size, config.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
        model.reset_expert_counts()
        return model

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
        """All parameters (the tied embedding once); active=True: only the k routed experts a token uses."""
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
        qk, v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attention == 'mla' else (c.head_dim,) * 2
        keys = c.n_latent + (seq_len + 1) / 2
        return 6 * self.num_params(active=True) + 6 * c.n_layer * c.n_head * (qk + v) * keys

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, idx, targets=None, attention_mask=None, cache=None, reduction='mean'):
        """idx (B, T) token ids; attention_mask (B, T): 1 for real tokens, 0 for (left) padding. Without
        targets: (logits (B, T, vocab), None). With targets (B, T): (None, the cross-entropy over targets
        != -1: its mean, or with reduction='none' each token's), computed in chunks of rows (kernel.py)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        padded = attention_mask is not None
        is_token = attention_mask.bool() if padded else torch.ones(B, T, dtype=torch.bool, device=idx.device)
        if cache is None:   # RoPE positions count from 0 at each row's first real token
            pos = is_token.long().cumsum(1) - 1
            key_valid = F.pad(is_token, (self.config.n_latent, 0), value=True) if padded else is_token
            attn_mask, is_causal = attention_layout(key_valid, T, padded, first=True)
        else:
            pos = cache.advance(is_token, padded)
            attn_mask, is_causal = attention_layout(cache.key_valid[:, :cache.len], T, cache.padded, cache.first)
        pos = pos.clamp(min=0)
        cos, sin = self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)   # (B, T, 1, D/2)
        x = self.wte(idx)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:   # with recompute, a block keeps only its input; backward runs it again
            args = (x, cos, sin, attn_mask, is_causal, cache, is_token if padded else None)
            x = checkpointed(block, *args) if recompute else block(*args)
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x), None
        h, t = x.reshape(B * T, -1), targets.reshape(-1)
        dtype = matmul_dtype(h)   # autocast's, if on: it does not look inside the loss's own autograd Function
        with torch.autocast(h.device.type, enabled=False):
            return None, linear_cross_entropy(h, self.lm_head.weight, t, dtype, reduction)

    # --- loss-free load balancing -----------------------------------------------------------------

    def routers(self):
        return [b.moe.router for b in self.blocks]

    def expert_counts(self):
        """(n_layer, n_expert) tokens routed to each expert since the last reset."""
        return torch.stack([r.expert_counts for r in self.routers()])

    def sequence_balance_loss(self):
        """The last training forward's sequence-wise balance loss over all layers (0 if off), handed over once:
        train.py backpropagates it with the loss, and logs the loss without it."""
        terms = [r.seq_loss for r in self.routers() if r.seq_loss is not None]
        for r in self.routers():
            r.seq_loss = None
        return sum(terms)

    def reset_expert_counts(self):
        for r in self.routers():
            r.expert_counts.zero_()

    @torch.no_grad()
    def update_router_bias(self, ema=0.99):
        """Once per optimizer step, from the token counts of all ranks: each expert's bias moves against its
        load, by rate * sign(mean load - load) ('sign') or by rate * (mean load - load) / mean load
        ('proportional'), then the counts reset. Returns per-layer MaxVio and load fractions of those counts."""
        counts = self.expert_counts()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        counts = counts.float()
        mean = counts.mean(1, keepdim=True)
        error = (mean - counts) / mean.clamp(min=1) if self.config.balance_update == 'proportional' else (mean - counts).sign()
        for step, c, r in zip(self.config.balance_rate * error, counts, self.routers()):
            r.expert_bias += step
            share = torch.where(c.sum() > 0, c / c.sum().clamp(min=1), r.expert_load)   # no tokens: kept as is
            r.expert_load.mul_(ema).add_((1 - ema) * share)
        self.reset_expert_counts()
        # tensors, not Python numbers or lists: converting would wait for the GPU at every step
        return {'max_vio': max_violation(counts), 'load': counts / counts.sum(1, keepdim=True).clamp(min=1)}

    # --- generation -------------------------------------------------------------------------------

    def new_cache(self, batch_size):
        c = self.config
        return KVCache(batch_size, c.n_latent, c.block_size, c.n_layer, self.wte.weight.device)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, attention_mask=None,
                        use_cache=True):
        """Yield the next token of every row, (B,), up to max_new_tokens times; prompts of different lengths
        are left-padded with attention_mask 0. With the cache: one prefill, then one token per step; a full
        window refills the cache from the last block_size tokens. temperature=0 is greedy."""
        bs = self.config.block_size
        mask = attention_mask
        cache, step_input = None, None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.tokens < bs:
                logits, _ = self(step_input, cache=cache)
            else:  # prefill (or, without the cache, a full forward) over the last block_size tokens
                cache = self.new_cache(idx.size(0)) if use_cache else None
                logits, _ = self(idx[:, -bs:], attention_mask=None if mask is None else mask[:, -bs:], cache=cache)
            nxt = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p)
            yield nxt
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, eos_token_id=None, **kw):
        """idx (B, T) extended by up to max_new_tokens (generate_tokens' keywords). Rows that emitted
        eos_token_id keep emitting it; generation stops when all have."""
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for nxt in self.generate_tokens(idx, max_new_tokens, **kw):
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> (B,) token ids. temperature 0 = argmax; top_k / top_p (nucleus) filter first."""
    if temperature < torch.finfo(logits.dtype).tiny:   # 0, or too small for the logits' dtype: greedy
        return logits.argmax(-1)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature   # the best token at 0: no overflow
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p   # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, sorted_idx, sorted_logits.masked_fill(drop, float('-inf')))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
