"""jaxrl_llm: JAX-native post-training of language models with reinforcement learning."""

__version__ = "0.1.0"
