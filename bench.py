"""How close each part of the model runs to what this machine can do.

    python bench.py                # the table, on the device --device picks (auto: cuda > mps > cpu)
    python bench.py --json         # the same, plus one JSON object on the last line
    python bench.py --quick        # smoke run: small sizes, few repeats, no compilation (seconds)
    python bench.py --only=moe_vs_dense,cache_speedup
    python bench.py --profile       # where the mini config's train step spends its time, op by op

Every figure is a ratio of two things timed in the same process, interleaved (A B A B ...), after
warm-up, as the median of repeats: load from other processes slows both sides alike, so the ratio
holds on a shared, noisy machine where absolute times would not. Rows (JSON keys), goal in brackets:

    train_vs_mm            compiled train step (forward, backward, grad clip, AdamW, router-bias update)
                           of config/deepseek_mini.py in model FLOP/s, over the FLOP/s of a plain
                           torch.mm of the same dtype                                          [>= 0.70]
    step_vs_gemm_floor     the eager train step of config/deepseek_mini.py over its own matrix
                           multiplications (same ops, shapes, dtypes) timed alone             [>= 0.80]
    moe_vs_dense           the MoE layer at the reference sizes (768 -> 2048, 8 experts top-2; router,
                           dispatch, experts, combine; forward + backward) over a dense FFN doing the
                           same useful FLOPs on N*k tokens                                     [>= 0.90]
    moe_step_vs_dense      the eager train step of config/deepseek_mini.py with one dense feed-forward as
                           wide as a token's k experts (the same FLOPs, no routing) over the MoE's; _card:
                           the same at the card's widths, 2 layers; _muon: both trained with the config's
                           Muon, whose cost grows with all the experts' weights                [>= 0.91]
    latent_attn_vs_causal  the card's latent-token attention layer at T=1024 over the same layer with
                           no latents and plain causal SDPA                                    [>= 0.95]
    cache_speedup          model.generate of 512 tokens with the KV cache over full forwards   [>= 10]
    mla_decode_vs_latent   cached greedy decoding at the reference sizes after 1,000 tokens (_ctx16:
                           after 16), attention='mla' over the card's latent-token GQA, with tokens/s
    vs_transformers        our train step over transformers' MixtralForCausalLM at matched dims, both
                           in model FLOP/s (null without transformers); vs_deepseek_v3 likewise
                           against DeepseekV3ForCausalLM and our MLA variant                 [>= 1.3]
    mfu                    CUDA only: config/deepseek.py train step (bf16, compiled) over the GPU's
                           peak FLOP/s (null on CPU)
    compile_speedup        seconds to the first compiled train step of a 24-layer model, the whole model
                           as one graph over each block compiled on its own (train.py's way), with both
                           times (compile_whole_s, compile_blocks_s)
    memory                 (counted, not timed) a config/deepseek.py step's memory (memory.py): weights,
                           gradients and AdamW state, the tensors saved for backward (bf16) with and
                           without activation checkpointing, and the largest batch per common GPU
Keys ending in _eager are the same pairs without torch.compile."""

import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

import cli
import devices
import memory
from model import DeepSeekLM, LatentTokenAttention, ModelConfig, MoE, apply_rope, attend, rope_tables
from optim import configure_optimizers

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_KEYS = [f.name for f in dataclasses.fields(ModelConfig)]

GOALS = {'train_vs_mm': 0.70, 'step_vs_gemm_floor': 0.80, 'moe_vs_dense': 0.90, 'moe_step_vs_dense': 0.91,
         'latent_attn_vs_causal': 0.95, 'cache_speedup': 10.0,
         'vs_transformers': 1.3, 'vs_deepseek_v3': 1.3}


# --- timing ---

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timeit_pair(fa, fb, device, repeats, warmup=2):
    """Median seconds of fa() and of fb(), timed alternately (A B A B ...) after `warmup` calls of each:
    other processes' load and clock changes then hit both sides alike."""
    for _ in range(warmup):
        fa(), fb()
    times = ([], [])
    for _ in range(repeats):
        for f, t in zip((fa, fb), times):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            t.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


