"""The device plan (devices.py) on every common GPU, faked on the CPU: torch.cuda's queries answer as
each GPU would, and every device index they are asked about is recorded. Nothing is allocated on a GPU.
For each GPU: the plan's choices and start-up lines, and that the card's command as the README words it
fits by memory.plan. Then what each choice rests on: the attention calls meet the kernel the plan names,
cuDNN attention is off, the fp16 head gradient does not overflow, FSDP gathers in the run's dtype, and a
rank under torchrun asks nothing of another rank's GPU."""

import types

import pytest
import torch
import torch.nn.functional as F

import devices
import kernel
import memory
from cli import UserError
from model import DeepSeekLM, ModelConfig

GiB = 2**30
# name, compute capability, total_memory as torch reports it (less than the label: the driver's share)
GPUS = {
    'T4': ('Tesla T4', (7, 5), 14.58 * GiB),
    'V100': ('Tesla V100-SXM2-16GB', (7, 0), 15.77 * GiB),
    'A100-40GB': ('NVIDIA A100-SXM4-40GB', (8, 0), 39.39 * GiB),
    'A100-80GB': ('NVIDIA A100-SXM4-80GB', (8, 0), 79.15 * GiB),
    'L4': ('NVIDIA L4', (8, 9), 22.03 * GiB),
    'H100': ('NVIDIA H100 80GB HBM3', (9, 0), 79.19 * GiB),
    'B200': ('NVIDIA B200', (10, 0), 178.35 * GiB),
}
CARD = ModelConfig()   # config/deepseek.py sets no model key: the card is ModelConfig's defaults
TINY = dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_latent=4, n_expert=4,
            n_expert_active=2, expert_hidden=64, block_size=32, expert_dropout=0.0, router_jitter=0.0)
