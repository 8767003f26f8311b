"""The run's log: the lines a training run prints (evaluations, steps, the result) and the records it keeps in
out_dir/log.jsonl, one JSON object per line, each iteration once, which plot_log.py draws."""

import json
import math
import os
import time

import torch

import checkpoint
import cli
from cli import UserError


def whole_val_line(r):
    return (f"whole val split ({r['val_tokens_scored']:,} tokens) at iter {r['iter']}: loss {r['val_loss']:.4f} | "
            f"bpb {r['val_bpb']:.4f} | MaxVio per layer {' '.join(f'{v:.3f}' for v in r['val_max_vio_layers'])}")


class Clock:
    """Seconds per step between log lines, with the ETA from the median of the last few intervals: robust
    to the first one (compilation) and to hiccups."""

    def __init__(self, max_iters, start):
        self.max_iters, self.start = max_iters, start
        self.t_start = self.t0 = time.time()
        self.t0_iter, self.recent = start, []

    def restart(self, it):
        self.t0, self.t0_iter = time.time(), it

    def lap(self, it):
        t1 = time.time()
        step_s, self.t0, self.t0_iter = (t1 - self.t0) / max(it - self.t0_iter, 1), t1, it
        self.recent = (self.recent + [step_s])[-5:]
        return step_s, sorted(self.recent)[len(self.recent) // 2] * (self.max_iters - it)


class Log:
    """Console lines and log.jsonl records, from the first process only. A resumed run appends to the log; the
    records a stopped run wrote past the checkpoint resumed (and a finished run's result) are cut only once the
    resumed run has written a checkpoint, so a resume that fails before then loses nothing."""

    def __init__(self, cfg, dev, master, distributed, world, block_size, start, run_id):
        self.cfg, self.dev, self.master, self.distributed, self.world = cfg, dev, master, distributed, world
        self.path = os.path.join(cfg['out_dir'], 'log.jsonl')
        self.tokens_per_iter = cfg['batch_size'] * block_size * cfg['gradient_accumulation_steps'] * world
        self.first, self.flops_per_iter, self.clock = start + 1, None, Clock(cfg['max_iters'], start)
        self.evals, self.cut_at = [], None   # (iter, train loss, val loss) of each evaluation; (iter, records)
        if not master:
            return
        if start:
            old = read_records(self.path) if os.path.exists(self.path) else []
            self.cut_at = (start, len(old))
            self.evals = [(r['iter'], r['train_loss'], r['val_loss']) for r in old
                          if r.get('kind') == 'eval' and r['iter'] <= start]
            end_last_line(self.path)   # a record cut short by a kill stays a line of its own
        else:   # a new run (--overwrite) starts a new record
            checkpoint.remove(*(os.path.join(cfg['out_dir'], f) for f in ('ckpt.pt', 'ckpt_best.pt', 'log.jsonl')))
            self.write({'kind': 'start', 'iter': 0, 'run_id': run_id, 'config': cfg}, None)

    def write(self, record, line):
        if not self.master:
            return
        if line:
            print(line, flush=True)
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:   # a full disk: say which file, and that the checkpoints stand
            raise UserError(f"cannot write {self.path} ({e.strerror}): free disk space, then resume with "
                            f"--init_from=resume (the last checkpoint is kept)") from None

    def checkpointed(self):
        """A resumed run wrote its first checkpoint: from now on its records are the log's."""
        if self.cut_at:
            keep_log_until(self.path, *self.cut_at)
            self.cut_at = None

    def evaluation(self, it, ev):
        if self.dev.type == 'cuda':
            ev['peak_mem_gb'] = torch.cuda.max_memory_allocated(self.dev.device) / 2**30
        if not math.isfinite(ev['val_loss']):
            raise diverged(f"val loss is {ev['val_loss']} at iter {it}", self.cfg['out_dir'])
        self.evals.append((it, ev['train_loss'], ev['val_loss']))
        note = ''
        if overfitting([e[1:] for e in self.evals]):
            best = min(self.evals, key=lambda e: e[2])
            ev['overfitting'] = True
            note = (f" | overfitting: val loss has risen for 3 evaluations while train loss fell; the best, "
                    f"{best[2]:.4f} at iter {best[0]}, is in ckpt_best.pt")
        self.write({'kind': 'eval', 'iter': it, **ev},
                   f"eval {it}: train loss {ev['train_loss']:.4f} | val loss {ev['val_loss']:.4f} | "
                   f"val bpb {ev['val_bpb']:.4f} | MaxVio val {ev['val_max_vio']:.3f} (mean {ev['val_max_vio_mean']:.3f}) "
                   f"train {ev['train_max_vio']:.3f} (mean {ev['train_max_vio_mean']:.3f})"
                   + (f" | peak memory {ev['peak_mem_gb']:.1f} GiB" if 'peak_mem_gb' in ev else '') + note)

    def step(self, it, loss, grad_norm, balance, lr):
        step_s, eta = self.clock.lap(it)
        if self.distributed:   # the mean over processes of each one's loss
            torch.distributed.all_reduce(loss)
            loss = loss / self.world
        lossf = loss.item()
        if not math.isfinite(lossf):
            raise diverged(f"loss is {lossf} at iter {it}", self.cfg['out_dir'])
        grad = float(grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm)   # collective
        if not self.master:
            return
        flops = self.flops_per_iter / step_s
        peak = self.dev.peak_flops
        speed = f"MFU {100 * flops / peak:.1f}%" if peak else f"{flops / 1e9:.1f} GFLOP/s"
        vio = balance['max_vio'].max().item()
        first = ' (the first step' + (', compilation included)' if self.dev.compile else ')') if it == self.first else ''
        self.write({'kind': 'train', 'iter': it, 'loss': lossf, 'lr': lr, 'ms_per_iter': 1000 * step_s,
                    'tokens_per_s': self.tokens_per_iter / step_s, 'mfu': flops / peak if peak else None,
                    'gflops': flops / 1e9, 'grad_norm': grad, 'max_vio': vio},
                   f"iter {it}/{self.cfg['max_iters']} | loss {lossf:.4f} | lr {lr:.2e} | {1000 * step_s:.1f} ms{first} | "
                   f"{self.tokens_per_iter / step_s:,.0f} tok/s | {speed} | grad {grad:.2f} | MaxVio {vio:.3f} | "
                   f"ETA {cli.fmt_time(eta)}")

    def final(self, it, final, raw_model, best_val_loss):
        elapsed = time.time() - self.clock.t_start
        summary = {'kind': 'summary', 'iter': it, 'time_s': elapsed, 'tokens_seen': (it - self.clock.start) * self.tokens_per_iter,
                   'params': raw_model.num_params(), 'active_params': raw_model.num_params(active=True),
                   'best_val_loss': best_val_loss}
        result = f"best val loss {best_val_loss:.4f}"
        if final:
            record = {'kind': 'final', 'iter': it, **final}
            self.write(record, whole_val_line(record))
            summary.update({k: final[k] for k in ('val_loss', 'val_bpb', 'val_tokens_scored')})
            result = f"whole val split: loss {final['val_loss']:.4f}, bpb {final['val_bpb']:.4f}"
        if self.dev.type == 'cuda':
            summary['peak_mem_gb'] = torch.cuda.max_memory_allocated(self.dev.device) / 2**30
        self.write(summary, f"done: {it - self.clock.start} iters in {cli.fmt_time(elapsed)}, {summary['tokens_seen']:,} tokens; "
                            f"{result}; checkpoints in {self.cfg['out_dir']}/")


def keep_log_until(path, iter_num, before=None):
    """Keep, of the log's first `before` records (all: None), those up to iter_num other than a finished
    run's result, then every record after them: each iteration once, in order."""
    records = read_records(path)
    cut = len(records) if before is None else before
    kept = [r for r in records[:cut] if r.get('iter', 0) <= iter_num and r.get('kind') not in ('summary', 'final')]
    checkpoint.write_atomic(path, lambda f: f.write(''.join(json.dumps(r) + '\n' for r in kept + records[cut:]).encode()))


def diverged(what, out):
    ckpt_path = os.path.join(out, 'ckpt.pt')
    kept = f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
    return UserError(f"{what}: training diverged; lower --learning_rate ({kept})")


def read_records(path):
    """The whole JSON records of a log.jsonl; a line cut short by a kill, or not a record, is skipped."""
    records = []
    with open(cli.check_file(path, 'log'), encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(r, dict) and isinstance(r.get('iter', 0), int):
                records.append(r)
    return records


def end_last_line(path):
    """End a file of lines with a newline, so that what is appended next starts its own line (after a killed writer)."""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, 'rb+') as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b'\n':
                f.write(b'\n')


def overfitting(evals, span=3):
    """Whether val loss has risen at each of the last `span` evaluations while train loss fell over them:
    the model is learning its training text by heart. evals: [(train loss, val loss)], oldest first."""
    if len(evals) <= span:
        return False
    recent = evals[-span - 1:]
    return all(b[1] > a[1] for a, b in zip(recent, recent[1:])) and recent[-1][0] < recent[0][0]