# --- setup shared by the rows ---

def load_config(name, **overrides):
    """The model keys and batch_size of config/<name> over ModelConfig's defaults, overrides on top."""
    file = cli.read_config_file(os.path.join(ROOT, 'config', name))
    cfg = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    cfg.update({k: v for k, v in file.items() if k in cfg or k in ('batch_size', 'block_size')})
    return {**cfg, **overrides}


def model_config(cfg):
    return ModelConfig(**{k: cfg[k] for k in MODEL_KEYS})


def autocast_for(device):
    """(dtype, autocast context) of train.py's dtype='auto' on this device."""
    run = devices.plan(str(device))
    return run.dtype, run.autocast()


def matmul(n, dtype, device):
    """An n x n x n torch.mm and its FLOPs: 'what the machine can do', measured next to each step."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def fwd_bwd(f, ctx, tensors):
    """f() under autocast, then backward from a loss on its output; gradients of `tensors` are dropped
    afterwards, as train.py's zero_grad(set_to_none=True) does, so no call pays for accumulating."""
    def run():
        with ctx:
            y = f()
        y.float().square().mean().backward()
        for t in tensors:
            t.grad = None
    return run


def train_step(model, loss_of, device, after=lambda: None, optimizer='adamw'):
    """One training step as train.py's loop takes it, on a fixed batch: loss_of(model) (the forward, under
    autocast), backward, grad clip, the optimizers' step (optim.py: fused AdamW over all parameters, or with
    'muon' Muon for the blocks' matrices), zero_grad, then after() (our model's router-bias update)."""
    params = list(model.parameters())
    opts = configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device.type, optimizer)

    def step():
        loss_of(model).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        after()
    return step


def compile_blocks(model):
    """torch.compile each block in place, as train.py does: one compiled graph serves every layer."""
    for block in model.blocks:
        block.compile(fullgraph=True)


_steps = {}


def our_train_step(cfg, device, compiled, optimizer='adamw'):
    """(step function, model FLOPs per step) of DeepSeekLM at cfg, trained as train.py trains it (AdamW,
    train.py's default, or optimizer) on a fixed batch. Memoised: several rows time the same compiled model
    and compilation is the slow part."""
    mconf = model_config(cfg)
    key = (repr(mconf), cfg['batch_size'], compiled, optimizer)
    if key not in _steps:
        torch.manual_seed(0)
        model = DeepSeekLM(mconf).to(device).train()
        devices.plan(str(device)).apply(model)   # the attention as train.py runs it on this GPU
        B, T = cfg['batch_size'], cfg['block_size']
        x = torch.randint(cfg['vocab_size'], (B, T + 1), device=device)
        _, ctx = autocast_for(device)
        if compiled:
            compile_blocks(model)

        def loss_of(m):
            with ctx:
                loss = m(x[:, :-1], x[:, 1:])[1]
            return loss + m.sequence_balance_loss()
        _steps[key] = (train_step(model, loss_of, device, model.update_router_bias, optimizer),
                       model.flops_per_token(T) * B * T)
    return _steps[key]


def vs_mm(step, step_flops, device, args):
    """(model FLOP/s of step over torch.mm FLOP/s, step FLOP/s, mm FLOP/s), the two timed interleaved."""
    dtype, _ = autocast_for(device)
    mm, mm_flops = matmul(args.mm_size, dtype, device)
    t_mm, t_step = timeit_pair(mm, step, device, args.repeats)
    return (step_flops / t_step) / (mm_flops / t_mm), step_flops / t_step, mm_flops / t_mm


# --- rows: each adds its keys to `out` ---

