"""jaxrl_llm: JAX-native post-training of language models with reinforcement learning."""

from jaxrl_llm import host_memory as _host_memory

__version__ = "0.1.0"

# Before any JAX computation starts XLA's threads: freed host memory stays mapped for the next step.
_host_memory.configure()
