"""Argument types of the job commands: each one checks a value when the command line is parsed,
before the command touches Redis or a destination, so that a bad value is exit 2 with one line
naming the option (the parser's error: :class:`producer.cli.Parser`), never a traceback after a
job, a key or an object exists. Their messages start with the option and the value
(``--top-k 0: out of range, give 1 to 20``), as the commands' own ConfigErrors do.

Job ids. `hardnet submit` makes them with :func:`hnq.jobs.store.new_job_id`
(``20260101-120000-1a2b3c4d``). A command that takes one accepts what a worker accepts in a chunk
message (:class:`hnq.schema.ChunkTask`: letters, digits, ``.``, ``_``, ``-``, at most 128), and
only names that start with a letter or a digit: no ``/``, no ``..``, no hidden name, nothing that
could leave ``DEST/JOB_ID/`` or match more than one Redis key. The ids of jobs made by hand
(``hnq.jobs.store.JobStore.create``, the tests' ``j1`` or ``no-such-job``) have that shape too,
so an id that is well formed but unknown is still answered "unknown job" (exit 4)."""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable

from hnq.errors import ConfigError
from hnq.formats import parse_extensions

#: the job ids a command accepts (see the module doc)
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
JOB_ID_MAX = 128


def job_id_type(name: str = "JOB") -> Callable[[str], str]:
    """argparse type of a job id given as ``name`` (the JOB argument, ``--since``)."""
    def parse(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"{name} '': the job id is empty")
        if len(value) > JOB_ID_MAX:
            raise argparse.ArgumentTypeError(f"{name} {value[:40]!r}…: a job id has at most {JOB_ID_MAX} "
                                             f"characters, this one {len(value)}")
        if not JOB_ID_RE.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"{name} {value!r}: not a job id (`hardnet submit` prints them, e.g. "
                "20260101-120000-1a2b3c4d: letters, digits, '.', '_' and '-', starting with a letter "
                "or digit)")
        return value
    parse.__name__ = "job id"
    return parse


#: the JOB argument of the job commands (metavar "JOB")
job_id = job_id_type("JOB")


def int_range(opt: str, lo: int, hi: int | None = None, why: str = "") -> Callable[[str], int]:
    """argparse type of option ``opt``: an integer in lo..hi (hi None: no upper bound); ``why``
    says where the bound comes from."""
    def parse(value: str) -> int:
        try:
            n = int(value, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{opt} {value!r}: not a whole number") from None
        if n < lo or (hi is not None and n > hi):
            rng = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{opt} {n}: out of range, give {rng}{why}")
        return n
    parse.__name__ = "int"
    return parse


def timeout_seconds(value: str) -> float:
    """argparse type of a --timeout: a finite number of seconds above 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout {value!r}: not a number of seconds") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"--timeout {value}: give a number of seconds above 0 "
                                         "(leave the option out to wait without a limit)")
    return x


def field_bounds(settings_cls, name: str) -> tuple[int, int | None]:
    """(ge, le) of an integer settings field: an option and its HARDNET_ variable share bounds."""
    lo, hi = 1, None
    for m in settings_cls.model_fields[name].metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
    return lo, hi


def setting_range(opt: str, settings_cls, name: str) -> Callable[[str], int]:
    """argparse type of option ``opt``, which overrides the integer setting ``name``: its bounds."""
    lo, hi = field_bounds(settings_cls, name)
    return int_range(opt, lo, hi, f" (the bounds of HARDNET_{name.upper()})")


def check_output_file(path: str, option: str = "-o") -> str:
    """The absolute path of an output FILE that can be written, checked before the command reads
    or writes anything else; ConfigError naming ``option`` otherwise. Creates nothing."""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        raise ConfigError(f"{option} {path}: is a directory; give a file name")
    if not os.path.isdir(parent):
        raise ConfigError(f"{option} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise ConfigError(f"{option} {path}: not writable (permission denied)")
    return full


def extensions_arg(value: str) -> str:
    """argparse type of ``--extensions``: ``any`` or a comma-separated list of extensions
    (:func:`hnq.formats.parse_extensions`), checked when the command line is parsed; the value
    itself is returned (:meth:`hnq.formats.ExtensionFilter.of` reads it)."""
    try:
        parse_extensions(value, "--extensions")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value
