"""copycheck.py: the longest span a sample shares with a training text, against a brute-force search (random
texts, edge cases, hashes made to collide), and the training text of a checkpoint read back from its data."""

import random

import numpy as np
import pytest

import copycheck
import dataset
import prepare
from dataset import EOT


def brute(sample, documents):
    """The length of the longest substring of sample found inside one of the documents."""
    for n in range(len(sample), 0, -1):
        if any(sample[i:i + n] in doc for i in range(len(sample) - n + 1) for doc in documents):
            return n
    return 0


def check(samples, documents):
    found = copycheck.longest_shared(samples, copycheck.corpus_of(documents))
    assert len(found) == len(samples)
    for sample, (n, span) in zip(samples, found):
        assert n == brute(sample, documents), (sample, documents)
        assert len(span) == n and span in sample and (n == 0 or any(span in doc for doc in documents))
    return found


ALPHABETS = ['ab', 'abc', 'ab é', 'aé日😀\n', 'a']   # é and 日 are several UTF-8 bytes, 😀 is past the BMP


@pytest.mark.parametrize('base', [copycheck.BASE, 1, 2**63 + 1])   # 1: every anagram collides
def test_random_texts_agree_with_brute_force(base, monkeypatch):
    monkeypatch.setattr(copycheck, 'BASE', base)
    rng = random.Random(base % 1000)
    for _ in range(150):
        alphabet = rng.choice(ALPHABETS)
        word = lambda n: ''.join(rng.choice(alphabet) for _ in range(n))
        documents = [word(rng.randint(0, 40)) for _ in range(rng.randint(0, 3))]
        samples = [word(rng.randint(0, 30)) for _ in range(rng.randint(1, 4))]
        if documents and documents[0] and rng.random() < 0.5:   # a copied piece in a sample, up to its edges
            doc = documents[0]
            a = rng.randrange(len(doc))
            b = rng.randint(a + 1, len(doc))
            samples[0] = rng.choice(['', word(3)]) + doc[a:b] + rng.choice(['', word(3)])
        check(samples, documents)


def test_edges():
    plays = ['To be, or not to be, that is the question', 'Now is the winter of our discontent']
    found = check(['To be, or not', 'our discontent', 'xyz', '', 'TTTTTTT', 'questionNow is'], plays)
    assert found[0] == (13, 'To be, or not')     # the whole sample, at the very start of the text
    assert found[1] == (14, 'our discontent')    # at the very end
    assert found[2] == (0, '')                   # no character in common
    assert found[3] == (0, '')                   # an empty sample
    assert found[4] == (1, 'T')
    assert found[5] == (8, 'question')           # no span runs across two documents
    check(['anything'], [])                      # no training text at all
    check(['aaaaaaaaaaaaaaaaaaaa', 'aaaa'], ['aaaaaaaaaaaaa', 'baaab'])   # repeats: many equal windows
    check(['a sample longer than the training text it is checked against'], ['the training text'])
    check(['日本語のテキスト😀😀と English'], ['テキスト😀😀と', 'English'])


@pytest.mark.parametrize('n', [1, 2, 3, 5, 6, 7, 11, 12, 13, 24, 25, 49])   # either side of each pass's length
def test_copies_at_the_edges_of_the_training_text_and_of_a_sample(n):
    """A span copied from the very start or the very end of the training text, placed at the start, the end or
    as the whole of a sample, is found whole (the brute force agrees); so it is where the training text ends
    right after the span, without the separator corpus_of adds."""
    rng = random.Random(n)
    word = lambda k: ''.join(rng.choice('abcdefgh') for _ in range(k))   # X and Y are in no document
    documents = [word(60), word(60), word(60)]
    for i, span in enumerate((documents[0][:n], documents[-1][-n:])):
        samples = [span, 'XY' + span, span + 'XY', 'XY' + span + 'XY']
        corpora = [copycheck.corpus_of(documents)] + i * [copycheck.corpus_of(documents)[:-1],
                                                          copycheck.code_points(documents[-1])]
        for corpus in corpora:
            assert copycheck.longest_shared(samples, corpus) == [(n, span)] * 4
        check(samples, documents)