REAL_SDPA = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def process_settings_put_back():
    """DevicePlan.apply sets process-wide flags (cuDNN attention off, TF32): as they were after each test."""
    was = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.enable_cudnn_sdp(was[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was[1:]


def fake_gpus(monkeypatch, gpu, count=1):
    """torch.cuda answers as `count` GPUs of kind `gpu`; returns the list of (what, device index) asked."""
    name, cc, total = GPUS[gpu]
    asked, current = [], [0]

    def index(d=None):
        d = current[0] if d is None else d
        return d if isinstance(d, int) else torch.device(d).index if torch.device(d).index is not None else current[0]

    def ask(what):
        def answer(d=None):
            asked.append((what, index(d)))
            props = types.SimpleNamespace(name=name, major=cc[0], minor=cc[1], total_memory=int(total))
            return {'props': props, 'cc': cc, 'name': name}[what]
        return answer

    def set_device(d):
        current[0] = index(d)
        asked.append(('set', current[0]))

    def current_device():
        asked.append(('current', current[0]))
        return current[0]
    for attr, fake in [('is_available', lambda: True), ('device_count', lambda: count), ('set_device', set_device),
                       ('current_device', current_device), ('get_device_properties', ask('props')),
                       ('get_device_capability', ask('cc')), ('get_device_name', ask('name')),
                       ('_check_bf16_tensor_supported', lambda d: True)]:   # a real T4 holds bf16 tensors
        monkeypatch.setattr(torch.cuda, attr, fake)
    return asked


# what each GPU gets: dtype, attention kernel, key/value heads copied, one grouped kernel for the experts,
# and activation checkpointing for `python train.py config/deepseek.py` (batch 8 x 1,024)
EXPECTED = {
    'T4': (torch.float16, 'memory-efficient', True, False, True),
    'V100': (torch.float16, 'memory-efficient', True, False, True),
    'A100-40GB': (torch.bfloat16, 'flash', False, False, False),
    'A100-80GB': (torch.bfloat16, 'flash', False, False, False),
    'L4': (torch.bfloat16, 'flash', False, False, True),
    'H100': (torch.bfloat16, 'flash', False, True, False),
    'B200': (torch.bfloat16, 'flash', False, True, False),
}


@pytest.mark.parametrize('gpu', list(GPUS))
def test_each_gpu_gets_a_plan_whose_card_command_fits(monkeypatch, gpu):
    asked = fake_gpus(monkeypatch, gpu)
    run = devices.plan()   # train.py's defaults: device, dtype and compile 'auto'
    dtype, kernel_name, expand, grouped, checkpointing = EXPECTED[gpu]
    assert (run.device, run.dtype, run.compile) == ('cuda:0', dtype, True)
    assert run.attention(CARD) == (kernel_name, expand)
    assert run.moe().startswith('one grouped matmul') == grouped
    assert run.peak_flops == devices.PEAK_FLOPS[gpu.split('-')[0]]
    policy = run.fsdp['mp_policy']
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (dtype, torch.float32, False)
    assert run.line.startswith(f"cuda:0 ({GPUS[gpu][0]}, compute capability ") and f"), {str(dtype)[6:]}" in run.line
    assert run.kernels(CARD).startswith(f"kernels: attention {kernel_name}")
    # the README's command: batch 8 x 1,024 on one GPU, checkpointing as memory.plan decides
    on, est, line = memory.plan(CARD, 8, 1, True, run.memory, 1, None, expand)
    assert on == checkpointing and est['total'] <= memory.HEADROOM * run.memory
    # and two of them: torchrun --nproc_per_node=2 ... --fsdp=true --batch_size=4, without checkpointing
    on, est, _ = memory.plan(CARD, 4, 1, True, run.memory, 2, None, expand)
    assert not on and est['total'] <= memory.HEADROOM * run.memory
    assert {i for _, i in asked} == {0} and asked[0] == ('set', 0)


def test_t4_start_up_lines(monkeypatch):
    """What a T4 user reads before the first step (the two-T4 command's, with FSDP)."""
    fake_gpus(monkeypatch, 'T4', count=2)
    run = devices.plan(local_rank=0)
    assert run.line == ("cuda:0 (Tesla T4, compute capability 7.5, 14.6 GiB), float16 with loss scaling (no bfloat16 "
                        "arithmetic below compute capability 8.0), compile=True")
    assert run.kernels(CARD, fsdp=True) == (
        "kernels: attention memory-efficient, its 4 key/value heads copied to 12 | experts one matmul per expert "
        "(torch's grouped_mm fallback: it reads the group sizes on the host, a wait for the GPU in each grouped "
        "matmul) | FSDP: weights gathered in float16, gradients reduced in float32")


def test_rank_1_under_torchrun_asks_only_its_own_gpu(monkeypatch):
    """Finding 3: torchrun's second process (LOCAL_RANK=1) takes GPU 1 before asking anything, and every
    question names GPU 1: no CUDA context on GPU 0 from it. So does one process told --device=cuda:1."""
    asked = fake_gpus(monkeypatch, 'T4', count=2)
    run = devices.plan('auto', 'auto', None, local_rank=1)
    run.line, run.kernels(CARD), run.peak_flops
    run.apply(DeepSeekLM(ModelConfig(**TINY)))
    assert run.device == 'cuda:1' and asked[0] == ('set', 1) and {i for _, i in asked} == {1}
    asked.clear()
    assert devices.plan('cuda:1').device == 'cuda:1' and asked[0] == ('set', 1) and {i for _, i in asked} == {1}
    with pytest.raises(UserError, match=r"device=cuda:2 but there are 2 CUDA devices: use cuda:0 \.\.\. cuda:1"):
        devices.plan('cuda:2')


def test_no_emulated_bf16_and_no_compile_where_triton_cannot(monkeypatch):
    """Finding 1: bf16 on a GPU below compute capability 8.0 would be emulated (slow, no fused attention,
    inductor refuses it): refused with the fix. fp16 runs there, with the loss scaler and compiled."""
    fake_gpus(monkeypatch, 'T4')
    with pytest.raises(UserError, match=r"Tesla T4 \(compute capability 7.5\) has no bfloat16 arithmetic.*--dtype=float16"):
        devices.plan(dtype='bfloat16')
    assert devices.plan(dtype='float32').attention(CARD) == ('memory-efficient', True)   # no grouped heads in fp32
    monkeypatch.setitem(GPUS, 'P100', ('Tesla P100-PCIE-16GB', (6, 0), 15.9 * GiB))   # Triton needs 7.0
    fake_gpus(monkeypatch, 'P100')
    assert not devices.plan().compile
    with pytest.raises(UserError, match="--compile=true on Tesla P100.*needs compute capability 7.0"):
        devices.plan(compile=True)


@pytest.mark.parametrize('device, message', [
    ('cpu:x', "device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:x'"),
    ('gpu', "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ('cuda:x', "device must be auto, cpu, cuda, cuda:N or mps"),
])
def test_devices_that_do_not_exist_are_refused(device, message):
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        devices.plan(device)
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="device=mps but this torch has no MPS"):
            devices.plan('mps')
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            devices.plan('cuda:1')
    with pytest.raises(UserError, match="dtype must be auto, float32, bfloat16 or float16, got 'half'"):
        devices.plan('cpu', 'half')
    run = devices.plan('cpu')
    assert (run.device, run.dtype, run.compile, run.peak_flops) == ('cpu', torch.float32, False, None)
    assert run.memory > 0 and run.line == 'cpu, float32, compile=False'
    assert run.kernels(CARD) == "kernels: attention cpu SDPA | experts one grouped matmul"


# ----------------------------------------------------------------------------------------------
# what the plan's choices rest on

def sdpa_calls(monkeypatch, model, dtype):
    """The (q, k, v, enable_gqa, is_causal) of every SDPA call in one training forward of model under
    CPU autocast in dtype, and the loss."""
    calls = []

    def spy(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **kw):
        calls.append((q, k, v, enable_gqa, is_causal))
        return REAL_SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kw)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    idx = torch.randint(256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
        loss = model(idx, idx.roll(1, 1))[1]
    return calls, loss


def fused_kernel_takes(kernel_name, cc, q, k, v, enable_gqa, is_causal):
    """Whether SDPA's kernel takes these inputs on compute capability cc, by the conditions in torch's
    sdp_utils.cpp (can_use_flash_attention, can_use_mem_efficient_attention) for dense inputs, no mask."""
    dims = q.size(-1), k.size(-1), v.size(-1)
    heads_ok = q.size(1) == k.size(1) == v.size(1) or (enable_gqa and q.size(1) % k.size(1) == 0 and k.size(1) == v.size(1))
    if kernel_name == 'flash':
        return (cc >= (8, 0) and q.dtype in (torch.float16, torch.bfloat16) and dims[0] == dims[1] == dims[2] <= 256
                and heads_ok and (not is_causal or q.size(2) == k.size(2)))
    dtypes = (torch.float16, torch.float32, torch.bfloat16) if cc >= (8, 0) else (torch.float16, torch.float32)
    return (cc >= (5, 0) and q.dtype in dtypes and dims[0] == dims[1] and dims[0] % 8 == 0 and dims[2] % 8 == 0
            and q.size(1) == k.size(1) == v.size(1) and all(t.stride(-1) == 1 for t in (q, k, v)))


@pytest.mark.parametrize('gpu, dtype', [('T4', 'auto'), ('V100', 'auto'), ('A100-40GB', 'float32'), ('L4', 'auto'),
                                        ('H100', 'auto')])
def test_attention_calls_meet_the_kernel_the_plan_names(monkeypatch, gpu, dtype):
    """Finding 2: on a T4 the memory-efficient kernel must take every attention call (flash needs CC 8.0;
    the memory-efficient kernel takes no grouped heads in torch 2.13), else SDPA falls to its math kernel
    and its quadratic memory. The plan copies the key/value heads out there, and the loss is the same."""
    fake_gpus(monkeypatch, gpu)
    run = devices.plan(dtype=dtype)
    torch.manual_seed(0)
    model = DeepSeekLM(ModelConfig(**TINY)).train()
    _, reference = sdpa_calls(monkeypatch, model, run.dtype)   # as the model runs before apply: grouped heads
    run.apply(model)
    calls, loss = sdpa_calls(monkeypatch, model, run.dtype)
    kernel_name, _ = run.attention(model.config)
    assert len(calls) == TINY['n_layer'] and all(fused_kernel_takes(kernel_name, run.capability, *c) for c in calls)
    torch.testing.assert_close(loss, reference, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize('gpu', ['H100', 'B200', 'A100-80GB'])
def test_cudnn_attention_is_off(monkeypatch, gpu):
    """Finding 7: torch prefers cuDNN attention on CC 9.0/10.x, which gives wrong results with fewer than 8
    key/value heads (pytorch/pytorch#193893): the plan turns it off for every GPU."""
    fake_gpus(monkeypatch, gpu)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    devices.plan().apply()
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


def test_fp16_head_gradient_cannot_overflow_at_a_gpus_chunk(monkeypatch):
    """Finding 6: a GPU's chunk of the 49,152-token head is 1,365 rows. With one target in every row and a
    feature of 60, the chunk's weight gradient sums to 1,365 x 60 = 81,900, past fp16's 65,504: it must be
    summed in fp32, so the gradient is finite and right whatever the loss scale."""
    monkeypatch.setattr(kernel, 'chunk_rows', lambda h, w: 1365)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1365, 16, generator=g) * 0.1
    h[:, 3] = 60.0
    w = (torch.randn(64, 16, generator=g) * 0.02).requires_grad_()
    targets = torch.full((1365,), 5)
    kernel.linear_cross_entropy(h, w, targets, torch.float16).backward()
    reference = w.detach().clone().requires_grad_()
    F.cross_entropy(h @ reference.t(), targets).backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad, reference.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.filterwarnings('ignore:Mismatch dtype between input and weight')   # CPU autocast; CUDA's casts (torch >= 2.12)
def test_fsdp_gathers_blocks_in_the_run_dtype_and_reduces_in_fp32(monkeypatch):
    """Finding 5: FSDP2 with the plan's policy (one process, gloo) gathers a block's weights in bf16 for
    its forward and leaves fp32 gradients on the fp32 shards; the loss is bf16 autocast's without FSDP."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    fake_gpus(monkeypatch, 'A100-80GB')
    policy = devices.plan().fsdp
    monkeypatch.undo()   # the GPU gone again: torch 2.10's FSDP would build its mesh on it, over NCCL
    torch.manual_seed(0)
    model = DeepSeekLM(ModelConfig(**TINY)).train()
    idx = torch.randint(256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference = model(idx, idx.roll(1, 1))[1]
    seen = []
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        for block in model.blocks:
            fully_shard(block, **policy)
            block.register_forward_pre_hook(lambda m, a: seen.append(m.moe.w1.dtype))
        fully_shard(model)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(idx, idx.roll(1, 1))[1]
        loss.backward()
        grads = [p.grad.to_local() for p in model.blocks[0].parameters()]
    finally:
        dist.destroy_process_group()
    assert seen == [torch.bfloat16] * TINY['n_layer']
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, reference, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# The README's commands through train.main with a faked GPU, up to the model's build

class Built(Exception):
    pass


@pytest.fixture(scope='module')
def plays(tmp_path_factory):
    import prepare
    d = str(tmp_path_factory.mktemp('data') / 'plays')
    prepare.main(['--dataset=shakespeare', f'--data_dir={d}', '--max_docs=6', '--val_docs=1', '--vocab_size=512'])
    return d


def train_until_build(monkeypatch, argv):
    """train.main(argv) up to the model's build: (its device plan, checkpointing on?, the memory line)."""
    import train
    seen = {}

    def build(cfg, mconf, data, dev, processes, ckpt, recompute, memory_line, heartbeat):
        seen.update(dev=dev, recompute=recompute, line=memory_line)
        raise Built
    monkeypatch.setattr(train, 'train', build)
    monkeypatch.setattr(train, 'bytes_per_token', lambda *a: None)   # a tensor on the GPU
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda *a, **kw: None)
    monkeypatch.setattr(torch.distributed, 'broadcast_object_list', lambda *a, **kw: None)
    with pytest.raises(Built):
        train.main(argv)
    return seen['dev'], seen['recompute'], seen['line']


def test_train_the_card_on_a_t4(monkeypatch, plays, tmp_path):
    """python train.py config/deepseek.py on a T4: fp16 (with the loss scaler), checkpointing on, fits."""
    fake_gpus(monkeypatch, 'T4')
    dev, recompute, line = train_until_build(monkeypatch, ['config/deepseek.py', f'--data_dir={plays}',
                                                           f'--out_dir={tmp_path}/out'])
    assert dev.dtype == torch.float16 and recompute and 'activation checkpointing on' in line


def test_train_the_card_on_two_t4s_rank_1(monkeypatch, plays, tmp_path):
    """torchrun --standalone --nproc_per_node=2 train.py config/deepseek.py --fsdp=true --batch_size=4, as
    its second process: GPU 1 only is asked anything, fp16, no checkpointing, fits."""
    asked = fake_gpus(monkeypatch, 'T4', count=2)
    for key, value in (('RANK', '1'), ('LOCAL_RANK', '1'), ('WORLD_SIZE', '2')):
        monkeypatch.setenv(key, value)
    dev, recompute, line = train_until_build(monkeypatch, ['config/deepseek.py', f'--data_dir={plays}',
                                                           f'--out_dir={tmp_path}/out', '--fsdp=true', '--batch_size=4'])
    assert dev.device == 'cuda:1' and asked[0] == ('set', 1) and {i for _, i in asked} == {1}
    assert dev.dtype == torch.float16 and not recompute and 'activation checkpointing off' in line
