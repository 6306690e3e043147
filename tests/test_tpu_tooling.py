"""tpu/launch.py in --dry-run mode, and the SLURM example script.

Every launcher call runs `launch.py --dry-run` in a subprocess whose PATH holds only fake
`gcloud`, `git`, `gsutil` and `mkdir` programs that record being called: the tests check the
printed commands and that none of those programs ever ran.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tpu" / "launch.py"
SBATCH = REPO / "tpu" / "slurm" / "train.sbatch"
BASH = shutil.which("bash") or "/bin/bash"
SLICE = ["--name", "t1", "--zone", "us-central2-b"]


def _load_launch():
    spec = importlib.util.spec_from_file_location("tpu_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


launch_mod = _load_launch()


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    """A PATH directory whose programs only record that they were called."""
    d = tmp_path_factory.mktemp("fakebin")
    marker = d / "CALLED"
    for prog in ("gcloud", "git", "gsutil", "mkdir", "bash", "sh"):
        p = d / prog
        p.write_text(f"#!/bin/sh\necho \"{prog} $*\" >> {marker}\nexit 0\n")
        p.chmod(0o755)
    return d


def launch(fake_bin, *args, env=None):
    """Run launch.py with the fake PATH; return (returncode, stdout lines, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAXRL_TPU_")}
    base["PATH"] = str(fake_bin)
    base.update(env or {})
    r = subprocess.run([sys.executable, str(LAUNCH), *args], check=False, capture_output=True, text=True, env=base,
                       cwd=REPO, timeout=60)
    assert not (fake_bin / "CALLED").exists(), "dry-run started a program: " + (fake_bin / "CALLED").read_text()
    return r.returncode, r.stdout.splitlines(), r.stderr


def commands(lines):
    """The command lines (not the `# ...` info lines) of a dry-run."""
    return [line for line in lines if line and not line.startswith("#")]


def remote_script(line):
    """The script passed to the workers by a `gcloud ... ssh --command=SCRIPT` line."""
    argv = shlex.split(line)
    [script] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return argv, script


def bash_syntax_ok(script):
    r = subprocess.run([BASH, "-n", "-c", script], check=False, capture_output=True, text=True)
    return r.returncode == 0, r.stderr


# --- accelerator types ---------------------------------------------------------------------------

@pytest.mark.parametrize("acc,chips,workers,runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"), ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v3-32", 16, 4, "tpu-ubuntu2204-base"), ("v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v5p-64", 32, 8, "v2-alpha-tpuv5"), ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"), ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"),
    ("v6e-1", 1, 1, "v2-alpha-tpuv6e"), ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-16", 16, 4, "v2-alpha-tpuv6e"), ("v6e-256", 256, 64, "v2-alpha-tpuv6e"),
])
def test_slice_shapes(acc, chips, workers, runtime):
    shape = launch_mod.parse_accelerator_type(acc)
    assert (shape.chips, shape.workers, shape.family.runtime_version) == (chips, workers, runtime)
    assert shape.multi_host == (workers > 1)


@pytest.mark.parametrize("bad", ["v9-8", "v5e-8", "tpu", "v4-6", "v6e-2", "v5p-12"])
def test_bad_accelerator_types_raise(bad):
    with pytest.raises(launch_mod.LaunchError):
        launch_mod.parse_accelerator_type(bad)


def test_parse_source():
    assert launch_mod.parse_source("local") == ("local", None, None)
    assert launch_mod.parse_source("git+https://github.com/o/r.git@v1.2") == \
        ("git", "https://github.com/o/r.git", "v1.2")
    assert launch_mod.parse_source("git+ssh://git@github.com/o/r.git") == \
        ("git", "ssh://git@github.com/o/r.git", None)
    assert launch_mod.parse_source("git+ssh://git@github.com/o/r.git@feature/x") == \
        ("git", "ssh://git@github.com/o/r.git", "feature/x")
    with pytest.raises(launch_mod.LaunchError):
        launch_mod.parse_source("https://github.com/o/r.git")


