# Let the tests import the repo's top-level modules (model, cli, train, ...) under plain `pytest` too.
import functools
import http.server
import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use tiny models, which gain nothing from threads; on shared cores extra threads
    can stall badly. (Subprocesses started by the tests keep their own thread count.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_hugging_face(monkeypatch):
    """No test reaches the network: TinyStories, prepare.py's default, is asked of a port on 127.0.0.1 where
    nothing listens, unless the test serves it there itself (HF_ENDPOINT, as tinystories_mirror does)."""
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')


def tiny_stories(n, seed=0):
    """n short stories in TinyStories' style (a few hundred characters each)."""
    import random
    rng = random.Random(seed)
    names, things = ['Lily', 'Tom', 'Sue', 'Max', 'Ben', 'Mia'], ['ball', 'kite', 'cat', 'boat', 'cake', 'tree']
    stories = []
    for i in range(n):
        name, thing, friend = rng.choice(names), rng.choice(things), rng.choice(names)
        stories.append(f"Once upon a time, {name} found a {rng.choice(['red', 'big', 'shiny'])} {thing} in the park.\n"
                       f"{name} said, \"Look, {friend}! Can we play with it?\" {friend} smiled and nodded.\n"
                       f"They played all day until the sun went down. Story {i} ends happily.")
    return stories


def tinystories_file(stories):
    """The text of a TinyStories V2 file: each story followed by a line <|endoftext|>."""
    return ''.join(f"{story}\n<|endoftext|>\n" for story in stories)


@pytest.fixture
def tinystories_mirror(tmp_path_factory, monkeypatch):
    """huggingface.co's TinyStories in miniature, served on 127.0.0.1 with HF_ENDPOINT pointing at it, so that
    a plain `python prepare.py` prepares it: 200 train and 20 valid stories in the files' own format. Returns
    (train stories, valid stories)."""
    root = tmp_path_factory.mktemp('hub')
    folder = root / 'datasets' / 'roneneldan' / 'TinyStories' / 'resolve' / 'main'
    folder.mkdir(parents=True)
    stories = tiny_stories(220)
    for split, part in (('train', stories[:200]), ('valid', stories[200:])):
        (folder / f'TinyStoriesV2-GPT4-{split}.txt').write_text(tinystories_file(part), encoding='utf-8')
    quiet = type('Quiet', (http.server.SimpleHTTPRequestHandler,), {'log_message': lambda *args: None})
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{server.server_address[1]}')
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    yield stories[:200], stories[200:]
    server.shutdown()
    server.server_close()
