"""`hardnet` — the command line. This module only assembles the parser from each side's commands
(their ``register`` functions) and turns errors into exit codes; the commands live beside what
they drive (see :mod:`hnq.console`). Building the parser imports no torch: the worker-side
commands import it inside their handlers."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from hnq.console import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, BrokerUnreachable, HelpFormatter, err
from hnq.errors import ConfigError, HardnetError
from hnq.logs import setup_cli
from hnq.settings import CommonSettings, redact_url
from producer import commands, demo, exporter, report


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version   # ~40 ms: only for --version

    try:
        v = version("hardnet-queue")
    except PackageNotFoundError:  # running from a source tree that was never installed
        v = "unknown"
    return f"hardnet-queue {v} (python {sys.version.split()[0]})"


class Parser(argparse.ArgumentParser):
    """A bad argument is one line on stderr that names it, and exit 2 (argparse prints the whole
    usage first; `COMMAND --help` shows it). The subcommands' parsers are of this class too."""

    def error(self, message: str):
        # "argument --top-k: --top-k 0: out of range…" (producer.args' messages name their option
        # themselves) -> "--top-k 0: out of range…"; argparse's own messages keep their prefix
        m = re.match(r"argument (\S+): (.*)", message, re.S)
        if m and any(m.group(2).startswith(n + " ") for n in m.group(1).split("/")):
            message = m.group(2)
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # The worker side's commands are imported when the parser is built, not at the top: importing
    # producer.cli (or any producer module) loads nothing of worker/, which is reached only here, in
    # main's malloc re-exec and inside `hardnet demo`. What keeps torch out of every producer
    # command is that worker/commands.py imports torch only inside its handlers
    # (tests/unit/test_cli.py::test_producer_commands_never_import_torch).
    from worker import commands as worker_commands

    p = Parser(prog="hardnet", formatter_class=HelpFormatter,
               description="Label images with HarDNet, locally or on a worker fleet.")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    worker_commands.register(sub)
    commands.register(sub)
    report.register(sub)
    exporter.register(sub)
    demo.register(sub)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; flags a command does not know go through where the command passes them on
    (`hardnet worker -E` gives Celery its -E), and are an error anywhere else."""
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    after = []
    if "--" in argv:  # everything after -- is for the command to pass on, untouched
        i = argv.index("--")
        argv, after = argv[:i], argv[i + 1:]
    a, extra = p.parse_known_args(argv)
    extra += after
    if extra:
        if not getattr(a, "passthrough", False):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        a.celery_args = [*a.celery_args, *extra]
    return a


def _setup_logging(verbose: bool) -> None:
    setup_cli(logging.INFO if verbose else logging.WARNING, CommonSettings().log_format)


def _is_broker_error(e: BaseException) -> bool:
    # kombu (Celery's) only when an error needs classifying: the job commands other than submit
    # never load Celery.
    import kombu.exceptions
    import redis

    return isinstance(e, (redis.exceptions.RedisError, kombu.exceptions.OperationalError))


#: commands that end as soon as their answer is printed (see _exit_now)
_QUICK = {"submit", "wait", "status", "results", "cancel", "redrive", "resume", "sweep"}


def _exit_now(rc: int) -> None:
    """End the process without the interpreter's teardown: after the last line a job command
    prints, tearing down its modules (boto3's, Celery's, pydantic's) took 0.3-1.3 s of the time a
    user waits for `submit --wait` to return (docs/performance.md, "Far storage through the CLI").
    The atexit handlers still run (temporary files, logging), the output is flushed; no thread of
    ours is left by then (submit joins its uploads and its heartbeat first)."""
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    own = argv is None   # this process's own command line (not a test calling main([...]))
    if own:
        # worker/ reached only from here and build_parser (see there)
        from worker.commands import maybe_reexec_with_malloc_tuning

        maybe_reexec_with_malloc_tuning(sys.argv[1:])
    a = parse(argv)
    rc = _run(a)
    if own and a.cmd in _QUICK:
        _exit_now(rc)
    return rc


def _run(a: argparse.Namespace) -> int:
    try:
        _setup_logging(a.verbose)
        return a.fn(a)
    except ConfigError as e:
        for line in str(e).splitlines() or [""]:    # bad settings: one line per variable
            err(line)
        return EXIT_USAGE
    except HardnetError as e:
        err(f"{e.code.value}: {e}")
        return EXIT_ERROR
    except BrokerUnreachable as e:
        err(f"cannot reach Redis at {redact_url(CommonSettings().broker_url)} (gave up after about 8 s: {e}); "
            "is it running? is HARDNET_BROKER_URL right, password and TLS included?")
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001
        if not _is_broker_error(e):
            raise
        err(f"cannot use Redis at {redact_url(CommonSettings().broker_url)}: {type(e).__name__}: {e} "
            "(is it running? is HARDNET_BROKER_URL right, password and TLS included?)")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
