"""How a job is shown to people: `hardnet status JOB` (one labelled line per fact), the recent-jobs
table of `hardnet status`, and the pieces the progress display and `hardnet results` share:
rates and durations rounded, error codes as ``code=n`` lists, times in UTC.

Pure functions of a :class:`hnq.schema.JobInfo` (and what else the command read from Redis) and
the time ``now``: the commands pass ``time.time()``, the tests a fixed clock
(tests/unit/test_status_golden.py holds the golden text of every state). `--json` never goes
through here."""
from __future__ import annotations

from datetime import datetime, timezone

from hnq.models import RANDOM
from hnq.schema import FINAL_STATES, JobInfo

#: width of the label column of `hardnet status JOB`
LABEL = 10


def rate_text(rate: float | None) -> str:
    """``260.4 img/s``; ``-`` when nothing has been labelled yet."""
    return f"{rate:.1f} img/s" if rate else "- img/s"


def duration(seconds: float) -> str:
    """``0.8s``, ``42s``, ``3m 05s``, ``2h 03m``, ``1d 04h``: rounded for people."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def when(dt: datetime | None, *, minutes: bool = False) -> str:
    """A time in UTC: ``2026-01-01 12:00:02 UTC`` (``minutes``: ``2026-01-01 12:00``)."""
    if dt is None:
        return "-"
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M") if minutes else dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def codes_text(codes: dict[str, int]) -> str:
    """``chunk_failed=6, decode_error=2`` (most frequent first)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(codes.items(), key=lambda kv: (-kv[1], kv[0])))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def dropped(info: JobInfo) -> int:
    """Images of a cancelled job that were never labelled nor given a record: the chunks that had
    not started when it was cancelled."""
    if info.state != "cancelled" or info.total is None:
        return 0
    return max(0, info.total - info.succeeded - info.failed)


def weights_text(used: list[str], options: dict | None) -> str:
    """The weights the job's records were made with; before any record, those the job asked for
    (``--weights``), else the workers' own."""
    if used:
        text = ", ".join(used)
    elif options and options.get("weights"):
        text = f"{options['weights']} (asked; no record yet)"
    else:
        text = "the workers' own (HARDNET_WEIGHTS, else official)"
    if RANDOM in used or (not used and options and options.get("weights") == RANDOM):
        text += " (labels meaningless)" if used in ([RANDOM], []) else " (random: its labels meaningless)"
    return text


def _state_line(info: JobInfo) -> str:
    j = info.job_id
    if info.state == "queued":
        return "queued: no chunk has started yet"
    if info.state == "running":
        return "running" if info.total is not None else "running, still being listed"
    if info.state == "done":
        return "done: every image labelled"
    if info.state == "done_with_errors":
        return (f"done_with_errors: ended, {plural(info.failed, 'image')} could not be labelled "
                f"(why: hardnet results {j} --failed-only)")
    if info.state == "failed":
        return "failed: ended" + (f", {plural(info.dead_chunks, 'chunk')} dead-lettered" if info.dead_chunks else "")
    if info.state == "cancelled":
        return "cancelled: chunks that had not started were dropped"
    if info.state == "abandoned":
        return f"abandoned: its submit stopped while listing (hardnet resume {j} seals and finishes it)"
    return info.state


def _images_line(info: JobInfo) -> str:
    done = info.succeeded + info.failed
    counts = f"{info.succeeded} labelled, {info.failed} failed"
    if info.error_codes:
        counts += f" ({codes_text(info.error_codes)})"
    if info.total is None:
        head = (f"{done} done before its submit stopped listing" if info.state == "abandoned"
                else f"{done} done so far, still being listed")
    elif info.state in FINAL_STATES:
        head = f"{info.total} submitted"
    else:
        pct = 100 * done / info.total if info.total else 100.0
        head = f"{done} of {info.total} done ({pct:.1f}%)"
    text = f"{head}: {counts}"
    if dropped(info):
        text += f", {dropped(info)} dropped (not started when it was cancelled)"
    if info.skipped:
        text += f", {info.skipped} skipped (labelled by an earlier job)"
    return text