# --- subcommands -----------------------------------------------------------------------------------

def test_create_single_host(fake_bin):
    rc, out, err = launch(fake_bin, "create", *SLICE, "--accelerator-type", "v4-8", "--dry-run")
    assert rc == 0, err
    assert commands(out) == [("gcloud compute tpus tpu-vm create t1 --zone=us-central2-b "
                              "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base")]
    assert "# slice v4-8: TPU v4, 4 chips on 1 worker (4 chips each), single-host" in out


def test_create_spot_project_runtime(fake_bin):
    rc, out, err = launch(fake_bin, "create", *SLICE, "--project", "my-proj", "--accelerator-type", "v6e-16",
                          "--spot", "--dry-run")
    assert rc == 0, err
    assert commands(out) == [("gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --project=my-proj "
                              "--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e --spot")]
    assert any("16 chips on 4 workers" in line and "multi-host" in line for line in out)
    rc, out, _ = launch(fake_bin, "create", *SLICE, "--accelerator-type", "v5litepod-8", "--preemptible",
                        "--runtime-version", "my-runtime", "--dry-run")
    assert commands(out) == [("gcloud compute tpus tpu-vm create t1 --zone=us-central2-b "
                              "--accelerator-type=v5litepod-8 --version=my-runtime --preemptible")]
    rc, _, err = launch(fake_bin, "create", *SLICE, "--accelerator-type", "v4-8", "--spot", "--preemptible",
                        "--dry-run")
    assert rc != 0 and "mutually exclusive" in err


def test_bad_input_is_a_clear_error(fake_bin):
    rc, out, err = launch(fake_bin, "create", *SLICE, "--accelerator-type", "v9-8", "--dry-run")
    assert rc != 0 and not commands(out)
    assert "unknown accelerator family 'v9'" in err
    for family in ("v4", "v5p", "v5litepod", "v6e"):
        assert family in err
    rc, _, err = launch(fake_bin, "create", *SLICE, "--accelerator-type", "v5e-8", "--dry-run")
    assert rc != 0 and "v5litepod" in err
    rc, out, err = launch(fake_bin, "create", "--zone", "z", "--accelerator-type", "v4-8", "--dry-run")
    assert rc != 0 and "--name is required" in err and not out
    rc, _, err = launch(fake_bin, "delete", "--name", "t1", "--dry-run")
    assert rc != 0 and "--zone is required" in err
    rc, _, err = launch(fake_bin, "create", *SLICE, "--dry-run")
    assert rc != 0 and "--accelerator-type is required" in err
    rc, _, err = launch(fake_bin, "run", *SLICE, "experiments/grpo.py", "--set", "novalue", "--dry-run")
    assert rc != 0 and "KEY=VALUE" in err


def test_env_fallbacks(fake_bin):
    env = {"JAXRL_TPU_NAME": "t2", "JAXRL_TPU_ZONE": "europe-west4-a", "JAXRL_TPU_ACCELERATOR_TYPE": "v5p-8"}
    rc, out, err = launch(fake_bin, "create", "--dry-run", env=env)
    assert rc == 0, err
    assert commands(out) == [("gcloud compute tpus tpu-vm create t2 --zone=europe-west4-a "
                              "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5")]


def test_install_ships_local_checkout(fake_bin, tmp_path):
    tarball = str(tmp_path / "src.tar.gz")
    rc, out, err = launch(fake_bin, "install", *SLICE, "--tarball", tarball, "--dry-run")
    assert rc == 0, err
    cmds = commands(out)
    assert cmds[0] == shlex.join(["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"])
    assert cmds[1] == (f"gcloud compute tpus tpu-vm scp {tarball} t1:jaxrl_llm-src.tar.gz "
                       "--zone=us-central2-b --worker=all")
    argv, script = remote_script(cmds[2])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    assert "tar -xzf jaxrl_llm-src.tar.gz -C jaxrl_llm" in script
    assert "python3 -m venv .venv" in script
    assert ".venv/bin/pip install -e . 'jax[tpu]'" in script
    assert len(cmds) == 3
    assert bash_syntax_ok(script)[0]


