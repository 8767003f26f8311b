"""
Draw a training run from its log.jsonl: loss, expert-load balance (MaxVio) and each layer's expert load.

    python plot_log.py config/deepseek_mini.py               # out-mini/log.jsonl -> out-mini/run.png
    python plot_log.py --out_dir=out-mini --png=mini.png --title="mini, 2,000 steps"

matplotlib is optional (pip install matplotlib); nothing else in the repo needs it.
"""

import json
import os
import sys

import common
from common import UserError

DEFAULTS = dict(
    out_dir='out',   # the run's folder (a training config sets it)
    log='',          # '' = out_dir/log.jsonl
    png='',          # '' = out_dir/run.png
    title='',
)


def main(argv):
    cfg, _ = common.parse_config(argv, DEFAULTS, skip_file_keys=True)   # of a training config: its out_dir
    log = cfg['log'] or os.path.join(cfg['out_dir'], 'log.jsonl')
    png = cfg['png'] or os.path.join(cfg['out_dir'], 'run.png')
    if not os.path.isfile(log):
        raise UserError(f"no log at {log}: train first with `python train.py CONFIG`")
    try:
        with open(log) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except ValueError as e:
        raise UserError(f"{log} is not a log of train.py ({e})") from None
    records = [r for r in records if isinstance(r, dict)]
    train = [r for r in records if r.get('kind') == 'train']
    evals = [r for r in records if r.get('kind') == 'eval']
    if not train and not evals:
        raise UserError(f"{log} holds no train or eval records")
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None

    fig, (ax_loss, ax_vio, ax_load) = plt.subplots(3, 1, figsize=(9, 10), height_ratios=[3, 2, 2])
    ax_loss.plot([r['iter'] for r in train], [r['loss'] for r in train], lw=0.8, alpha=0.6, label='train loss (batch)')
    for key, label in (('train_loss', 'train loss (eval)'), ('val_loss', 'val loss')):
        ax_loss.plot([r['iter'] for r in evals], [r[key] for r in evals], 'o-', ms=3, label=label)
    ax_loss.set_ylabel('cross-entropy (nats/token)')
    ax_loss.set_xlabel('iteration')

    ax_vio.plot([r['iter'] for r in train], [r['max_vio'] for r in train], lw=0.8, alpha=0.6,
                label='training batch (worst layer)')
    for key, label in (('val_max_vio', 'val (worst layer)'), ('val_max_vio_mean', 'val (layer mean)'),
                       ('train_max_vio', 'train split (worst layer)'), ('train_max_vio_mean', 'train split (layer mean)')):
        points = [(r['iter'], r[key]) for r in evals if key in r]
        if points:
            ax_vio.plot(*zip(*points), 'o-', ms=3, label=label)
    ax_vio.set_yscale('symlog', linthresh=0.1)
    ax_vio.set_ylabel('MaxVio = (max load - mean) / mean')
    ax_vio.set_xlabel('iteration')

    last = next((r for r in reversed(evals) if 'val_load' in r), None)
    if last:   # tokens per expert on the val split at the last evaluation; 1.0 = an even share
        load = [[v * len(row) for v in row] for row in last['val_load']]
        im = ax_load.imshow(load, aspect='auto', cmap='coolwarm', vmin=0, vmax=2)
        ax_load.set_xlabel('expert')
        ax_load.set_ylabel('layer')
        ax_load.set_title(f"val load per expert at iter {last['iter']} (1.0 = even share)", fontsize=10)
        fig.colorbar(im, ax=ax_load)
    else:
        ax_load.set_axis_off()
    for ax in (ax_loss, ax_vio):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if cfg['title']:
        fig.suptitle(cfg['title'])
    fig.tight_layout()
    tmp = png + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    print(f"wrote {png}")


if __name__ == '__main__':
    common.run(main, sys.argv[1:])