def status_lines(info: JobInfo, *, weights: list[str], dead=(), stalled=(), visibility_timeout: int = 0,
                 now: float) -> list[str]:
    """`hardnet status JOB` for people: one labelled line per fact, in the words of its state."""
    j = info.job_id
    rows: list[tuple[str, str]] = [("job", j), ("state", _state_line(info))]
    if info.error and info.state != "abandoned":     # the abandoned state line says it
        rows.append(("why", info.error))
    rows.append(("model", info.model or "-"))
    rows.append(("priority", info.priority))
    rows.append(("weights", weights_text(weights, info.options)))
    options = {k: v for k, v in (info.options or {}).items() if k != "weights"}
    if options:
        rows.append(("options", ", ".join(f"{k}={v}" for k, v in sorted(options.items()))))
    rows.append(("dest", info.dest or f"redis (read with: hardnet results {j})"))
    rows.append(("images", _images_line(info)))
    if info.chunks is not None:
        rows.append(("chunks", f"{info.chunks_done} of {info.chunks} done"
                     + (f", {info.dead_chunks} dead-lettered" if info.dead_chunks else "")))
    rows.append(("submitted", when(info.submitted_at)))
    if info.started_at:
        rows.append(("started", when(info.started_at)))
    if info.finished_at:
        since = info.started_at or info.submitted_at
        ended = {"cancelled": "cancelled", "abandoned": "abandoned"}.get(info.state, "finished")
        rows.append((ended, when(info.finished_at)
                     + (f", {'took' if ended == 'finished' else 'after'} "
                        f"{duration((info.finished_at - since).total_seconds())}" if since else "")))
    elif info.state not in FINAL_STATES and info.submitted_at:
        rows.append(("elapsed", f"{duration(now - info.submitted_at.timestamp())} since submitted"))
    if info.rate:
        rate = rate_text(info.rate)
        if info.state not in FINAL_STATES:
            rate += f", ETA {duration(info.eta_s)}" if info.eta_s is not None else ""
        else:
            rate += " on average"
        rows.append(("rate", rate))
    lines = [f"{k:<{LABEL}} {v}" for k, v in rows]
    for x in dead:
        lines.append(f"dead chunk {x.chunk}: {x.count} URIs, {x.attempts} attempts, last error: {x.error}")
    if dead:
        lines.append(f"re-drive with: hardnet redrive {j}")
    if stalled:
        shown = ", ".join(str(c) for c in stalled[:50]) + (", ..." if len(stalled) > 50 else "")
        lines.append(f"stalled chunks ({len(stalled)}: neither queued, in flight nor done for over "
                     f"{visibility_timeout}s): {shown}; the workers' sweeper re-sends them, or run: "
                     f"hardnet sweep {j}")
    return lines


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns aligned under a header row, two spaces apart; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [header, *rows]]


def recent_lines(infos: list[JobInfo], weights: dict[str, list[str]]) -> list[str]:
    """`hardnet status` without a job: the recent jobs, newest first, one aligned row each."""
    if not infos:
        return []
    skipped = any(i.skipped for i in infos)
    header = ["SUBMITTED (UTC)", "JOB", "STATE", "DONE", "FAILED", *(["SKIPPED"] if skipped else []),
              "MODEL", "WEIGHTS", "DEST"]
    rows = []
    for i in infos:
        used = weights.get(i.job_id) or []
        w = ",".join(used) or (i.options or {}).get("weights") or "default"
        done = i.succeeded + i.failed
        rows.append([when(i.submitted_at, minutes=True), i.job_id, i.state,
                     f"{done}/{i.total if i.total is not None else '?'}", str(i.failed),
                     *([str(i.skipped)] if skipped else []), i.model or "-", w, i.dest or "redis"])
    return table(header, rows)
