"""
Sample from a trained model.

    python sample.py --num_samples 5                          # out-deepseek/ckpt.pt, each sample a new document
    python sample.py config/deepseek_mini.py --start="ROMEO:"  # the out_dir of a training config
    python sample.py --out_dir=out-mini --ckpt=best --temperature=0 --max_new_tokens=100
    python sample.py --start=FILE:prompts.txt > samples.txt   # one prompt per line, all in one batch

Flags are nanoGPT's: config files and --key=value (or --key value) overrides of the defaults below.
Everything needed comes from the checkpoint, tokenizer included, so this runs on a machine that
never ran prepare.py. stdout holds only the samples, each under a `--- sample N ---` line, so it
can be redirected to a file; progress, warnings and the tokens/s figure go to stderr.

Prompts: text is encoded as is, except that the literal text <|endoftext|> becomes that token. The
default start is <|endoftext|> alone: the token every training document begins with, so each sample
is a new document. Start a prompt with it to mark it as the beginning of a document; an empty prompt
means <|endoftext|>. A printed sample is its prompt followed by the completion, with the
<|endoftext|> tokens left out; a sample ends at the first <|endoftext|> the model emits.
"""

import glob
import os
import sys
import time
from contextlib import nullcontext

import torch

import configurator
import prepare
import train
from configurator import UserError
from model import DeepSeekLM, ModelConfig

# -----------------------------------------------------------------------------
# defaults
out_dir = 'out-deepseek'   # the out_dir of config/deepseek.py
ckpt = 'last'              # 'last' = out_dir/ckpt.pt, 'best' = out_dir/ckpt_best.pt (lowest val loss), or a path
start = prepare.EOT        # prompt text, or FILE:path with one prompt per line (then one sample per prompt)
num_samples = 5            # copies of a text prompt, sampled as one batch (unused with FILE:)
max_new_tokens = 500       # per sample; fewer when it ends with <|endoftext|>
temperature = 0.8          # 0 = greedy (argmax); < 1 sharper, > 1 more random
top_k = 200                # sample among the k likeliest tokens only (0 = all)
top_p = 1.0                # nucleus: the smallest set of tokens holding this much probability (1.0 = all)
seed = 1337                # same seed, same checkpoint, same flags: same samples
device = 'auto'            # 'auto' = cuda > mps > cpu
dtype = 'auto'             # 'auto' = bfloat16 on CUDA if supported, float32 elsewhere; or float32/bfloat16/float16
compile = False            # torch.compile the model (pays off for long generations on a GPU)
use_cache = True           # False = recompute the whole window for every token (slow; for comparison)
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, str, bool))}


def main(argv=None):
    """The command line; mistakes become one line on stderr and exit code 2. Returns the sample texts."""
    return configurator.main_guard(sample, sys.argv[1:] if argv is None else argv)


