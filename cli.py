"""The command line every script shares: config files and --key=value overrides, progress on the terminal, and
one-line errors (UserError, call_main). No script imports another script, only the modules beside them."""

import ast
import ctypes
import difflib
import inspect
import math
import os
import shlex
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
LAST_OUTPUT = [0.0]   # when a script last wrote to stdout: a Heartbeat counts silence from then


class UserError(Exception):
    """A mistake the user can fix (bad input, missing data, a busy folder): one line, no traceback, exit 2."""


# --- The command line of every script: python SCRIPT.py [config/FILE.py ...] [--key=value | --key value ...]
# Config files (plain Python whose public names override the defaults) apply left to right, then the overrides,
# wherever they stand (a malformed argument is refused before any config file is read). Values are Python
# literals, or plain text for string keys, and must match the default's type. Bools take true/false/yes/no/1/0,
# and a bare --flag means --flag=true; a key whose default is None takes true/false/auto. --help lists the keys.

BOOL_WORDS = {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}


def settings_of(namespace):
    """A script's settings: its module's lowercase public names that hold a plain value (not EOT, not helpers)."""
    return {k: v for k, v in namespace.items() if k.islower() and not k.startswith('_')
            and isinstance(v, (int, float, str, bool, type(None)))}


def parse_config(argv, defaults, skip_file_keys=()):
    """Config files, then overrides, from argv merged into a copy of defaults. Returns (config, origin): origin maps
    each key set to where it came from (the file's path, or '--' for an override). Config files may also set
    keys in skip_file_keys (another script's; True = any), which are ignored; any other unknown key is an error."""
    config, origin = dict(defaults), {}
    items = split_argv(argv, defaults)
    for _, _, path in (item for item in items if item[2]):
        for key, value in read_config_file(path).items():
            if key not in defaults:
                # another script's key is skipped, unless it looks like a misspelling of one of ours
                typo = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.85)
                if (skip_file_keys is True or key in skip_file_keys) and not typo:
                    continue
                raise unknown_key(key, defaults, f" in {path}")
            config[key] = check_type(key, value, defaults[key], f"{show(value)} (in {path})")
            origin[key] = path
    for key, raw, _ in (item for item in items if item[0]):
        config[key] = parse_value(key, raw, defaults[key])
        origin[key] = '--'
    return config, origin


def split_argv(argv, defaults):
    """argv as a list of (key, raw value, None) overrides and (None, None, path) config files, in order:
    --key=VALUE, --key VALUE, a bare --flag for a bool, or a path. --help prints the keys and exits."""
    items, i = [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ('-h', '--help'):
            print_help(defaults)
            raise SystemExit(0)
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if key not in defaults:
                raise unknown_key(key, defaults, '')
            if not eq:   # --key value, or a bare bool flag
                nxt = argv[i] if i < len(argv) else None
                if isinstance(defaults[key], bool) and (nxt or '').lower() not in BOOL_WORDS:
                    raw = 'true'
                elif nxt is None or nxt.startswith('--'):
                    raise UserError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
                else:
                    raw, i = nxt, i + 1
            items.append((key, raw, None))
        elif arg.startswith('-') and len(arg) > 1:
            raise UserError(f"bad argument '{arg}': use --key=VALUE, --key VALUE or a config file path")
        else:
            items.append((None, None, arg))
    return items


def repo_command(script, args):
    """The command line that runs the repo's script with args from here, for advice in messages: the script's
    full path outside the repo's folder (paths in args stay relative to here, as the scripts take them)."""
    path = script if os.path.abspath('.') == ROOT else os.path.join(ROOT, script)
    return shlex.join(['python', path, *args])


def print_help(defaults):
    """The running script's docstring, then every key it takes with its default."""
    out = getattr(sys.stdout, 'stream', sys.stdout)   # not Stdout's: help has no work to go on with
    doc = (sys.modules['__main__'].__doc__ or '').strip()
    usage = f"usage: python {os.path.basename(sys.argv[0])} [config/FILE.py ...] [--key=value | --key value ...]"
    print(f"{doc}\n\n{usage}" if doc else f"\n{usage}", file=out)
    print("keys (default):", *(f"  --{key}={defaults[key]!r}" for key in sorted(defaults)), sep='\n', file=out)
    out.flush()   # here, where call_main can tell a reader that went away, not at exit


def unknown_key(key, defaults, where):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(sorted(defaults))
    return UserError(f"unknown config key '{key}'{where} ({hint})")


def parse_value(key, raw, default):
    """The text after --key= as a value of the default's type (a default of None: a bool or 'auto')."""
    if default is None and raw.lower() in ('auto', 'none'):
        return None
    if default is None or isinstance(default, bool):
        if raw.lower() in BOOL_WORDS:
            return BOOL_WORDS[raw.lower()]
        expects = 'true/false/auto' if default is None else 'a bool (true/false/yes/no/1/0)'
        raise UserError(f"config key '{key}' expects {expects}, got {raw!r}")
    if isinstance(default, str):
        return raw   # any text, e.g. --data_dir=2024 stays '2024'
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return check_type(key, value, default, show(raw))


def show(value, limit=60):
    """repr() for an error message, cut short: a config may hold a value too long to print."""
    try:
        text = repr(value)
    except ValueError:   # an int of more digits than Python will print
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit] + '...'


