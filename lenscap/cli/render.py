"""What each command shows a person: lines on stderr (not with ``--quiet`` or ``--json``) and, for the
commands whose output is the point (inspect, verify, estimate, audit, a dry run), text on stdout (not with
``--json``). Everything here reads a result or a summary; nothing decides anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from lenscap.audit.render import audit_lines
from lenscap.caption.options import BACKEND_FLAGS
from lenscap.core.result import EXIT_EMPTY
from lenscap.estimate.compare import compare_lines
from lenscap.estimate.options import hours_span

__all__ = ["Shown", "SHOWN", "inspect_table", "backends_lines", "batch_status_lines", "demo_lines"]


@dataclass
class Shown:
    lines: list[str] = field(default_factory=list)  # stderr
    stdout: list[str] = field(default_factory=list)


def _parts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def download(s: dict[str, Any], options: Any) -> Shown:
    ok = (s.get("status") or {}).get("success", 0)
    return Shown([f"{s['out_dir']}: {s['shards_completed']}/{s['shards_total']} shards, {s['samples']} samples, {ok} downloaded"])


def filter(s: dict[str, Any], options: Any) -> Shown:  # noqa: A001 - the command's name
    if s.get("dry_run"):
        reasons = s["reasons"]
        stdout = [f"{s['in_dir']}: {s['samples']} samples, {s['kept']} would be kept"]
        stdout += [
            f"  {n:>8}  dropped: {reason}" if reason != "error" else f"  {n:>8}  unreadable"
            for reason, n in reasons.items()
            if reason != "kept"
        ]
        return Shown(stdout=stdout)
    if s["exit_code"] == EXIT_EMPTY:
        return Shown()  # said as a warning by the command
    dropped = ", ".join(f"{n} {r}" for r, n in s["reasons"].items() if r != "kept") or "none"
    return Shown([f"{s['out_dir']}: {s['samples']} samples, {s['kept']} kept; dropped: {dropped}"])


def caption(s: dict[str, Any], options: Any) -> Shown:
    outcomes = s.get("caption_status") or {}
    if "complete" in s:  # a batch job
        files = ", ".join(f"{n} {k}" for k, n in s["files"].items()) or "none"
        return Shown(
            [
                f"{s['out_dir']}: {s['shards_completed']}/{s['shards_total']} shards ({_parts(outcomes) or 'none yet'}); "
                f"batch files: {files}; ${s['spent_usd']:.4f} spent"
            ]
        )
    spent = f"${s['spent_usd']:.4f} spent" if s.get("cost_known", True) else "cost unknown"
    return Shown(
        [
            f"{s['out_dir']}: {s['shards_completed']}/{s['shards_total']} shards, {s['samples']} samples ({_parts(outcomes)}); {spent}"
        ]
    )


def dedup(s: dict[str, Any], options: Any) -> Shown:
    if s["hashing_failed"]:
        return Shown()  # said by the command
    reasons = ", ".join(f"{n} {r}" for r, n in (s.get("duplicates_by_reason") or {}).items()) or "none"
    lines = [
        f"{s['out_dir']}: {s['samples']} samples, {s['duplicates']} duplicates "
        f"{'marked' if options.mark_only else 'removed'} ({reasons}) in {s['clusters']} clusters; "
        f"report: {s['report']}"
    ]
    if semantic := s.get("semantic"):
        lines.append(
            f"embeddings ({semantic['model']}): {semantic.get('embedded', 0)} computed, {semantic.get('reused', 0)} reused "
            f"from the input's; kept in {s['out_dir']}/embeddings; {semantic['clusters']} k-means clusters"
        )
    return Shown(lines)


def shard(s: dict[str, Any], options: Any) -> Shown:
    if s["failed_shards"] or s["empty"]:
        return Shown()  # said by the command
    left = ", ".join(f"{n} {r}" for r, n in s["left_out"].items()) or "none"
    return Shown(
        [
            f"{s['out_dir']}: {s['samples']} samples in {s['shards_total']} {s['format']} shards ({s['bytes']:,} bytes); left out: {left}"
        ]
    )


def report(s: dict[str, Any], options: Any) -> Shown:
    return Shown([f"report: {s['html']}" + (f", contact sheet: {s['png']}" if "png" in s else "")])


def audit(s: dict[str, Any], options: Any) -> Shown:
    return Shown(stdout=audit_lines(s))


def estimate(s: dict[str, Any], options: Any) -> Shown:
    if "compare" in s:
        return Shown(stdout=compare_lines(s))
    per, total, wall = s["per_image"], s["total"], s["wall_time"]
    out = []
    if "selected" in s:
        out.append(f"{s['selected']:,} images of {options.from_dir} selected by --where")
    out += [
        f"{s.get('selected', options.count):,} images with {options.model}, priced {s['priced_as']}",
        f"  per image:  {per['input_tokens']:,} input + {per['output_tokens']:,} output tokens ({s['basis']})",
        f"  total:      {total['input_tokens']:,} input + {total['output_tokens']:,} output tokens",
        f"  cost:       ${total['cost_usd']:,.2f}",
    ]
    if "files" in wall:
        limit = (
            f"bound by {options.max_file_mib:g} MiB a file, not {options.max_requests_per_file:,} requests"
            if wall["bound_by"] == "bytes"
            else f"bound by {options.max_requests_per_file:,} requests a file, not {options.max_file_mib:g} MiB"
        )
        out.append(f"  files:      {wall['files']:,} of up to {wall['requests_per_file']:,} requests ({limit})")
        out.append(f"  line size:  {wall['line_bytes']:,} B a request ({wall['line_bytes_basis']})")
    if "waves" in wall:
        at_once = wall["files_at_once"]
        out.append(
            f"  wall time:  {wall['human']}: {wall['waves']:,} waves of {at_once:,} file{'s' if at_once != 1 else ''} at once "
            f"(queue limit {options.queue_tokens:,} input tokens), {hours_span(*wall['batch_hours'])} a wave"
        )
    elif "hours" in wall:
        out.append(
            f"  wall time:  {wall['human']} at {wall['requests_per_minute']:,} requests/min (limited by {wall['limited_by']})"
        )
    if "note" in wall:
        out.append(f"  {'note:      ' if 'hours' in wall else 'wall time: '} {wall['note']}")
    return Shown(stdout=out)


def inspect(s: dict[str, Any], options: Any) -> Shown:
    inspect_table(s)
    return Shown()


def verify(s: dict[str, Any], options: Any) -> Shown:
    shards = s["shards"]
    out = [f"damaged {name}: {why}" for name, why in s["damaged_shards"].items()]
    out += [f"unchecked {name}: no SHA-256 recorded for {', '.join(files)}" for name, files in s["unchecked_shards"].items()]
    out.append(
        f"{s['path']}: {shards['checked']} complete shards, {shards['ok']} ok, {shards['unchecked']} unchecked, "
        f"{shards['damaged']} damaged ({s['bytes_read']:,} bytes read)"
    )
    lines = []
    if s.get("repaired"):
        lines.append(
            f"marked incomplete: {', '.join(s['repaired'])}; rerun the command that wrote {s['path']} to write them again"
        )
    elif shards["damaged"]:
        lines.append(f"lenscap verify --repair {s['path']}, then rerun the command that wrote it, writes them again")
    return Shown(lines, out)


def run(s: dict[str, Any], options: Any) -> Shown:
    return Shown()  # each stage said its line as it ran


def demo(s: dict[str, Any], options: Any) -> Shown:
    return Shown()  # demo_lines, once the summary is emitted


SHOWN = {
    "download": download,
    "filter": filter,
    "caption": caption,
    "dedup": dedup,
    "shard": shard,
    "report": report,
    "audit": audit,
    "estimate": estimate,
    "inspect": inspect,
    "verify": verify,
    "run": run,
    "demo": demo,
}


def demo_lines(s: dict[str, Any], captioned_by: str) -> None:
    """The demo's ending: the captioned dataset's summary, where everything is, what the captions are."""
    base = s["work_dir"]
    if s["captioned"] is not None:
        inspect_table(s["captioned"])
    print(
        f"pipeline: {base}/{{download,filter,dedup,caption}}, training shards in {base}/shard\nreport:   {s['report']}  (open it in a browser)"
    )
    print(captioned_by)


def inspect_table(info: dict[str, Any]) -> None:
    """``lenscap inspect``'s tables, on stdout."""
    console = Console()
    table = Table(title=f"{info['path']}  (stage: {info['stage'] or 'unknown'})", show_header=False)
    for name, value in _inspect_rows(info):
        table.add_row(name, value)
    console.print(table)
    for key, title in (("errors", "most common errors"), ("skips", "skipped (not errors)")):
        if info.get(key):
            listing = Table("count", title)
            for message, n in info[key].items():
                listing.add_row(str(n), message)
            console.print(listing)


