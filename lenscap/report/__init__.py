"""``lenscap report``: a self-contained HTML page about a dataset."""
