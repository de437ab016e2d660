"""What the audit measures on each caption, a batch of rows at a time.

Which rows are captions: a downloaded sample (``status`` success, where there is a status) whose
caption stage answered (``caption_status`` ok, refused or truncated); in a dataset no lenscap caption
stage wrote, every row with a caption. Only an ``ok`` caption's text is measured: a refused or
truncated answer leaves the old text in ``caption``, and counts as what it is.

The per-caption flags (each defined once, here; the docs quote these definitions):

- ``refusal``: ``caption_status`` refused, or an ok caption whose first 200 characters apologise or
  decline ("I'm sorry", "I can't", "as an AI", "unable to describe" ...).
- ``truncated``: ``caption_status`` truncated, or an ok caption that does not end a sentence (its
  last character, before closing quotes or brackets, is not . ! ? or an ellipsis).
- ``loop``: at least 10 word trigrams, and at least 20 % of them repeat an earlier trigram of the same caption.
- ``off_length``: fewer than half, or more than 1.5 times, the target words (``--target-words``, or the
  prompt preset's: lens and alt-aware 109, short 20); no target known, no flag.
- ``wrong_script``: under half of the caption's letters are in the expected script (``--script``, Latin).
- ``empty``: an ok caption with no words.
- ``ocr_missed``: OCR found text in the image (the ``ocr`` annotator's ``ocr_text``, or the
  ``caption_ocr_text`` that ``caption --hints ocr`` records) and under half of its words
  (two letters or more; one edit allowed in words of four or more) are in the caption.
- ``ocr_invented``: OCR ran, and the caption quotes text ("...") of which under half the words are
  in what OCR read.
- ``alt_dropped``: an ``alt-aware`` caption that carries none of its alt-text's named words
  (capitalised words other than the first, and words with digits).
- ``duplicate`` is not decided here: the global pass (``lenscap.audit.scan``) decides it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lenscap.audit.text import minhash_bands, ngram_hashes, null_where, repeated_share, words_of
from lenscap.core.errors import UsageError

__all__ = ["AuditSettings", "Measured", "measure", "check_script", "FLAGS", "READ_COLUMNS", "PRESET_WORDS", "LENGTH_BAND"]

FLAGS = (
    "refusal",
    "loop",
    "truncated",
    "duplicate",
    "off_length",
    "wrong_script",
    "empty",
    "ocr_missed",
    "ocr_invented",
    "alt_dropped",
)
READ_COLUMNS = (
    "key",
    "caption",
    "status",
    "caption_status",
    "caption_model",
    "caption_prompt",
    "caption_prompt_sha",
    "ocr_text",
    "ocr_text_area",
    "caption_ocr_text",
    "alt_text",
)
PRESET_WORDS = {"lens": 109, "alt-aware": 109, "short": 20}
LENGTH_BAND = 0.5  # off_length: outside [target * (1 - band), target * (1 + band)]
LOOP_SHARE, LOOP_MIN_TRIGRAMS = 0.2, 10
ANSWERED = ("ok", "refused", "truncated")

_REFUSAL = (
    r"\b(i'?m sorry|i am sorry|sorry, (but )?i|i apologi[sz]e|my apologies|i can'?t|i cannot|i'?m (not able|unable)"
    r"|i am (not able|unable)|i (won'?t|will not) be able|as an ai\b|as a language model"
    r"|(unable|not able) to (help|assist|describe|identify|provide|comply|caption|process|view|see)"
    r"|can(not|'t) (help|assist|describe|identify|provide|comply|caption|process|view|see) (with|this|that|the|images?))"
)
_SENTENCE_END = r"[.!?\x{2026}\x{3002}\x{FF01}\x{FF1F}][\"'\x{201D}\x{2019})\]\x{00BB}]*\s*$"
_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]{2,200})[\"\u201c\u201d]")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOP = frozenset("a an the and or of in on at to for with by from is are this that it its as be".split())


@dataclass(frozen=True)
class AuditSettings:
    target_words: int | None = None  # None: the preset's, where the rows name one
    script: str = "Latin"


@dataclass
class Measured:
    """One batch's per-row measures (numpy arrays of the batch's length) and what the global passes need."""

    audited: np.ndarray  # bool: the row is a caption
    text: np.ndarray  # bool: an ok caption, its text measured
    words: np.ndarray  # int: words in the caption (text rows)
    repeat_share: np.ndarray  # float: share of its trigrams that repeat
    flags: dict[str, np.ndarray]  # name -> bool per row (duplicate: all False here)
    openings: pa.Array  # first three words, null where not a text row
    groups: np.ndarray  # int: index into labels; -1 for a row that is not a caption
    labels: list[tuple[str, str, str]]  # (model, prompt, prompt_sha)
    unigrams: np.ndarray  # word hashes of the text rows, with the row each belongs to
    unigram_owner: np.ndarray
    bigrams: np.ndarray
    bigram_owner: np.ndarray
    band_keys: np.ndarray
    band_rows: np.ndarray
    ocr_known: np.ndarray  # bool: OCR ran on the image
    ocr_with_text: np.ndarray  # bool: ... and found words
    alt_named: np.ndarray  # bool: alt-aware caption whose alt-text has named words
    alt_carry: np.ndarray  # float: share of them carried


def _column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def _strings(table: pa.Table, name: str) -> list[str | None] | None:
    column = _column(table, name)
    return None if column is None else column.to_pylist()


def _bool(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool)


def measure(table: pa.Table, settings: AuditSettings) -> Measured:
    n = table.num_rows
    caption = (
        table.column("caption").cast(pa.string()).combine_chunks()
        if "caption" in table.column_names
        else pa.nulls(n, pa.string())
    )
    audited = _bool(pc.is_valid(caption))
    status = _column(table, "status")
    if status is not None:
        audited &= _bool(pc.equal(status, "success"))
    caption_status = _column(table, "caption_status")
    if caption_status is not None:
        audited &= _bool(pc.is_in(caption_status, pa.array(ANSWERED)))
        text = audited & _bool(pc.equal(caption_status, "ok"))
    else:
        text = audited.copy()
    text_array = null_where(caption, ~text)

    trimmed = pc.utf8_trim_whitespace(text_array)
    tokens = words_of(text_array)
    words = tokens.spaced
    trigrams, owners = ngram_hashes(tokens, 3)
    trigram_total, repeat = repeated_share(trigrams, owners, n)
    bigrams, bigram_owner = ngram_hashes(tokens, 2)
    band_keys, band_rows = minhash_bands(trigrams, owners, tokens)

    flags = {name: np.zeros(n, bool) for name in FLAGS}
    lowered = pc.replace_substring(pc.utf8_lower(pc.utf8_slice_codeunits(trimmed, 0, 200)), "\u2019", "'")
    flags["refusal"] = text & _bool(pc.match_substring_regex(lowered, _REFUSAL))
    flags["empty"] = text & (words == 0)
    flags["truncated"] = text & (words > 0) & ~_bool(pc.match_substring_regex(trimmed, _SENTENCE_END))
    if caption_status is not None:
        flags["refusal"] |= audited & _bool(pc.equal(caption_status, "refused"))
        flags["truncated"] |= audited & _bool(pc.equal(caption_status, "truncated"))
    flags["loop"] = text & (trigram_total >= LOOP_MIN_TRIGRAMS) & (repeat >= LOOP_SHARE)
    target = _targets(table, n, settings)
    with np.errstate(invalid="ignore"):
        outside = (words < target * (1 - LENGTH_BAND)) | (words > target * (1 + LENGTH_BAND))
    flags["off_length"] = text & (words > 0) & outside
    flags["wrong_script"] = _wrong_script(trimmed, text, settings.script)

    ocr_known, ocr_with_text = _ocr(table, text, flags)
    alt_named, alt_carry = _alt(table, text, flags)

    labels, groups = _caption_groups(*_groups(table, n), audited)
    return Measured(
        audited=audited,
        text=text,
        words=words,
        repeat_share=repeat,
        flags=flags,
        openings=pc.binary_join(pc.list_slice(tokens.lists, 0, 3), " "),
        groups=groups,
        labels=labels,
        unigrams=tokens.hashes,
        unigram_owner=tokens.owner,
        bigrams=bigrams,
        bigram_owner=bigram_owner,
        band_keys=band_keys,
        band_rows=band_rows,
        ocr_known=ocr_known,
        ocr_with_text=ocr_with_text,
        alt_named=alt_named,
        alt_carry=alt_carry,
    )


def check_script(script: str) -> None:
    """A ``UsageError`` unless ``script`` is a Unicode script name the regular expressions know."""
    try:
        pc.match_substring_regex(pa.array(["a"]), rf"[^\p{{{script}}}\PL]")
    except pa.ArrowInvalid:
        raise UsageError(f"--script {script!r} is not a Unicode script name (Latin, Cyrillic, Han, Arabic ...)") from None


def _wrong_script(trimmed: pa.Array, text: np.ndarray, script: str) -> np.ndarray:
    """Under half the letters in ``script``. Letters are counted only in the captions that have a
    letter outside it at all (one cheap scan): counting every letter of every caption costs 100 us."""
    mixed = text & _bool(pc.match_substring_regex(trimmed, rf"[^\p{{{script}}}\PL]"))
    wrong = np.zeros(len(text), bool)
    rows = np.flatnonzero(mixed)
    if len(rows):
        some = trimmed.take(pa.array(rows))
        outside = pc.count_substring_regex(some, rf"[^\p{{{script}}}\PL]").to_numpy(zero_copy_only=False).astype(float)
        letters = pc.count_substring_regex(some, r"\pL").to_numpy(zero_copy_only=False).astype(float)
        wrong[rows] = outside > 0.5 * letters
    return wrong


def _targets(table: pa.Table, n: int, settings: AuditSettings) -> np.ndarray:
    if settings.target_words is not None:
        return np.full(n, float(settings.target_words))
    prompts = _strings(table, "caption_prompt")
    if prompts is None:
        return np.full(n, np.nan)
    return np.array([PRESET_WORDS.get(p or "", np.nan) for p in prompts], float)


def _groups(table: pa.Table, n: int) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Each row's (model, prompt, prompt_sha) label, missing or null as "": the labels in order of
    first appearance, and each row's index into them."""
    columns = [_column(table, c) for c in ("caption_model", "caption_prompt", "caption_prompt_sha")]
    if not all(c is None or c.type in (pa.string(), pa.large_string(), pa.null()) for c in columns):
        return _groups_by_row(table, n)
    # Vectorised: a code per distinct triple (4,096 rows looked up one by one cost a microsecond each).
    code = np.zeros(n, np.int64)
    parts: list[tuple[list[str], np.ndarray]] = []
    for column in columns:
        if column is None or column.type == pa.null():
            parts.append(([""], np.zeros(n, np.int64)))
            continue
        encoded = pc.dictionary_encode(pc.fill_null(column, "").combine_chunks())
        indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        parts.append((encoded.dictionary.to_pylist(), indices))
        code = np.unique(code * len(parts[-1][0]) + indices, return_inverse=True)[1].reshape(-1)  # stays under n
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    labels = [tuple(values[int(indices[row])] for values, indices in parts) for row in first[order]]
    return labels, rank[inverse.reshape(-1)]  # type: ignore[return-value]


