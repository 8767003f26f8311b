"""Draw a training run from its log.jsonl: loss, expert-load balance (MaxVio) and each layer's expert load.

    python plot_log.py config/deepseek_mini.py               # out-mini/log.jsonl -> out-mini/run.png
    python plot_log.py --out_dir=out-mini --png=mini.png --title="mini, 2,000 steps"

matplotlib is optional (pip install matplotlib); nothing else in the repo needs it."""

import json
import os
import sys

import cli
from cli import UserError

DEFAULTS = dict(out_dir='out-deepseek',   # the run's folder: train.py's default, or the one a training config sets
                log='',                   # '' = out_dir/log.jsonl
                png='',                   # '' = out_dir/run.png
                title='')


def main(argv):
    cfg, _ = cli.parse_config(argv, DEFAULTS, skip_file_keys=True)   # of a training config: its out_dir
    log = cfg['log'] or os.path.join(cfg['out_dir'], 'log.jsonl')
    png = cfg['png'] or os.path.join(cfg['out_dir'], 'run.png')
    if not os.path.lexists(log):
        raise UserError(f"no log at {log}: train first with `python train.py --out_dir={cfg['out_dir']}`")
    cli.check_file(log, 'log')   # a folder, or a pipe that would hang the reader
    if not png.endswith('.png') or os.path.isdir(png):   # never write over a checkpoint, a log or a folder
        raise UserError(f"--png={png} is not a .png file name: give one, e.g. --png=run.png")
    try:
        with open(log, encoding='utf-8') as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (ValueError, RecursionError) as e:   # not JSON, not UTF-8, or nested beyond reason
        raise UserError(f"{log} is not a log of train.py ({type(e).__name__})") from None
    records = [r for r in records if isinstance(r, dict) and number(r.get('iter'))]
    train = [r for r in records if r.get('kind') == 'train' and number(r.get('loss')) and number(r.get('max_vio'))]
    evals = [r for r in records if r.get('kind') == 'eval' and number(r.get('val_loss'))
             and number(r.get('train_loss'))]
    if not train and not evals:
        raise UserError(f"{log} holds no train or eval records")
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None

    iters, loads = load_over_training(evals, 'val_load')
    cols = min(4, len(loads)) or 1
    rows = -(-len(loads) // cols)
    fig = plt.figure(figsize=(9, 7.5 + 1.7 * rows), layout='constrained')
    grid = fig.add_gridspec(2 + rows, cols, height_ratios=[3, 2] + [1.2] * rows)
    ax_loss, ax_vio = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, :])
    for ax, key, label in ((ax_loss, 'loss', 'train loss (batch)'),
                           (ax_vio, 'max_vio', 'training batch (worst layer)')):
        ax.plot([r['iter'] for r in train], [r[key] for r in train], lw=0.8, alpha=0.6, label=label)
    for key, label in (('train_loss', 'train loss (eval)'), ('val_loss', 'val loss')):
        ax_loss.plot([r['iter'] for r in evals], [r[key] for r in evals], 'o-', ms=3, label=label)
    for key, label in (('val_max_vio', 'val (worst layer)'), ('val_max_vio_mean', 'val (layer mean)'),
                       ('train_max_vio', 'train split (worst layer)'), ('train_max_vio_mean', 'train split (layer mean)')):
        points = [(r['iter'], r[key]) for r in evals if number(r.get(key))]
        if points:
            ax_vio.plot(*zip(*points), 'o-', ms=3, label=label)
    ax_loss.set_ylabel('cross-entropy (nats/token)')
    ax_vio.set_yscale('symlog', linthresh=0.5, linscale=2)   # linear where balance lives, log up to a collapse's 3.0
    ax_vio.set_yticks([0, 0.1, 0.2, 0.3, 0.5, 1, 2, 3], ['0', '0.1', '0.2', '0.3', '0.5', '1', '2', '3'])
    ax_vio.set_ylabel('MaxVio = (max load - mean) / mean')
    for ax in (ax_loss, ax_vio):
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    if loads:   # one small heatmap per layer: experts down, evaluations across
        axes = [fig.add_subplot(grid[2 + i // cols, i % cols]) for i in range(rows * cols)]
        extent = (iters[0], iters[-1], len(loads[0]) - 0.5, -0.5)
        for layer, (ax, load) in enumerate(zip(axes, loads)):
            im = ax.imshow(load, aspect='auto', cmap='coolwarm', vmin=0, vmax=2, extent=extent, interpolation='nearest')
            ax.set_title(f'val load per expert, layer {layer}' if layer == 0 else f'layer {layer}', fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_ylabel('expert' if layer % cols == 0 else '', fontsize=8)   # the first column, the last row
            ax.set_xlabel('iteration' if layer >= len(loads) - cols else '', fontsize=8)
        for ax in axes[len(loads):]:
            ax.set_axis_off()
        fig.colorbar(im, ax=axes, shrink=0.9, label='1 = even share')
    if cfg['title']:
        fig.suptitle(cfg['title'])
    tmp = png + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    print(f"wrote {png}")


def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_over_training(evals, key):
    """The evaluations' iterations, and per layer a matrix [expert][evaluation] of its token share, 1.0 an even share
    (evaluations without a layers x experts table of numbers under key, or shaped unlike the first, are left out)."""
    def shape(load):
        ok = isinstance(load, list) and load and all(isinstance(row, list) and row and all(map(number, row))
                                                     for row in load)
        return (len(load), len(load[0])) if ok and len({len(row) for row in load}) == 1 else None
    evals = [r for r in evals if shape(r.get(key))]
    evals = [r for r in evals if shape(r[key]) == shape(evals[0][key])]
    if not evals:
        return [], []
    n_layer, n_expert = shape(evals[0][key])
    loads = [[[r[key][layer][e] * n_expert for r in evals] for e in range(n_expert)] for layer in range(n_layer)]
    return [r['iter'] for r in evals], loads


if __name__ == '__main__':
    cli.call_main(main, sys.argv[1:])
