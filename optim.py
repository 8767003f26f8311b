"""
How the weights are updated: one optimizer step, as train.py and bench.py both take it, and Muon, the
optimizer for the blocks' weight matrices with --optimizer=muon (AdamW, from torch, takes the rest:
DeepSeekLM.configure_optimizers makes the groups).
"""

import torch


def optimizer_step(model, raw_model, optimizers, scaler, batches, autocast, grad_clip):
    """One optimizer step over a list of (X, Y) micro-batches:
    forward and backward of each, their mean loss's gradients synchronised across processes on the last
    one only (DDP or FSDP), unscaled (fp16's GradScaler), clipped to grad_clip (0 = off), then every
    optimizer steps and the routers' balancing biases move. Returns (the last micro-batch's loss, the
    gradient norm, the balancing figures of DeepSeekLM.update_router_bias)."""
    for i, (X, Y) in enumerate(batches):
        last = i == len(batches) - 1
        if hasattr(model, 'require_backward_grad_sync'):   # DDP
            model.require_backward_grad_sync = last
        elif hasattr(model, 'set_requires_gradient_sync'):   # FSDP
            model.set_requires_gradient_sync(last)
        with autocast:
            _, loss = model(X, Y)
        scaler.scale(loss / len(batches)).backward()
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
    for opt in optimizers:
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    return loss.detach(), grad_norm, raw_model.update_router_bias()   # counts of all micro-steps and ranks


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
    near 1) by a quintic Newton-Schulz iteration in bf16, with Muon's coefficients."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16().reshape(-1, *g.shape[-2:])
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
