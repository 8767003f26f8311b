"""model.py checked against slow, obviously-correct references written here (explicit loops, hand-written
softmax, torch built-ins), on tiny fp32 models: sizes, config checks, init, RoPE, causality, the attention fast
paths, left padding, the dropless MoE and its loss-free balancing, generation with the KV cache, MLA,
torch.compile / bf16 autocast, and the FLOPs estimate."""

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DeepSeekLM, ModelConfig, MoE, apply_rope, attend, max_violation, rope_tables, sample_next_token
from optim import configure_optimizers

ATOL = 1e-5

TINY = dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_latent=4, n_expert=4,
            n_expert_active=2, expert_hidden=64, block_size=32, expert_dropout=0.0, router_jitter=0.0)

# attention variants: the card's latent-token GQA, and MLA with / without latents and a low-rank query
VARIANTS = {
    'latent': dict(attention='latent'),
    'latent-nolat': dict(attention='latent', n_latent=0),
    'mla': dict(attention='mla'),
    'mla-qlora-nolat': dict(attention='mla', n_latent=0, q_lora_rank=32),
}
variants = pytest.mark.parametrize('variant', list(VARIANTS))


def tiny_cfg(**kw):
    return ModelConfig(**{**TINY, **kw})


def sharpen(module, seed, std=0.1):
    """Re-draw the weights larger than the 0.02 init so that attention is far from uniform and the logits
    have clear winners (greedy comparisons never hinge on a near tie); norm weights get drawn too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return module


def make_model(variant='latent', seed=0, **kw):
    torch.manual_seed(seed)
    return sharpen(DeepSeekLM(tiny_cfg(**{**VARIANTS[variant], **kw})), seed).eval()


def tokens(shape, seed, vocab=256):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# slow references

def softmax_ref(s, dim=-1):
    e = (s - s.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def rmsnorm_ref(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_ref(x, pos, theta):
    """x (B, T, H, D), pos (B, T): rotate each pair (i, i + D/2) by pos * theta^(-2i/D), one pair at a time."""
    B, T, _, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            for i in range(half):
                a = p * theta ** (-2 * i / D)
                c, s = math.cos(a), math.sin(a)
                x1, x2 = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i] = x1 * c - x2 * s
                out[b, t, :, i + half] = x1 * s + x2 * c
    return out


def positions(real):
    """RoPE positions of a left-padded batch: real tokens count from 0, pads sit at 0."""
    pos = torch.zeros(real.shape, dtype=torch.long)
    for b in range(real.size(0)):
        n = 0
        for t in range(real.size(1)):
            if real[b, t]:
                pos[b, t] = n
                n += 1
    return pos


def allowed_ref(L, real):
    """(B, T, L+T) bool: query t sees every latent and the real tokens <= t (and always itself)."""
    B, T = real.shape
    allowed = torch.zeros(B, T, L + T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(L + T):
                allowed[b, t, s] = s < L or (s - L <= t and bool(real[b, s - L])) or s - L == t
    return allowed


def attention_ref(q, k, v, allowed, scale):
    """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), allowed (B, T, S) -> (B, T, H*Dv)."""
    s = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * scale                  # (B, H, T, S)
    s = s.masked_fill(~allowed[:, None], float('-inf'))
    return (softmax_ref(s) @ v.transpose(1, 2)).transpose(1, 2).flatten(2)


def latent_attention_ref(attn, x, pos, allowed, theta):
    """LatentTokenAttention from its weights: GQA via repeat_interleave, RoPE on tokens only."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    L = attn.latent.size(0)
    q = rope_ref((x @ attn.wq.weight.T).view(B, T, H, D), pos, theta)
    k = rope_ref((x @ attn.wk.weight.T).view(B, T, Hkv, D), pos, theta)
    v = (x @ attn.wv.weight.T).view(B, T, Hkv, D)
    k_lat = (attn.latent @ attn.wk.weight.T).view(1, L, Hkv, D).expand(B, L, Hkv, D)   # never rotated
    v_lat = (attn.latent @ attn.wv.weight.T).view(1, L, Hkv, D).expand(B, L, Hkv, D)
    k = torch.cat([k_lat, k], 1).repeat_interleave(H // Hkv, dim=2)
    v = torch.cat([v_lat, v], 1).repeat_interleave(H // Hkv, dim=2)
    return attention_ref(q, k, v, allowed, 1 / math.sqrt(D)) @ attn.wo.weight.T


def mla_ref(attn, cfg, x, pos, allowed, theta):
    """DeepSeek-V2 MLA from its definition: c_kv = norm(W_DKV x), k = [W_UK c_kv | rope(W_KR x)] with the rope
    key shared by the heads, v = W_UV c_kv, q = [q_nope | rope(q_rope)], scale 1/sqrt(nope + rope)."""
    B, T, _ = x.shape
    H, nope, rope, vd, rank = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = rmsnorm_ref(x @ attn.wq_a.weight.T, attn.q_norm.weight, cfg.norm_eps) @ attn.wq_b.weight.T
    else:
        q = x @ attn.wq.weight.T
    q = q.view(B, T, H, nope + rope)
    q = torch.cat([q[..., :nope], rope_ref(q[..., nope:], pos, theta)], -1)

    def compress(z):
        a = z @ attn.wkv_a.weight.T
        return rmsnorm_ref(a[..., :rank], attn.kv_norm.weight, cfg.norm_eps), a[..., rank:]

    c, kr = compress(x)
    kr = rope_ref(kr[:, :, None], pos, theta)[:, :, 0]
    lc, lr = compress(attn.latent)
    L = lc.size(0)
    c = torch.cat([lc.expand(B, L, rank), c], 1)
    kr = torch.cat([lr.expand(B, L, rope), kr], 1)
    kv = (c @ attn.wkv_b.weight.T).view(B, L + T, H, nope + vd)
    k = torch.cat([kv[..., :nope], kr[:, :, None].expand(B, L + T, H, rope)], -1)
    return attention_ref(q, k, kv[..., nope:], allowed, (nope + rope) ** -0.5) @ attn.wo.weight.T


def centered_ref(x):
    """x (B, T, D): each token minus the mean of its sequence up to and including itself, one at a time."""
    out = torch.empty_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            out[b, t] = x[b, t] - x[b, :t + 1].mean(0)
    return out


def moe_ref(moe, x, router_input=None):
    """Naive dropless MoE, token by token: fp32 router on the centred input (or router_input (N, D)), top-k
    on scores + bias, gates = the chosen unbiased scores renormalised, expert e = silu(x @ w1[e]) @ w2[e].
    x (B, T, D) -> y (B*T, D), counts (n_expert,)."""
    r_in = router_input if router_input is not None else (centered_ref(x) if moe.router.center else x).flatten(0, 1)
    x = x.flatten(0, 1)
    logits = r_in.float() @ moe.router.weight.float().T
    scores = torch.softmax(logits, -1) if moe.router.score == 'softmax' else torch.sigmoid(logits)
    E = scores.size(1)
    counts = torch.zeros(E)
    ys = []
    for n in range(x.size(0)):
        chosen = sorted(range(E), key=lambda e: -(scores[n, e] + moe.router.expert_bias[e]).item())[:moe.k]
        total = sum(scores[n, e] for e in chosen)
        y = torch.zeros_like(x[n])
        for e in chosen:
            y = y + scores[n, e] / total * (F.silu(x[n] @ moe.w1[e]) @ moe.w2[e])
            counts[e] += 1
        ys.append(y)
    y = torch.stack(ys)
    if moe.shared is not None:
        y = y + F.silu(x @ moe.shared[0].weight.T) @ moe.shared[2].weight.T
    return y, counts


def greedy_ref(model, idx, n):
    """Greedy decoding by repeated full forwards over the last block_size tokens."""
    bs = model.config.block_size
    for _ in range(n):
        logits, _ = model(idx[:, -bs:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


# ----------------------------------------------------------------------------------------------
# 1. the reference configuration: the architecture card's values and sizes

def card_params(c, mla=False):
    """Parameter count from the architecture card (tied embedding counted once), all and active."""
    d, H = c.n_embd, c.n_head
    if mla:
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = d * H * qk if not c.q_lora_rank else d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk
        attn = (q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * d)
    else:
        attn = d * H * c.head_dim + 2 * d * c.n_kv_head * c.head_dim + H * c.head_dim * d
    attn += c.n_latent * d
    expert = 2 * d * c.expert_hidden
    common = attn + 2 * d + d * c.n_expert + c.n_shared_expert * expert   # 2 RMSNorms, router, shared
    total = c.vocab_size * d + c.n_layer * (common + c.n_expert * expert) + d
    active = c.vocab_size * d + c.n_layer * (common + c.n_expert_active * expert) + d
    return total, active


def test_reference_config_is_the_card():
    c = ModelConfig()
    assert (c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.n_latent) == \
        (49152, 768, 24, 12, 4, 64, 8)
    assert (c.rope_theta, c.n_expert, c.n_expert_active, c.expert_hidden, c.expert_dropout, c.norm_eps) == \
        (10000.0, 8, 2, 2048, 0.05, 1e-5)
    assert c.attention == 'latent' and c.router_jitter > 0 and c.balance_rate > 0 and c.n_shared_expert == 0
    with torch.device('meta'):
        m = DeepSeekLM(c)
    assert m.num_params() == 679_809_792
    assert m.num_params(active=True) == 226_824_960
    assert m.kv_cache_numel_per_token() == 12_288
    c = m.config
    # embedding 49152x768 tied; per layer q 768x768, k,v 768x256, o 768x768, 8x768 latents, 2 RMSNorms,
    # router 768x8, 8 experts of 768x2048x2; final norm
    per_layer = 768 * 768 + 2 * 768 * 256 + 768 * 768 + 8 * 768 + 2 * 768 + 768 * 8 + 8 * 768 * 2048 * 2
    assert m.num_params() == 49152 * 768 + 24 * per_layer + 768
    assert m.num_params(active=True) == 49152 * 768 + 24 * (per_layer - 6 * 768 * 2048 * 2) + 768
    assert card_params(c) == (m.num_params(), m.num_params(active=True))
    assert m.kv_cache_numel_per_token() == 24 * 2 * 4 * 64   # K and V, 4 kv heads of 64, per layer


# ----------------------------------------------------------------------------------------------
# 2. config validation

@pytest.mark.parametrize('kw, field', [
    (dict(n_head=12, n_kv_head=5), 'n_kv_head'),
    (dict(n_expert=4, n_expert_active=5), 'n_expert_active'),
    (dict(head_dim=15), 'head_dim'),
    (dict(vocab_size=0), 'vocab_size'),
    (dict(n_layer=0), 'n_layer'),
    (dict(n_embd=-8), 'n_embd'),
    (dict(block_size=0), 'block_size'),
    (dict(n_head=0), 'n_head'),
    (dict(n_kv_head=0), 'n_kv_head'),
    (dict(head_dim=0), 'head_dim'),
    (dict(n_expert=0), 'n_expert'),
    (dict(n_expert_active=0), 'n_expert_active'),
    (dict(expert_hidden=-1), 'expert_hidden'),
    (dict(n_latent=-1), 'n_latent'),
    (dict(n_shared_expert=-1), 'n_shared_expert'),
    (dict(attention='mla', kv_lora_rank=-1), 'kv_lora_rank'),
    (dict(attention='mla', qk_rope_head_dim=7), 'qk_rope_head_dim'),
    (dict(attention='flash'), 'attention'),
    (dict(router_score='relu'), 'router_score'),
    (dict(expert_dropout=1.0), 'expert_dropout'),
])
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_config_accepts_tiny_and_derives_mla_sizes():
    tiny_cfg()
    tiny_cfg(n_latent=0)
    c = tiny_cfg(attention='mla')
    assert (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (32, 16, 8, 16)
    assert c.rope_dim == 8 and tiny_cfg().rope_dim == 16


# ----------------------------------------------------------------------------------------------
# 3. tying, init, norms

def test_tied_head_init_stds_and_norm_eps():
    torch.manual_seed(0)
    cfg = tiny_cfg(vocab_size=512, n_embd=128, n_layer=4, expert_hidden=256, n_shared_expert=1, norm_eps=1e-6)
    m = DeepSeekLM(cfg)
    assert m.lm_head.weight is m.wte.weight
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    expected = {'wte.weight': 0.02}
    for i in range(cfg.n_layer):
        p = f'blocks.{i}.'
        expected.update({p + 'attn.wq.weight': 0.02, p + 'attn.wk.weight': 0.02, p + 'attn.wv.weight': 0.02,
                         p + 'attn.latent': 0.02, p + 'moe.router.weight': 0.02, p + 'moe.w1': 0.02,
                         p + 'moe.shared.0.weight': 0.02,
                         p + 'attn.wo.weight': resid, p + 'moe.w2': resid, p + 'moe.shared.2.weight': resid})
    params = dict(m.named_parameters())
    assert set(expected) == {n for n, p in params.items() if p.dim() >= 2}
    for name, std in expected.items():
        p = params[name]
        assert abs(p.mean().item()) < 0.2 * std, name
        assert p.std().item() == pytest.approx(std, rel=0.1), name
    norms = [mod for mod in m.modules() if isinstance(mod, nn.RMSNorm)]
    assert len(norms) == 2 * cfg.n_layer + 1
    for mod in norms:
        assert mod.eps == 1e-6 and torch.equal(mod.weight, torch.ones_like(mod.weight))
    assert all(mod.eps == 1e-5 for mod in DeepSeekLM(tiny_cfg()).modules() if isinstance(mod, nn.RMSNorm))
    with torch.no_grad():   # one tensor: a write through the embedding shows in the head
        m.wte.weight[3, 5] = 7.0
    assert m.lm_head.weight[3, 5] == 7.0
    mla = DeepSeekLM(tiny_cfg(attention='mla', q_lora_rank=16, norm_eps=1e-6))
    assert {mod.eps for mod in mla.modules() if isinstance(mod, nn.RMSNorm)} == {1e-6}
    assert mla.blocks[0].attn.wo.weight.std().item() == pytest.approx(0.02 / 2, rel=0.15)


# ----------------------------------------------------------------------------------------------
# 4. RoPE

def test_rope_is_rotate_half_rotation_with_relative_scores():
    torch.manual_seed(0)
    B, T, H, D, theta = 2, 9, 3, 16, 500.0
    cos, sin = rope_tables(D, 32, theta)
    assert cos.shape == (32, D // 2)
    x = torch.randn(B, T, H, D)
    pos = torch.stack([torch.arange(T), torch.arange(T) * 3 + 1])               # arbitrary positions per row
    y = apply_rope(x, cos[pos].unsqueeze(2), sin[pos].unsqueeze(2))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(y, rope_ref(x, pos, theta), atol=ATOL, rtol=ATOL)
    # position 0 is the identity; the model's tables follow the config
    torch.testing.assert_close(y[0, 0], x[0, 0], atol=0, rtol=0)
    m = DeepSeekLM(tiny_cfg(rope_theta=theta))
    torch.testing.assert_close(m.rope_cos, rope_tables(16, 32, theta)[0])

    # q.k after rotation depends only on the offset m - n
    q, k = torch.randn(1, 1, 1, D).expand(1, 32, 1, D), torch.randn(1, 1, 1, D).expand(1, 32, 1, D)
    c_, s_ = cos[None, :, None], sin[None, :, None]
    qr, kr = apply_rope(q, c_, s_), apply_rope(k, c_, s_)
    score = lambda m_, n_: (qr[0, m_, 0] * kr[0, n_, 0]).sum().item()   # noqa: E731
    for m_, n_, shift in [(5, 2, 10), (2, 5, 20), (7, 7, 13), (0, 9, 4)]:
        assert score(m_ + shift, n_ + shift) == pytest.approx(score(m_, n_), abs=1e-4)
    assert abs(score(5, 2) - score(2, 5)) > 1e-3   # but it does depend on the offset


# ----------------------------------------------------------------------------------------------
# 5. causality

@variants
def test_causal_and_latents_matter(variant):
    m = make_model(variant)
    idx = tokens((2, 12), 1)
    logits, _ = m(idx)
    for t in (0, 5, 10):
        idx2 = idx.clone()
        idx2[:, t + 1:] = tokens((2, 11 - t), 2 + t)
        logits2, _ = m(idx2)
        torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], atol=ATOL, rtol=ATOL)
        assert (logits2[:, t + 1:] - logits[:, t + 1:]).abs().amax() > 1e-3
    # the explicit-mask path (an all-ones attention_mask) agrees with the is_causal fast path
    torch.testing.assert_close(m(idx, attention_mask=torch.ones_like(idx))[0], logits, atol=ATOL, rtol=ATOL)
    if m.config.n_latent:
        with torch.no_grad():
            m.blocks[0].attn.latent.add_(0.5 * torch.randn_like(m.blocks[0].attn.latent))
        assert (m(idx)[0][:, 0] - logits[:, 0]).abs().amax() > 1e-3


# ----------------------------------------------------------------------------------------------
# 6. the attention fast path vs an explicit-mask reference, from the module's own weights

@variants
@pytest.mark.parametrize('padded', [False, True])
def test_attention_matches_slow_reference(variant, padded):
    m = make_model(variant)
    attn, cfg = m.blocks[0].attn, m.config
    B, T, L = 2, 7, cfg.n_latent
    torch.manual_seed(3)
    x = torch.randn(B, T, cfg.n_embd)
    real = torch.ones(B, T, dtype=torch.bool)
    if padded:
        real[0, :3] = False
    pos = positions(real)
    allowed = allowed_ref(L, real)
    with torch.no_grad():
        if padded:
            y = attn(x, m.rope_cos[pos].unsqueeze(2), m.rope_sin[pos].unsqueeze(2), allowed.unsqueeze(1), False)
        else:   # the is_causal zero-query trick
            y = attn(x, m.rope_cos[None, :T, None], m.rope_sin[None, :T, None], None, True)
        if cfg.attention == 'mla':
            ref = mla_ref(attn, cfg, x, pos, allowed, cfg.rope_theta)
        else:
            ref = latent_attention_ref(attn, x, pos, allowed, cfg.rope_theta)
    torch.testing.assert_close(y[real], ref[real], atol=ATOL, rtol=ATOL)


def test_attend_gqa_fast_path_equals_explicit_mask():
    torch.manual_seed(0)
    B, T, L, H, Hkv, D = 2, 6, 3, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, L + T, Hkv, D), torch.randn(B, L + T, Hkv, D)
    allowed = allowed_ref(L, torch.ones(B, T, dtype=torch.bool))
    ref = attention_ref(q, k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2), allowed, D ** -0.5)
    torch.testing.assert_close(attend(q, k, v, None, True), ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(attend(q, k, v, allowed.unsqueeze(1), False), ref, atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------
# 7. left padding

@variants
def test_left_padding_matches_unpadded(variant):
    m = make_model(variant)
    a, b = tokens((1, 6), 4), tokens((1, 9), 5)
    batch = torch.cat([torch.cat([torch.full((1, 3), 17), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    logits, _ = m(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0, 3:], m(a)[0][0], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(logits[1], m(b)[0][0], atol=ATOL, rtol=ATOL)
    assert torch.isfinite(logits).all()


def test_chunked_loss_equals_cross_entropy_of_the_logits(monkeypatch):
    """The fused head + loss (rows in chunks, gradients computed in the forward pass) against the plain
    cross-entropy of the full logits: loss, per-token losses and gradients, with ignored targets (-1)."""
    import kernel
    monkeypatch.setattr(kernel, 'chunk_rows', lambda h, w: 5)   # several chunks, the last one short
    m = make_model()
    m.train()
    idx, tgt = tokens((2, 8), 6), tokens((2, 8), 7)
    tgt[0, :3] = -1
    torch.manual_seed(0)
    logits, _ = m(idx)
    logp = logits.log_softmax(-1)
    picked = [-logp[b, t, tgt[b, t]] for b in range(2) for t in range(8) if tgt[b, t] != -1]
    ref = torch.stack(picked).mean()
    grads_ref = torch.autograd.grad(ref, list(m.parameters()))
    torch.manual_seed(0)
    _, loss = m(idx, tgt)
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=ATOL)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    for (name, _), g, g_ref in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=1e-4, msg=name)
    _, per_token = m(idx, tgt, reduction='none')
    want = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1), ignore_index=-1, reduction='none')
    torch.testing.assert_close(per_token, want, atol=ATOL, rtol=ATOL)


def test_loss_under_no_grad_skips_the_fused_gradients(monkeypatch):
    """Evaluating with `torch.no_grad()` (nanoGPT's estimate_loss) gives the same mean loss, and the loss
    computes no gradients in its forward pass, as it does when training."""
    import kernel
    m = make_model()
    idx, tgt = tokens((2, 8), 6), tokens((2, 8), 7)
    tgt[1, 5:] = -1
    _, want = m(idx, tgt)
    asked, apply = [], kernel.LinearCrossEntropy.apply

    def spy(*args):
        asked.append(args[-1])   # need_grad
        return apply(*args)
    monkeypatch.setattr(kernel.LinearCrossEntropy, 'apply', spy)
    with torch.no_grad():
        _, loss = m(idx, tgt)
    _, _ = m(idx, tgt, reduction='none')
    m(idx, tgt)
    assert asked == [False, False, True]
    torch.testing.assert_close(loss, want.detach(), atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------
# 8. the MoE dispatch vs a naive loop, outputs and gradients

def make_moe(seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoE(tiny_cfg(**kw), layer_idx=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name == 'router.weight' else 0.1))
        # a sequence's first token has a centred router input of 0, all scores equal: the bias decides
        moe.router.expert_bias.copy_(0.01 * torch.randn(moe.n_expert, generator=g))
    return moe.eval()


@pytest.mark.parametrize('score, k, shared, rig', [
    ('softmax', 2, 0, None),
    ('sigmoid', 2, 0, None),
    ('softmax', 2, 1, None),
    ('softmax', 1, 0, None),
    ('softmax', 1, 0, 'bias'),      # every token to expert 2, nothing dropped
    ('sigmoid', 2, 0, 'bias'),
    ('softmax', 1, 0, 'router'),    # the router itself sends everything to expert 3
])
def test_moe_matches_naive_loop_with_grads(score, k, shared, rig):
    # a rigged router sends all tokens to one expert only on the raw input: centring would cancel the rig
    moe = make_moe(router_score=score, n_expert_active=k, n_shared_expert=shared, router_center=rig != 'router')
    torch.manual_seed(1)
    x = torch.randn(2, 12, 64)
    if rig == 'bias':
        moe.router.expert_bias[2] = 1e3
    elif rig == 'router':
        x = x.abs()
        with torch.no_grad():
            moe.router.weight[3] = 1.0
    x.requires_grad_(True)
    w = torch.randn(2, 12, 64)                                  # a generic loss: sum(w * y)
    params = [x, moe.w1, moe.w2, moe.router.weight]
    y = moe(x)
    grads = torch.autograd.grad((y * w).sum(), params, allow_unused=True)
    y_ref, counts = moe_ref(moe, x)
    grads_ref = torch.autograd.grad((y_ref.view_as(w) * w).sum(), params, allow_unused=True)
    torch.testing.assert_close(y, y_ref.view_as(y), atol=ATOL, rtol=ATOL)
    assert torch.equal(moe.router.expert_counts.float(), counts)
    assert counts.sum() == 24 * k
    for name, g, g_ref in zip(['x', 'w1', 'w2', 'router'], grads, grads_ref):
        g = torch.zeros_like(params[0] if name == 'x' else g_ref) if g is None else g
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=ATOL, msg=name)
    if rig:
        hot = 2 if rig == 'bias' else 3
        assert counts[hot] == 24
        if k == 1:   # experts that got no token get an exactly zero gradient
            cold = [e for e in range(4) if e != hot]
            assert grads[1][cold].abs().max() == 0 and grads[2][cold].abs().max() == 0


@pytest.mark.parametrize('k, T, shared', [(2, 1, 0), (1, 3, 0), (2, 1, 1), (1, 1, 0)])
def test_moe_decode_path_matches_naive_loop(k, T, shared):
    # in inference, fewer (token, choice) pairs than experts take the per-pair path instead of grouped_mm
    moe = make_moe(n_expert_active=k, n_shared_expert=shared)
    assert T * k < moe.n_expert
    x = torch.randn(1, T, 64)
    y = moe(x)
    y_ref, counts = moe_ref(moe, x)
    torch.testing.assert_close(y, y_ref.view_as(y), atol=ATOL, rtol=ATOL)
    assert torch.equal(moe.router.expert_counts.float(), counts)


def test_shared_expert_is_always_on_and_counted():
    moe = make_moe(n_shared_expert=1)
    x = torch.randn(1, 5, 64)
    routed = moe(x)
    shared = moe.shared
    moe.shared = None
    only_routed = moe(x)
    moe.shared = shared
    torch.testing.assert_close(routed, only_routed + F.silu(x @ shared[0].weight.T) @ shared[2].weight.T,
                               atol=ATOL, rtol=ATOL)
    for extra in (1, 2):
        a, b = DeepSeekLM(tiny_cfg()), DeepSeekLM(tiny_cfg(n_shared_expert=extra))
        assert b.num_params() - a.num_params() == 2 * extra * 2 * 64 * 64
        assert b.num_params(active=True) - a.num_params(active=True) == 2 * extra * 2 * 64 * 64
        assert card_params(b.config) == (b.num_params(), b.num_params(active=True))


def test_one_expert_is_a_plain_feed_forward():
    """n_expert=1, the dense baselines of docs/moe_vs_dense.md and bench.py: the layer is exactly
    silu(x @ w1[0]) @ w2[0] with nothing routed (the router takes no gradient, its counters stay empty,
    balancing reports 0), and a model of it trains."""
    moe = make_moe(n_expert=1, n_expert_active=1)
    x = torch.randn(2, 12, 64, requires_grad=True)
    y = moe(x)
    torch.testing.assert_close(y, F.silu(x @ moe.w1[0]) @ moe.w2[0], atol=ATOL, rtol=ATOL)
    y.square().sum().backward()
    assert moe.w1.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert moe.router.weight.grad is None and moe.router.expert_counts.sum() == 0
    m = make_model(n_expert=1, n_expert_active=1).train()
    m(tokens((2, 8), 1), tokens((2, 8), 2))[1].backward()
    assert torch.equal(m.update_router_bias()['max_vio'], torch.zeros(2))


def test_centred_routing_ignores_what_a_whole_sequence_shares():
    """With router_center (the default), adding the same vector to every token of a sequence changes no
    routing decision; without it, a large enough shift sends the whole sequence to the same experts."""
    torch.manual_seed(11)
    x = torch.randn(2, 16, 64)
    shift = 3.0 * torch.randn(2, 1, 64)
    moe = make_moe()
    assert moe.router.center
    _, picked, _ = moe.router(x)
    _, picked_shifted, _ = moe.router(x + shift)
    assert torch.equal(picked, picked_shifted)
    raw = make_moe(router_center=False)
    _, picked, _ = raw.router(x)
    _, picked_shifted, _ = raw.router(x + shift)
    assert not torch.equal(picked, picked_shifted)
    per_sequence = picked_shifted.view(2, 16 * 2)
    assert all(len(set(row.tolist())) <= 3 for row in per_sequence)   # one lean for the whole sequence


def test_expert_dropout_only_in_training_on_expert_outputs():
    """Every token routed to one expert with gate 1 (k=1, rigged bias): in training, y = dropout(expert(x)),
    so about p of its elements are exactly 0 and the rest are expert(x) / (1 - p); in eval y = expert(x)."""
    p = 0.25
    moe = make_moe(n_expert_active=1, expert_dropout=p)
    moe.router.expert_bias[1] = 1e3
    torch.manual_seed(8)
    x = torch.randn(1, 64, 64)
    full = F.silu(x[0] @ moe.w1[1]) @ moe.w2[1]
    torch.testing.assert_close(moe(x)[0], full, atol=ATOL, rtol=ATOL)
    moe.train()
    y = moe(x)[0]
    dropped = y == 0
    assert 0.15 < dropped.float().mean().item() < 0.35
    torch.testing.assert_close(y[~dropped], full[~dropped] / (1 - p), atol=ATOL, rtol=ATOL)
    assert not (moe(x)[0] == 0).equal(dropped)   # a fresh mask each step
    moe_plain = make_moe(n_expert_active=1, expert_dropout=0.0).train()
    moe_plain.router.expert_bias[1] = 1e3
    assert not (moe_plain(x) == 0).any()


def test_the_combines_output_is_never_written_in_place():
    """torch.compile in torch 2.11 drops every gradient of an autograd Function whose output was written in
    place: compiled, an in-place weighted sum in the MoE's combine gave the experts none (docs/full-size.md).
    The suite runs on a torch where that works either way, so the property itself is checked: a fresh output,
    never bumped by an in-place write, for k = 1, 2 and 3."""
    from kernel import Combine
    for k in (1, 2, 3):
        order = torch.randperm(5 * k, generator=torch.Generator().manual_seed(k))
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(5 * k))
        y = Combine.apply(torch.randn(5 * k, 4), torch.rand(5, k), order, inv)
        assert y._version == 0


def test_grouped_mm_fallback_loop_equals_kernel():
    """GPUs without the grouped-matmul kernel (fp16, compute capability < 8.0) take one matmul per group;
    on the CPU both exist, so the loop is checked against the kernel in both forms and through the MoE."""
    import kernel
    from kernel import grouped_mm_loop
    torch.manual_seed(9)
    a, b = torch.randn(10, 8), torch.randn(3, 8, 16)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)           # an empty group in the middle
    torch.testing.assert_close(grouped_mm_loop(a, b, offs), F.grouped_mm(a, b, offs=offs), atol=ATOL, rtol=ATOL)
    g = torch.randn(10, 16)
    torch.testing.assert_close(grouped_mm_loop(a.t(), g, offs), F.grouped_mm(a.t(), g, offs=offs), atol=ATOL, rtol=ATOL)
    moe = make_moe()
    x = torch.randn(2, 12, 64, requires_grad=True)
    y = moe(x)
    grads = torch.autograd.grad(y.square().sum(), [x, moe.w1, moe.w2])
    real = kernel.has_grouped_mm_kernel
    kernel.has_grouped_mm_kernel = lambda a: False
    try:
        y2 = moe(x)
        grads2 = torch.autograd.grad(y2.square().sum(), [x, moe.w1, moe.w2])
    finally:
        kernel.has_grouped_mm_kernel = real
    torch.testing.assert_close(y2, y, atol=ATOL, rtol=ATOL)
    for g1, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g1, atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------
# 9. loss-free balancing

def test_bias_changes_selection_not_gates():
    moe = make_moe()
    torch.manual_seed(2)
    x = torch.randn(1, 16, 64)
    moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 50.0, 50.0]))
    y = moe(x)[0]
    assert moe.router.expert_counts.tolist() == [0, 0, 16, 16]
    s = torch.softmax(centered_ref(x)[0] @ moe.router.weight.T, -1)
    expert = lambda e: F.silu(x[0] @ moe.w1[e]) @ moe.w2[e]   # noqa: E731
    g2, g3 = s[:, 2:3] / (s[:, 2:3] + s[:, 3:4]), s[:, 3:4] / (s[:, 2:3] + s[:, 3:4])
    torch.testing.assert_close(y, g2 * expert(2) + g3 * expert(3), atol=ATOL, rtol=ATOL)
    # the test can tell: gates taken from the biased scores would be ~1/2 each
    assert (y - 0.5 * expert(2) - 0.5 * expert(3)).abs().amax() > 1e-3
    # a modest bias flips only some choices; gates still follow the unbiased scores (the naive loop)
    moe.router.expert_counts.zero_()
    moe.router.expert_bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.05]))
    torch.testing.assert_close(moe(x)[0], moe_ref(moe, x)[0], atol=ATOL, rtol=ATOL)