def test_install_from_git(fake_bin):
    rc, out, err = launch(fake_bin, "install", *SLICE, "--source",
                          "git+https://github.com/example/jaxrl_llm.git@v1.2", "--pip-spec", "jax[tpu]==0.7.2",
                          "--dry-run")
    assert rc == 0, err
    [cmd] = commands(out)
    argv, script = remote_script(cmd)
    assert "--worker=all" in argv
    assert "git clone -q https://github.com/example/jaxrl_llm.git jaxrl_llm" in script
    assert "git checkout -q --detach origin/v1.2" in script
    assert ".venv/bin/pip install -e . 'jax[tpu]==0.7.2'" in script
    assert bash_syntax_ok(script)[0]


def test_mount_gcsfuse_on_all_workers(fake_bin):
    rc, out, err = launch(fake_bin, "mount", *SLICE, "--bucket", "gs://my-runs", "--dry-run")
    assert rc == 0, err
    [cmd] = commands(out)
    argv, script = remote_script(cmd)
    assert "--worker=all" in argv
    assert "gcsfuse --implicit-dirs --rename-dir-limit=10000 my-runs /mnt/shared" in script
    assert bash_syntax_ok(script)[0]
    rc, _, err = launch(fake_bin, "mount", *SLICE, "--dry-run")
    assert rc != 0 and "--bucket is required" in err


OVERRIDES = ["rl.algo.loss.kl_coef=0.0", "task.kwargs.note=it's $HOME & more", "mesh.preset=v4-8"]


def run_args(*extra):
    args = ["run", *SLICE, "experiments/grpo.py:smoke", "--dry-run", *extra]
    for o in OVERRIDES:
        args += ["--set", o]
    return args


def test_run_command_line(fake_bin):
    rc, out, err = launch(fake_bin, *run_args("--accelerator-type", "v4-8", "--env", "HF_HOME=/data/hf"))
    assert rc == 0, err
    assert "warning" not in err  # single host: the local runs/ is fine
    [cmd] = commands(out)
    argv, script = remote_script(cmd)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    train = [".venv/bin/jaxrl-llm", "train", "experiments/grpo.py:smoke"]
    for o in OVERRIDES:
        train += ["--set", o]
    assert shlex.join(train) in script
    assert "--set 'task.kwargs.note=it'\"'\"'s $HOME & more'" in script  # quoted for the worker's shell
    assert "setsid nohup env -u XLA_FLAGS -u JAX_PLATFORMS" in script
    assert "PYTHONUNBUFFERED=1 HF_HOME=/data/hf .venv/bin/jaxrl-llm train" in script
    assert ">> logs/train-w$W.log 2>&1 < /dev/null &" in script
    ok, msg = bash_syntax_ok(script)
    assert ok, msg
    assert any("run directory on the workers: runs/grpo-smoke" in line for line in out)


