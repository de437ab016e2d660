"""``lenscap inspect``: what a dataset directory or an export holds, without reading an image."""
