"""The training loop's host-side pieces: checkpoints (`jaxrl_llm.train.checkpoint`)."""