def test_run_script_on_a_simulated_worker(tmp_path):
    """The worker script, run by bash in a fake project dir, starts `train` with the exact argv."""
    project = tmp_path / "jaxrl_llm"
    (project / ".venv" / "bin").mkdir(parents=True)
    fake_train = project / ".venv" / "bin" / "jaxrl-llm"
    fake_train.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '<%s>\\n' \"$a\"; done\n"
                          "echo \"XLA_FLAGS=${XLA_FLAGS-unset} HF_HOME=$HF_HOME\"\necho done\n")
    fake_train.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog, body in (("pgrep", "exit 1"), ("curl", "exit 7")):  # nothing running; no metadata server
        (bin_dir / prog).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / prog).chmod(0o755)
    train = launch_mod.train_command("experiments/grpo.py:smoke", OVERRIDES, run_root="/mnt/shared/runs")
    script = launch_mod.run_script(train, str(project), env=["HF_HOME=/data/hf"])
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "XLA_FLAGS": "--leftover"}
    r = subprocess.run([BASH, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert "started pid" in r.stdout
    [log] = list((project / "logs").glob("train-w*.log"))
    for _ in range(100):  # the process runs detached; wait for its last line
        if "done" in log.read_text():
            break
        time.sleep(0.05)
    text = log.read_text()
    assert "".join(f"<{a}>\n" for a in train[1:]) in text
    assert "XLA_FLAGS=unset HF_HOME=/data/hf" in text


def test_run_multi_host_needs_shared_storage(fake_bin):
    rc, out, err = launch(fake_bin, *run_args("--accelerator-type", "v5p-64"))
    assert rc == 0, err
    assert "warning:" in err and "multi-host" in err and "shared storage" in err
    assert any("32 chips on 8 workers" in line for line in out)
    # on the gcsfuse mount: no warning, and run_root reaches the train command
    rc, out, err = launch(fake_bin, *run_args("--accelerator-type", "v5p-64", "--run-root", "/mnt/shared/runs"))
    assert rc == 0 and "shared storage" not in err
    _, script = remote_script(commands(out)[0])
    assert ".venv/bin/jaxrl-llm train experiments/grpo.py:smoke --set run_root=/mnt/shared/runs --set" in script
    # asserted shared (e.g. NFS): no warning
    rc, _, err = launch(fake_bin, *run_args("--accelerator-type", "v6e-16", "--run-root", "/nfs/runs",
                                            "--shared-storage"))
    assert rc == 0 and "shared storage" not in err
    # a gs:// run_root is refused with a hint
    rc, _, err = launch(fake_bin, *run_args("--run-root", "gs://b/runs"))
    assert rc != 0 and "mount" in err


def test_logs(fake_bin):
    rc, out, err = launch(fake_bin, "logs", *SLICE, "--dry-run")
    assert rc == 0, err
    assert commands(out) == [("gcloud compute tpus tpu-vm ssh t1 --zone=us-central2-b --worker=0 "
                              "'--command=tail -n 100 -F jaxrl_llm/logs/train-w0.log'")]
    rc, out, _ = launch(fake_bin, "logs", *SLICE, "--worker", "3", "--dry-run")
    argv, script = remote_script(commands(out)[0])
    assert "--worker=3" in argv and script == "tail -n 100 -F jaxrl_llm/logs/train-w3.log"


def test_fetch(fake_bin):
    rc, out, err = launch(fake_bin, "fetch", *SLICE, "--experiment", "experiments/grpo.py:smoke", "--dry-run")
    assert rc == 0, err
    assert commands(out) == ["mkdir -p runs",
                             ("gcloud compute tpus tpu-vm scp --recurse t1:jaxrl_llm/runs/grpo-smoke runs "
                              "--zone=us-central2-b --worker=0")]
    rc, out, err = launch(fake_bin, "fetch", *SLICE, "--run-name", "exp1", "--run-root", "/mnt/shared/runs",
                          "--bucket", "my-runs", "--dest", "out", "--dry-run")
    assert rc == 0, err
    assert commands(out) == ["mkdir -p out/exp1", "gsutil -m rsync -r gs://my-runs/runs/exp1 out/exp1"]
    rc, out, err = launch(fake_bin, "fetch", *SLICE, "--run-name", "exp1", "--run-root", "gs://b/x", "--dry-run")
    assert commands(out)[-1] == "gsutil -m rsync -r gs://b/x/exp1 runs/exp1"
    rc, _, err = launch(fake_bin, "fetch", *SLICE, "--dry-run")
    assert rc != 0 and "--run-name" in err


def test_status_stop_delete(fake_bin):
    rc, out, err = launch(fake_bin, "status", *SLICE, "--accelerator-type", "v5p-64", "--dry-run")
    assert rc == 0, err
    cmds = commands(out)
    assert cmds[0] == "gcloud compute tpus tpu-vm describe t1 --zone=us-central2-b"
    argv, script = remote_script(cmds[1])
    assert "--worker=all" in argv and bash_syntax_ok(script)[0]
    assert "# slice v5p-64: TPU v5p, 32 chips on 8 workers (4 chips each), multi-host" in out

    rc, out, err = launch(fake_bin, "stop", *SLICE, "--dry-run")
    assert rc == 0, err
    argv, script = remote_script(commands(out)[0])
    assert "--worker=all" in argv
    assert "pkill -TERM -f '[j]axrl-llm train'" in script and bash_syntax_ok(script)[0]

    rc, out, err = launch(fake_bin, "delete", *SLICE, "--project", "p", "--dry-run")
    assert rc == 0, err
    assert commands(out) == ["gcloud compute tpus tpu-vm delete t1 --zone=us-central2-b --project=p --quiet"]


def test_up_runs_create_install_mount_run_in_order(fake_bin):
    rc, out, err = launch(fake_bin, "up", *SLICE, "--accelerator-type", "v5litepod-16", "--spot",
                          "--bucket", "my-runs", "--run-root", "/mnt/shared/runs",
                          "experiments/grpo.py", "--set", "mesh.preset=v5litepod-16", "--dry-run")
    assert rc == 0, err
    cmds = commands(out)
    assert len(cmds) == 6
    assert cmds[0].startswith("gcloud compute tpus tpu-vm create t1 ") and "--spot" in cmds[0]
    assert cmds[1].startswith("git ") and " archive " in cmds[1]
    assert cmds[2].startswith("gcloud compute tpus tpu-vm scp ")
    assert "pip install -e ." in remote_script(cmds[3])[1]
    assert "gcsfuse" in remote_script(cmds[4])[1]
    assert (".venv/bin/jaxrl-llm train experiments/grpo.py --set run_root=/mnt/shared/runs "
            "--set mesh.preset=v5litepod-16") in remote_script(cmds[5])[1]
    assert "shared storage" not in err
    # without a bucket: create, install, run, and the multi-host warning
    rc, out, err = launch(fake_bin, "up", *SLICE, "--accelerator-type", "v5litepod-16", "experiments/grpo.py",
                          "--dry-run")
    assert rc == 0 and len(commands(out)) == 5 and "shared storage" in err


def test_help(fake_bin):
    rc, out, _ = launch(fake_bin, "--help")
    assert rc == 0 and all(c in "\n".join(out) for c in ("create", "install", "run", "fetch", "up"))


# --- SLURM -------------------------------------------------------------------------------------------

def test_sbatch_syntax():
    r = subprocess.run([BASH, "-n", str(SBATCH)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SBATCH.read_text()
    for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --requeue"):
        assert directive in text


def test_sbatch_srun_command(tmp_path):
    """With a fake srun, the script passes the experiment, run_root, mesh preset and extra args."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv.mkdir(parents=True)
    (bin_dir / "srun").write_text("#!/bin/sh\necho \"JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS\"\n"
                                  "for a in \"$@\"; do printf '<%s>\\n' \"$a\"; done\n")
    (venv / "jaxrl-llm").write_text("#!/bin/sh\n")
    for p in (bin_dir / "srun", venv / "jaxrl-llm"):
        p.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(tmp_path), "VENV": str(tmp_path / "venv"),
           "SLURM_GPUS_ON_NODE": "8", "RUN_ROOT": "/shared/runs"}
    r = subprocess.run([BASH, str(SBATCH), "experiments/grpo.py:smoke", "--set", "a=b c"], check=False,
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in r.stdout
    args = [line[1:-1] for line in r.stdout.splitlines() if line.startswith("<")]
    assert args == ["--ntasks-per-node=1", "--gpus-per-node=8", "--kill-on-bad-exit=1",
                    str(venv / "jaxrl-llm"), "train", "experiments/grpo.py:smoke",
                    "--set", "run_root=/shared/runs", "--set", "mesh.preset=2x8xH100", "--set", "a=b c"]
