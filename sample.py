"""Sample from a trained model.

    python sample.py --num_samples 5                          # out-deepseek/ckpt_best.pt, each sample a new document
    python sample.py config/deepseek_mini.py --start="ROMEO:"  # the out_dir of a training config
    python sample.py --out_dir=out-mini --ckpt=last --temperature=0 --max_new_tokens=100
    python sample.py --start=FILE:prompts.txt > samples.txt   # one sample per line of the file

Everything comes from the checkpoint, the tokenizer included, so this runs where prepare.py never ran. The default
checkpoint is the run's best (lowest val loss): its last unless the run overfit. Each sample is printed as it comes,
under a `--- sample N ---` line; stdout holds only the samples, progress and the tokens/s figure go to stderr.

Copy check: when the checkpoint's training data is here (the data folder it was trained on, unchanged), each sample's
longest span shared with the training text, its prompt left out, is reported on stderr: a model that recites its
training data shows it there. --copy_check=false turns it off.

Prompts: text is encoded as is, the literal text <|endoftext|> as that token. The default start is <|endoftext|>
alone, which every training document begins with, so each sample is a new document. A sample is its prompt and
completion, <|endoftext|> tokens left out; it ends at the first <|endoftext|> the model emits."""

import codecs
import os
import sys
import time

import torch

import checkpoint
import cli
import copycheck
import dataset
import devices
import preflight
from cli import UserError
from dataset import EOT
from model import DeepSeekLM

