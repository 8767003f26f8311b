"""Copy check: has the model learnt its training text by heart? For each sample, the longest span of characters it
shares with the training text (the checkpoint's train split), which sample.py reports when that data is here.

How: polynomial hashes (mod 2**64) of windows of the texts, which numpy computes for every position at once. One pass
over the training text finds where any sample's windows of 12 characters occur; from those places each sample's
longest shared span is found by doubling its length, then halving the gap, every step looking only at the places that
still match. A sample that shares fewer than 12 characters takes a pass for 6, then 3, then 1. Every match is
confirmed by comparing the characters: a hash collision can cost time, never give a wrong answer."""

import contextlib
import os

import numpy as np

import checkpoint
import cli
import dataset
from cli import UserError
from dataset import EOT

SEPARATOR = 0x110000      # one past the last Unicode code point: in no text, so no span runs across two documents
PASSES = (12, 6, 3, 1)    # span lengths of the passes over the training text: each next one for samples sharing less
BASE = 0x9E3779B97F4A7C15  # odd, so multiplying by it mod 2**64 loses nothing
MAX_TOKENS = 10_000_000   # a larger training text is not read (about 150 bytes of memory per token)


def code_points(text):
    """A str as an array of its code points (uint32), one per character, as Python indexes it."""
    return np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype='<u4')


