"""Rollout generation: the jitted KV-cache sampler and its logit processing."""

from jaxrl_llm.rollout.sampler import Rollout, make_sampler, sample
from jaxrl_llm.rollout.sampling import SamplingConfig, keep_mask, process_logits, sample_tokens, scale_logits

__all__ = ["Rollout", "SamplingConfig", "keep_mask", "make_sampler", "process_logits", "sample",
           "sample_tokens", "scale_logits"]
