"""
Draw a training run's log.jsonl: train/val loss and expert load (MaxVio) against iterations.

    python plot_log.py out-mini/log.jsonl out-mini/run.png [--title "..."]

matplotlib is optional (pip install matplotlib); nothing else in the repo needs it.
"""

import argparse
import json
import os
import sys


def load(path):
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r.get('kind') == 'train']
    evals = [r for r in records if r.get('kind') == 'eval']
    return train, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument('log', help='log.jsonl written by train.py')
    ap.add_argument('png', help='picture to write')
    ap.add_argument('--title', default=None)
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install matplotlib")
    if not os.path.isfile(args.log):
        sys.exit(f"error: no log at {args.log}: train first with `python train.py CONFIG`")
    train, evals = load(args.log)
    if not train and not evals:
        sys.exit(f"error: {args.log} holds no train or eval records")

    fig, (ax_loss, ax_vio) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 2])
    ax_loss.plot([r['iter'] for r in train], [r['loss'] for r in train], lw=0.8, alpha=0.6, label='train loss (batch)')
    ax_loss.plot([r['iter'] for r in evals], [r['train_loss'] for r in evals], 'o-', ms=3, label='train loss (eval)')
    ax_loss.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', ms=3, label='val loss')
    ax_loss.set_ylabel('cross-entropy (nats/token)')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_vio.plot([r['iter'] for r in train], [r['max_vio'] for r in train], lw=0.8, alpha=0.6,
                label='MaxVio, training batch (worst layer)')
    ax_vio.plot([r['iter'] for r in evals], [r['val_max_vio'] for r in evals], 'o-', ms=3, label='MaxVio, val (worst layer)')
    ax_vio.plot([r['iter'] for r in evals], [r['val_max_vio_mean'] for r in evals], 'o-', ms=3, label='MaxVio, val (layer mean)')
    ax_vio.set_yscale('symlog', linthresh=0.1)
    ax_vio.set_ylabel('MaxVio = (max load - mean) / mean')
    ax_vio.set_xlabel('iteration')
    ax_vio.grid(alpha=0.3)
    ax_vio.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    tmp = args.png + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.png)
    print(f"wrote {args.png}")


if __name__ == '__main__':
    main()