def corpus_of(documents):
    """The code points of a list of texts, each followed by SEPARATOR."""
    parts = []
    for doc in documents:
        parts += [code_points(doc), np.array([SEPARATOR], dtype=np.uint32)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


class Windows:
    """Hashes of any window of a text: text[p:p+L] hashes to sum_j text[p+j] * B**(j + E - p), which is the same
    for equal windows wherever they are (E is one exponent for all texts: no division needed)."""

    def __init__(self, cp, powers):
        self.cp, self.n, self.powers, self.top = cp, len(cp), powers, len(powers) - 1
        self.prefix = np.zeros(self.n + 1, dtype=np.uint64)
        np.multiply(cp, powers[:self.n], out=self.prefix[1:])
        np.cumsum(self.prefix[1:], out=self.prefix[1:])

    def all(self, L):
        """The hash of the window at every start 0 .. n-L."""
        count = max(0, self.n - L + 1)
        h = self.prefix[L:] - self.prefix[:count]
        h *= self.powers[self.top - count + 1:self.top + 1][::-1]   # B**(E - p) for p = 0 .. count-1
        return h

    def at(self, starts, L):
        """The hashes of the windows at these starts (each must end within the text)."""
        h = self.prefix[starts + L] - self.prefix[starts]
        h *= self.powers[self.top - starts]
        return h


def longest_shared(samples, corpus):
    """For each sample (a str), (length, span): a longest substring of it that occurs in corpus (code points
    from corpus_of); (0, '') for a sample that shares no character with it."""
    powers = np.full(max([len(corpus), *map(len, samples)]) + 1, BASE, dtype=np.uint64)   # len: one per code point
    powers[0] = 1
    np.cumprod(powers, out=powers)
    big = Windows(corpus, powers)
    small = [Windows(code_points(s), powers) for s in samples]
    best = [(0, 0)] * len(samples)   # (length, start in the sample)
    todo, below = list(range(len(samples))), len(powers)   # below: what the samples still to do share at most
    for L in PASSES:   # nearly always one pass: samples short of L characters in common take the next
        found = pass_over(big, {s: small[s] for s in todo}, L)
        for s, (places, start) in found.items():
            if start is not None:
                best[s] = extend(big, small[s], places, L, start, min(small[s].n, below))
        todo, below = [s for s in todo if best[s][0] == 0], L - 1
    return [(L, samples[s][i:i + L]) for s, (L, i) in enumerate(best)]


def pass_over(big, small, L):
    """{sample: (places, start)} for the samples ({sample: Windows}) long enough for windows of length L:
    places are the starts in the training text of every window of length L that hashes like one of the
    sample's (so every real match is among them), start the start in the sample of a confirmed match, or None."""
    which = [s for s in small if small[s].n >= L]
    if not which:
        return {}
    wanted = [np.unique(small[s].all(L)) for s in which]
    union = np.unique(np.concatenate(wanted))
    # a table of one byte per hash prefix (cache-sized) rules out most of the text at one look-up each
    bits = int(min(max(20, np.ceil(np.log2(len(union))) + 4), 26))
    shift = np.uint64(64 - bits)
    table = np.zeros(1 << bits, dtype=np.bool_)
    table[(union >> shift).view(np.int64)] = True   # under 2**26: the same number as an int64
    h = big.all(L)
    places = np.flatnonzero(table[(h >> shift).view(np.int64)])
    h = h[places]
    k = np.minimum(np.searchsorted(union, h), len(union) - 1)
    hit = union[k] == h
    places, k = places[hit], k[hit]
    found = {}
    for s, own in zip(which, wanted):
        mine = np.zeros(len(union), dtype=np.bool_)
        mine[np.searchsorted(union, own)] = True
        found[s] = matches(big, small[s], places[mine[k]], L)
    return found


def extend(big, text, places, L, start, hi):
    """(length, start in text) of text's longest span in the training text, given a confirmed match of length
    L at `start`, places (the starts of every match of length L in the training text, and maybe more), and hi,
    a length it does not exceed."""
    doubling = True
    while L < hi:
        mid = min(2 * L, hi) if doubling else (L + hi + 1) // 2
        matched, found = matches(big, text, places, mid)
        if found is None:
            hi, doubling = mid - 1, False
        else:
            L, start, places = mid, found, matched   # every longer match starts at one of these
    return L, start


def matches(big, text, places, L):
    """(matched, start): those of places whose window of length L in the training text hashes like one of text's, and
    the start in text of a window equal to one of them character for character (None: all hash collisions)."""
    places = places[places + L <= big.n]
    h = big.at(places, L)
    own = text.all(L)
    order = np.argsort(own, kind='stable')
    own = own[order]
    k = np.minimum(np.searchsorted(own, h), len(own) - 1)
    hit = own[k] == h
    matched, k, h = places[hit], k[hit], h[hit]
    for q in range(len(matched)):   # the first almost always matches: only a hash collision moves on
        p, j = int(matched[q]), int(k[q])
        while j < len(own) and own[j] == h[q]:
            i = int(order[j])
            if np.array_equal(big.cp[p:p + L], text.cp[i:i + L]):
                return matched, i
            j += 1
    return matched, None


# --- The training text of a checkpoint ---

def training_text(data, tokenizer_spec):
    """(code points of the training text, number of documents) of a checkpoint, from ck['data'] and ck['tokenizer']:
    the train split, decoded with the checkpoint's tokenizer, each document followed by SEPARATOR. A UserError says
    why not: no data recorded, no intact dataset in its folder, or not the one the checkpoint was trained on."""
    if not isinstance(data, dict) or not isinstance(data.get('dir'), str):
        raise UserError("the checkpoint does not record its training data")
    ddir = data['dir']
    # locked as train.py locks it: a prepare.py rewriting the folder is not read halfway
    lock = checkpoint.lock_folder(ddir, 'copy check', shared=True) if os.path.isdir(ddir) else None
    with lock or contextlib.nullcontext():   # a lock file, closed at the end
        made_with = data.get('prepared_with')   # missing or damaged: read_meta says how to make it again
        meta = dataset.read_meta(ddir, dataset.remake_command(made_with, ddir) if isinstance(made_with, dict) else None)
        if dataset.differences(data, tokenizer_spec, meta):
            raise UserError(f"{ddir} is not this checkpoint's training data (other text, split or tokenizer)")
        if meta['train_tokens'] > MAX_TOKENS:
            raise UserError(f"the training text in {ddir} is {meta['train_tokens']:,} tokens, more than the "
                            f"{MAX_TOKENS:,} the check reads (--copy_check=false turns it off)")
        ids = np.fromfile(cli.check_file(os.path.join(ddir, 'train.bin'), 'training data'), dtype=meta['dtype'])
    enc = dataset.load_tokenizer(tokenizer_spec)
    eot = enc.encode_single_token(EOT)
    token_text = dataset.text_bytes(enc, max(int(ids.max(initial=0)), eot) + 1)   # <|endoftext|>: no bytes
    cuts = [0, *np.flatnonzero(ids == eot).tolist(), len(ids)]   # every document starts with <|endoftext|>
    ids = ids.tolist()
    documents = [b''.join(map(token_text.__getitem__, ids[a:b])).decode('utf-8', errors='replace')
                 for a, b in zip(cuts[:-1], cuts[1:])]
    documents = [doc for doc in documents if doc]
    return corpus_of(documents), len(documents)
