"""
The device plan: what this process runs on and how. (Temporary: the full plan replaces this.)
"""

import dataclasses
from contextlib import nullcontext

import torch

import cli


@dataclasses.dataclass
class Plan:
    device: str
    dtype: torch.dtype
    compile: bool

    @property
    def type(self):
        return self.device.split(':')[0]

    @property
    def line(self):
        return f"{self.device}, {str(self.dtype).removeprefix('torch.')}, compile={self.compile}"

    @property
    def peak_flops(self):
        return cli.gpu_peak_flops(self.type)

    @property
    def fsdp(self):
        return {}

    def autocast(self):
        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.type, dtype=self.dtype)

    def matmul_flops(self):
        return cli.matmul_flops(self.device, self.dtype)


def plan(device='auto', dtype='auto', compile=None, local_rank=None):
    dev, dt = cli.pick_device(device, dtype)
    if local_rank is not None and dev.startswith('cuda'):
        dev = f'cuda:{local_rank}'
        torch.cuda.set_device(dev)
    return Plan(dev, dt, dev.startswith('cuda') if compile is None else compile)
