"""The opt-outs a response's headers carry, read before its body.

``X-Robots-Tag`` holds comma-separated directives, for every crawler (``X-Robots-Tag: noai``) or for
one named by its token (``X-Robots-Tag: lenscap: noai``; ``otherbot: noai`` is another crawler's and
does not apply). Directives that stop a download (``OPT_OUTS``): ``noai``, ``noimageai`` and ``noml``
(the AI and machine-learning opt-outs), and ``noindex`` and ``noimageindex``, which img2dataset
already honoured. A header may come more than once; each is read.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["OPT_OUTS", "DISALLOWED", "opted_out"]

OPT_OUTS = frozenset({"noai", "noimageai", "noml", "noindex", "noimageindex"})
DISALLOWED = "disallowed by X-Robots-Tag"  # how the row's message starts; --retry-failed never asks again

# Directives that take a value after a colon, so that "unavailable_after: 25 Jun 2030" is not read
# as the directives of a crawler named "unavailable_after".
_WITH_VALUES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def opted_out(values: Iterable[str], token: str) -> str | None:
    """The first directive of the ``X-Robots-Tag`` header ``values`` that opts this crawler (``token``)
    out of the download, or None."""
    token = token.strip().lower()
    for value in values:
        head, sep, rest = value.partition(":")
        named = head.strip().lower()
        if sep and named not in _WITH_VALUES and " " not in named and "," not in named:
            if named != token:
                continue  # another crawler's directives
            value = rest
        for directive in value.split(","):
            directive = directive.strip().lower()
            if directive in OPT_OUTS:
                return directive
    return None