def check_type(key, value, default, shown):
    """value as the default's type, or a UserError naming key, the expected type and what was given."""
    want, number = type(default), isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, bool) and want in (bool, type(None)) or (value is None and default is None):
        return value
    if want is int and number and (isinstance(value, int) or value.is_integer()):   # --max_iters=1e4
        return int(value)
    if want is float and number:
        try:
            value = float(value)   # --learning_rate=1 means 1.0
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' expects a finite number, got {shown}")
        return value
    if want is str and isinstance(value, str):
        return value
    names = {int: "an int", float: "a number", bool: "a bool (True/False)", str: "a string",
             type(None): "True, False or None (automatic)"}
    raise UserError(f"config key '{key}' expects {names.get(want, want.__name__)}, got {shown}")


def read_config_file(path):
    """Run a config file in a fresh namespace; its public names, without modules, functions and classes."""
    check_file(path, 'config file')
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: is it a Python config file?") from None
    namespace = {'__file__': path}   # lets a config build on another one beside it
    try:
        exec(compile(source, path, 'exec'), namespace)
    except SyntaxError as e:
        raise UserError(f"config file {path} line {e.lineno}: syntax error: {e.msg}") from None
    except SystemExit:   # exit() would end the script as if it had done its work
        raise UserError(f"config file {path} calls exit(): a config file only sets values; remove the call") from None
    except Exception as e:
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
        where = f" line {lines[-1]}" if lines else ""
        raise UserError(f"config file {path}{where}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and not (inspect.ismodule(v) or inspect.isfunction(v) or inspect.isclass(v))}


def check_file(path, what='', fix="give the path of a file", missing_ok=False):
    """path, if it is a regular file to read (or, with missing_ok, nothing at all). A missing path, a folder, a
    pipe or device (which would hang the reader) or a broken link is a UserError that says which."""
    if os.path.isfile(path) or missing_ok and not os.path.lexists(path):
        return path
    kind = ('is a folder, not a file' if os.path.isdir(path) else 'is not a regular file (a pipe or a device)'
            if os.path.exists(path) else 'is a broken link (to a missing file, or links in a loop)'
            if os.path.lexists(path) else 'not found')
    raise UserError(f"{what} {path} {kind}: {fix}".lstrip())


def check_ranges(cfg, rules):
    """rules: {key: (test, what it must be)}. The first key whose value fails its test is a UserError."""
    for key, (ok, must) in rules.items():
        if not ok(cfg[key]):
            raise UserError(f"{key} must be {must}, got {show(cfg[key])}")


class Stdout:
    """sys.stdout for work that goes on unwatched (training, preparing data): when its reader goes away (`| head`),
    its file fills the disk or it was closed (`>&-`), stderr says so once and the work goes on. Feeds the Heartbeat."""

    def __init__(self, stream, going_on):
        self.stream, self.going_on, self.lost = stream, going_on, False

    def write(self, text):
        LAST_OUTPUT[0] = time.time()
        if not self.lost:
            try:
                if self.stream is None:
                    raise OSError(0, 'closed')
                self.stream.write(text)
            except (OSError, ValueError) as e:
                self.lose(e)
        return len(text)

    def flush(self):
        if not self.lost and self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError) as e:
                self.lose(e)

    def isatty(self):
        return not self.lost and self.stream is not None and self.stream.isatty()

    def lose(self, error):
        self.lost = True
        try:   # the stream's own later flushes (at exit, too) go nowhere instead of failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        reason = 'its reader went away' if isinstance(error, BrokenPipeError) else getattr(error, 'strerror', None) or error
        print(f"note: standard output is gone ({reason}); {self.going_on}", file=sys.stderr, flush=True)

    def __getattr__(self, name):   # fileno, encoding, ...
        return getattr(self.stream, name)


