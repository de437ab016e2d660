"""Stages: one module per stage. ``base.ShardStage`` owns the per-sample loop."""
