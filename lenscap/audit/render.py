"""The audit as a person reads it on a terminal (``--json`` is the contract for scripts)."""

from __future__ import annotations

from typing import Any

from lenscap.audit.measures import FLAGS

__all__ = ["audit_lines"]


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.2f}%"


def _one(a: dict[str, Any], title: str | None = None) -> list[str]:
    w = a["words"]
    lines = [
        f"{title or a['path']}: {a['captions']:,} captions audited ({a['measured_texts']:,} texts measured) "
        f"in {a['shards']:,} shards"
        + (f" ({a['incomplete_shards']:,} incomplete shards not audited)" if a.get("incomplete_shards") else "")
    ]
    if not a["captions"]:
        return lines
    band = (
        f"; target {w['target']}, {_pct(a['shares']['off_length'])} outside {w['band'][0]}-{w['band'][1]}" if w["target"] else ""
    )
    lines.append(f"  words       mean {w['mean']}, p5 {w['p5']}, p50 {w['p50']}, p95 {w['p95']}{band}")
    for name in FLAGS:
        n = a["counts"][name]
        if n or name in ("refusal", "loop", "truncated", "duplicate"):
            lines.append(f"  {name:<11} {n:>8,}  {_pct(a['shares'][name])}")
    if a["openings"]:
        lines.append("  openings    " + "; ".join(f'"{o["opening"]}" {_pct(o["share"])}' for o in a["openings"][:5]))
    lines.append(f"  diversity   distinct-1 {a['distinct_1']}, distinct-2 {a['distinct_2']}")
    if a["ocr"]["known"]:
        o = a["ocr"]
        lines.append(
            f"  ocr         {o['with_text']:,} images with text: {o['quoted']:,} quoted, {o['missed']:,} missed; "
            f"{o['invented']:,} captions quote text OCR did not read"
        )
    if a["alt_text"]["named"]:
        t = a["alt_text"]
        lines.append(
            f"  alt-text    {t['named']:,} with named words, {t['carry_mean']:.0%} carried on average, {t['dropped']:,} dropped all"
        )
    if len(a["by_model"]) > 1:
        lines.append("  by model and prompt:")
        for g in a["by_model"]:
            lines.append(
                f"    {g['model'] or '?'} / {g['prompt'] or '?'} ({(g['prompt_sha'] or '')[:8]}): {g['captions']:,} captions, "
                f"p50 {g['words']['p50']} words, refusal {_pct(g['shares']['refusal'])}, "
                f"top opening {_pct(g['template_top1'])}"
            )
    return lines


def audit_lines(result: dict[str, Any]) -> list[str]:
    if "a" in result:
        lines = _one(result["a"], f"A {result['a']['path']}") + _one(result["b"], f"B {result['b']['path']}")
        lines.append(
            f"{result['common']:,} images in both; B minus A: "
            + ", ".join(f"{k} {v:+g}" for k, v in result["delta"].items() if v)
        )
        for name, change in result["flag_changes"].items():
            lines.append(f"  {name:<11} {change['gained']:,} more in B, {change['cleared']:,} fewer")
        for d in result["differences"]:
            lines.append(f"- {d['key']}")
            for side in ("a", "b"):
                flags = ",".join(d[side]["flags"]) or "no flags"
                lines.append(f"    {side.upper()} [{flags}; {d[side]['words']} words] {(d[side]['caption'] or '')[:300]}")
    else:
        lines = _one(result)
        if result["samples"]:
            lines.append("flagged captions, sampled:")
            for s in result["samples"]:
                lines.append(f"- {s['key']} [{','.join(s['flags'])}] {s['caption'][:300]!r}")
    for r in result["rules"]:
        lines.append(f"rule {r['rule']}: {'BROKEN' if r['broken'] else 'ok'} (measured {r['value']})")
    if result.get("out"):
        lines.append(f"flags written to {result['out']['out_dir']}")
    return lines
