"""A minimal lenscap filter annotator: the share of strongly red pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from lenscap.plugin import Annotator, Sample


class Redness(Annotator):
    """Share of pixels whose red channel clearly dominates; --threshold redness=X drops images above X."""

    name = "redness"  # what --annotate and --threshold NAME=X take; the entry point's name
    columns = (pa.field("redness_share", pa.float64()),)  # the columns written into every row
    score = "redness_share"  # the column the threshold applies to
    keep_above = False  # drop the samples scoring above the threshold
    threshold_help = "drop images whose strongly red pixels are more than this share"

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        a = np.asarray(image.resize((64, 64)), dtype=np.int16)  # image: RGB, at most 1024 px a side
        red = (a[..., 0] > 150) & (a[..., 0] > a[..., 1] + 60) & (a[..., 0] > a[..., 2] + 60)
        return {self.score: float(red.mean())}