def test_update_router_bias_counts_maxvio_and_load():
    m = make_model(balance_rate=0.01)
    rate = 0.01
    m.blocks[0].moe.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    before = [b.moe.router.expert_bias.clone() for b in m.blocks]
    counts = torch.tensor([[8.0, 0.0, 4.0, 4.0], [2.0, 2.0, 2.0, 10.0]])   # means 4 and 4
    for b, c in zip(m.blocks, counts):
        b.moe.router.expert_counts.copy_(c)
    torch.testing.assert_close(m.expert_counts().float(), counts)
    out = m.update_router_bias(ema=0.9)
    # overloaded falls, idle rises, by exactly balance_rate; at the mean: unchanged
    assert torch.equal(m.blocks[0].moe.router.expert_bias, before[0] + rate * torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(m.blocks[1].moe.router.expert_bias, before[1] + rate * torch.tensor([1.0, 1.0, 1.0, -1.0]))
    assert m.expert_counts().abs().sum() == 0
    torch.testing.assert_close(out['max_vio'], torch.tensor([(8 - 4) / 4, (10 - 4) / 4]))
    torch.testing.assert_close(out['load'], counts / 16)
    for b, c in zip(m.blocks, counts):
        torch.testing.assert_close(b.moe.router.expert_load, 0.9 * 0.25 + 0.1 * c / c.sum())
    # a real forward: every token counted k times per layer, then a bias step toward balance
    idx = tokens((2, 10), 8)
    m(idx)
    c = m.expert_counts()
    assert c.sum(1).tolist() == [40, 40]
    c = c.float()
    before = [b.moe.router.expert_bias.clone() for b in m.blocks]
    out = m.update_router_bias()
    for layer, b in enumerate(m.blocks):
        torch.testing.assert_close(b.moe.router.expert_bias - before[layer], rate * torch.sign(c[layer].mean() - c[layer]))
        mean = c[layer].mean()
        assert out['max_vio'][layer].item() == pytest.approx(((c[layer].max() - mean) / mean).item())


def test_proportional_update_moves_each_bias_by_its_relative_load_error():
    """balance_update='proportional': b_i += rate * (mean - load_i) / mean, so an expert 25% over its share
    moves a quarter as far as the sign rule would move it, and one at the mean stays put."""
    m = make_model(balance_rate=0.01, balance_update='proportional')
    counts = torch.tensor([[8, 0, 4, 4], [5, 3, 4, 4]])   # means 4 and 4
    for b, c in zip(m.blocks, counts):
        b.moe.router.expert_counts.copy_(c)
    before = [b.moe.router.expert_bias.clone() for b in m.blocks]
    out = m.update_router_bias()
    for b, was, step in zip(m.blocks, before, ([-1.0, 1.0, 0.0, 0.0], [-0.25, 0.25, 0.0, 0.0])):
        torch.testing.assert_close(b.moe.router.expert_bias - was, 0.01 * torch.tensor(step))
    torch.testing.assert_close(out['max_vio'], torch.tensor([1.0, 0.25]))
    assert m.expert_counts().sum() == 0


def test_balancing_buffers_are_state_not_parameters():
    m = make_model()
    names = dict(m.named_parameters())
    sd = m.state_dict()
    for i in range(m.config.n_layer):
        for buf in ('expert_bias', 'expert_load'):
            key = f'blocks.{i}.moe.router.{buf}'
            assert key in sd and key not in names
        assert f'blocks.{i}.moe.router.expert_counts' not in sd
        with torch.no_grad():
            m.blocks[i].moe.router.expert_bias.copy_(torch.randn(4) * 0.1)
            m.blocks[i].moe.router.expert_load.copy_(torch.rand(4))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = DeepSeekLM(m.config).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(m.blocks, fresh.blocks):
        assert torch.equal(a.moe.router.expert_bias, b.moe.router.expert_bias)
        assert torch.equal(a.moe.router.expert_load, b.moe.router.expert_load)
    idx = tokens((2, 10), 9)
    torch.testing.assert_close(fresh(idx)[0], m(idx)[0], atol=0, rtol=0)
    _, loss = m(idx, idx)
    loss.backward()
    assert all(b.moe.router.expert_bias.grad is None for b in m.blocks)


def test_router_jitter_only_in_training_and_only_on_router_input():
    moe = make_moe(router_jitter=0.3)
    torch.manual_seed(4)
    x = torch.randn(1, 16, 64)
    y_eval = moe(x)
    torch.testing.assert_close(moe(x), y_eval, atol=0, rtol=0)           # eval is deterministic
    torch.testing.assert_close(y_eval[0], moe_ref(moe, x)[0], atol=ATOL, rtol=ATOL)
    moe.train()
    torch.manual_seed(5)
    y1 = moe(x)
    torch.manual_seed(5)
    noise = torch.empty(16, 64).uniform_(0.7, 1.3)     # the first random draw of a training forward
    torch.testing.assert_close(y1[0], moe_ref(moe, x, router_input=centered_ref(x)[0] * noise)[0], atol=ATOL, rtol=ATOL)
    assert (moe(x) - y1).abs().amax() > 1e-4           # a fresh draw each step
    assert (y1 - y_eval).abs().amax() > 1e-4
    moe.router.jitter = 0.0
    torch.testing.assert_close(moe(x), y_eval, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
def test_sequence_balance_loss_matches_its_definition_with_grads(score):
    """DeepSeek-V3's sequence-wise loss, written out sequence by sequence: weight * mean over sequences of
    sum_i f_i * P_i, f_i = n_expert / (k T) * expert i's picks in the sequence, P_i = its mean score
    normalised over the experts. Its gradient reaches the router through P alone (the picks are counts)."""
    moe = make_moe(router_score=score, seq_balance_loss=0.3).train()
    torch.manual_seed(12)
    x = torch.randn(3, 10, 64)
    _, expert, _ = moe.router(x)
    got = moe.router.seq_loss
    B, T, E, k = 3, 10, moe.n_expert, moe.k
    w = moe.router.weight.detach().clone().requires_grad_(True)
    per_sequence = []
    for b in range(B):
        s = centered_ref(x)[b] @ w.T
        s = s.softmax(-1) if score == 'softmax' else s.sigmoid()
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        picks = expert.view(B, T * k)[b].tolist()
        f = torch.tensor([E / (k * T) * picks.count(i) for i in range(E)])
        per_sequence.append((f * P).sum())
    want = 0.3 * torch.stack(per_sequence).mean()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(torch.autograd.grad(got, moe.router.weight)[0], torch.autograd.grad(want, w)[0],
                               atol=ATOL, rtol=ATOL)


def test_sequence_balance_loss_only_in_training_and_summed_over_layers_once():
    """A training forward leaves each router's term; the model's sum takes them all and forgets them. Eval,
    no-grad forwards and the default weight 0 leave none, so scoring and the card's model never see it."""
    m = make_model(seq_balance_loss=0.1).train()
    idx = tokens((2, 10), 13)
    m(idx, idx)
    terms = [b.moe.router.seq_loss for b in m.blocks]
    assert all(t is not None and t.requires_grad for t in terms)
    torch.testing.assert_close(m.sequence_balance_loss(), terms[0] + terms[1], atol=0, rtol=0)
    assert m.sequence_balance_loss() == 0
    with torch.no_grad():
        m(idx, idx)
    m.eval()
    m(idx, idx)
    assert m.sequence_balance_loss() == 0
    plain = make_model().train()
    plain(idx, idx)
    assert plain.sequence_balance_loss() == 0


def test_sequence_balance_loss_spreads_each_sequence_over_the_experts():
    """Sequences that each lean towards their own experts (a plain router, a shift shared by all of a
    sequence's tokens): gradient steps on the loss alone spread every sequence's picks, which one global
    bias per expert cannot do."""
    moe = make_moe(router_center=False, seq_balance_loss=0.5).train()
    torch.manual_seed(14)
    x = 0.3 * torch.randn(4, 32, 64) + torch.randn(4, 1, 64)
    opt = torch.optim.Adam([moe.router.weight], lr=5e-3)

    def per_sequence_max_vio():
        _, expert, _ = moe.router(x)
        picks = torch.zeros(4, moe.n_expert).scatter_add_(1, expert.view(4, -1), torch.ones(4, 64))
        return max_violation(picks).mean().item()
    before = per_sequence_max_vio()
    for _ in range(100):
        moe.router(x)
        opt.zero_grad()
        moe.router.seq_loss.backward()
        opt.step()
    assert per_sequence_max_vio() < 0.25 * before


# ----------------------------------------------------------------------------------------------
# 10. generation

@variants
def test_greedy_generation_cache_equals_full_forwards(variant):
    m = make_model(variant)
    idx = tokens((2, 5), 10)
    ref = greedy_ref(m, idx, 10)
    assert torch.equal(m.generate(idx, 10, temperature=0), ref)
    assert torch.equal(m.generate(idx, 10, temperature=0, use_cache=False), ref)
    assert len(set(ref[:, 5:].flatten().tolist())) > 2   # not a degenerate repeat of one token


@variants
def test_cached_decode_logits_equal_full_forward(variant):
    """Prefill, then one token at a time through the cache: each step's logits equal the full forward."""
    m = make_model(variant)
    for padded in (False, True):
        idx = tokens((2, 11), 11)
        mask = torch.ones_like(idx)
        if padded:
            mask[0, :3] = 0
        full, _ = m(idx, attention_mask=mask if padded else None)
        cache = m.new_cache(2)
        logits, _ = m(idx[:, :5], attention_mask=mask[:, :5] if padded else None, cache=cache)
        torch.testing.assert_close(logits[:, 3:], full[:, 3:5], atol=ATOL, rtol=ATOL)
        for t in range(5, 11):
            step, _ = m(idx[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=ATOL)


@variants
def test_cache_multi_token_chunk_is_causal(variant):
    """Several tokens fed at once to a filled cache (a prompt continued in chunks) attend causally among
    themselves: their logits equal the full forward's."""
    m = make_model(variant)
    idx = tokens((2, 10), 12)
    full, _ = m(idx)
    cache = m.new_cache(2)
    m(idx[:, :4], cache=cache)
    chunk, _ = m(idx[:, 4:7], cache=cache)
    torch.testing.assert_close(chunk, full[:, 4:7], atol=ATOL, rtol=ATOL)


@variants
def test_cache_rewind_decodes_again_from_the_prompt(variant):
    """mark() after the prompt, rewind() after a continuation: another continuation then sees the prompt
    alone (keys, positions and the routers' running means), as in a fresh cache."""
    m = make_model(variant)
    idx = tokens((2, 12), 19)
    full, _ = m(idx)
    cache = m.new_cache(2)
    m(idx[:, :5], cache=cache)
    prompt = cache.mark()
    for _ in range(2):   # the mark outlives a rewind: bench.py times many continuations from one prompt
        m(tokens((2, 4), 20), cache=cache)   # a continuation to forget
        cache.rewind(prompt)
        for t in range(5, 12):
            step, _ = m(idx[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=ATOL)
        cache.rewind(prompt)


@variants
@pytest.mark.parametrize('use_cache', [True, False])
def test_left_padded_batch_generation_matches_single_rows(variant, use_cache):
    m = make_model(variant)
    a, b = tokens((1, 3), 13), tokens((1, 7), 14)
    batch = torch.cat([torch.cat([torch.full((1, 4), 23), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    out = m.generate(batch, 10, temperature=0, attention_mask=mask, use_cache=use_cache)
    assert torch.equal(out[0, 7:], m.generate(a, 10, temperature=0)[0, 3:])
    assert torch.equal(out[1, 7:], m.generate(b, 10, temperature=0)[0, 7:])


@variants
def test_generation_past_block_size(variant):
    m = make_model(variant, block_size=8)
    idx = tokens((2, 5), 15)
    ref = greedy_ref(m, idx, 12)
    assert torch.equal(m.generate(idx, 12, temperature=0), ref)
    assert torch.equal(m.generate(idx, 12, temperature=0, use_cache=False), ref)
    # a left-padded batch crossing the window: each row as if alone
    a = tokens((1, 3), 16)
    batch = torch.cat([torch.cat([torch.full((1, 2), 31), a], 1), idx[:1]])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    out = m.generate(batch, 12, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 5:], greedy_ref(m, a, 12)[0, 3:])
    assert torch.equal(out[1], ref[0])
    # a prompt longer than block_size is cropped to its last block_size tokens
    long = tokens((1, 20), 17)
    assert torch.equal(m.generate(long, 3, temperature=0)[:, 20:], greedy_ref(m, long[:, -8:], 3)[:, 8:])


def test_sampling_seed_top_k_and_eos():
    m = make_model()
    idx = tokens((2, 4), 18)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(m.generate(idx, 12, temperature=1.0, top_k=50, top_p=0.95))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    greedy = m.generate(idx, 12, temperature=0)
    torch.manual_seed(3)
    assert torch.equal(m.generate(idx, 12, temperature=0.7, top_k=1), greedy)
    # eos: stop once every row has emitted it; finished rows keep emitting it
    one = greedy[:1]
    gen = one[0, 4:].tolist()
    step = next(i for i in range(2, 12) if gen[i] not in gen[:i])
    eos = gen[step]
    out = m.generate(idx[:1], 12, temperature=0, eos_token_id=eos)
    assert out.shape[1] == 4 + step + 1 and torch.equal(out, one[:, :4 + step + 1])
    out = m.generate(idx, 12, temperature=0, eos_token_id=eos)
    row1 = m.generate(idx[1:], 12, temperature=0, eos_token_id=eos)
    assert out.shape[1] == max(4 + step + 1, row1.shape[1])
    assert (out[0, 4 + step:] == eos).all()
    assert torch.equal(out[1, :row1.shape[1]], row1[0]) and (out[1, row1.shape[1]:] == eos).all()


def test_sample_next_token_filters():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(400, 4)
    assert (sample_next_token(logits, temperature=0) == 0).all()
    for kw in (dict(top_k=2), dict(top_p=0.7)):      # both keep exactly {0, 1}
        got = set(sample_next_token(logits, **kw).tolist())
        assert got == {0, 1}, kw
    assert set(sample_next_token(logits).tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------------
# 11. Multi-head Latent Attention

@pytest.mark.parametrize('n_latent', [0, 4])
@pytest.mark.parametrize('q_lora_rank', [0, 16])
def test_mla_absorbed_equals_naive(n_latent, q_lora_rank):
    m = make_model('mla', n_latent=n_latent, q_lora_rank=q_lora_rank)
    attn, c = m.blocks[0].attn, m.config
    torch.manual_seed(6)
    B, H = 2, c.n_head
    for T, S, causal in [(5, n_latent + 5, True), (1, n_latent + 9, False), (4, n_latent + 9, False)]:
        q_nope, q_rope = torch.randn(B, T, H, c.qk_nope_head_dim), torch.randn(B, T, H, c.qk_rope_head_dim)
        c_kv, k_rope = torch.randn(B, S, c.kv_lora_rank), torch.randn(B, S, c.qk_rope_head_dim)
        mask = None
        if T > 1 and not causal:   # an explicit mask with some hidden keys
            mask = torch.rand(B, 1, T, S, generator=torch.Generator().manual_seed(T)) > 0.3
            mask[..., -1] = True
        explicit = mask
        if causal:   # the absorbed path takes masks only: keys are [S - T latents; the T query tokens]
            explicit = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(B, 1, T, S)
        with torch.no_grad():
            naive = attn.attend_naive(q_nope, q_rope, c_kv, k_rope, mask, causal)
            absorbed = attn.attend_absorbed(q_nope, q_rope, c_kv, k_rope, explicit)
        torch.testing.assert_close(absorbed, naive, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('q_lora_rank', [0, 384])
def test_mla_sizes_on_meta(q_lora_rank):
    with torch.device('meta'):
        m = DeepSeekLM(ModelConfig(attention='mla', q_lora_rank=q_lora_rank))
    c = m.config
    d, H, nope, rope, v, rank, L = 768, 12, 64, 32, 64, 128, 8      # derived from head_dim 64
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank) == (nope, rope, v, rank)
    q = d * H * (nope + rope) if not q_lora_rank else d * q_lora_rank + q_lora_rank + q_lora_rank * H * (nope + rope)
    attn = q + d * (rank + rope) + rank + rank * H * (nope + v) + H * v * d + L * d
    expert = 768 * 2048 * 2
    per_layer = attn + 2 * d + d * 8
    assert m.num_params() == 49152 * d + 24 * (per_layer + 8 * expert) + d
    assert m.num_params(active=True) == 49152 * d + 24 * (per_layer + 2 * expert) + d
    assert card_params(c, mla=True) == (m.num_params(), m.num_params(active=True))
    assert m.kv_cache_numel_per_token() == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) == 24 * 160


# ----------------------------------------------------------------------------------------------
# 12. torch.compile and bf16 autocast

def test_compile_fullgraph_forward_backward_matches_eager():
    """torch.compile(fullgraph=True) captures the whole model, the custom grouped matmul and the loss's autograd
    Function included, with no graph break, and its forward and backward match eager. The graph runs through
    AOT autograd on the eager backend: what train.py's compile relies on from this repo, without the minutes of
    C++ code generation that inductor's own lowering (torch's to test) would take on a CPU."""
    import torch._dynamo
    m = make_model('latent', n_layer=1)
    m.train()
    idx, tgt = tokens((2, 16), 19), tokens((2, 16), 20)
    _, loss = m(idx, tgt)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        cm = torch.compile(m, fullgraph=True, backend='aot_eager')
        _, closs = cm(idx, tgt)
        closs.backward()
        assert not torch._dynamo.utils.counters['graph_break']
    finally:
        torch._dynamo.reset()
    assert abs(closs.item() - loss.item()) <= 1e-4
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize('recompute', [False, True])
def test_sequence_balance_loss_survives_compiled_blocks(recompute):
    """train.py compiles each block with fullgraph=True; the router hands its balance term over in an attribute
    set inside the compiled graph: no graph break, and the same term and router gradient as eager. With
    activation checkpointing too, where the compiled block runs again in backward and must save the same."""
    import torch._dynamo
    idx = tokens((2, 16), 3)
    results = []
    for compiled in (False, True):
        m = make_model(seq_balance_loss=0.3).train()
        m.activation_checkpointing = recompute
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        try:
            if compiled:
                for block in m.blocks:
                    block.compile(fullgraph=True, backend='aot_eager')
            _, loss = m(idx, idx)
            balance = m.sequence_balance_loss()
            (loss + balance).backward()
            assert not torch._dynamo.utils.counters['graph_break']
        finally:
            torch._dynamo.reset()
        results.append((balance.detach(), m.blocks[0].moe.router.weight.grad))
    assert results[1][0] > 0
    torch.testing.assert_close(results[1], results[0], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float64])
def test_model_cast_to_another_dtype_trains_and_generates(dtype):
    """model.to(dtype): the balancing counts stay exact integers, forward, backward and generation run."""
    m = make_model('latent').to(dtype)
    m.train()
    idx, tgt = tokens((2, 16), 23), tokens((2, 16), 24)
    _, loss = m(idx, tgt)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.expert_counts().dtype == torch.long and m.expert_counts().sum(1).tolist() == [64, 64]
    m.update_router_bias()
    m.eval()
    out = m.generate(idx[:, :4], 5, temperature=0)
    assert out.shape == (2, 9)


@pytest.mark.parametrize('variant', ['latent', 'mla'])
def test_bf16_autocast_forward_backward(variant):
    m = make_model(variant)
    m.train()
    idx, tgt = tokens((2, 16), 21), tokens((2, 16), 22)
    _, loss32 = m(idx, tgt)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss16 = m(idx, tgt)
    loss16.backward()
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.blocks[0].moe.w1.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# 13. Muon

def test_muon_matches_torch_muon_on_matrices_and_runs_each_expert_on_its_own():
    from optim import Muon, orthogonalize
    torch.manual_seed(10)
    g = torch.randn(3, 16, 40)
    o = orthogonalize(g, 5)
    for e in range(3):   # a stack is each matrix on its own
        torch.testing.assert_close(o[e], orthogonalize(g[e], 5), atol=0, rtol=0)
    s = torch.linalg.svdvals(o.float())
    assert 0.5 < s.min() and s.max() < 1.5   # the iteration's band of singular values, not 0 or 1 exactly
    # two steps of ours against torch.optim.Muon with the same update-size rule
    w2d, w3d = torch.randn(24, 10), torch.randn(2, 24, 10)
    ours = [w2d.clone().requires_grad_(), w3d.clone().requires_grad_()]
    ref = [w2d.clone().requires_grad_()] + [w3d[e].clone().requires_grad_() for e in range(2)]
    opt = Muon(ours, lr=0.01, weight_decay=0.1)
    opt_ref = torch.optim.Muon(ref, lr=0.01, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    for step in range(2):
        grads = [torch.randn(24, 10), torch.randn(2, 24, 10)]
        ours[0].grad, ours[1].grad = grads
        ref[0].grad, ref[1].grad, ref[2].grad = grads[0], grads[1][0], grads[1][1]
        opt.step()
        opt_ref.step()
    # torch's Muon iterates in bf16, ours in fp32 on a CPU: they agree to bf16's rounding, far below the
    # difference a wrong update size would make (the steps move the weights by about 1e-2)
    torch.testing.assert_close(ours[0], ref[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours[1], torch.stack(ref[1:]), atol=2e-3, rtol=2e-3)
    assert (ours[0] - w2d).abs().max() > 1e-3


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    m = make_model('latent', n_shared_expert=1)
    adamw, muon = configure_optimizers(m, 0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='muon')
    names = {id(p): n for n, p in m.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g['params']}
    assert on_muon == {n for n, p in m.named_parameters()
                       if n.startswith('blocks.') and p.dim() >= 2 and 'router' not in n and 'latent' not in n}
    assert 'blocks.0.moe.w1' in on_muon and 'blocks.0.attn.wq.weight' in on_muon
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g['params']}
    assert on_adamw == set(names.values()) - on_muon and 'wte.weight' in on_adamw
    decayed = {names[id(p)] for p in adamw.param_groups[0]['params']}
    assert decayed == {'wte.weight', 'blocks.0.moe.router.weight', 'blocks.1.moe.router.weight'}
    assert len(configure_optimizers(m, 0.1, 1e-3, (0.9, 0.95), 'cpu')) == 1


# ----------------------------------------------------------------------------------------------
# 14. FLOPs

@pytest.mark.parametrize('variant', ['latent', 'mla'])
def test_flops_per_token(variant):
    m = DeepSeekLM(tiny_cfg(**VARIANTS[variant]))
    c = m.config
    total, active = card_params(c, mla=variant == 'mla')
    assert (m.num_params(), m.num_params(active=True)) == (total, active)
    T = 32
    if variant == 'mla':   # q.k over nope + rope = 24, p.v over v = 16
        width = (16 + 8) + 16
    else:
        width = 16 + 16
    # per layer and head, a query meets n_latent + (T+1)/2 keys on average, 2 FLOPs per multiply-add,
    # forward + backward = 3x
    attn = 3 * 2 * c.n_layer * c.n_head * width * (c.n_latent + (T + 1) / 2)
    assert m.flops_per_token(T) == pytest.approx(6 * active + attn, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize('grouped', [True, False])
def test_activation_checkpointing_gives_the_same_gradients_and_counts(monkeypatch, grouped):
    """With activation checkpointing each block runs its forward again in backward. The recomputation must
    draw the same router jitter and expert dropout (checkpoint restores the RNG state) and must not count
    the routers' picks twice: loss, every gradient and the balancing counts are bit-identical to a run
    without it, on the grouped-matmul path and on the per-expert fallback of fp16 GPUs."""
    import kernel
    if not grouped:
        monkeypatch.setattr(kernel, 'has_grouped_mm_kernel', lambda a: False)
    m = make_model(expert_dropout=0.2, router_jitter=0.2).train()
    assert not m.activation_checkpointing   # off unless train.py turns it on
    idx, tgt = tokens((2, 16), 6), tokens((2, 16), 7)
    runs = []
    for on in (False, True):
        m.activation_checkpointing = on
        m.zero_grad()
        m.reset_expert_counts()
        torch.manual_seed(11)
        _, loss = m(idx, tgt)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in m.parameters()], m.expert_counts().clone()))
    (loss0, grads0, counts0), (loss1, grads1, counts1) = runs
    assert torch.equal(loss0, loss1) and torch.equal(counts0, counts1)
    assert counts0.sum() == 2 * 16 * m.config.n_expert_active * m.config.n_layer
    for (name, _), g0, g1 in zip(m.named_parameters(), grads0, grads1):
        assert torch.equal(g0, g1), name
