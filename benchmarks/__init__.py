"""Speed benchmarks for gpt2jax: `python -m benchmarks.run` (see README, "Performance")."""