def row_train_vs_mm(args, device, out):
    cfg = load_config('deepseek_mini.py', **args.mini)
    for compiled, key in ((True, 'train_vs_mm'), (False, 'train_vs_mm_eager')):
        if compiled and not args.compile:
            out[key] = None
            continue
        out[key], step_flops, mm_flops = vs_mm(*our_train_step(cfg, device, compiled), device, args)
        out[key + '_gflops'] = step_flops / 1e9   # context, not a ratio: it moves with the machine's load
        out['mm_gflops'] = mm_flops / 1e9


GEMMS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::_grouped_mm')


def gemm_floor(step, device):
    """A function that runs, alone and back to back, the matrix multiplications one call of step() makes:
    the same ops at the same shapes on fresh random data (grouped matmuls with even groups).
    Recorded by torch's profiler; a GEMM inside another (a grouped matmul's own) counts once."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls = []
    for e in prof.events():
        parent, nested = e.cpu_parent, False
        while parent is not None and not nested:
            nested, parent = parent.name in GEMMS, parent.cpu_parent
        if e.name in GEMMS and not nested:
            calls.append((e.name, [s for s in e.input_shapes if s]))
    dtype, _ = autocast_for(device)   # every matmul of the step runs in the autocast dtype
    work = []
    for name, shapes in calls:
        if name == 'aten::_grouped_mm':
            a, b = (torch.randn(s, device=device, dtype=dtype) for s in shapes[:2])
            groups = shapes[2][0]
            rows = a.size(0) if b.dim() == 3 else a.size(1)
            offs = torch.linspace(rows / groups, rows, groups, device=device).round().to(torch.int32)
            work.append(lambda a=a, b=b, offs=offs: torch._grouped_mm(a, b, offs=offs))
        else:
            ts = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
            op = getattr(torch, name.split('::')[1])
            work.append(lambda op=op, ts=ts: op(*ts))

    def run():
        for w in work:
            w()
    return run, len(calls)


def row_step_vs_gemm_floor(args, device, out):
    """The eager train step of config/deepseek_mini.py over its own matrix multiplications timed alone:
    1.0 would mean everything else (attention, norms, routing, the optimizer, Python) is free. The
    big-matmul ratio (train_vs_mm) says little at 128 wide, where every matmul is thin."""
    cfg = load_config('deepseek_mini.py', **args.mini)
    step, _ = our_train_step(cfg, device, compiled=False)
    step()
    floor, n = gemm_floor(step, device)
    t_floor, t_step = timeit_pair(floor, step, device, args.repeats)
    out['step_vs_gemm_floor'], out['step_gemm_calls'] = t_floor / t_step, n


def row_moe_vs_dense(args, device, out):
    """The MoE layer exactly as the model runs it in training (router jitter, expert dropout, counters)
    against nn.Linear -> SiLU -> nn.Linear of the same sizes on N*k tokens: the expert FLOPs with no
    routing, dispatch or combine at all."""
    cfg = ModelConfig(n_embd=768, expert_hidden=2048, n_expert=8, n_expert_active=2)
    N, D, H = args.moe_tokens, cfg.n_embd, cfg.expert_hidden
    _, ctx = autocast_for(device)
    torch.manual_seed(0)
    moe = MoE(cfg, layer_idx=0).to(device).train()
    for p in moe.parameters():
        nn.init.normal_(p, std=0.02)   # MoE leaves its weights to DeepSeekLM.reset_parameters
    dense = nn.Sequential(nn.Linear(D, H, bias=False), nn.SiLU(), nn.Linear(H, D, bias=False)).to(device)
    x_moe = torch.randn(1, N, D, device=device, requires_grad=True)
    x_dense = torch.randn(N * cfg.n_expert_active, D, device=device, requires_grad=True)
    t_moe, t_dense = timeit_pair(fwd_bwd(lambda: moe(x_moe), ctx, [x_moe, *moe.parameters()]),
                                 fwd_bwd(lambda: dense(x_dense), ctx, [x_dense, *dense.parameters()]),
                                 device, args.repeats)
    out['moe_vs_dense'] = t_dense / t_moe


def row_moe_step_vs_dense(args, device, out):
    """The eager train step of config/deepseek_mini.py against the same step with one dense feed-forward
    of the width a token uses (n_expert=1 of hidden n_expert_active * expert_hidden: no router, sort or
    gather; the same FLOPs per token): what routing costs per step. _muon: both with the config's own
    optimizer, whose Newton-Schulz steps cost in proportion to all the experts' weights, not the active ones.
    _card: the card's widths (768 wide, experts of 2048, 12/4 heads of 64) in 2 layers at the mini config's
    vocabulary and tokens per step."""
    card = dict(n_layer=2, n_embd=768, n_head=12, n_kv_head=4, head_dim=64, expert_hidden=2048)
    for key, sizes, optimizer in (('moe_step_vs_dense', {}, 'adamw'), ('moe_step_vs_dense_muon', {}, 'muon'),
                                  ('moe_step_vs_dense_card', card, 'adamw')):
        cfg = load_config('deepseek_mini.py', **sizes, **args.mini)
        dense = {**cfg, 'n_expert': 1, 'n_expert_active': 1,
                 'expert_hidden': cfg['n_expert_active'] * cfg['expert_hidden']}
        t_moe, t_dense = timeit_pair(our_train_step(cfg, device, False, optimizer)[0],
                                     our_train_step(dense, device, False, optimizer)[0], device, args.repeats)
        out[key] = t_dense / t_moe


def row_latent_attn_vs_causal(args, device, out):
    """The card's LatentTokenAttention (projections, RoPE, latent keys and values, SDPA, output) against
    the same layer and weights with no latents and plain causal SDPA: what the latents cost."""
    cfg = ModelConfig()   # the reference: 12 query / 4 key-value heads of 64, 8 latents
    B, T = 2, args.attn_T
    _, ctx = autocast_for(device)
    torch.manual_seed(0)
    attn = LatentTokenAttention(cfg, layer_idx=0).to(device)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.02)
    cos, sin = (t.view(1, T, 1, -1).to(device) for t in rope_tables(cfg.head_dim, T, cfg.rope_theta))
    x = torch.randn(B, T, cfg.n_embd, device=device, requires_grad=True)

    def plain_causal():
        q = apply_rope(attn.wq(x).view(B, T, attn.n_head, attn.head_dim), cos, sin)
        k = apply_rope(attn.wk(x).view(B, T, attn.n_kv_head, attn.head_dim), cos, sin)
        v = attn.wv(x).view(B, T, attn.n_kv_head, attn.head_dim)
        return attn.wo(attend(q, k, v, None, is_causal=True))   # no latents: attend's zero-query prefix is empty
    tensors = [x, *attn.parameters()]
    t_latent, t_plain = timeit_pair(fwd_bwd(lambda: attn(x, cos, sin, None, True), ctx, tensors),
                                    fwd_bwd(plain_causal, ctx, tensors), device, args.repeats)
    out['latent_attn_vs_causal'] = t_plain / t_latent


def row_cache_speedup(args, device, out):
    """model.generate of args.gen_tokens tokens after a 16-token prompt, greedy, mini-size model whose
    block_size holds it all (so the cached run never re-fills), with use_cache=True and =False."""
    prompt, n = 16, args.gen_tokens
    cfg = load_config('deepseek_mini.py', block_size=prompt + n)
    torch.manual_seed(0)
    model = DeepSeekLM(model_config(cfg)).to(device).eval()
    idx = torch.randint(cfg['vocab_size'], (1, prompt), device=device)
    _, ctx = autocast_for(device)

    def generate(use_cache, tokens):
        def run():
            with ctx:
                model.generate(idx, tokens, temperature=0, use_cache=use_cache)
        return run
    # warm up on a short run: the full no-cache generation is the longest single thing timed here
    generate(True, 8)(), generate(False, 8)()
    t_cache, t_full = timeit_pair(generate(True, n), generate(False, n), device, args.gen_repeats, warmup=0)
    out['cache_speedup'] = t_full / t_cache


def row_mla_decode_vs_latent(args, device, out):
    """Decoding speed of the two attention types at the reference sizes (--quick: the mini config's), batch 1,
    greedy, KV cache on (MLA decodes through its absorbed path): args.decode_tokens new tokens after a
    16-token prompt and after a 1,000-token one. The prompt is prefilled once, outside the timing; each
    timed run decodes from it and rewinds the cache. MLA over the card's latent-token GQA; each one's
    tokens/s at the long context is context: it moves with load."""
    base = model_config(load_config('deepseek_mini.py')) if args.quick else ModelConfig()
    _, ctx = autocast_for(device)
    n = args.decode_tokens
    models = {}
    for kind in ('latent', 'mla'):
        torch.manual_seed(0)
        models[kind] = DeepSeekLM(dataclasses.replace(base, attention=kind)).to(device).eval()

    def decoder(model, prompt):
        cache = model.new_cache(1)
        with torch.no_grad(), ctx:
            logits, _ = model(prompt, cache=cache)
        prefilled = cache.mark()

        def run():
            with torch.no_grad(), ctx:
                token = logits[:, -1:].argmax(-1)
                for _ in range(n):
                    token = model(token, cache=cache)[0][:, -1:].argmax(-1)
            cache.rewind(prefilled)
        return run
    for T, suffix in ((min(1000, base.block_size - n), ''), (16, '_ctx16')):
        prompt = torch.randint(base.vocab_size, (1, T), device=device)
        t_latent, t_mla = timeit_pair(decoder(models['latent'], prompt), decoder(models['mla'], prompt), device,
                                      args.gen_repeats, warmup=1)
        out['mla_decode_vs_latent' + suffix] = t_latent / t_mla
        if not suffix:
            out['latent_decode_tok_s'], out['mla_decode_tok_s'] = n / t_latent, n / t_mla


def hf_model(name, cfg):
    """transformers' model at the dims of cfg, randomly initialised from a config object (no download),
    and the ModelConfig overrides that make our model its match. Their experts are SwiGLU (3 matrices
    to our 2), so their expert width is 2/3 of ours, rounded to 8: the same FLOPs per token."""
    import transformers
    width = round(cfg['expert_hidden'] * 2 / 3 / 8) * 8
    common = dict(vocab_size=cfg['vocab_size'], hidden_size=cfg['n_embd'], num_hidden_layers=cfg['n_layer'],
                  num_attention_heads=cfg['n_head'], max_position_embeddings=cfg['block_size'],
                  rms_norm_eps=cfg['norm_eps'], tie_word_embeddings=True, num_experts_per_tok=cfg['n_expert_active'])
    if name == 'mixtral':
        conf = transformers.MixtralConfig(**common, num_key_value_heads=cfg['n_kv_head'], head_dim=cfg['head_dim'],
                                          intermediate_size=width, num_local_experts=cfg['n_expert'])
        return transformers.MixtralForCausalLM(conf), {}
    # DeepSeek-V3: MLA (no query compression), sigmoid router, one shared expert, every layer MoE
    hd = cfg['head_dim']
    conf = transformers.DeepseekV3Config(**common, num_key_value_heads=cfg['n_head'], q_lora_rank=None,
                                         kv_lora_rank=2 * hd, qk_nope_head_dim=hd, qk_rope_head_dim=hd // 2,
                                         v_head_dim=hd, n_routed_experts=cfg['n_expert'], n_shared_experts=1,
                                         moe_intermediate_size=width, first_k_dense_replace=0, n_group=1,
                                         topk_group=1, routed_scaling_factor=1.0)
    return transformers.DeepseekV3ForCausalLM(conf), {'attention': 'mla', 'n_shared_expert': 1,
                                                      'router_score': 'sigmoid'}


def hf_flops_per_token(model, seq_len):
    """Counted as DeepSeekLM.flops_per_token counts ours: 6 per active weight (routed experts at k/E, an
    untied input embedding is a free lookup) plus causal attention over (T+1)/2 keys on average."""
    c = model.config
    E, k = getattr(c, 'num_local_experts', None) or c.n_routed_experts, c.num_experts_per_tok
    n = 0
    for name, p in model.named_parameters():
        if 'embed_tokens' in name and not c.tie_word_embeddings:
            continue
        n += p.numel() * (k / E if '.experts.' in name else 1)
    if hasattr(c, 'kv_lora_rank'):
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    else:
        qk = v = c.head_dim
    return 6 * n + 6 * c.num_hidden_layers * c.num_attention_heads * (qk + v) * (seq_len + 1) / 2


def row_vs_transformers(args, device, out):
    """Our train step over transformers' at matched dims, in model FLOP/s each (counted the same way),
    compiled and eager. null when transformers is not installed (an optional dev dependency)."""
    try:
        import transformers
    except ImportError:
        out['vs_transformers'] = out['vs_transformers_eager'] = None
        return
    cfg = load_config('deepseek_mini.py', **args.mini)
    B, T = cfg['batch_size'], cfg['block_size']
    _, ctx = autocast_for(device)
    x = torch.randint(cfg['vocab_size'], (B, T), device=device)

    def loss_of(m):
        with ctx:
            return m(input_ids=x, labels=x).loss   # they shift the labels inside
    names = ['mixtral'] + (['deepseek_v3'] if hasattr(transformers, 'DeepseekV3ForCausalLM') else [])
    for name in names:
        torch.manual_seed(0)
        hf, ours = hf_model(name, cfg)
        hf = hf.to(device).train()
        hf_flops = hf_flops_per_token(hf, T) * B * T
        key = 'vs_transformers' if name == 'mixtral' else f'vs_{name}'
        for compiled, suffix in ((True, ''), (False, '_eager')):
            if compiled and not args.compile:
                out[key + suffix] = None
                continue
            step_ours, flops_ours = our_train_step({**cfg, **ours}, device, compiled)
            step_hf = train_step(torch.compile(hf) if compiled else hf, loss_of, device)
            t_ours, t_hf = timeit_pair(step_ours, step_hf, device, args.repeats)
            out[key + suffix] = (flops_ours / t_ours) / (hf_flops / t_hf)


def row_mfu(args, device, out):
    """CUDA only: a config/deepseek.py train step (bf16 autocast, compiled) over the GPU's peak FLOP/s,
    and over the bf16 torch.mm timed next to it (deepseek_vs_mm)."""
    peak = devices.plan(str(device)).peak_flops
    if device.type != 'cuda' or not args.compile:
        out['mfu'] = None
        return
    cfg = load_config('deepseek.py')
    out['deepseek_vs_mm'], step_flops, mm_flops = vs_mm(*our_train_step(cfg, device, compiled=True), device, args)
    out['mfu'] = step_flops / peak if peak else None   # None: a GPU missing from devices.PEAK_FLOPS
    out['mm_mfu'] = mm_flops / peak if peak else None


def row_compile_speedup(args, device, out):
    """Seconds from nothing to the first compiled train step (forward + backward) of a 24-layer model:
    the whole model compiled as one graph, against each block on its own (train.py's way, one compiled
    block serving all 24), and their ratio. The mini config's widths: compile time follows the size of
    the graph, not the width of its tensors. Inductor's caches are off, so both compile from scratch."""
    if not args.compile:
        out['compile_whole_s'] = out['compile_blocks_s'] = out['compile_speedup'] = None
        return
    import torch._dynamo
    import torch._inductor.config
    cfg = load_config('deepseek_mini.py', n_layer=24, **args.mini)
    B, T = cfg['batch_size'], cfg['block_size']
    _, ctx = autocast_for(device)
    x = torch.randint(cfg['vocab_size'], (B, T + 1), device=device)
    seconds = {}
    with torch._inductor.config.patch(force_disable_caches=True):
        for way in ('whole', 'blocks'):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = DeepSeekLM(model_config(cfg)).to(device).train()
            if way == 'whole':
                model = torch.compile(model, fullgraph=True)
            else:
                compile_blocks(model)
            sync(device)
            t0 = time.perf_counter()
            with ctx:
                loss = model(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            sync(device)
            seconds[way] = time.perf_counter() - t0
    torch._dynamo.reset()
    out['compile_whole_s'], out['compile_blocks_s'] = seconds['whole'], seconds['blocks']
    out['compile_speedup'] = seconds['whole'] / seconds['blocks']


GPUS = [('T4 16 GB', 14.6, 'float16'), ('L4 24 GB', 22.0, 'bfloat16'), ('A100 40 GB', 39.4, 'bfloat16'),
        ('A100 80 GB', 79.1, 'bfloat16'), ('H100 80 GB', 79.1, 'bfloat16')]   # usable GiB, as CUDA reports them


def row_memory(args, device, out):
    """Memory of a config/deepseek.py step, counted rather than timed (memory.py): weights, gradients and
    AdamW state, the tensors saved for backward at the config's batch under bf16 autocast, with and
    without activation checkpointing; and for common GPUs the largest batch (x 1,024 tokens) that fits
    without checkpointing, with it, and sharded over two GPUs with FSDP. --quick: the mini config's."""
    cfg = load_config('deepseek_mini.py' if args.quick else 'deepseek.py')
    mconf, B = model_config(cfg), cfg['batch_size']
    for on in (False, True):
        est = memory.estimate(mconf, B, True, on)
        suffix = '_checkpointed' if on else ''
        out['state_gib'] = est['state'] / 2**30
        out[f'saved{suffix}_gib'], out[f'step{suffix}_gib'] = est['saved'] / 2**30, est['total'] / 2**30
    out['gpus'] = {name: {key: memory.largest_batch(mconf, gib * 2**30, True, on, shards,
                                                    expand_kv=dtype == 'float16')   # fp16: CC < 8.0, heads copied
                          for key, on, shards in (('no_checkpointing', False, 1), ('checkpointing', True, 1),
                                                  ('fsdp_2_gpus', True, 2))}
                   for name, gib, dtype in GPUS}


ROWS = [row_train_vs_mm, row_step_vs_gemm_floor, row_moe_vs_dense, row_moe_step_vs_dense, row_latent_attn_vs_causal,
        row_cache_speedup, row_mla_decode_vs_latent, row_vs_transformers, row_mfu, row_compile_speedup, row_memory]


# ----------------------------------------------------------------------------------------------

# the command line: python bench.py [--key=value ...]
DEFAULTS = dict(
    json=False,     # also print one JSON object on the last line
    quick=False,    # smoke run: small sizes, few repeats, no torch.compile
    device='auto',  # 'auto' = cuda > mps > cpu
    only='',        # comma-separated row names to run, e.g. moe_vs_dense
    profile=False,  # instead: where the time of config/deepseek_mini.py's eager train step goes, op by op
)


class Args:
    def __init__(self, cfg):
        self.__dict__.update(cfg)


def main(argv):
    args = Args(cli.parse_config(argv, DEFAULTS)[0])
    names = [r.__name__[len('row_'):] for r in ROWS]
    only = [s for s in args.only.split(',') if s]
    if args.only and not only:
        raise cli.UserError(f"--only={args.only!r} names no row: rows are {', '.join(names)}")
    if set(only) - set(names):
        raise cli.UserError(f"unknown rows {sorted(set(only) - set(names))}: rows are {', '.join(names)}")
    run = devices.plan(args.device)
    run.apply()   # as train.py: TF32, no cuDNN attention
    device = torch.device(run.device)
    cuda = device.type == 'cuda'

    # the spec's sizes on a full run; --quick keeps every code path but shrinks the work
    q = args.quick
    args.compile = not q
    args.repeats = 3 if q else 7
    args.mm_size = 256 if q else (8192 if cuda else 2048)
    args.mini = dict(batch_size=2, block_size=32) if q else {}   # overrides of config/deepseek_mini.py
    args.moe_tokens = 128 if q else 2048
    args.attn_T = 64 if q else 1024
    args.gen_tokens = 16 if q else 512
    args.gen_repeats = 1 if q else 3
    args.decode_tokens = 8 if q else 16

    # time the process as train.py runs it, with its allocator setting
    cli.keep_freed_memory()
    if args.profile:
        return profile_step(args, device)
    out = {'device': run.name if cuda else f'cpu, {torch.get_num_threads()} threads',
           'torch': torch.__version__, 'quick': q, 'load_avg': round(os.getloadavg()[0], 2)}
    if not cuda and out['load_avg'] > 0.5 * (os.cpu_count() or 1):
        # ratios survive steady load, but OpenMP threads that wait on descheduled siblings make many-small-op
        # code (the MoE, decoding) lose far more than one big torch.mm: expect lower ratios than on a quiet machine
        print(f"warning: load average {out['load_avg']} on {os.cpu_count()} cores before starting", file=sys.stderr)
    heartbeat = cli.Heartbeat(stream=sys.stderr)   # some rows compile or time for minutes on a CPU
    for row, name in zip(ROWS, names):
        if only and name not in only:
            continue
        t0 = time.time()
        heartbeat.beat(name)
        row(args, device, out)
        print(f"[{name}: {time.time() - t0:.0f} s]", file=sys.stderr, flush=True)
    heartbeat.close()
    print_table(out)
    if args.json:
        print(json.dumps(out))
    return out


def profile_step(args, device):
    """torch.profiler's table of the ops that take the time of 5 eager train steps (2 with --quick), by their own time."""
    from torch.profiler import ProfilerActivity, profile
    step, _ = our_train_step(load_config('deepseek_mini.py', **args.mini), device, compiled=False)
    warmup, steps = (1, 2) if args.quick else (3, 5)
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])) as prof:
        for _ in range(steps):
            step()
    sort = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