class Progress:
    """How far a long piece of work has come, so that slow never looks like hung: on a terminal one line rewritten
    in place, in a file or pipe a line every `every` seconds; nothing for work done within `after` seconds."""

    def __init__(self, what, total=None, unit='', after=2.0, every=10.0, stream=None):
        self.what, self.total, self.unit, self.after, self.every = what, total, unit, after, every
        self.stream = stream or sys.stdout
        self.tty, self.printed = self.stream.isatty(), False
        self.t0 = self.shown = time.time()

    def update(self, done):
        now = time.time()
        if now - self.t0 < self.after or now - self.shown < (0.5 if self.tty else self.every):
            return
        self.shown, self.printed, elapsed = now, True, now - self.t0
        when = fmt_time(elapsed)
        if self.total and done:
            when = f"{100 * done / self.total:.0f}%, {when}, ETA {fmt_time(elapsed * (self.total - done) / done)}"
        line = f"{self.what}: {done:,}" + (f"/{self.total:,}" if self.total else '')
        line += (f" {self.unit}" if self.unit else '') + f" ({when})"
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + '\n')
        self.stream.flush()
        LAST_OUTPUT[0] = now

    def close(self):
        """End the updating line on a terminal, so that the next print starts on a line of its own."""
        if self.tty and self.printed:
            self.stream.write('\n')
            self.stream.flush()


class Heartbeat:
    """For work that runs long without printing (a big model's training step on a CPU): a background thread says
    what is still running after every `every` seconds of silence, counted from the last line the script printed
    (LAST_OUTPUT), not from beat(). Call beat(what) as each piece of work starts, and close() at the end."""

    def __init__(self, every=25.0, active=True, stream=None):
        self.every, self.what, self.last, self.stream = every, '', time.time(), stream
        self.done = threading.Event()
        if active:   # under torchrun, the first process speaks for all
            threading.Thread(target=self.run, daemon=True).start()

    def beat(self, what):
        self.what = what

    def run(self):
        while not self.done.wait(1.0):
            silent = time.time() - max(self.last, LAST_OUTPUT[0])
            if self.what and silent >= self.every:
                print(f"  ... {self.what} (still running, {fmt_time(silent)} since the last line)",
                      file=self.stream or sys.stdout, flush=True)
                self.last = time.time()

    def close(self):
        self.done.set()


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def call_main(main, *args, going_on_without_stdout=None):
    """Call main(*args) as every script's command line does: a UserError, an OS error (a path that is a file, no
    permission, a full disk) or running out of memory is one line on stderr and exit code 2; Ctrl-C is 130; programming
    errors keep their traceback. Under torchrun the first process speaks for all: the others stay quiet about a problem
    they share, or one that stopped the first. going_on_without_stdout: what the script does when stdout goes away
    (Stdout); None: it stops quietly with exit code 1 (a sampler whose reader is gone has no one to write for)."""
    if going_on_without_stdout:
        sys.stdout = Stdout(sys.stdout, going_on_without_stdout)
    quiet = os.environ.get('RANK', '0') != '0'
    try:
        return main(*args)
    except UserError as e:
        message = str(e)
    except (MemoryError, RuntimeError) as e:   # "can't allocate memory": the CPU allocator's own out-of-memory error
        torch = sys.modules.get('torch')   # imported by the scripts that use it (prepare.py starts without it)
        device_oom = torch is not None and isinstance(e, torch.OutOfMemoryError)
        if isinstance(e, MemoryError) or device_oom or "can't allocate memory" in str(e):
            where = ' on the device' if device_oom else ''
            message, quiet = (f"out of memory{where}: ask for less at once (a smaller --batch_size, --block_size or "
                              f"--num_samples) or a smaller model"), False
        elif quiet and torch is not None and torch.distributed.is_available() and isinstance(e, torch.distributed.DistError):
            message = "lost the other processes"   # the first one stopped and said why
        else:
            raise
    except BrokenPipeError:   # the reader of stdout went away (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        message = f"{e.strerror or e}{where} (check the path, its permissions and the free disk space)"
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        torch = sys.modules.get('torch')
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not quiet:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def keep_freed_memory():
    """On Linux/glibc, keep freed memory in the process: glibc maps blocks over 32 MB (a layer's activations at a
    large batch) fresh and unmaps them on free, so each CPU step would page-fault through them again."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: serve blocks under 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap top untrimmed
    except (OSError, AttributeError):   # other systems, musl and other libcs: nothing to tune
        pass
