"""``lenscap audit``: how good a dataset's captions are, measured out of core, before training on them.

    scan (every shard, on the executor)  ->  global pass (hash-partitioned spill files)  ->  summary
                                                                                         ->  --out: a dataset with per-caption flags

``command`` runs it; ``source`` opens what is audited; ``measures`` defines each flag; ``text`` turns
text into hashes; ``scan`` runs the scan; ``spill`` groups by hash out of core; ``summary`` builds the
numbers, the ``--fail-on`` rules and the comparison of two datasets; ``render`` prints them.
Nothing is written into the audited dataset: the spill files live in a temporary directory.
"""
