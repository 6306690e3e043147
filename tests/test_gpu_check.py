"""bench/gpu_check.py: its formulas on hand-computed examples, the real shapes it builds, and a whole run at shrunk
shapes on CPU (every part, the JSON and the markdown table), so the script a GPU session runs once cannot rot."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


gpu = _load()


def test_device_peaks_by_kind():
    assert gpu.device_peaks("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)  # the SXM part, as JAX names it
    assert gpu.device_peaks("NVIDIA H100 PCIe") == (2.0e12, 756e12)
    assert gpu.device_peaks("NVIDIA H200") == (4.8e12, 989e12)
    assert gpu.device_peaks("NVIDIA A100-SXM4-80GB") == (2.0e12, 312e12)
    assert gpu.device_peaks("cpu") == (None, None)
    assert gpu.device_peaks("NVIDIA H100 NVL") == (None, None)  # not in the table: null, never a guess


def test_formulas_on_hand_computed_examples():
    # 24 layers x 2 kv heads x head_dim 64 in bf16: K and V = 2 x 24 x 2 x 64 x 2 bytes per token
    assert gpu.kv_bytes_per_token(24, 2, 64, 2) == 12288
    # 2 decode steps after a 3-token prompt, 2 rows: step 0 reads 4 tokens' K/V, step 1 reads 5
    assert gpu.decode_bytes(1000, 10, 2, 3, 2) == 2 * 1000 + 10 * 2 * (4 + 5)
    assert gpu.decode_bytes(1000, 10, 2, 3, 0) == 0
    assert gpu.bandwidth_fraction(3e12, 2.0, 3e12) == pytest.approx(0.5)
    assert gpu.bandwidth_fraction(3e12, 2.0, None) is None
    # 6 x 1e9 params x 1000 tokens / 2 s = 3e12 FLOP/s, over a 1e13 peak
    assert gpu.mfu(10 ** 9, 1000, 2.0, 1e13) == pytest.approx(0.3)
    assert gpu.mfu(10 ** 9, 1000, 2.0, None) is None
    assert gpu.ratio(3, 2) == 1.5 and gpu.ratio(None, 2) is None and gpu.ratio(3, None) is None


def test_real_shapes_are_qwen2_5():
    small = gpu.model_config("qwen2.5-0.5b", False)
    assert (small.vocab_size, small.hidden_size, small.intermediate_size, small.num_layers, small.num_heads,
            small.num_kv_heads, small.head_dim) == (151936, 896, 4864, 24, 14, 2, 64)
    big = gpu.model_config("qwen2.5-1.5b", False)
    assert (big.vocab_size, big.hidden_size, big.intermediate_size, big.num_layers, big.num_heads,
            big.num_kv_heads, big.head_dim) == (151936, 1536, 8960, 28, 12, 2, 128)
    for cfg in (small, big):
        assert cfg.tie_word_embeddings and cfg.qkv_bias
    # the parameter counts of the released checkpoints (0.49B and 1.54B)
    assert small.num_params() == 494_032_768 and big.num_params() == 1_543_714_304
    tiny = gpu.model_config("qwen2.5-1.5b", True, dtype="bfloat16")
    assert (tiny.num_layers, tiny.vocab_size, tiny.dtype) == (2, 512, "bfloat16")


def test_update_estimates_fall_with_micro_batches_and_remat():
    cfg = gpu.model_config("qwen2.5-1.5b", False, param_dtype="float32", dtype="bfloat16")
    est = {c: sum(gpu.update_estimate(cfg.replace(remat=c[0]), 64, 128, 384, c[1], 128).values())
           for c in gpu.UPDATE_CANDIDATES}
    assert est[("dots", 1)] > est[("dots", 2)] > est[("dots", 4)]
    assert est[("dots", 1)] > est[("full", 1)] > est[("full", 4)]
    # float32 weights + AdamW's two moments + gradients alone: 16 bytes per parameter
    terms = gpu.update_estimate(cfg.replace(remat="full"), 64, 128, 384, 1, 128)
    assert terms["params"] + terms["optimizer"] + terms["gradients"] == 16 * cfg.num_params()


def test_update_configuration_is_chosen_by_the_estimate():
    cfg = gpu.model_config("qwen2.5-1.5b", False, param_dtype="float32", dtype="bfloat16")
    est = {c: sum(gpu.update_estimate(cfg.replace(remat=c[0]), 64, 128, 384, c[1], 128).values())
           for c in gpu.UPDATE_CANDIDATES}
    h100 = int(0.92 * 81559 * 2 ** 20)  # an H100's 81559 MiB under XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    order = gpu.update_order(est, h100)
    assert sorted(order) == sorted(gpu.UPDATE_CANDIDATES)
    assert est[order[0]] <= gpu.MEMORY_FIT * h100
    assert all(est[c] > gpu.MEMORY_FIT * h100 for c in gpu.UPDATE_CANDIDATES[:gpu.UPDATE_CANDIDATES.index(order[0])])
    assert gpu.update_order(est, None) == list(gpu.UPDATE_CANDIDATES)  # no limit known (CPU): the first
    tiny = gpu.update_order(est, 1)  # nothing fits: every candidate still tried, in order, on OOM
    assert tiny == list(gpu.UPDATE_CANDIDATES)
    assert gpu._is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes."))
    assert not gpu._is_oom(ValueError("shapes do not match"))


def test_bad_parts_flag_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--parts", "decode,speed", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--parts" in r.stderr and "speed" in r.stderr and "decode,update,parity,memory" in r.stderr


def test_a_job_past_the_budget_is_stopped_and_recorded(tmp_path):
    t0 = time.time()
    res = gpu._run_child("parity", tmp_path, True, time.time() + 0.5, grace_s=0.5)
    assert time.time() - t0 < 20
    assert res["status"] == "error" and "time budget" in res["error"]
    assert not list(tmp_path.glob(".gpu-check-*"))  # the child's scratch file is removed


def test_markdown_table_shows_a_failed_part():
    report = {"device_kind": "NVIDIA H100 80GB HBM3", "jax_version": "0", "created": "now", "shrink": False,
              "parts": {"update": {"status": "error", "config": {"model": "qwen2.5-1.5b", "rows": 64,
                                                                "prompt_len": 128, "completion_len": 384},
                                   "runs": [{"remat": "dots", "num_micro_batches": 2, "status": "error",
                                             "error": "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory"}]},
                        "memory": {"status": "skipped", "error": "no measuring part ran to completion", "rows": []}}}
    table = gpu.markdown_table(report)
    assert "| update | qwen2.5-1.5b | 64 x 512 tokens, remat dots, 2 micro-batch(es) | error | " \
           "XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory |" in table
    assert "| memory |  |  | skipped | no measuring part ran to completion |" in table


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_shrunk_run_writes_every_part(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--shrink", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [json_path] = tmp_path.glob("gpu-check-*-shrunk.json")
    rep = json.loads(json_path.read_text())
    assert rep["shrink"] is True and rep["device_kind"] == "cpu" and rep["jax_version"]
    assert rep["peak_hbm_bytes_per_s"] is None and rep["peak_bf16_flops"] is None
    parts = rep["parts"]
    assert set(parts) == {"decode", "update", "parity", "memory"}
    assert {p: parts[p]["status"] for p in parts} == dict.fromkeys(parts, "ok"), parts

    plan = rep["plan"]
    jobs = parts["decode"]["jobs"]
    assert [j["config"]["model"] for j in jobs] == ["qwen2.5-0.5b", "qwen2.5-1.5b"]
    for job in jobs:
        assert job["config"]["param_dtype"] == "bfloat16" and job["config"]["eos_token_ids"] == []
        assert [run["batch"] for run in job["runs"]] == plan["decode_batches"]
        for run in job["runs"]:
            assert run["status"] == "ok", run
            assert run["steps"] == plan["decode_new"] and run["every_row_full_length"] is True
            for k in ("sampler_s", "prefill_s", "tokens_per_s", "decode_bytes", "weight_bytes", "estimate_bytes"):
                assert _finite(run[k]) and run[k] > 0, (k, run[k])
            assert run["tokens_per_s"] == pytest.approx(run["batch"] * plan["decode_new"] / run["sampler_s"])
            assert run["hbm_fraction"] is None  # no peak bandwidth for a CPU
            assert run["peak_bytes_so_far"] is None  # no memory statistics on CPU

    [upd] = [run for run in parts["update"]["runs"] if run["status"] == "ok"]
    assert _finite(upd["step_s"]) and upd["step_s"] > 0 and upd["losses_finite"] is True
    assert upd["tokens"] == plan["update_rows"] * (plan["update_prompt"] + plan["update_completion"])
    assert upd["mfu"] is None and _finite(upd["model_flops_per_s"])
    assert (upd["remat"], upd["num_micro_batches"]) == gpu.UPDATE_CANDIDATES[0]  # no memory limit on CPU

    [par] = parts["parity"]["runs"]
    assert 0.0 <= par["greedy_agreement"] <= 1.0
    assert _finite(par["logprob_max_abs_diff"]) and _finite(par["logprob_mean_abs_diff"])
    assert 0.0 < par["logprob_mean_abs_diff"] <= par["logprob_max_abs_diff"] < 0.5  # bf16 differs, a little
    assert par["positions"] == plan["parity_rows"] * plan["parity_completion"]

    mem = parts["memory"]["rows"]
    assert [m["job"] for m in mem] == ["parity", "decode:qwen2.5-0.5b", "update", "decode:qwen2.5-1.5b"]
    for m in mem:
        assert _finite(m["estimate_bytes"]) and m["estimate_bytes"] > 0
        assert m["peak_bytes"] is None and m["peak_over_estimate"] is None

    table = (tmp_path / json_path.name.replace(".json", ".md")).read_text()
    assert table in r.stdout  # printed too
    assert " MiB (n/a) |" in table
    assert "| part | model | setting | figure | value |" in table
    for needle in ("| decode | qwen2.5-0.5b | batch 4, prompt 8, 16 new, bf16 | tokens/s",
                   "| decode | qwen2.5-1.5b | batch 4, prompt 8, 16 new, bf16 | HBM fraction | n/a |",
                   "| update | qwen2.5-1.5b | 4 x 24 tokens, remat dots, 1 micro-batch(es) | MFU | n/a |",
                   "| parity | qwen2.5-0.5b | 2 x 16 completion tokens, float32 vs bf16 | greedy agreement |",
                   "| memory | update | remat dots, 1 micro-batch(es) | peak / estimate (ratio) | n/a / "):
        assert needle in table, needle


def test_out_of_budget_parts_are_recorded_as_skipped(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--shrink", "--out", str(tmp_path), "--budget-s", "0.001",
                        "--parts", "update,memory"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    assert set(rep["parts"]) == {"update", "memory"}
    assert rep["parts"]["update"]["status"] == "skipped" and "budget" in rep["parts"]["update"]["error"]
    assert rep["parts"]["memory"]["status"] == "skipped"
    assert "| update |  |  | skipped | time budget spent before it started |" in r.stdout
    assert "| parity |" not in r.stdout and "| decode |" not in r.stdout  # parts not asked for: no rows


def test_decode_job_fills_the_gpu_only_figures(tmp_path, monkeypatch):
    """The branches a GPU takes (a known peak bandwidth, memory statistics), in process at shrunk shapes."""
    monkeypatch.setattr(gpu, "device_peaks", lambda kind: (1e9, 1e12))
    monkeypatch.setattr(gpu, "_memory_stats", lambda: {"peak_bytes_in_use": 3 * 2 ** 20, "bytes_limit": 2 ** 30})
    rec = gpu.Recorder(str(tmp_path / "decode.json"), "decode:qwen2.5-0.5b")
    gpu.job_decode(rec, gpu.SHRUNK, True, math.inf, "qwen2.5-0.5b")
    [run] = rec.data["runs"]
    assert run["status"] == "ok", run
    assert rec.data["peak_bytes"] == 3 * 2 ** 20
    forwards = gpu.SHRUNK.decode_new - 1  # the last step only samples
    cfg = gpu.model_config("qwen2.5-0.5b", True)
    assert run["kv_bytes_per_token"] == gpu.kv_bytes_per_token(2, cfg.num_kv_heads, cfg.head_dim, 2)
    assert run["weight_bytes"] == 2 * cfg.num_params()  # bf16
    assert run["decode_bytes"] == gpu.decode_bytes(run["weight_bytes"], run["kv_bytes_per_token"], run["rows"],
                                                   gpu.SHRUNK.decode_prompt, forwards)
    if run["decode_s"] > 0:  # sampler minus prefill: tiny and noisy at these shapes
        assert run["hbm_fraction"] == pytest.approx(run["decode_bytes"] / run["decode_s"] / 1e9)
    else:
        assert run["hbm_fraction"] is None
    assert run["peak_over_estimate"] == pytest.approx(3 * 2 ** 20 / run["estimate_bytes"])
    on_disk = json.loads((tmp_path / "decode.json").read_text())
    assert on_disk["runs"][0]["status"] == "ok"  # written after each measurement