INFO_KEYS = ('device', 'torch', 'quick', 'load_avg')
UNITS = {'_gflops': 'GFLOP/s', '_tok_s': 'tokens/s', '_s': 'seconds', '_calls': 'matmuls per step', '_gib': 'GiB'}


def print_table(out):
    print(f"{'':26s} {'ratio':>8s}   goal")
    for key, value in out.items():
        if key in INFO_KEYS or isinstance(value, dict):
            continue
        shown = 'null' if value is None else f"{value:.3f}"
        goal = GOALS.get(key)
        unit = next((u for suffix, u in UNITS.items() if key.endswith(suffix)), '')
        if unit:   # context, not a ratio
            shown, goal = ('null' if value is None else f"{value:.1f}"), None
        verdict = '' if goal is None or value is None or out['quick'] else ('ok' if value >= goal else 'BELOW')
        print(f"{key:26s} {shown:>8s}   {'>= ' + format(goal, 'g') + '  ' + verdict if goal else unit}")
    if out.get('gpus'):
        print(f"largest batch (x 1,024 tokens) of config/{'deepseek_mini' if out['quick'] else 'deepseek'}.py per GPU: "
              "without / with activation checkpointing / with it and FSDP over 2 GPUs")
        for name, fits in out['gpus'].items():
            print(f"  {name:24s} {fits['no_checkpointing']:>4d} {fits['checkpointing']:>4d} {fits['fsdp_2_gpus']:>4d}")
    note = ', --quick: smoke sizes, not the real figures' if out['quick'] else ''
    print(f"({out['device']}, torch {out['torch']}, load average {out['load_avg']} at start{note})")


if __name__ == '__main__':
    warnings.filterwarnings('ignore', message='.*TF32.*')   # allow_tf32 is deprecated in new torch; train.py sets it too
    cli.call_main(main, sys.argv[1:])