def _caption_groups(
    labels: list[tuple[str, str, str]], index: np.ndarray, audited: np.ndarray
) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Only captions have a group: a skipped sample has no provenance, and is no group of its own
    (-1); the labels left are renumbered in order of first appearance."""
    index = np.where(audited, index, -1)
    used = np.unique(index[index >= 0])
    renumber = np.full(len(labels) + 1, -1, np.int64)  # the extra -1 entry maps -1 to itself
    renumber[used] = np.arange(len(used))
    return [labels[i] for i in used], renumber[index]


def _groups_by_row(table: pa.Table, n: int) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    columns = [_strings(table, c) or [None] * n for c in ("caption_model", "caption_prompt", "caption_prompt_sha")]
    labels: dict[tuple[str, str, str], int] = {}
    index = np.empty(n, np.int64)
    for i, label in enumerate(zip(*columns, strict=True)):
        key = tuple(v or "" for v in label)
        index[i] = labels.setdefault(key, len(labels))  # type: ignore[arg-type]
    return list(labels), index


def _word_set(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if len(w) >= 2}


def _found(word: str, words: set[str]) -> bool:
    """``word`` in ``words``, allowing one OCR error in a word of four letters or more."""
    if word in words:
        return True
    if len(word) < 4:
        return False
    return any(
        abs(len(w) - len(word)) <= 1 and difflib.SequenceMatcher(None, w, word).ratio() >= 0.75
        for w in words
        if w[:1] == word[:1] or w[-1:] == word[-1:]
    )


def _ocr(table: pa.Table, text: np.ndarray, flags: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = len(text)
    known, with_text = np.zeros(n, bool), np.zeros(n, bool)
    ocr = _strings(table, "ocr_text")
    area = _column(table, "ocr_text_area")
    ran = (
        np.zeros(n, bool)
        if ocr is None
        else _bool(pc.is_valid(area))
        if area is not None
        else np.array([t is not None for t in ocr])
    )
    hinted = _strings(table, "caption_ocr_text")  # --hints ocr: what the caption request was told ("" nothing)
    if hinted is not None:
        ocr = [o if r else h for o, r, h in zip(ocr or [None] * n, ran, hinted, strict=True)]
        ran |= np.array([h is not None for h in hinted])
    if ocr is None or not ran.any():
        return known, with_text
    captions = table.column("caption").to_pylist()
    for i in np.flatnonzero(text & ran):
        known[i] = True
        read = _word_set(ocr[i] or "")
        said = _word_set(captions[i] or "")
        if read:
            with_text[i] = True
            flags["ocr_missed"][i] = sum(_found(w, said) for w in read) < 0.5 * len(read)
        for quote in _QUOTED.findall(captions[i] or ""):
            quoted = _word_set(quote)
            if quoted and sum(_found(w, read) for w in quoted) < 0.5 * len(quoted):
                flags["ocr_invented"][i] = True
                break
    return known, with_text


def _alt(table: pa.Table, text: np.ndarray, flags: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = len(text)
    named, carry = np.zeros(n, bool), np.zeros(n)
    prompts, alts = _strings(table, "caption_prompt"), _strings(table, "alt_text")
    if prompts is None or alts is None:
        return named, carry
    captions = table.column("caption").to_pylist()
    for i in np.flatnonzero(text):
        if prompts[i] != "alt-aware" or not alts[i]:
            continue
        words = _WORD.findall(alts[i])
        names = {
            w.lower()
            for j, w in enumerate(words)
            if len(w) >= 2 and w.lower() not in _STOP and ((j > 0 and w[0].isupper()) or any(c.isdigit() for c in w))
        }
        if not names:
            continue
        said = _word_set(captions[i] or "")
        named[i] = True
        carry[i] = sum(w in said for w in names) / len(names)
        flags["alt_dropped"][i] = carry[i] == 0
    return named, carry
