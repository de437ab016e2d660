"""``lenscap verify``: every byte of a dataset's shards checked against what their commits recorded."""
