"""gpt2jax: train and sample GPT-2 language models with JAX/Flax, in any script."""
