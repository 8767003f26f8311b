"""The device plan: where a run goes and how it runs there, decided once from the device (compute capability,
memory, name) and from what this torch does on it: the dtype, the attention's SDPA kernel, the experts' grouped
matmul, compile, FSDP's precision and the peak FLOP/s. train.py, sample.py and bench.py take their device decisions
from here. What each GPU gets, and what in torch each choice rests on: docs/full-size.md."""

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cli import UserError

# dense fp16/bf16 tensor-core FLOP/s by GPU name (the first key found in the device's name), for MFU
PEAK_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'H800': 989e12, 'B200': 2250e12,
              'A100': 312e12, 'A800': 312e12, 'A6000': 155e12, 'L40S': 362e12, 'L40': 181e12, 'L4': 121e12,
              'A10': 125e12, '4090': 165e12, '3090': 71e12, 'V100': 125e12, 'T4': 65e12}


@dataclass
class DevicePlan:
    device: str                  # 'cpu', 'mps' or 'cuda:N'
    dtype: torch.dtype           # autocast's; float32 = no autocast
    compile: bool
    name: str = ''               # the GPU's
    capability: tuple = (0, 0)   # the GPU's compute capability
    memory: int = None           # bytes of the GPU, of the machine's RAM for the CPU; None: unknown (MPS)

    @property
    def type(self):
        return self.device.split(':')[0]

    @property
    def peak_flops(self):
        """The GPU's dense fp16/bf16 peak (None: not a GPU, a GPU not in PEAK_FLOPS, or an fp32 run)."""
        low = self.type == 'cuda' and self.dtype != torch.float32
        return next((v for k, v in PEAK_FLOPS.items() if k in self.name), None) if low else None

    def attention(self, mconf):
        """(the SDPA kernel a training step's attention runs, whether its key/value heads are copied out to one
        per query head for it). Each kernel's conditions are in torch's sdp_utils.cpp: flash takes CC 8.0-12.1,
        fp16/bf16, equal query/key/value widths up to 256 and grouped heads; the memory-efficient kernel CC 5.0 and
        up, fp16/fp32 (bf16 from 8.0), widths a multiple of 8, and no grouped heads."""
        if self.type != 'cuda':
            return f'{self.type} SDPA', False
        mla = mconf.attention == 'mla'
        qk, v = (mconf.qk_nope_head_dim + mconf.qk_rope_head_dim, mconf.v_head_dim) if mla else (mconf.head_dim,) * 2
        if self.capability >= (8, 0) and self.dtype != torch.float32 and qk == v <= 256:
            return 'flash', False
        if qk % 8 or v % 8:   # the math kernel would keep (B, H, T, T) probabilities in every layer
            raise UserError(f"attention widths {qk} and {v} are not multiples of 8, which SDPA's memory-efficient "
                            f"kernel needs on this GPU: choose --head_dim as a multiple of 8 (the card's is 64)")
        return 'memory-efficient', not mla and mconf.n_kv_head != mconf.n_head

    def moe(self):
        """How F.grouped_mm runs the experts here (torch's GroupedBlas.cpp, _grouped_mm_cuda)."""
        if self.type == 'cpu' or (self.capability[0] in (9, 10) and self.dtype == torch.bfloat16):
            return 'one grouped matmul'
        return ("one matmul per expert (torch's grouped_mm fallback: it reads the group sizes on the host, a wait "
                "for the GPU in each grouped matmul)")

    @property
    def fsdp(self):
        """fully_shard's keywords for each block: weights gathered in the run's dtype (half the traffic of fp32),
        gradients reduce-scattered in fp32. The blocks' inputs are not cast, and the whole model is sharded without
        it: the residual stream stays fp32 as in one process, and autocast runs each op in the run's dtype."""
        from torch.distributed.fsdp import MixedPrecisionPolicy
        low = None if self.dtype == torch.float32 else self.dtype
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, cast_forward_inputs=False)
        return {'mp_policy': policy}

    def apply(self, model=None):
        """This process's settings for the plan, and the model's attention layout; before compiling."""
        if self.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls on tensor cores (CC 8.0 and up)
            torch.backends.cudnn.allow_tf32 = True
            # torch prefers cuDNN attention on CC 9.0/10.x with a recent cuDNN, which gives silently wrong
            # results with fewer than 8 key/value heads (pytorch/pytorch#193893; the card has 4) and NaN
            # gradients with masks at some lengths (#196678); flash runs instead.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if model is not None:
            expand = self.attention(model.config)[1]
            for m in model.modules():
                if hasattr(m, 'expand_kv'):
                    m.expand_kv = expand

    @property
    def line(self):
        """The device, dtype and compile, for the start-up line."""
        dtype = str(self.dtype).removeprefix('torch.') + (' with loss scaling' if self.dtype == torch.float16 else '')
        if self.type != 'cuda':
            return f"{self.device}, {dtype}, compile={self.compile}"
        below = ' (no bfloat16 arithmetic below compute capability 8.0)' if self.capability < (8, 0) else ''
        return (f"{self.device} ({self.name}, compute capability {self.capability[0]}.{self.capability[1]}, "
                f"{self.memory / 2**30:.1f} GiB), {dtype}{below}, compile={self.compile}")

    def kernels(self, mconf, fsdp=False):
        """The start-up line of what runs the attention and the experts, and FSDP's precision."""
        kernel, expand = self.attention(mconf)
        copies = f", its {mconf.n_kv_head} key/value heads copied to {mconf.n_head}" if expand else ''
        dtype = str(self.dtype).removeprefix('torch.')
        sharded = f" | FSDP: weights gathered in {dtype}, gradients reduced in float32" if fsdp else ''
        return f"kernels: attention {kernel}{copies} | experts {self.moe()}{sharded}"

    def autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(device_type=self.type, dtype=self.dtype)

    def sync(self):
        """Wait for the device, so that a timing covers the work and not just its launch."""
        if self.type == 'cuda':
            torch.cuda.synchronize(self.device)
        elif self.type == 'mps':
            torch.mps.synchronize()

    def matmul_flops(self, seconds=0.2):
        """This device's measured matmul rate (FLOP/s) in the plan's dtype, from square matmuls timed for a fraction
        of a second: what a training step's speed is a fraction of."""
        n = 512 if self.type == 'cpu' else 4096
        g = torch.Generator(self.device).manual_seed(0)   # its own: a run's random streams are not touched
        a, b = (torch.randn(n, n, device=self.device, dtype=self.dtype, generator=g) for _ in range(2))
        t0 = time.perf_counter()
        a @ b   # warm-up: libraries load, clocks rise
        self.sync()
        if time.perf_counter() - t0 > seconds:   # a dtype this device only emulates (fp16 on most CPUs): slow enough
            return 2 * n ** 3 / (time.perf_counter() - t0)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or calls < 2:
            a @ b
            calls += 1
            self.sync()
        return 2 * n ** 3 * calls / (time.perf_counter() - t0)


