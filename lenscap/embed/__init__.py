"""Image embeddings computed once and kept with the dataset, for every stage that needs them.

``model`` loads a CLIP-style model (a hub id or a local directory) through transformers' real loading
path and embeds images (and texts); ``store`` keeps a shard's embeddings as float16 in a sidecar
Parquet file, ``embeddings/NNNNN.parquet``, and finds kept ones for a dataset, following its inputs.
Semantic dedup writes them; the CLIP-score and aesthetic annotators read them instead of embedding again.
"""
