"""Stages: one module per stage. ``base.Stage`` is what the runner runs; ``base.ShardStage`` adds the
per-sample loop."""
