"""
Sample from a trained model.

    python sample.py --num_samples 5                          # out-deepseek/ckpt.pt, each sample a new document
    python sample.py config/deepseek_mini.py --start="ROMEO:"  # the out_dir of a training config
    python sample.py --out_dir=out-mini --ckpt=best --temperature=0 --max_new_tokens=100
    python sample.py --start=FILE:prompts.txt > samples.txt   # one sample per line of the file

Everything comes from the checkpoint, the tokenizer included, so this runs where prepare.py never ran.
Each sample is printed as it is generated, under a `--- sample N ---` line; stdout holds only the
samples (redirect it to a file), while progress and the tokens/s figure go to stderr.

Prompts: text is encoded as is, except that the literal text <|endoftext|> becomes that token. The
default start is <|endoftext|> alone, the token every training document begins with, so each sample
is a new document. A sample is its prompt followed by the completion, <|endoftext|> tokens left
out; it ends at the first <|endoftext|> the model emits.
"""

import codecs
import glob
import os
import sys
import time

import torch

import checkpoint
import cli
import dataset
from cli import UserError
from dataset import EOT
from model import DeepSeekLM

# -----------------------------------------------------------------------------
# defaults
out_dir = 'out-deepseek'   # train.py's default and config/deepseek.py's
ckpt = 'last'              # 'last' = out_dir/ckpt.pt, 'best' = out_dir/ckpt_best.pt (lowest val loss), or a path
start = EOT                # prompt text, or FILE:path with one prompt per line (one sample per prompt)
num_samples = 5            # samples of a text prompt (unused with FILE:)
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
DEFAULTS = cli.settings_of(globals())
RULES = {
    'num_samples': (lambda v: v > 0, "> 0"),
    'max_new_tokens': (lambda v: v > 0, "> 0"),
    'temperature': (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    'top_k': (lambda v: v >= 0, ">= 0 (0 = off)"),
    'top_p': (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    'seed': (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
}


def main(argv):
    """Print the samples; returns their texts."""
    cfg, _ = cli.parse_config(argv, DEFAULTS, skip_file_keys=True)   # of a training config: its out_dir
    cli.check_ranges(cfg, RULES)
    prompts, from_file = read_prompts(cfg['start'])   # before the (maybe slow) load: fail fast
    dev, dt = cli.pick_device(cfg['device'], cfg['dtype'])
    device_type = dev.split(':')[0]

    # --- model and tokenizer, both from the checkpoint --------------------------------------------
    path = checkpoint_path(cfg)
    ck, mconf = checkpoint.load_checkpoint(path)
    enc = dataset.load_tokenizer(ck['tokenizer'])
    eot = enc.encode_single_token(EOT)
    with torch.device(dev):   # initialise straight on the device: much faster than on the CPU for big models
        model = DeepSeekLM(mconf)
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit model.py ({str(e).splitlines()[0]})") from None
    model.eval()
    if cfg['compile']:
        model.compile(dynamic=True)   # compiles forward, which generation calls once per token
    print(f"loaded {path}: iter {ck['iter_num']}, best val loss {ck['best_val_loss']:.4f} | "
          f"{model.num_params():,} parameters | {dev}, {str(dt).removeprefix('torch.')}", file=sys.stderr)
    del ck

    # --- prompts as token ids ----------------------------------------------------------------------
    block_size = mconf.block_size
    ids = []
    for i, text in enumerate(prompts):
        p = enc.encode(text, allowed_special={EOT}, disallowed_special=()) or [eot]
        if len(p) >= block_size:   # leave room in the window for at least one new token
            print(f"warning: {f'prompt {i + 1}' if from_file else 'the prompt'} is {len(p)} tokens, the model "
                  f"sees at most {block_size}: keeping its last {block_size - 1}", file=sys.stderr)
            p = p[-(block_size - 1):]
        ids.append(p)
    if not from_file:
        ids = ids * cfg['num_samples']

    # --- generate and print, one sample at a time: a prefill, then one token per step --------------
    def tokens(prompt_ids, n):
        idx = torch.tensor([prompt_ids], device=dev)
        with cli.autocast(device_type, dt):
            for nxt in model.generate_tokens(idx, n, temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                                             top_p=cfg['top_p'], use_cache=cfg['use_cache']):
                yield int(nxt[0])

    for _ in tokens(ids[0], 2):   # warm-up, so tokens/s measures generation, not one-time setup
        pass
    token_text = dataset.text_bytes(enc, mconf.vocab_size)
    torch.manual_seed(cfg['seed'])
    cli.sync(device_type)
    t0, n_new, texts = time.time(), 0, []
    for i, prompt_ids in enumerate(ids):
        print(f"--- sample {i + 1} ---", flush=True)
        text = Printer(token_text)
        text.add(prompt_ids)
        for token in tokens(prompt_ids, cfg['max_new_tokens']):
            n_new += 1   # the <|endoftext|> that ends a sample was generated too
            if token == eot:
                break
            text.add([token])
        texts.append(text.end())
    cli.sync(device_type)
    seconds = time.time() - t0
    print(f"{n_new:,} tokens in {seconds:.2f}s: {n_new / max(seconds, 1e-9):,.1f} tokens/s ({len(ids)} sample"
          f"{'s' if len(ids) > 1 else ''} x up to {cfg['max_new_tokens']} new tokens, KV cache "
          f"{'on' if cfg['use_cache'] else 'off'})", file=sys.stderr)
    return texts


class Printer:
    """Writes tokens to stdout as text while they come, given each id's bytes (dataset.text_bytes). A token
    can end inside a UTF-8 character, so bytes go through an incremental decoder."""

    def __init__(self, token_text):
        self.token_text, self.parts = token_text, []
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')

    def add(self, token_ids):
        self.write(self.decoder.decode(b''.join(self.token_text[t] for t in token_ids)))

    def write(self, s):
        self.parts.append(s)
        sys.stdout.write(s)
        sys.stdout.flush()

    def end(self):
        self.write(self.decoder.decode(b'', final=True) + '\n')
        return ''.join(self.parts)[:-1]


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
            cfg, _ = cli.parse_config([path], {'out_dir': ''}, skip_file_keys=True)
        except UserError:
            continue   # a config that only runs from the repo root, say
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
    cli.run(main, sys.argv[1:])