def _inspect_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    shards = info["shards"]
    expected = f" of {shards['expected']}" if shards["expected"] is not None else ""
    damaged = f", {shards['damaged']} damaged" if shards.get("damaged") else ""
    rows = [("shards", f"{shards['complete']} complete{expected}, {shards['incomplete']} incomplete{damaged}")]
    rows += [
        ("damaged", f"shard {name}: {why}; rerun the command that wrote it")
        for name, why in info.get("damaged_shards", {}).items()
    ]
    if info["input_incomplete_shards"]:
        rows.append(
            ("left out", f"input shards {', '.join(info['input_incomplete_shards'])} were incomplete (--allow-incomplete)")
        )
    rows.append(("samples", str(info["samples"])))
    if info.get("export"):
        rows.append(("export", f"{info['export']['format']} ({shards['complete']} shards)"))
    for section, outcomes in info["outcomes"].items():  # in pipeline order
        name = {"status": "download status", "filter_reasons": "  dropped by"}.get(section, section)
        rows.append((name, _parts(outcomes)))
    rows += _cost_rows(info)
    cw = info["caption_words"]
    if cw["count"]:
        rows.append(("caption words", f"mean {cw['mean']}, p50 {cw['p50']}, p95 {cw['p95']} ({cw['count']} captions)"))
    elif info["samples"]:
        rows.append(("caption words", "no captions"))
    rows.append(("columns", ", ".join(info["columns"])))
    rows.append(("bytes on disk", f"{info['bytes']['shards']:,} in shards, {info['bytes']['total']:,} in all"))
    images = info["images"]
    held = (
        "in this directory"
        if images["held"]
        else images["problem"] or f"in {images['location']} (this directory holds rows only)"
    )
    rows.append(("images", held))
    if info["history"]:
        rows.append(("history", " -> ".join(str(h) for h in info["history"])))
    return rows


