"""``lenscap caption``: captions from a backend, resumable without paying twice."""
