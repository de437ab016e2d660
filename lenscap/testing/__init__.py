"""Servers that tests, benchmarks and the demo run on loopback: a fake OpenAI-compatible API."""