def _cost_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if info["caption_cost"]:
        c = info["caption_cost"]
        cached = (
            f" (+${c['cached_usd']:.4f} of {c['cached_answers']:,} cached answers, paid by earlier runs)"
            if c.get("cached_answers")
            else ""
        )
        rows.append(
            (
                "caption cost",
                f"${c['spent_usd']:.4f} spent{cached}; {c['input_tokens']:,} input + {c['output_tokens']:,} output tokens",
            )
        )
    if info["dedup"]:
        d = info["dedup"]
        reasons = ", ".join(f"{n} {r}" for r, n in (d["by_reason"] or {}).items()) or "none"
        rows.append(("duplicates", f"{d['duplicates']} ({reasons}) in {d['clusters']} clusters; {d['report']}"))
    return rows


def backends_lines(found: list[dict[str, Any]]) -> list[str]:
    """``lenscap backends``: each backend, where it comes from, its options (a flag of caption's, or -O)."""
    lines = []
    for b in found:
        if "error" in b:
            lines.append(f"{b['name']}  ({b['source']})  cannot be loaded: {b['error']}")
            continue
        traits = ", ".join(
            t for t, on in (("needs a key", b["needs_key"]), ("priced", b["priced"]), ("batch job", b["batch"])) if on
        )
        lines.append(f"{b['name']}  ({b['source']}{'; ' + traits if traits else ''})")
        if b["summary"]:
            lines.append(f"    {b['summary']}")
        for o in b["options"]:
            default = o["default_text"] if o["default"] in (None, []) else o["default"]
            shown = f" [default: {default}]" if default not in (None, []) else ""
            choices = f" ({'|'.join(o['choices'])})" if o["choices"] else ""
            flag = o["flag"] if o["name"] in BACKEND_FLAGS else f"-O {o['name']}=..."  # a plugin's --model too
            lines.append(f"    {flag:<26} {o['type']:<6} {o['help']}{choices}{shown}")
    return lines


def batch_status_lines(info: dict[str, Any]) -> list[str]:
    shards, queue = info["shards"], info["queue"]
    files = ", ".join(f"{n:,} {state}" for state, n in info["files"].items()) or "none yet"
    limit = f" of {queue['limit']:,}" if queue["limit"] else ""
    eta = info["eta_hours"]
    lines = [
        f"{info['out_dir']}: {info['backend']} {info['model']}, job {info['job_id'][:12]}",
        f"shards {shards['completed']:,}/{shards['expected'] if shards['expected'] is not None else '?'} written; "
        f"batch files: {files} (round {max(info['rounds'], 1)})",
        f"requests: {info['answered']:,} answered ({info['failed']:,} failed after the last round, {info['asked_again']:,} "
        f"asked again), about {info['left']:,} left; queue {queue['tokens']:,}{limit} tokens; ${info['spent_usd']:.2f} spent",
        f"rate {info['answers_per_hour']:,.0f} answers/h; "
        + (f"ETA {eta:,.1f} h" if eta is not None else "ETA unknown until a batch is merged"),
    ]
    for b in info["batches"][:20]:
        lines.append(f"  {b['name']}  {b['state']:<9} {b['status'] or '':<11} {b['requests']:>6} requests  {b['batch_id'] or ''}")
    if len(info["batches"]) > 20:
        lines.append(f"  ... and {len(info['batches']) - 20} more in flight (--json lists them)")
    return lines
