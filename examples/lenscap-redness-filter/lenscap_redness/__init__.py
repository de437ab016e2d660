"""A minimal lenscap filter annotator: the share of strongly red pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from lenscap.filters.base import Annotator
from lenscap.record import Sample


class Redness(Annotator):
    """Share of pixels whose red channel clearly dominates; --threshold redness=X drops images above X."""

    name = "redness"
    columns = (pa.field("redness_share", pa.float64()),)
    score = "redness_share"
    keep_above = False

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        a = np.asarray(image.resize((64, 64)), dtype=np.int16)
        red = (a[..., 0] > 150) & (a[..., 0] > a[..., 1] + 60) & (a[..., 0] > a[..., 2] + 60)
        return {self.score: float(red.mean())}
