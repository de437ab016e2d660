"""``lenscap report``: one self-contained HTML page about a dataset directory, and a PNG contact sheet.

The page needs nothing but itself: styles inline, images inlined as JPEG thumbnails, charts as inline
SVG, no script. It shows the counts and every stage's outcomes (from ``inspect``), the caption length
histogram, the caption audit (``lenscap.audit``: flag counts, top openings, sampled flagged captions
beside their images and OCR text) where there are captions, filter reasons and the dedup report when
present, the most common errors, the pipeline from the manifest, and a grid of sampled images, each
with its caption beside its original alt-text.

The sample is the ``n`` samples with images whose ``hash(seed, key)`` is smallest: the same seed
picks the same samples whatever the shard order, and memory holds ``n`` candidates, not the dataset.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lenscap import __version__
from lenscap.audit.command import audit
from lenscap.audit.measures import FLAGS
from lenscap.audit.options import AuditOptions
from lenscap.core.commits import atomic_write_bytes
from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError, UsageError, disk_full
from lenscap.core.layout import IMAGE_OFFSET, IMAGE_SIZE
from lenscap.inspect.summary import inspect_dataset
from lenscap.report.options import ReportOptions
from lenscap.shard.formats import export_format

__all__ = [
    "ReportSample",
    "pick_samples",
    "pick_export_samples",
    "audit_thumbnails",
    "render_html",
    "render_contact_sheet",
    "write_report",
    "run_report",
    "written_by_report",
    "GENERATOR",
]

THUMB = 256
# The mark of what report writes, in a page's head and a contact sheet's PNG text: an existing file is
# replaced only where it carries it (``written_by_report``).
GENERATOR = "lenscap report"
_HTML_MARK = f"<meta name='generator' content='{GENERATOR}'>"
_REPORT_MARKS = (_HTML_MARK.encode(), b"<title>lenscap report: ", b"Software\x00" + GENERATOR.encode())
AUDIT_SAMPLES = 12  # flagged captions shown at most: each brings a thumbnail into the page
_SHOWN_CHARS = 600  # of an OCR text or alt-text beside a flagged caption (the audit already cuts captions)
_ROW_COLUMNS = (
    "caption",
    "alt_text",
    "previous_caption",
    "caption_status",
    "caption_model",
    "filter_status",
    "dedup_status",
    "width",
    "height",
)


@dataclass
class ReportSample:
    key: str
    row: dict[str, Any]
    thumbnail: bytes  # JPEG, at most THUMB pixels a side

    @property
    def caption(self) -> str:
        return self.row.get("caption") or ""

    @property
    def original(self) -> str | None:
        """The text the caption replaced, if a caption stage ran."""
        return self.row.get("previous_caption") or (self.row.get("alt_text") if self.row.get("caption_status") else None)


def _thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (THUMB, THUMB))
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=80)
    return out.getvalue()


def pick_samples(ds: Dataset, n: int, seed: int = 0) -> list[ReportSample]:
    """The ``n`` samples with images whose ``blake2b(seed:key)`` is smallest, in that order."""
    if n <= 0:
        return []  # the loop below compares with the heap's top, which an empty heap has not
    heap: list[tuple[int, str, int, tuple[int, int], dict[str, Any]]] = []  # max-heap on the hash
    damaged = ds.damaged_shards()  # counted and named by inspect's summary; never read
    for shard_id in [i for i in ds.completed_ids() if i not in damaged]:
        names = ds.read_schema(shard_id).names  # only the columns shown: rows may be wide
        table = ds.read_table(shard_id, columns=["key", *(c for c in (*_ROW_COLUMNS, IMAGE_OFFSET, IMAGE_SIZE) if c in names)])
        offsets, sizes = ds.image_locations(shard_id, table)
        for row, offset, size in zip(table.to_pylist(), offsets, sizes, strict=True):
            if offset is None:
                continue
            key = str(row["key"])
            h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
            entry = (-h, key, shard_id, (offset, size), row)
            if len(heap) < n:
                heapq.heappush(heap, entry)
            elif -heap[0][0] > h:
                heapq.heapreplace(heap, entry)
    chosen = sorted(heap, key=lambda e: -e[0])
    out = []
    for _, key, shard_id, (offset, size), row in chosen:
        data = ds.read_image(shard_id, key, offset, size)
        try:
            thumb = _thumbnail(data)
        except Exception:  # noqa: BLE001 - an undecodable image is shown as missing, not fatal
            thumb = b""
        out.append(ReportSample(key, row, thumb))
    return out


def pick_export_samples(ds: Dataset, n: int, seed: int = 0) -> list[ReportSample]:
    """``pick_samples`` for an export (``lenscap shard``'s output, a local one): the same choice by
    ``hash(seed, key)``, read from its tars (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) or Parquet files."""
    if n <= 0:
        return []
    index = ds.read_json("shards.json") or {}
    fmt = export_format(index.get("format"))
    heap: list[tuple[int, str, str, Any]] = []  # max-heap on the hash: (-hash, key, file, where)
    for record in index.get("shards") or []:
        path = ds.local_file(record["file"])
        if not path.is_file():
            continue  # inspect's summary names it
        for key, where in fmt.sample_locations(path):
            h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
            if len(heap) < n:
                heapq.heappush(heap, (-h, key, record["file"], where))
            elif -heap[0][0] > h:
                heapq.heapreplace(heap, (-h, key, record["file"], where))
    out = []
    for _, key, name, where in sorted(heap, key=lambda e: -e[0]):
        image, row = fmt.read_sample(ds.local_file(name), where)
        try:
            thumb = _thumbnail(image) if image else b""
        except Exception:  # noqa: BLE001 - an undecodable image is shown as missing, not fatal
            thumb = b""
        out.append(ReportSample(key, row, thumb))
    return out


def audit_thumbnails(ds: Dataset, samples: list[dict[str, Any]]) -> dict[str, bytes]:
    """Thumbnails of the audit's sampled captions' images (key: JPEG, empty where undecodable; absent
    where the sample has no image), each read from the shard and row the audit found it in."""
    out: dict[str, bytes] = {}
    by_shard: dict[int, list[int]] = {}
    for s in samples:
        by_shard.setdefault(int(s["shard"]), []).append(int(s["row"]))
    for shard_id, rows in sorted(by_shard.items()):
        names = ds.read_schema(shard_id).names
        table = ds.read_table(shard_id, columns=["key", *(c for c in (IMAGE_OFFSET, IMAGE_SIZE) if c in names)]).take(rows)
        offsets, sizes = ds.image_locations(shard_id, table)
        for key, offset, size in zip(table.column("key").to_pylist(), offsets, sizes, strict=True):
            if offset is None:
                continue
            try:
                out[str(key)] = _thumbnail(ds.read_image(shard_id, str(key), offset, size))
            except Exception:  # noqa: BLE001 - an undecodable image is shown as missing, not fatal
                out[str(key)] = b""
    return out


# -- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#c5ccd8}
main{padding:20px 28px;max-width:1400px}section{background:#fff;border:1px solid #e1e5eb;border-radius:8px;padding:14px 18px;margin:0 0 18px}
h2{font-size:16px;margin:0 0 10px}.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#f0f3f7;border-radius:6px;padding:10px 14px;min-width:140px}
.card b{display:block;font-size:20px}table{border-collapse:collapse}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
.bar{display:inline-block;height:10px;background:#4a7bd0;border-radius:2px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #e1e5eb;border-radius:8px;overflow:hidden}
figure img{display:block;width:100%;height:200px;object-fit:contain;background:#eef0f3}figcaption{padding:8px 10px;font-size:13px}
.label{font-size:11px;text-transform:uppercase;color:#6b7686;letter-spacing:.04em}.alt{color:#6b7686}.key{font-family:monospace;color:#6b7686}
.missing{height:200px;display:flex;align-items:center;justify-content:center;color:#9aa3af;background:#eef0f3}
.flag{display:inline-block;background:#fbe4e4;color:#9b1c1c;border-radius:3px;padding:0 5px;margin:0 4px 2px 0;font-size:12px}
.ocr{font-family:monospace;font-size:12px;color:#4b5563;white-space:pre-wrap;word-break:break-word}h3{font-size:14px;margin:12px 0 6px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bars(counts: dict[str, int], shares: dict[str, float | None] | None = None) -> str:
    """One bar per count, as its share of their sum, or of ``shares`` (0 to 1) where the counts overlap
    or each has its own whole (a caption can carry several flags)."""
    total = max(sum(counts.values()), 1)
    rows = []
    for k, n in counts.items():
        share = n / total if shares is None else shares.get(k) or 0.0
        rows.append(
            f"<tr><td>{_e(k)}</td><td>{n:,}</td><td><span class='bar' style='width:{round(300 * share)}px'></span> "
            f"{100 * share:.1f}%</td></tr>"
        )
    return f"<table>{''.join(rows)}</table>"


def _clip(text: str, chars: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= chars else text[:chars] + "..."


def _flags(counts: dict[str, int], shares: dict[str, float | None]) -> str:
    return ", ".join(f"{name} {counts[name]:,} ({100 * (shares.get(name) or 0):.1f}%)" for name in FLAGS if counts.get(name))


def _audit_section(audit: dict[str, Any], images: dict[str, bytes]) -> str:
    """The caption audit: length against the target, flag counts, top openings, word variety, the
    groups of model and prompt, and the sampled flagged captions beside their images (``images``:
    key to JPEG thumbnail)."""
    w = audit["words"]
    line = f"{audit['captions']:,} captions audited, " + (
        f"{w['mean']} words on average, median {w['p50']}, 95th percentile {w['p95']}"
        if w["mean"] is not None
        else "none of them with text to measure (refused or truncated answers keep the old text)"
    )
    if w.get("target"):
        line += f"; target {w['target']} words" + (f" ({w['band'][0]}-{w['band'][1]} is on length)" if w.get("band") else "")
    elif w["mean"] is not None:
        line += "; no length target (the captions name no prompt preset; audit --target-words sets one)"
    parts = [f"<p>{_e(line)}.</p>"]
    if audit.get("failed_shards"):
        parts.append(f"<p>{len(audit['failed_shards']):,} shards could not be read and are not in these numbers.</p>")
    counts = {name: audit["counts"][name] for name in FLAGS if audit["counts"].get(name)}
    parts.append("<h3>flags</h3>" + (_bars(counts, audit["shares"]) if counts else "<p>no captions flagged</p>"))
    if counts.get("duplicate"):
        parts.append(_CAPTION_DUPLICATES)
    if counts.keys() & {"ocr_missed", "ocr_invented", "alt_dropped"}:
        parts.append(
            "<p class='alt'>Shares are of the captions audited; those of ocr_missed, ocr_invented and alt_dropped "
            "of the captions that can have them (OCR read text, OCR ran, the alt-text names something).</p>"
        )
    if audit["openings"]:
        openings = {o["opening"]: o["captions"] for o in audit["openings"]}
        parts.append(f"<h3>top openings</h3>{_bars(openings, {o['opening']: o['share'] for o in audit['openings']})}")
    variety = [f"distinct-{n} {audit[f'distinct_{n}']:.3f}" for n in (1, 2) if audit.get(f"distinct_{n}") is not None]
    if variety:
        parts.append(f"<p>{', '.join(variety)} (unique words and word pairs, as a share of all of them)</p>")
    ocr, alt = audit.get("ocr") or {}, audit.get("alt_text") or {}
    if ocr.get("with_text"):
        parts.append(
            f"<p>OCR: images with text {ocr['with_text']:,}, their captions carrying it {ocr['quoted']:,}, "
            f"missing it {ocr['missed']:,}; captions quoting text OCR did not read {ocr['invented']:,}.</p>"
        )
    if alt.get("named"):
        parts.append(
            f"<p>Alt-text: alt-texts that name something {alt['named']:,}, names their captions carry "
            f"{100 * alt['carry_mean']:.0f}% on average, captions carrying none {alt['dropped']:,}.</p>"
        )
    groups = [g for g in audit.get("by_model") or [] if g["captions"]]
    if len(groups) > 1:
        rows = "".join(
            f"<tr><td>{_e(g['model'] or '-')}</td><td>{_e(g['prompt'] or '-')}</td><td>{g['captions']:,}</td>"
            f"<td>{_e(g['words']['mean'] if g['words']['mean'] is not None else '-')}</td>"
            f"<td>{_e(_flags(g['counts'], g['shares']) or 'none')}</td></tr>"
            for g in groups
        )
        parts.append(
            "<h3>by model and prompt</h3><table><tr><th>model</th><th>prompt</th><th>captions</th>"
            f"<th>words (mean)</th><th>flags</th></tr>{rows}</table>"
        )
    figures = []
    for s in audit.get("samples") or []:
        thumb = images.get(s["key"])
        img = (
            f"<img src='data:image/jpeg;base64,{base64.b64encode(thumb).decode()}' alt='flagged {_e(s['key'])}'>"
            if thumb
            else f"<div class='missing'>{'image could not be decoded' if thumb is not None else 'no image'}</div>"
        )
        text = "<div>" + "".join(f"<span class='flag'>{_e(f)}</span>" for f in s["flags"]) + "</div>"
        text += f"<div class='label'>caption</div><div>{_e(s['caption']) or '<i>none</i>'}</div>"
        if s.get("ocr_text"):
            text += f"<div class='label'>OCR text</div><div class='ocr'>{_e(_clip(s['ocr_text']))}</div>"
        if s.get("alt_text"):
            text += f"<div class='label'>alt-text</div><div class='alt'>{_e(_clip(s['alt_text']))}</div>"
        # A refused or truncated answer's text is not measured: its 0 words would belie the text beside it.
        measured = s.get("caption_status") not in ("refused", "truncated")
        meta = " ".join(
            f"{k}: {_e(s[k])}"
            for k in ("words", "caption_status", "model")
            if s.get(k) is not None and (k != "words" or measured)
        )
        figures.append(f"<figure>{img}<figcaption>{text}<div class='key'>{_e(s['key'])} {meta}</div></figcaption></figure>")
    if figures:
        parts.append(f"<h3>{len(figures)} sampled flagged captions</h3><div class='grid'>{''.join(figures)}</div>")
    return f"<section><h2>Audit</h2>{''.join(parts)}</section>"


def _histogram_svg(pairs: list[list[int]], bin_words: int = 5, bins: int = 40) -> str:
    counts = [0] * (bins + 1)
    for words, n in pairs:
        counts[min(words // bin_words, bins)] += n
    while len(counts) > 1 and counts[-1] == 0:
        counts.pop()
    width, height, pad = 720, 180, 24
    step = (width - pad) / len(counts)
    peak = max(counts) or 1
    parts = [f"<svg width='{width}' height='{height + 30}' role='img' aria-label='caption length histogram'>"]
    for i, n in enumerate(counts):
        h = round((height - 10) * n / peak)
        label = f"{i * bin_words}+" if i == bins else f"{i * bin_words}-{i * bin_words + bin_words - 1}"
        parts.append(
            f"<rect x='{pad + i * step:.1f}' y='{height - h}' width='{max(step - 2, 1):.1f}' height='{h}' fill='#4a7bd0'>"
            f"<title>{label} words: {n:,} captions</title></rect>"
        )
        if i % max(1, len(counts) // 8) == 0:
            parts.append(f"<text x='{pad + i * step:.1f}' y='{height + 16}' font-size='11' fill='#6b7686'>{i * bin_words}</text>")
    parts.append(f"<text x='0' y='12' font-size='11' fill='#6b7686'>{peak:,}</text></svg>")
    return "".join(parts)


_OUTCOME_TITLES = {"status": "download status", "filter_reasons": "filter reasons", "left_out": "left out of the export"}


def render_html(
    info: dict[str, Any],
    samples: list[ReportSample],
    dedup: dict[str, Any] | None,
    audit: dict[str, Any] | None = None,
    audit_images: dict[str, bytes] | None = None,
) -> str:
    """The page; ``audit`` is ``lenscap.audit.command.audit``'s result (no section without captions), with
    ``audit_images`` the thumbnails of its sampled flagged captions by key."""
    name = Path(info["path"]).resolve().name
    cw = info["caption_words"]
    body = [_summary_section(info, dedup), *_outcomes_section(info)]
    if cw["count"]:
        body.append(
            f"<section><h2>Caption length</h2><p>{cw['count']:,} captions, {cw['mean']} words on average, "
            f"median {cw['p50']}, 95th percentile {cw['p95']}.</p>{_histogram_svg(cw['histogram'])}</section>"
        )
    if audit and audit.get("error"):
        body.append(f"<section><h2>Audit</h2><p>The captions could not be audited: {_e(audit['error'])}</p></section>")
    elif audit and audit.get("captions"):
        body.append(_audit_section(audit, audit_images or {}))
    if dedup:
        reasons = dedup.get("by_reason") or {}
        earlier = f", {dedup['of_earlier_releases']:,} of them of earlier releases" if dedup.get("of_earlier_releases") else ""
        body.append(
            f"<section><h2>Dedup</h2><p>{dedup.get('duplicates') or 0:,} {_dedup_noun(dedup)} in {dedup.get('clusters') or 0:,} "
            f"clusters{earlier}.</p>{_bars(reasons) if reasons else ''}</section>"
        )
    body += _problems_sections(info)
    if info["history"]:
        body.append("<section><h2>Pipeline</h2><p>" + " &rarr; ".join(_e(h) for h in info["history"]) + "</p></section>")
    if samples:
        figures = "".join(_figure(s) for s in samples)
        body.append(f"<section><h2>{len(samples)} sampled images</h2><div class='grid'>{figures}</div></section>")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{_HTML_MARK}<meta name='viewport' content='width=device-width'>"
        f"<title>lenscap report: {_e(name)}</title><style>{_CSS}</style></head><body><header><h1>lenscap report: {_e(name)}</h1>"
        f"<p>{_e(info['path'])} &middot; stage {_e(info['stage'] or 'unknown')} &middot; lenscap {__version__} &middot; {when}</p>"
        f"</header><main>{''.join(body)}</main></body></html>"
    )


# The audit's duplicate is a caption's text, dedup's an image: said where both can be on one page.
_CAPTION_DUPLICATES = (
    "<p class='alt'>duplicate counts captions whose text nearly repeats another caption's, whatever the images; "
    "dedup's duplicates (the summary) are images.</p>"
)


def _dedup_noun(dedup: dict[str, Any]) -> str:
    """What dedup's count counts: images (exact bytes, perceptual hash), and captions where it compared them."""
    return "duplicates (images or captions)" if (dedup.get("by_reason") or {}).get("caption") else "duplicate images"


def _summary_section(info: dict[str, Any], dedup: dict[str, Any] | None) -> str:
    shards = info["shards"]
    cw = info["caption_words"]
    export = info.get("export")
    cards = [
        ("samples", f"{info['samples']:,}"),
        (
            "shards",
            f"{shards['complete']:,} complete"
            + (f", {shards['incomplete']} incomplete" if shards["incomplete"] else "")
            + (f", {shards['damaged']} damaged" if shards.get("damaged") else ""),
        ),
    ]
    if export:
        cards += [("format", str(export.get("format"))), ("bytes", f"{info['bytes']['shards']:,}")]
    else:
        cards.append(("downloaded", f"{info['status'].get('success', 0):,}"))
    if cw["count"]:
        cards.append(("caption words", f"{cw['mean']} mean, {cw['p95']} p95"))
    cost = info.get("caption_cost")
    if cost:
        spent = cost.get("spent_usd", cost.get("usd", 0.0))
        cards.append(("caption spent", f"${spent:.4f}"))
        if cost.get("cached_answers"):
            cards.append(("cached answers", f"{cost['cached_answers']:,} (${cost.get('cached_usd', 0.0):.4f} when first asked)"))
    if dedup:
        cards.append((_dedup_noun(dedup), f"{dedup.get('duplicates') or 0:,}"))
    elif "dedup_status" in info["stage_status"]:  # deduplicated upstream: its rows say how many
        cards.append(("duplicate images", f"{info['stage_status']['dedup_status'].get('duplicate', 0):,}"))
    return (
        "<section><h2>Summary</h2><div class='cards'>"
        + "".join(f"<div class='card'><span class='label'>{_e(k)}</span><b>{_e(v)}</b></div>" for k, v in cards)
        + "</div></section>"
    )


def _outcomes_section(info: dict[str, Any]) -> list[str]:
    sections = info.get("outcomes")
    if sections is None:  # an inspect summary of before the outcomes were ordered
        sections = {
            **({"status": info["status"]} if info["status"] else {}),
            **info["stage_status"],
            **({"filter_reasons": info["filter_reasons"]} if info.get("filter_reasons") else {}),
        }
    outcomes = [f"<h3>{_e(_OUTCOME_TITLES.get(name, name))}</h3>{_bars(counts)}" for name, counts in sections.items() if counts]
    export = info.get("export")
    if export and export.get("empty"):
        outcomes.insert(0, "<p>This export is empty: none of the input's samples was exported (see left out).</p>")
    if not outcomes:
        return []
    return ["<section><h2>Outcomes</h2><p class='alt'>In pipeline order.</p>" + "".join(outcomes) + "</section>"]


def _problems_sections(info: dict[str, Any]) -> list[str]:
    out = []
    if info["errors"]:
        rows = "".join(f"<tr><td>{n:,}</td><td>{_e(m)}</td></tr>" for m, n in info["errors"].items())
        out.append(f"<section><h2>Most common errors</h2><table>{rows}</table></section>")
    if info.get("skips"):
        rows = "".join(f"<tr><td>{n:,}</td><td>{_e(m)}</td></tr>" for m, n in info["skips"].items())
        out.append(
            "<section><h2>Skipped</h2><p class='alt'>Samples a stage left alone, and why (not errors).</p>"
            f"<table>{rows}</table></section>"
        )
    return out


def _figure(s: ReportSample) -> str:
    img = (
        f"<img src='data:image/jpeg;base64,{base64.b64encode(s.thumbnail).decode()}' alt='sample {_e(s.key)}'>"
        if s.thumbnail
        else "<div class='missing'>image could not be decoded</div>"
    )
    text = f"<div class='label'>caption</div><div>{_e(s.caption) or '<i>none</i>'}</div>"
    if s.original is not None:
        text += f"<div class='label'>original alt-text</div><div class='alt'>{_e(s.original) or '<i>none</i>'}</div>"
    meta = " ".join(f"{k.removesuffix('_status')}: {_e(s.row[k])}" for k in ("caption_status", "dedup_status") if s.row.get(k))
    return f"<figure>{img}<figcaption>{text}<div class='key'>{_e(s.key)} {meta}</div></figcaption></figure>"


# -- PNG contact sheet ------------------------------------------------------------------------------


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, lines: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        out.append(line)
        line = word
        if len(out) == lines:
            break
    if len(out) < lines and line:
        out.append(line)
    if len(out) == lines and " ".join(out) != " ".join(text.split()):
        out[-1] = out[-1].rstrip(".,;: ") + "..."
    return out


def render_contact_sheet(samples: list[ReportSample], columns: int = 6) -> Image.Image:
    font = ImageFont.load_default()
    cell_w, text_h, gap = THUMB, 64, 8
    rows = max(1, -(-len(samples) // columns))
    sheet = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (THUMB + text_h + gap) + gap), (246, 247, 249))
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x = gap + (i % columns) * (cell_w + gap)
        y = gap + (i // columns) * (THUMB + text_h + gap)
        if s.thumbnail:
            with Image.open(io.BytesIO(s.thumbnail)) as thumb:
                sheet.paste(thumb, (x + (cell_w - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        for n, line in enumerate(_wrap(draw, s.caption, font, cell_w, 4)):
            draw.text((x, y + THUMB + 4 + 14 * n), line, fill=(29, 36, 48), font=font)
    return sheet


def run_report(path: str | os.PathLike[str], options: ReportOptions) -> dict[str, Any]:
    """``lenscap report``: write the report ``options`` ask for; its ``--json`` object."""
    ReportOptions.check_arguments({"path": path})
    for target in (options.out, options.png):
        if target is not None and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise UsageError(f"cannot write {target}: its directory does not exist")
    for target in (options.out_path(path), options.png):
        if target is not None and os.path.lexists(target) and not written_by_report(Path(target)):
            raise UsageError(f"{target} exists and is not a report lenscap wrote; name another file, or move it away first")
    written = write_report(path, options.out, options.sample, options.seed, options.png)
    return {"command": "report", **written, "exit_code": 0}


def write_report(
    path: str | Path, out: str | Path | None = None, n: int = 24, seed: int = 0, png: str | Path | None = None
) -> dict[str, Any]:
    """Write the HTML report (and the contact sheet); return what was written."""
    ds = Dataset.open(path)
    info = inspect_dataset(ds.location)
    if info.get("export") is not None:  # an export's samples are in its own files; the audit reads a dataset's
        samples = pick_export_samples(ds, n, seed)
        found = None
    else:
        samples = pick_samples(ds, n, seed)
        found = _audit(ds, info, min(n, AUDIT_SAMPLES), seed)
    flagged = (found or {}).get("samples") or []
    images = audit_thumbnails(ds, flagged) if flagged else {}
    target = Path(out) if out is not None else Path(ReportOptions(out=None).out_path(ds.location))
    _write(target, render_html(info, samples, info.get("dedup"), found, images).encode())
    written: dict[str, Any] = {"html": str(target), "samples_shown": len(samples), "audit": None}
    if found is not None:
        written["audit"] = (
            {"error": found["error"]} if "error" in found else {"captions": found["captions"], "flagged_shown": len(flagged)}
        )
    if png is not None:
        buf = io.BytesIO()
        sheet_info = PngImagePlugin.PngInfo()
        sheet_info.add_text("Software", GENERATOR)  # its mark: a later report may replace it, and nothing else
        render_contact_sheet(samples).save(buf, "PNG", pnginfo=sheet_info)
        _write(Path(png), buf.getvalue())
        written["png"] = str(png)
    return written


def _audit(ds: Dataset, info: dict[str, Any], n: int, seed: int) -> dict[str, Any] | None:
    """The audit of the captions, with ``n`` sampled flagged captions; None without a caption
    column, ``{"error": why}`` where the audit could not run."""
    if "caption" not in info["columns"]:
        return None
    try:
        return audit(ds.location, AuditOptions(sample=n, seed=seed, processes=1))  # a report reads, in this process
    except DatasetError as e:
        # E.g. the audit reads the schema of the first complete shard even when it is damaged, which
        # inspect and the sample leave out: the rest of the report still stands, and says why there is no audit.
        return {"error": str(e)}


def written_by_report(path: Path) -> bool:
    """Whether the file at ``path`` is a page or a contact sheet that ``report`` wrote, by the mark in its
    first bytes (a page's generator tag, or the title every page had before it; a sheet's ``Software``
    text): only such a file is replaced, never a file of the user's that happens to be named there."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:  # a directory, unreadable: not ours
        return False
    return any(mark in head for mark in _REPORT_MARKS)


def _write(target: Path, data: bytes) -> None:
    """A report file; a place that cannot take it (read-only, full, not allowed) is the user's to fix: one line."""
    try:
        atomic_write_bytes(target, data)
    except OSError as e:
        raise disk_full(e, target) or UsageError(f"cannot write {target}: {e.strerror or e}") from None
