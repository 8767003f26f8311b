"""The optimizers: configure_optimizers splits a model's parameters between AdamW (from torch) and Muon, the
optimizer for the blocks' weight matrices with --optimizer=muon; train.py's loop takes the step."""

import torch


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, optimizer='adamw'):
    """A list of optimizers for a DeepSeekLM. 'adamw': AdamW for everything. 'muon': Muon for the weight
    matrices inside the blocks (attention projections, experts), AdamW for the rest (embedding and tied
    head, router, latent tokens, norms). Weight decay applies to matrices only: norms and the latent tokens
    (learned vectors that play the part of keys, not maps) are left undecayed."""
    matrices, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if p.dim() < 2 or 'latent' in name:
            no_decay.append(p)
        elif optimizer == 'muon' and name.startswith('blocks.') and 'router' not in name:
            matrices.append(p)
        else:
            decay.append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ('cuda', 'cpu'))
    if optimizer == 'adamw':
        return [adamw]
    return [adamw, Muon(matrices, lr=learning_rate, weight_decay=weight_decay)]


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for weight matrices, and for stacks of them (the experts' (n_expert, in,
    out) weights: each expert's matrix on its own). SGD with Nesterov momentum whose update is
    orthogonalised by five Newton-Schulz steps, so that all directions of a matrix learn at the same
    rate. The step is scaled to AdamW's update size, 0.2 * sqrt(max(rows, cols)) as in Moonlight (Liu et
    al. 2025), so one learning rate serves both optimizers. torch.optim.Muon with
    adjust_lr_fn='match_rms_adamw' is the same rule for 2-D weights only."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault('momentum_buffer', torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group['momentum'])
                update = orthogonalize(p.grad.lerp(buf, group['momentum']), group['ns_steps'])
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_(update, alpha=-group['lr'] * 0.2 * max(p.shape[-2:]) ** 0.5)


def orthogonalize(g, steps, eps=1e-7):
    """The matrices of g (..., rows, cols) pushed towards the nearest semi-orthogonal ones (singular values
    near 1) by a quintic Newton-Schulz iteration with Muon's coefficients. In bf16 on GPUs that compute in
    it, as Muon's authors run it; in fp32 elsewhere: a CPU without bf16 matrix units (AVX2 and most laptop
    chips) runs bf16 batched matmuls many times slower than fp32 ones."""
    a, b, c = 3.4445, -4.7750, 2.0315
    fast_bf16 = g.is_cuda and torch.cuda.get_device_capability(g.device) >= (8, 0)
    x = g.to(torch.bfloat16 if fast_bf16 else torch.float32).reshape(-1, *g.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)   # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x.reshape(g.shape)
