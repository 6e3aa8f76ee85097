"""The worker-side commands: `classify` (label right here), `worker` (a Celery worker, one per GPU)
and `weights` (pre-seed the checkpoint cache). torch is imported inside the handlers only, so
building the parser stays free of it (the producer side never imports torch)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import deque

from hnq.console import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, add_command, err, print_human
from hnq.errors import ConfigError
from hnq.models import DEFAULT_MODEL, MODELS
from hnq.sources import check_sources, expand_sources
from hnq.storage import FetchPolicy
from worker.settings import WorkerSettings


# ---------------------------------------------------------------------------------------- classify
def cmd_classify(a: argparse.Namespace) -> int:
    # What can be checked without the model is, before it loads (seconds): a missing path, an
    # unknown scheme or a malformed URI is exit 2 with one line, as `hardnet submit` gives it.
    check_sources(a.inputs)
    # torch (the engine, the model): imported by the command that runs it, never by the parser
    from worker.engine import build_engine
    from worker.model.weights import weights_from_env
    from worker.engine.classifier import Classifier

    weights = a.weights or weights_from_env()
    # The loader both warns (for library users) and logs that random weights make meaningless
    # labels; here the log line says it once, and every record printed is marked too.
    warnings.filterwarnings("ignore", message=r".*RANDOM, untrained weights", category=UserWarning)
    clf = Classifier(a.model, weights, device=a.device, batch_size=a.batch_size, fast_jpeg=a.fast_jpeg)
    # A local command for the user's own files: local paths anywhere, http(s) to any host.
    policy = FetchPolicy(allow_http=True, http_allow_hosts=("*",), allow_private_networks=True,
                         file_roots=None)
    engine = build_engine(clf, policy, fetch_threads=32)
    emit = (lambda r: print(r.to_json(), flush=True)) if a.json else print_human
    failed = 0
    group: list[str] = []
    in_flight: deque = deque()   # groups handed to the engine, printed in order as they finish

    def drain(keep: int) -> None:
        nonlocal failed
        while len(in_flight) > keep:
            # No chunk-level retry here: an image whose storage kept failing gets its own record.
            for rec in in_flight.popleft().result():
                failed += rec.status != "ok"
                emit(rec)

    def send() -> None:
        if group:
            in_flight.append(engine.submit(list(group), storage_down_retry=False))
            group.clear()
            drain(keep=3)

    try:
        for src in a.inputs:
            try:
                for uri in expand_sources([src]):
                    group.append(uri)
                    if len(group) >= max(64, 2 * clf.batch_size):
                        send()
            except ConfigError:
                # Not expandable once listed (a bucket that cannot be listed): fetching it as it
                # is gives the input its record with the same stable code a worker would give it.
                group.append(src)
        send()
        drain(keep=0)
    finally:
        engine.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK


# ------------------------------------------------------------------------------------------ worker
def _export_worker_options(a: argparse.Namespace) -> None:
    """CLI options become HARDNET_* variables so `celery -A worker.app` and we read one config."""
    for opt, env in (("model", "HARDNET_MODEL"), ("weights", "HARDNET_WEIGHTS"), ("device", "HARDNET_DEVICE"),
                     ("batch_size", "HARDNET_BATCH_SIZE"), ("chunks_in_flight", "HARDNET_CHUNKS_IN_FLIGHT")):
        v = getattr(a, opt, None)
        if v is not None:
            os.environ[env] = str(v)


def celery_argv(a: argparse.Namespace, settings) -> list[str]:
    """The `celery worker` command line: ours first, then the user's extra flags, which win (Celery
    takes the last value of a repeated option)."""
    extra = list(a.celery_args)
    # JSON logs: no banner on stdout (a log pipeline would choke on it); Celery's -q is global
    quiet = ["--quiet"] if settings.log_format == "json" else []
    argv = [*quiet, "worker", "--pool=threads", f"--concurrency={settings.pool_size}", "-Q", settings.queue,
            f"--loglevel={a.loglevel}", "--without-gossip", "--without-mingle"]
    if a.hostname:
        argv.append(f"--hostname={a.hostname}")
    return argv + extra


def _keep_sigterm_warm() -> None:
    """SIGTERM must stay Celery's warm shutdown, which worker.shutdown bounds with
    HARDNET_SHUTDOWN_GRACE. billiard reads REMAP_SIGTERM when Celery is imported: with
    ``REMAP_SIGTERM=SIGQUIT`` (Celery's soft-shutdown recipe) SIGTERM would become a cold shutdown,
    which fails with the threads pool (it cannot kill a task) and exits 1; so it is dropped here."""
    v = os.environ.pop("REMAP_SIGTERM", None)
    if v:
        err(f"ignoring REMAP_SIGTERM={v}: `hardnet worker` handles SIGTERM itself (running chunks get "
            "HARDNET_SHUTDOWN_GRACE seconds, then go back to the queue)")


def cmd_worker(a: argparse.Namespace) -> int:
    _export_worker_options(a)
    _keep_sigterm_warm()     # before Celery (billiard) is imported below
    # Imported after _export_worker_options: the worker's settings are read from the environment
    # when worker.app is first imported.
    from worker import lifecycle
    from worker.app import app, settings

    app.worker_main(celery_argv(a, settings))
    if lifecycle.recycle_requested.is_set():
        # Memory guard tripped: start afresh in a new process image (same arguments).
        err("restarting the worker (memory guard)")
        os.execv(sys.executable, [sys.executable, "-m", "producer.cli", *sys.argv[1:]])
    return EXIT_OK


# ----------------------------------------------------------------------------------------- weights
def cmd_weights_download(a: argparse.Namespace) -> int:
    from worker.model import WEIGHTS, WeightsError, cache_dir, seed_cache  # torch: not in the parser

    names = list(WEIGHTS) if a.all else a.models
    if not names:
        raise ConfigError("name one or more models, or --all")
    unknown = [n for n in names if n not in WEIGHTS]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    failed = 0
    for name in names:
        try:
            path, sha = seed_cache(name, mirror=a.mirror, progress=not a.quiet)
            print(f"{name}  {path}  sha256:{sha}", flush=True)
        except WeightsError as e:
            failed += 1
            err(f"{name}: {e}")
    err(f"cache: {cache_dir()} (TORCH_HOME moves it; copy it to the fleet or mount it)")
    return EXIT_ERROR if failed else EXIT_OK


def cmd_weights_list(a: argparse.Namespace) -> int:
    from worker.model import WEIGHTS, cache_path  # torch: not in the parser

    for name, w in WEIGHTS.items():
        p = cache_path(w.url)
        state = f"cached {p}" if p.is_file() else "not cached"
        print(f"{name:12} top1 {w.top1_accuracy:5.2f}%  {state}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- argparse
def register(sub) -> None:
    c = add_command(sub, "classify", "label local files, directories or URIs right here", cmd_classify)
    c.add_argument("inputs", nargs="+", metavar="PATH_OR_URI", help="images, directories, or URIs to label")
    c.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS, help="HarDNet variant")
    c.add_argument("--weights", help="path, file:// or http(s):// checkpoint, or 'random'; unset: HARDNET_WEIGHTS, "
                   "else the official weights")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    c.add_argument("--batch-size", type=int, help="images per batch; unset: 256 on a GPU, 32 on the CPU")
    c.add_argument("--fast-jpeg", action="store_true", help="faster, very slightly different decode of big JPEGs")
    c.add_argument("--json", action="store_true", help="one JSON object per image")

    w = add_command(sub, "worker", "run a Celery worker (one per GPU); unknown flags go to `celery worker` "
                    "(e.g. -E, --max-tasks-per-child)", cmd_worker,
                    # exact names only: a Celery flag must never be taken for an abbreviation of ours
                    allow_abbrev=False)
    w.add_argument("--model", choices=MODELS, help="unset: HARDNET_MODEL")
    w.add_argument("--weights", help="checkpoint path/URL or 'random'; unset: HARDNET_WEIGHTS, else official")
    w.add_argument("--device", help="auto, cpu, cuda, cuda:N; unset: HARDNET_DEVICE")
    w.add_argument("--batch-size", type=int, help="unset: HARDNET_BATCH_SIZE (0 = chosen from the device)")
    w.add_argument("--chunks-in-flight", type=int,
                   help="chunks always taken at once (more while they hold fewer than HARDNET_IMAGES_IN_FLIGHT "
                   "images); unset: HARDNET_CHUNKS_IN_FLIGHT")
    w.add_argument("--hostname", help="Celery node name, e.g. gpu0@%%h (distinct per worker on one host)")
    w.add_argument("--loglevel", default="INFO", help="Celery log level")
    # No positional catch-all: flags this parser does not know (and everything after --) are
    # handed to Celery by producer.cli.parse, in order.
    w.set_defaults(passthrough=True, celery_args=[])

    wt = add_command(sub, "weights", "list or pre-seed the checkpoint cache (for an offline fleet)", cmd_weights_list)
    wsub = wt.add_subparsers(dest="weights_cmd")
    d = add_command(wsub, "download", "download checkpoints into the cache and check that they load",
                    cmd_weights_download)
    d.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"variants to fetch ({', '.join(MODELS)})")
    d.add_argument("--all", action="store_true", help="every variant")
    d.add_argument("--mirror", metavar="URL", help="base URL of an internal mirror holding the official file "
                   "names; unset: the official URL, then the project's mirror")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_command(wsub, "list", "the variants and whether each is in the cache", cmd_weights_list)


#: glibc returns the model's large activation buffers to the kernel after every batch by default
#: (thousands of page faults per image on the CPU). Raising these thresholds keeps them in the
#: process, with the same RSS (figures: docs/performance.md#1-cpu-workers-keep-glibc-from-returning-activation-buffers-to-the-kernel-after-every-batch).
#: glibc reads them only at process start, hence the re-exec.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
TORCH_COMMANDS = {"classify", "worker", "demo"}


def cpu_only(device: str) -> bool:
    """Will the torch command run on the CPU? (Without importing torch: the device setting or
    --device is cpu, or there is no NVIDIA driver on this machine.)"""
    argv = sys.argv[1:]
    if "--device" in argv and argv.index("--device") + 1 < len(argv):
        device = argv[argv.index("--device") + 1]
    return device == "cpu" or (device == "auto" and not os.path.exists("/proc/driver/nvidia"))


def maybe_reexec_with_malloc_tuning(argv: list[str]) -> None:
    cmd = next((x for x in argv if not x.startswith("-")), None)
    if cmd not in TORCH_COMMANDS or all(k in os.environ for k in MALLOC_ENV):
        return
    try:
        s = WorkerSettings()
    except ConfigError:
        return  # the command itself reports the bad setting
    if not s.tune_malloc:
        return
    env = {**os.environ, **{k: v for k, v in MALLOC_ENV.items() if k not in os.environ}}
    if cpu_only(s.device):
        # The engine runs the model in its own thread, and glibc gives a non-main thread its own
        # arena, whose heaps are at most 64 MiB: a batch's activations do not fit, go to mmap, and
        # fault their pages in again on every batch (measured: 82,000 page faults per batch,
        # hardnet39ds at 41 img/s in a thread against 72 in the main thread). One arena for the
        # whole process keeps them. Only on the CPU: a GPU worker's many fetch threads would
        # contend for that one arena's lock, and its activations live on the GPU anyway.
        env.setdefault("MALLOC_ARENA_MAX", "1")
    os.execve(sys.executable, [sys.executable, "-m", "producer.cli", *argv], env)
