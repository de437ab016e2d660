"""``lenscap shard``: export a dataset directory to training-ready WebDataset or Parquet shards."""