def sample(argv):
    cfg = configurator.parse_config(space_separated_values(argv, DEFAULTS), DEFAULTS, ignore_unknown_file_keys=True)
    check_config(cfg)
    prompts, from_file = read_prompts(cfg['start'])   # before the (maybe slow) load: fail fast
    dev, dt = train.pick_device(cfg['device'], cfg['dtype'])
    device_type = 'cuda' if dev.startswith('cuda') else dev
    autocast = nullcontext() if dt == torch.float32 else torch.autocast(device_type=device_type, dtype=dt)

    # --- model and tokenizer, both from the checkpoint --------------------------------------------
    path = checkpoint_path(cfg)
    ck, mconf = train.load_checkpoint(path)
    enc = prepare.load_tokenizer(ck['tokenizer'])
    eot = enc.encode_single_token(prepare.EOT)
    with torch.device(dev):  # initialise straight on the device: much faster than on the CPU for big models
        model = DeepSeekLM(mconf)
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit model.py ({str(e).splitlines()[0]})") from None
    model.eval()
    if cfg['compile']:
        model.compile(dynamic=True)   # compiles forward, which generate() calls once per step
    print(f"loaded {path}: iter {ck.get('iter_num', '?')}, best val loss {ck.get('best_val_loss', float('nan')):.4f} | "
          f"{model.num_params():,} parameters | {dev}, {str(dt).replace('torch.', '')}", file=sys.stderr)
    del ck

    # --- prompts: one batch, left-padded to the longest ------------------------------------------
    block_size = mconf.block_size
    ids = []
    for i, text in enumerate(prompts):
        p = enc.encode(text, allowed_special={prepare.EOT}, disallowed_special=()) or [eot]
        if len(p) >= block_size:   # leave room in the window for at least one new token
            print(f"warning: {f'prompt {i + 1}' if from_file else 'the prompt'} is {len(p)} tokens, the model "
                  f"sees at most {block_size}: keeping its last {block_size - 1}", file=sys.stderr)
            p = p[-(block_size - 1):]
        ids.append(p)
    if not from_file:
        ids = ids * cfg['num_samples']
    B, T = len(ids), max(len(p) for p in ids)
    idx = torch.full((B, T), eot, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(ids):
        idx[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    # no mask when nothing is padded: attention then takes its faster causal path
    attention_mask = None if bool(mask.all()) else mask.to(dev)
    idx = idx.to(dev)

    # --- generate: one prefill for the whole batch, then one token per step from the KV cache ---
    def generate(n, eos):
        with autocast:
            return model.generate(idx, n, temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                                  top_p=cfg['top_p'], attention_mask=attention_mask, eos_token_id=eos,
                                  use_cache=cfg['use_cache'])

    generate(3, None)   # warm-up, so tokens/s measures generation, not one-time setup (kernels, compilation)
    torch.manual_seed(cfg['seed'])
    sync(dev)
    t0 = time.time()
    out = generate(cfg['max_new_tokens'], eot)
    sync(dev)
    seconds = time.time() - t0

    # --- decode: prompt + completion up to the first <|endoftext|> -------------------------------
    texts, n_new = [], 0
    for i, row in enumerate(out[:, T:].tolist()):
        end = row.index(eot) if eot in row else len(row)
        new = row[:end]
        n_new += min(end + 1, len(row))   # the <|endoftext|> it stopped at was generated too
        # ids the tokenizer lacks (a model vocab padded past n_vocab) have no text
        texts.append(enc.decode([t for t in ids[i] + new if t != eot and t < enc.n_vocab]))
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---")
        print(text)
    sys.stdout.flush()
    print(f"{n_new:,} tokens in {seconds:.2f}s: {n_new / max(seconds, 1e-9):,.1f} tokens/s "
          f"({B} sample{'s' if B > 1 else ''} x up to {cfg['max_new_tokens']} new tokens, "
          f"KV cache {'on' if cfg['use_cache'] else 'off'})", file=sys.stderr)
    return texts


# -----------------------------------------------------------------------------
# helpers

def space_separated_values(argv, defaults):
    """`--num_samples 5` -> `--num_samples=5`, so both spellings work. A bool key joins only a
    True/False after it: a bare `--compile` still means True."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:]
        if arg.startswith('--') and '=' not in arg and key in defaults:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if isinstance(defaults[key], bool):
                if nxt is not None and nxt.lower() in ('true', 'false', '1', '0'):
                    arg, i = f'{arg}={nxt}', i + 1
            elif nxt is None or nxt.startswith('--'):
                raise UserError(f"{arg} needs a value: {arg}=VALUE or {arg} VALUE")
            else:
                arg, i = f'{arg}={nxt}', i + 1
        out.append(arg)
        i += 1
    return out


def check_config(cfg):
    for key in ('num_samples', 'max_new_tokens'):
        if cfg[key] <= 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg['temperature'] < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {cfg['temperature']}")
    if cfg['top_k'] < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {cfg['top_k']}")
    if not 0 < cfg['top_p'] <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {cfg['top_p']}")


def sync(device):
    """Wait for the device, so the timing covers the work and not just its launch."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elif device == 'mps':
        torch.mps.synchronize()


def checkpoint_path(cfg):
    names = {'last': 'ckpt.pt', 'best': 'ckpt_best.pt'}
    path = os.path.join(cfg['out_dir'], names[cfg['ckpt']]) if cfg['ckpt'] in names else cfg['ckpt']
    if not os.path.isfile(path):
        if cfg['ckpt'] in names:
            raise UserError(f"no checkpoint at {path}: train first with `{train_command(cfg['out_dir'])}`")
        raise UserError(f"no checkpoint at {path} (--ckpt is 'last', 'best' or a path)")
    return path


def train_command(out_dir):
    """The command that trains into out_dir: the repo's config file that names it, when there is one."""
    config_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config')
    for path in sorted(glob.glob(os.path.join(config_dir, '*.py'))):
        try:
            cfg = configurator.parse_config([path], {'out_dir': None}, ignore_unknown_file_keys=True)
        except UserError:
            continue  # a config that only runs from the repo root, say
        if cfg['out_dir'] == out_dir:
            return f"python train.py config/{os.path.basename(path)}"
    return f"python train.py --out_dir={out_dir}"


def read_prompts(start):
    """([start], False), or (the non-blank lines of the file named by FILE:path, True)."""
    if not start.startswith('FILE:'):
        return [start], False
    path = start[len('FILE:'):]
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} not found")
    try:
        with open(path, encoding='utf-8') as f:
            prompts = [line.rstrip('\r\n') for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts: write one per line")
    return prompts, True


if __name__ == '__main__':
    main()
