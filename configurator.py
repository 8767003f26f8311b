"""
Config handling shared by prepare.py and train.py, nanoGPT style.

    python train.py config/deepseek_mini.py --batch_size=32 --compile=False

Arguments are processed left to right:
- an argument without a leading `--` is a plain-Python config file: it is run
  in a fresh namespace and its public names (no leading underscore; modules,
  functions and classes skipped) override the defaults;
- `--key=value` overrides one key. The value is read with ast.literal_eval,
  falling back to the raw string, and must match the type of the default.
  A bool key may also be given bare: `--force` means `--force=True`.
  `--key value` (with a space) is not accepted.

Unlike nanoGPT's configurator this returns a dict instead of poking globals(),
and every mistake (unknown key, wrong type, missing file) is a ConfigError with
a one-line message, so callers can print it and exit without a traceback.
"""

import ast
import difflib
import inspect
import os
import sys
import traceback


class UserError(Exception):
    """A mistake the user can fix (bad input, missing data); printed as one line, no traceback."""


class ConfigError(UserError):
    """A bad config file or --key=value argument."""


def _unknown_key(key, defaults, where):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    if close:
        hint = f"did you mean '{close[0]}'?"
    else:
        hint = "known keys: " + ", ".join(sorted(defaults))
    return ConfigError(f"unknown config key '{key}'{where} ({hint})")


def _type_name(t):
    return {int: "an int", float: "a float", bool: "a bool (True/False)", str: "a string"}.get(t, t.__name__)


def _check_type(key, value, default, shown):
    """Return value converted to the default's type, or raise ConfigError. `shown` is what the user typed."""
    if default is None:
        return value  # no default type to check against
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is float:
        # an int is fine where a float is expected (--learning_rate=1 means 1.0); a bool is not
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # --max_iters=1e4 reads as a float; accept it when it is a whole number
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is tuple and isinstance(value, list):
        return tuple(value)
    elif isinstance(value, want):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(want)}, got {shown}")


def _parse_cli_value(key, raw, default):
    """Turn the text after `--key=` into a Python value of the default's type."""
    if isinstance(default, bool):
        # accept the spellings people actually type on a command line
        spelled = {"true": True, "false": False, "1": True, "0": False}
        if raw.lower() in spelled:
            return spelled[raw.lower()]
        raise ConfigError(f"config key '{key}' expects a bool (True/False), got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw  # not a Python literal: a bare string like --dataset=tinystories
    if isinstance(default, str) and not isinstance(value, str):
        value = raw  # a str key takes any text, e.g. --data_dir=2024 stays '2024'
    return _check_type(key, value, default, repr(raw))


def _load_config_file(path):
    """Run a config file in a fresh namespace and return its public names."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        # report the line inside the config file, not inside this module
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
        where = f" line {lines[-1]}" if lines else ""
        raise ConfigError(f"config file {path}{where}: {type(e).__name__}: {e}") from None
    return {
        k: v for k, v in namespace.items()
        if not k.startswith("_") and not (inspect.ismodule(v) or inspect.isfunction(v) or inspect.isclass(v))
    }


def parse_config(argv, defaults, *, ignore_unknown_file_keys=False):
    """
    Merge config files and --key=value overrides from argv into a copy of defaults.

    ignore_unknown_file_keys: True to silently skip keys from config FILES that are
    not in defaults (prepare.py reads train configs this way), or a set of names to
    skip. Unknown --keys on the command line are always an error.
    """
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if key not in defaults:
                raise _unknown_key(key, defaults, "")
            if not eq:
                if isinstance(defaults[key], bool):
                    raw = "True"  # a bare --force means --force=True
                else:
                    raise ConfigError(f"bad argument '{arg}': use --{key}=VALUE (with '=', not a space)")
            config[key] = _parse_cli_value(key, raw, defaults[key])
        elif arg.startswith("-"):
            raise ConfigError(f"bad argument '{arg}': use --key=VALUE or a config file path")
        else:
            for key, value in _load_config_file(arg).items():
                if key not in defaults:
                    ignored = ignore_unknown_file_keys is True or (
                        isinstance(ignore_unknown_file_keys, (set, frozenset)) and key in ignore_unknown_file_keys)
                    if ignored:
                        continue
                    raise _unknown_key(key, defaults, f" in {arg}")
                config[key] = _check_type(key, value, defaults[key], f"{value!r} (in {arg})")
    return config


def main_guard(fn, *args, **kwargs):
    """
    Run fn(*args, **kwargs); a UserError/ConfigError becomes one line on stderr and exit code 2.
    Programming errors still get their traceback.
    """
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
