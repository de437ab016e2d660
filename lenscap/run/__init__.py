"""``lenscap run``: whole pipelines from TOML recipes."""
