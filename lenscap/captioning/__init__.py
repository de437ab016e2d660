"""The parts of captioning that do not depend on a backend: prompts, image preparation, token and
cost estimates, rate limiting, the per-shard journal, the response cache and the budget."""
