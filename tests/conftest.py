"""Every test runs on 8 fake CPU devices, so sharded and single-device runs can be compared.

The flag must be set before jax is imported anywhere.
"""

import os
import shutil
import tempfile

# Compile fast: the tests run small programs a few times each, so compiling is most of their time; LLVM's
# optimisations off and XLA's classic CPU fusion emitters compile much faster. Subprocesses that tests start
# inherit these flags (tests that compare results compare runs compiled with the same flags).
COMPILE_FAST = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
# On 2 busy cores one fake device's thread can reach a collective long after its peers: wait for it instead of
# aborting the process after XLA's default 40 s (a real hang still ends at the tests' own time limits).
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), COMPILE_FAST, PATIENT_COLLECTIVES,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session, shared by both pytest workers and the processes tests start
# (those that compare runs set their own): a program compiled by an earlier test, in either worker, is read back
# instead of compiled again (library functions jit fresh closures, so the in-memory caches miss). The process
# that starts the session creates it (the workers inherit the variable) and removes it at the end. A cache set
# by the caller is used as it is and kept.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="jaxrl-llm-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxrl_llm.sharding.multihost import cpu_thread_headroom  # noqa: E402

# 8 devices on 2 cores: XLA's CPU thread pool gets spare threads, or two programs in flight can each hold
# threads the other's parts wait for (docs/scaling.md, "Troubleshooting hangs"). Before the backend starts.
cpu_thread_headroom(min_devices=2)

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}; XLA_FLAGS was set too late"
    return devs


# `make test` hands whole files to 2 workers in collection order (`--dist loadfile --no-loadscope-reorder`): each
# worker takes the next file when it has two tests or fewer left of its own. The files that take longest go
# first, so the short ones fill both workers' ends instead of one worker finishing a long file alone. The first
# four start processes of their own (smoke runs, several processes, SIGKILL and resume, sweeps); the
# in-process files after them compile the most programs.
HEAVY_FILES_FIRST = ("test_experiments.py", "test_vectorised_seeds.py", "test_trainer.py", "test_online_dpo.py",
                     "test_kto.py", "test_gguf.py", "test_multihost.py", "test_plots_sweep.py",
                     "test_ppo_step.py", "test_grpo_step.py", "test_model.py", "test_checkpoint.py",
                     "test_sampler.py", "test_sft_rm_dpo_steps.py")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def chatml_tokenizer(tmp_path):
    """A character-level tokenizer with a Qwen-style ChatML template (<|im_end|> is the EOS), loaded through
    `load_tokenizer` from a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxrl_llm.tokenizer import load_tokenizer
    chars = "abcdefghijklmnopqrstuvwxyz0123456789+*= \n"
    raw = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)} | {"<unk>": len(chars)}, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=raw, additional_special_tokens=["<|im_start|>", "<|im_end|>",
                                                                                "<|endoftext|>"])
    t.eos_token, t.pad_token = "<|im_end|>", "<|endoftext|>"
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t.save_pretrained(str(tmp_path / "chatml"))
    return load_tokenizer(tmp_path / "chatml")
