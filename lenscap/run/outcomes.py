"""One line per stage of a recipe run: what it did, and the samples it leaves for the next stage, read
from its command's summary."""

from __future__ import annotations

from typing import Any

__all__ = ["samples_left", "outcome", "why_empty"]


def _counted(counts: dict[str, int], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]) if k not in skip and n)


def samples_left(run: str, result: dict[str, Any]) -> int | None:
    """The samples a stage leaves for the next: downloaded, kept, not duplicates, captioned, exported."""
    if run == "download":
        return int((result.get("status") or {}).get("success", 0))
    if run == "filter":
        return int(result.get("kept", 0))
    if run == "dedup":
        outcome = (result.get("counts") or {}).get("dedup_status") or {}
        return sum(int(outcome.get(k, 0)) for k in ("unique", "kept", "error"))
    if run == "caption":
        return int((result.get("caption_status") or {}).get("ok", 0))
    if run == "shard":
        return int(result.get("samples", 0))
    if run == "new-urls":
        return int(result.get("new", 0))
    return None


def outcome(run: str, argv: list[str], result: dict[str, Any]) -> str:
    """A stage's outcome in one line, from its command's summary."""
    if run == "download":
        status = result.get("status") or {}
        ok, repeats = status.get("success", 0), status.get("duplicate", 0)  # a repeated URL: fetched once, not failed
        failed = _counted(status, ("success", "duplicate"))
        return (
            f"{result.get('samples', 0)} URLs, {ok} downloaded, {sum(status.values()) - ok - repeats} failed"
            + (f" ({failed})" if failed else "")
            + (f", {repeats} repeats of a URL above" if repeats else "")
        )
    if run == "filter":
        reasons = dict(result.get("reasons") or {})
        kept, errors = reasons.pop("kept", result.get("kept", 0)), reasons.pop("error", 0)
        dropped = sum(reasons.values())
        line = f"{kept + dropped + errors} in, {kept} kept, {dropped} dropped" + (f" ({_counted(reasons)})" if dropped else "")
        return line + (f", {errors} unreadable" if errors else "")
    if run == "dedup":
        outcome = (result.get("counts") or {}).get("dedup_status") or {}
        kept = samples_left(run, result) or 0
        dups = int(outcome.get("duplicate", 0))
        verb = "marked" if "--mark-only" in argv else "removed"
        reasons = _counted(result.get("duplicates_by_reason") or {})
        return f"{kept + dups} in, {dups} duplicates {verb}" + (f" ({reasons})" if reasons else "") + f", {kept} kept"
    if run == "caption":
        status = _counted(result.get("caption_status") or {}) or "0 ok"
        spent = f"${float(result.get('spent_usd') or 0):.4f}" if result.get("cost_known", True) else "cost unknown"
        pending = "; batches still running" if result.get("complete") is False else ""
        return f"{status}; {spent}{pending}"
    if run == "shard":
        left = _counted(result.get("left_out") or {})
        return (
            f"{result.get('samples', 0)} samples in {result.get('shards', 0)} {result.get('format', '')} shards "
            f"({int(result.get('bytes') or 0):,} bytes)" + (f"; left out: {left}" if left else "")
        )
    if run == "report":
        return f"{result.get('html')}"
    if run == "audit":
        rules, broken = result.get("rules") or [], result.get("failed_rules") or []
        return f"{len(rules)} rules, {len(broken)} broken" + (f" ({', '.join(broken)})" if broken else "")
    if run == "new-urls":
        return f"{result.get('input', 0)} URLs, {result.get('new', 0)} new, {result.get('in_earlier_releases', 0)} in earlier releases"
    if run == "release":
        return f"released as {result.get('release')}"
    return ""


def why_empty(run: str, result: dict[str, Any]) -> str:
    """What took every sample: ``61 dropped: caption-min-words``."""
    if run == "download":
        failed = _counted((result.get("status") or {}), ("success",))
        return f"{result.get('samples', 0)} URLs: {failed or 'none downloaded'}"
    if run == "filter":
        reasons = {k: v for k, v in (result.get("reasons") or {}).items() if k != "kept"}
        return f"{sum(reasons.values())} dropped: {', '.join(k for k, _ in sorted(reasons.items(), key=lambda kv: -kv[1])) or 'none'}"
    if run == "dedup":
        return f"{int(((result.get('counts') or {}).get('dedup_status') or {}).get('duplicate', 0))} duplicates"
    if run == "caption":
        return _counted(result.get("caption_status") or {}) or "nothing to caption"
    if run == "shard":
        return f"left out: {_counted(result.get('left_out') or {}) or 'nothing'}"
    return ""