def plan(device='auto', dtype='auto', compile=None, local_rank=None):
    """The DevicePlan for the device, dtype and compile keys. device 'auto' is cuda > mps > cpu; dtype 'auto' is bf16
    autocast on GPUs that compute in it, fp16 on older ones, fp32 elsewhere; compile None is on for CUDA. Under
    torchrun (local_rank given) a CUDA run takes cuda:LOCAL_RANK."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind, _, index = device.partition(':')
    if kind not in ('cuda', 'mps', 'cpu') or (index and (kind != 'cuda' or not index.isdigit())):
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if kind == 'cuda':
        return cuda_plan(int(index or 0) if local_rank is None else local_rank, dtype, compile)
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise UserError("device=mps but this torch has no MPS (Apple GPU) support: use --device=cpu")
    return DevicePlan(kind, getattr(torch, 'float32' if dtype == 'auto' else dtype), bool(compile),
                      memory=ram() if kind == 'cpu' else None)


def cuda_plan(index, dtype, compile):
    """The plan for GPU number index. The process takes that GPU as its own before asking anything of it, and every
    question names it, so no process opens a context on another's GPU (torch asks the current device if not told)."""
    if not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available: use --device=cpu")
    count = torch.cuda.device_count()   # from the driver: opens no GPU
    if index >= count:
        raise UserError(f"device=cuda:{index} but there are {count} CUDA devices: use cuda:0 ... cuda:{count - 1}")
    torch.cuda.set_device(index)
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    where = f"{props.name} (compute capability {cc[0]}.{cc[1]})"
    # the capability decides: torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated
    dt = (torch.bfloat16 if cc >= (8, 0) else torch.float16) if dtype == 'auto' else getattr(torch, dtype)
    if dt == torch.bfloat16 and cc < (8, 0):
        raise UserError(f"{where} has no bfloat16 arithmetic: torch would emulate it, several times slower, and "
                        f"could neither compile it nor run a fused attention kernel on it: use --dtype=float16 "
                        f"(the automatic choice here) or --dtype=float32")
    if compile and cc < (7, 0):
        raise UserError(f"--compile=true on {where}: torch.compile's Triton code needs compute capability 7.0 "
                        f"or newer: use --compile=false")
    return DevicePlan(f'cuda:{index}', dt, cc >= (7, 0) if compile is None else compile, props.name, cc,
                      props.total_memory)


def ram():
    """Bytes of the machine's memory (None where the system does not say)."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, ValueError, OSError):
        return None