# -----------------------------------------------------------------------------
# defaults
out_dir = 'out-deepseek'   # train.py's default and config/deepseek.py's
ckpt = 'best'              # 'best' = out_dir/ckpt_best.pt (lowest val loss; else ckpt.pt), 'last' = out_dir/ckpt.pt, or a path
start = EOT                # prompt text, or FILE:path with one prompt per line (one sample per prompt)
num_samples = 5            # samples of a text prompt (unused with FILE:)
max_new_tokens = 500       # per sample; fewer when it ends with <|endoftext|>
temperature = 0.8          # 0 = greedy (argmax); < 1 sharper, > 1 more random
top_k = 200                # sample among the k likeliest tokens only (0 = all)
top_p = 1.0                # nucleus: the smallest set of tokens holding this much probability (1.0 = all)
seed = 1337                # same seed, same checkpoint, same flags: same samples
device = 'auto'            # 'auto' = cuda > mps > cpu
dtype = 'auto'             # 'auto' = devices.plan's: bfloat16 on GPUs that compute in it, float16 on older ones, float32 elsewhere
compile = False            # torch.compile the model (pays off for long generations on a GPU)
use_cache = True           # False = recompute the whole window for every token (slow; for comparison)
copy_check = True          # report each sample's longest span shared with the training text (when that data is here)
# -----------------------------------------------------------------------------
DEFAULTS = cli.settings_of(globals())
SAY_LOADING = 100_000_000  # bytes: a checkpoint this big gets a line before its load (ckpt_best.pt of the card: 2.7 GB)
RULES = {
    'num_samples': (lambda v: 0 < v <= 2**20, "in [1, 2**20]"),
    'max_new_tokens': (lambda v: 0 < v <= 2**24, "in [1, 2**24]"),
    'temperature': (lambda v: v >= 0, ">= 0 (0 = greedy)"),
    'top_k': (lambda v: 0 <= v <= 2**31, "in [0, 2**31] (0 = off)"),
    'top_p': (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    'seed': (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
}


def main(argv):
    """Print the samples; returns their texts."""
    cfg, _ = cli.parse_config(argv, DEFAULTS, skip_file_keys=True)   # of a training config: its out_dir
    cli.check_ranges(cfg, RULES)
    prompts, from_file = read_prompts(cfg['start'])   # before the (maybe slow) load: fail fast
    dev = devices.plan(cfg['device'], cfg['dtype'])

    # --- model and tokenizer, both from the checkpoint --------------------------------------------
    path = preflight.checkpoint_file(cfg['out_dir'], cfg['ckpt'])
    if os.path.getsize(path) >= SAY_LOADING:   # a big file takes a while: say so before (small: one line if refused)
        print(f"loading {path} ({size_text(os.path.getsize(path))}) ...", file=sys.stderr, flush=True)
    t_load = time.time()
    ck, mconf = checkpoint.load_checkpoint(path)
    enc = dataset.load_tokenizer(ck['tokenizer'])
    eot = enc.encode_single_token(EOT)
    try:
        model = DeepSeekLM.from_state_dict(mconf, ck['model'], dev.device)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit model.py ({str(e).splitlines()[0]})") from None
    model.eval()
    dev.apply(model)
    if cfg['compile']:
        model.compile(dynamic=True)   # compiles forward, which generation calls once per token
    val, best = ck.get('val_loss', ck['best_val_loss']), ck['best_val_loss']
    better = f" (the run's best was {best:.4f}: --ckpt=best samples that model)" if val > best else ''
    print(f"loaded {path} in {time.time() - t_load:.1f}s: iter {ck['iter_num']}, val loss {val:.4f}{better} | "
          f"{model.num_params():,} parameters | {dev.line}", file=sys.stderr)
    trained_on, tokenizer_spec = ck.get('data'), ck['tokenizer']
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
        idx = torch.tensor([prompt_ids], device=dev.device)
        with dev.autocast():
            for nxt in model.generate_tokens(idx, n, temperature=cfg['temperature'], top_k=cfg['top_k'] or None,
                                             top_p=cfg['top_p'], use_cache=cfg['use_cache']):
                yield int(nxt[0])

    list(tokens(ids[0], 2))   # warm-up, so tokens/s measures generation, not one-time setup
    token_text = dataset.text_bytes(enc, mconf.vocab_size)
    torch.manual_seed(cfg['seed'])
    dev.sync()
    t0, n_new, texts, completions = time.time(), 0, [], []
    for i, prompt_ids in enumerate(ids):
        print(f"--- sample {i + 1} ---", flush=True)
        text = Printer(token_text)
        text.add(prompt_ids)   # a prompt is whole characters: all of it is printed here
        prompt_chars = sum(map(len, text.parts))
        for token in tokens(prompt_ids, cfg['max_new_tokens']):
            n_new += 1   # the <|endoftext|> that ends a sample was generated too
            if token == eot:
                break
            text.add([token])
        texts.append(text.end())
        completions.append(texts[-1][prompt_chars:])
    dev.sync()
    seconds = time.time() - t0
    print(f"{n_new:,} tokens in {seconds:.2f}s: {n_new / max(seconds, 1e-9):,.1f} tokens/s ({len(ids)} sample"
          f"{'s' if len(ids) > 1 else ''} x up to {cfg['max_new_tokens']} new tokens, KV cache "
          f"{'on' if cfg['use_cache'] else 'off'})", file=sys.stderr)
    if cfg['copy_check']:
        report_copies(completions, trained_on, tokenizer_spec)
    return texts


def report_copies(completions, data, tokenizer_spec):
    """On stderr, each completion's longest span shared with the training text (ck['data'], decoded with
    ck['tokenizer']) and the longest of all; or one line saying why not. Returns [(length, span)] or None."""
    t0 = time.time()
    try:
        corpus, n_docs = copycheck.training_text(data, tokenizer_spec)
    except UserError as e:
        print(f"copy check skipped: {e}", file=sys.stderr)
        return None
    except OSError as e:   # unreadable (permissions, a disk error): the samples are out, so only say so
        print(f"copy check skipped: cannot read {e.filename or 'the training data'} ({e.strerror or e})",
              file=sys.stderr)
        return None
    except MemoryError:
        print("copy check skipped: out of memory reading the training text (--copy_check=false turns it off)",
              file=sys.stderr)
        return None
    found = copycheck.longest_shared(completions, corpus)
    for i, (n, span) in enumerate(found):
        print(f"copy check, sample {i + 1}: longest span shared with the training text is {characters(n)}: "
              f"{quoted(span)}", file=sys.stderr)
    top = max(range(len(found)), key=lambda i: found[i][0])
    print(f"copy check: longest span shared with the training text over {len(found)} sample"
          f"{'s' if len(found) > 1 else ''} is {characters(found[top][0])} (sample {top + 1}); training text "
          f"{os.path.join(data['dir'], 'train.bin')}: {len(corpus) - n_docs:,} characters, checked in "
          f"{time.time() - t0:.2f}s", file=sys.stderr)
    return found


def characters(n):
    return f"{n:,} character{'' if n == 1 else 's'}"


def quoted(text, limit=80):
    """text in double quotes, escaped (newlines, quotes, anything unprintable) and cut after limit characters."""
    def esc(c):
        if c in '"\\':
            return '\\' + c
        return c if c.isprintable() else c.encode('unicode_escape').decode('ascii')
    return '"' + ''.join(map(esc, text[:limit])) + '"' + ('...' if len(text) > limit else '')


def size_text(n):
    """A file size for people: 2.7 GB, 25.3 MB, 812 kB, 96 bytes."""
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n} bytes"


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


def read_prompts(start):
    """([start], False), or (the non-blank lines of the file named by FILE:path, True)."""
    if not start.startswith('FILE:'):
        return [start], False
    path = start[len('FILE:'):]
    if not path:
        raise UserError("--start=FILE: needs the path of a prompt file: --start=FILE:prompts.txt")
    cli.check_file(path, 'prompt file')   # a folder, pipe or device is named as such (a pipe would hang the read)
    try:
        with open(path, encoding='utf-8') as f:
            prompts = [line.rstrip('\r\n') for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts: write one per line")
    return prompts, True


if __name__ == '__main__':
    cli.call_main(main, sys.argv[1:])
