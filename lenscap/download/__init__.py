"""``lenscap download``: URL lists into a dataset directory, through img2dataset."""
