"""What the commands of both sides share: exit codes, the help formatter, printing records.

The commands live beside what they drive: :mod:`producer.commands` (the job commands),
:mod:`producer.exporter`, :mod:`producer.demo` and :mod:`worker.commands` (classify, worker,
weights; torch imported lazily). :mod:`producer.cli` assembles the parser from their ``register``
functions and maps errors to exit codes; nothing imports it back."""
from __future__ import annotations

import argparse
import sys

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1            # unexpected failure
EXIT_USAGE = 2            # bad arguments or configuration
EXIT_SOME_FAILED = 3      # the job/command finished, but some images could not be labelled
EXIT_JOB_FAILED = 4       # the job itself failed, was cancelled, or its state was lost
EXIT_TIMEOUT = 5          # `wait`/`submit --wait --timeout`: gave up waiting; the job goes on
EXIT_ABANDONED = 6        # the job's submit died while listing: `hardnet resume JOB` seals and finishes it
EXIT_INTERRUPTED = 130    # Ctrl-C (a wait: the job goes on)

#: exit code of a job that ended in this state
STATE_EXIT = {"done": EXIT_OK, "done_with_errors": EXIT_SOME_FAILED, "failed": EXIT_JOB_FAILED,
              "cancelled": EXIT_JOB_FAILED, "lost": EXIT_JOB_FAILED, "abandoned": EXIT_ABANDONED}


class BrokerUnreachable(Exception):
    """First contact with Redis failed within seconds (the CLI does not wait minutes)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default (`hardnet CMD --help`); an option whose default is
    unset or off says what happens then in its own words instead of "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def add_command(sub, name: str, help: str, fn, **kw) -> argparse.ArgumentParser:
    """One subcommand, with the house help formatter and its handler."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kw)
    p.set_defaults(fn=fn)
    return p


def err(msg: str) -> None:
    print(f"hardnet: {msg}", file=sys.stderr)


def code_name(code) -> str:
    """An error code as people read it: ``not_found``, never ``ErrorCode.not_found``."""
    return str(getattr(code, "value", code))


def print_human(rec) -> None:
    """One record for people: the URI, then the top 5 or the error."""
    print(rec.uri + ("  [random weights: labels meaningless]" if rec.weights == "random" else ""))
    if rec.status == "ok":
        for t in rec.top5:
            print(f"  {t.score:8.4f}  {t.label}")
    else:
        print(f"  ERROR {code_name(rec.error.code)}: {rec.error.message}")
    sys.stdout.flush()
