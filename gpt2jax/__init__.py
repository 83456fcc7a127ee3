"""gpt2jax: train and sample GPT-2 language models with JAX/Flax, in any script."""

from gpt2jax import runtime as _runtime

_runtime.apply()
