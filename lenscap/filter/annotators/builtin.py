"""The built-in annotators: sharpness, uniformity, text area, faces, NSFW."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from lenscap.caption import vision
from lenscap.core.errors import MissingDependency
from lenscap.core.install import install_hint
from lenscap.core.record import Sample
from lenscap.filter.annotators.base import Annotator

__all__ = ["Blur", "Uniform", "TextArea", "Faces", "Nsfw"]


class Blur(Annotator):
    """Sharpness as the variance of the Laplacian of the grey image at most 512 px across: blurred
    and out-of-focus images score low (a common cut-off is around 100)."""

    name = "blur"
    cost_rank = 2
    columns = (pa.field("blur_laplacian_var", pa.float64()),)
    score = "blur_laplacian_var"
    keep_above = True
    threshold_flag = "--min-sharpness"
    threshold_help = "drop images whose Laplacian variance is below this"

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        grey = image.convert("L")
        grey.thumbnail((512, 512))
        a = np.asarray(grey, dtype=np.float32)
        lap = -4 * a[1:-1, 1:-1] + a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:]
        return {self.score: float(lap.var()) if lap.size else 0.0}


class Uniform(Annotator):
    """The share of the pixels in the most common colour (16 levels a channel): 1.0 is a single
    colour (placeholders, blank frames)."""

    name = "uniform"
    cost_rank = 1
    columns = (pa.field("uniform_dominant_share", pa.float64()),)
    score = "uniform_dominant_share"
    keep_above = False
    threshold_flag = "--max-uniformity"
    threshold_help = "drop images whose most common colour covers more than this share"

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        small = image.resize((64, 64))
        q = np.asarray(small, dtype=np.uint16) // 16
        codes = (q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]
        counts = np.bincount(codes.ravel(), minlength=4096)
        return {self.score: float(counts.max() / codes.size)}


class TextArea(Annotator):
    """Text read by OCR (the ocr extra) and the share of the image its boxes cover."""

    name = "ocr"
    cost_rank = 6
    columns = (pa.field("ocr_text", pa.string()), pa.field("ocr_text_area", pa.float64()))
    score = "ocr_text_area"
    keep_above = False
    threshold_flag = "--max-text-area"
    threshold_help = "drop images whose text boxes cover more than this share"
    extra = "ocr"

    @classmethod
    def unavailable(cls) -> str | None:
        return None if vision.ocr_available() else f"the ocr annotator needs the ocr extra: {install_hint('ocr')}"

    def setup(self) -> None:
        problem = self.unavailable()
        if problem:
            raise MissingDependency(problem)

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        lines = vision.read_text_boxes(image)
        area = sum(_polygon_area(box) for box, _ in lines) / float(image.width * image.height)
        return {"ocr_text": " / ".join(text for _, text in lines) or None, self.score: min(1.0, area)}


def _polygon_area(points: list[list[float]]) -> float:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(points))))


class Faces(Annotator):
    """Frontal faces found by OpenCV's bundled Haar cascade: a count, never an identity."""

    name = "faces"
    cost_rank = 3
    columns = (pa.field("faces_count", pa.int64()),)
    score = "faces_count"
    keep_above = False
    threshold_flag = "--max-faces"
    threshold_help = "drop images with more faces than this"
    threshold_type = int

    @classmethod
    def unavailable(cls) -> str | None:
        if vision.faces_available():
            return None
        return "the faces annotator needs OpenCV 4 with its cascades (opencv-python-headless<5)"

    def setup(self) -> None:
        problem = self.unavailable()
        if problem:
            raise MissingDependency(problem)

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        return {self.score: vision.count_faces(image)}


class Nsfw(Annotator):
    """NudeNet's detector (the nsfw extra; AGPL-3.0 licensed, hence optional): the highest score of
    its "exposed" classes, 0 when it finds none."""

    name = "nsfw"
    cost_rank = 5
    columns = (pa.field("nsfw_score", pa.float64()), pa.field("nsfw_labels", pa.string()))
    score = "nsfw_score"
    keep_above = False
    threshold_flag = "--max-nsfw"
    threshold_help = "drop images whose NSFW score is above this"
    extra = "nsfw"

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("nudenet") is not None:
            return None
        return f"the nsfw annotator needs the nsfw extra (NudeNet, AGPL-3.0): {install_hint('nsfw')}"

    def setup(self) -> None:
        try:
            from nudenet import NudeDetector  # optional (the nsfw extra)
        except ImportError:
            raise MissingDependency(
                f"the nsfw annotator needs the nsfw extra (NudeNet, AGPL-3.0): {install_hint('nsfw')}"
            ) from None
        self._detector = NudeDetector()

    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        found = [d for d in self._detector.detect(np.asarray(image)[:, :, ::-1].copy()) if "EXPOSED" in str(d.get("class", ""))]
        labels = sorted({str(d["class"]) for d in found})
        return {
            self.score: max((float(d.get("score", 0.0)) for d in found), default=0.0),
            "nsfw_labels": ",".join(labels) or None,
        }