def test_long_copies_in_long_texts():
    """Copies longer than the first pass's windows (8), in texts large enough to hold many false starts."""
    rng = random.Random(0)
    words = ['the', 'king', 'and', 'queen', 'my', 'lord', 'of', 'what', 'news', 'good', 'morrow', '\n']
    text = lambda n: ' '.join(rng.choice(words) for _ in range(n))
    documents = [text(2000) for _ in range(3)]
    samples = []
    for n in (9, 16, 17, 33, 64, 200, 1000):
        d = rng.choice(documents)
        a = rng.randrange(len(d) - n)
        samples.append(text(20) + 'X' + d[a:a + n] + 'Y' + text(20))
    found = copycheck.longest_shared(samples, copycheck.corpus_of(documents))
    for sample, (n, span) in zip(samples, found):
        inside = sample[sample.index('X') + 1:sample.index('Y')]
        assert n >= len(inside) and span in sample and any(span in d for d in documents)
        assert not any(sample[i:i + n + 1] in d for i in range(len(sample) - n) for d in documents)   # longest


def test_one_pass_over_the_training_text(monkeypatch):
    """The speed: samples that share 12 characters or more take one pass over the whole training text."""
    documents = ['Now is the winter of our discontent made glorious summer by this sun of York'] * 50
    corpus = copycheck.corpus_of(documents)
    passes = []
    every_window = copycheck.Windows.all

    def counted(self, L):
        if self.n == len(corpus):
            passes.append(L)
        return every_window(self, L)
    monkeypatch.setattr(copycheck.Windows, 'all', counted)
    samples = ['xx of our discontent, and more', 'made glorious summer by this sun qq']
    found = copycheck.longest_shared(samples, corpus)
    assert [n for n, _ in found] == [brute(s, documents) for s in samples] == [18, 33]
    assert passes == [copycheck.PASSES[0]]


# -----------------------------------------------------------------------------
# the training text of a checkpoint

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A prepared data folder (2 plays) and the ck['data'] and ck['tokenizer'] train.py records for it."""
    data_dir = str(tmp_path_factory.mktemp('data') / 'tiny')
    prepare.main([f'--data_dir={data_dir}', '--dataset=shakespeare', '--max_docs=2', '--val_docs=1', '--vocab_size=300'])
    meta = dataset.read_meta(data_dir)
    record = {'dir': data_dir, 'source': meta['source']['sha256'], 'prepared_with': meta['config'],
              'split': {'train_tokens': meta['train_tokens'], 'val_tokens': meta['val_tokens'],
                        'val_names': meta['source']['val_names']}}
    return record, dataset.tokenizer_spec(data_dir, meta), meta


def test_training_text_is_the_decoded_train_split(data):
    record, spec, meta = data
    corpus, n_docs = copycheck.training_text(record, spec)
    enc = dataset.load_tokenizer(spec)
    ids = np.fromfile(f"{record['dir']}/train.bin", dtype=meta['dtype']).tolist()
    documents = enc.decode(ids, errors='replace').split(EOT)[1:]   # every document starts with <|endoftext|>
    assert n_docs == len(documents) == meta['train_docs']
    want = copycheck.corpus_of(documents)
    assert np.array_equal(corpus, want)
    assert (corpus == copycheck.SEPARATOR).sum() == n_docs


@pytest.mark.parametrize('change, message', [
    (lambda r, s: {k: v for k, v in r.items() if k != 'dir'}, 'the checkpoint does not record its training data'),
    (lambda r, s: None, 'the checkpoint does not record its training data'),
    (lambda r, s: {**r, 'source': '0' * 64}, "is not this checkpoint's training data"),
    (lambda r, s: {**r, 'split': {**r['split'], 'train_tokens': r['split']['train_tokens'] + 1}},
     "is not this checkpoint's training data"),
    (lambda r, s: (r, {**s, 'ranks': s['ranks'].replace('\n', '\n\n', 1)}), "is not this checkpoint's training data"),
    (lambda r, s: {**r, 'dir': r['dir'] + '-elsewhere'}, 'no dataset in'),
])
def test_other_data_is_not_used(data, change, message):
    record, spec, _ = data
    changed = change(record, spec)
    record, spec = changed if isinstance(changed, tuple) else (changed, spec)
    with pytest.raises(dataset.UserError, match=message):
        copycheck.training_text(record, spec)


def test_too_much_training_text_is_not_read(data, monkeypatch):
    record, spec, meta = data
    monkeypatch.setattr(copycheck, 'MAX_TOKENS', meta['train_tokens'] - 1)
    with pytest.raises(dataset.UserError, match=r"tokens, more than the .* the check reads \(--copy_check=false"):
        copycheck.training_text(record, spec)
