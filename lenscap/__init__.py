"""lenscap: captioned, filtered, deduplicated, training-ready image-text datasets from URL lists."""

__version__ = "0.1.0"

from lenscap.dataset import Dataset  # noqa: E402
from lenscap.errors import DatasetError, InputError, LenscapError, ShardError, UsageError  # noqa: E402
from lenscap.record import Sample  # noqa: E402

__all__ = ["Dataset", "Sample", "LenscapError", "UsageError", "InputError", "DatasetError", "ShardError", "__version__"]
