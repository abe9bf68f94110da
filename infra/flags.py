"""The one place where command-line values are checked, for every script.

Each helper is an argparse ``type=``: a bad value ends as ``error: argument --batch_size:
must be an integer >= 1, got 0`` with the usage line and exit code 2, never a traceback.
``TrainConfig`` applies the same rules to values that come from Python instead of a
command line, so a config can never hold a value the parser would refuse.
"""
from __future__ import annotations

import argparse
import math
import socket

from infra.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: the docstring as written, and each flag's default after its help
    (unless the help already states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Every script's parser: no abbreviations (``--epoch`` is not silently ``--epochs``), and a
    mistake answers in two lines, with the closest flag name, instead of the whole usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def flag_names(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]

    def error(self, message: str):
        import difflib
        hints, names = [], self.flag_names()
        unknown = message.split("unrecognized arguments:", 1)[1] if "unrecognized arguments:" in message else ""
        for flag in (w.split("=")[0] for w in unknown.replace(",", " ").split() if w.startswith("--")):
            close = difflib.get_close_matches(flag, names, n=1, cutoff=0.6) if flag not in names else []
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
        self.exit(2, f"usage: {self.prog} [flags]  (all flags: {self.prog} --help)\n{self.prog}: error: {message}\n"
                  + "".join(f"  {h}\n" for h in hints))


DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"


class FlagError(UserError, argparse.ArgumentTypeError, ValueError):
    """A value outside its allowed range (argparse prints it after the flag's name)."""


def _number(kind, text):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise FlagError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise FlagError(f"must be a finite number, got {text!r}")
    return value


def int_range(lo: int | None = None, hi: int | None = None):
    """An integer in [lo, hi] (either bound optional)."""
    def check(text):
        v = _number(int, text)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise FlagError(f"must be an integer {_bounds(lo, hi)}, got {v}")
        return v
    check.__name__ = f"int{_bounds(lo, hi)}"
    return check


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite number in the range; ``lo_open``/``hi_open`` exclude the bound itself."""
    def check(text):
        v = _number(float, text)
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or \
              (hi is not None and (v > hi or (hi_open and v == hi)))
        if bad:
            raise FlagError(f"must be a number {_bounds(lo, hi, lo_open, hi_open)}, got {v:g}")
        return v
    check.__name__ = f"float{_bounds(lo, hi, lo_open, hi_open)}"
    return check


def _bounds(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def text(what: str = "value"):
    """A string with something in it besides spaces."""
    def check(s):
        if not isinstance(s, str) or not s.strip():
            raise FlagError(f"the {what} is empty")
        return s
    check.__name__ = "text"
    return check


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0, lo_open=True)
non_negative_float = float_range(0)
fraction = float_range(0, 1)          # [0, 1]
fraction_below_one = float_range(0, 1, hi_open=True)  # [0, 1)
port = int_range(1, 65535)


def check_value(name: str, rule, value):
    """Applies a rule outside argparse; raises ValueError naming the flag."""
    try:
        return rule(value)
    except FlagError as exc:
        raise FlagError(f"--{name} {exc}") from None


def port_is_free(host: str, port_number: int) -> bool:
    """True when a server could bind ``host:port`` now (checked before starting one, so a
    busy port is a message instead of a stack trace from the web server)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.getaddrinfo(host, port_number, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise FlagError(f"--host {host!r} is not an address or host name of this machine (e.g. 127.0.0.1, "
                        "0.0.0.0 for every interface)") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port_number))
        except OSError:
            return False
    return True
