#!/usr/bin/env python3
"""Run a jaxrl_llm experiment on a Google Cloud TPU VM slice (single-host or multi-host).

Every subcommand is a short sequence of `gcloud` (and, locally, `git` / `gsutil`) commands.
Each command is built by a pure function of the parsed options, printed shell-quoted, and run;
with --dry-run the commands are printed one per line, exactly as they would run, and nothing
is started (no gcloud, no git, no subprocess at all).

    python tpu/launch.py up     --name my-tpu --zone us-central2-b --accelerator-type v4-8 experiments/grpo.py
    python tpu/launch.py logs   --name my-tpu --zone us-central2-b
    python tpu/launch.py fetch  --name my-tpu --zone us-central2-b --experiment experiments/grpo.py
    python tpu/launch.py delete --name my-tpu --zone us-central2-b

Subcommands: create, install, mount, run, logs, fetch, status, stop, delete, up (create +
install [+ mount] + run). See tpu/README.md for a full session, multi-host slices, shared
storage and preemption. --name/--zone/--project/--accelerator-type fall back to the environment
variables JAXRL_TPU_NAME, JAXRL_TPU_ZONE, JAXRL_TPU_PROJECT, JAXRL_TPU_ACCELERATOR_TYPE.

Standard library only, so it runs from any Python 3.10+ with the gcloud CLI on PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REMOTE_DIR = "jaxrl_llm"      # on every worker, relative to the login user's home
DEFAULT_MOUNT_POINT = "/mnt/shared"   # where `mount` puts the bucket, on every worker
TARBALL_NAME = "jaxrl_llm-src.tar.gz"  # the shipped checkout, in the worker's home while unpacking
TRAIN_PATTERN = "[j]axrl-llm train"   # pgrep/pkill regex; the brackets keep it from matching the
#                                      shell whose own command line contains this pattern
WORKER_ID_SH = (  # the worker's index in the slice, from the same metadata key JAX reads
    "W=$(curl -sf -H 'Metadata-Flavor: Google' "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
    " || hostname)")
# Variables a login shell might carry that would change what the training process sees. The
# TPU runtime and JAX detect the slice topology themselves; explicit settings go through --env.
SCRUBBED_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID")


class LaunchError(Exception):
    """Bad input or an inconsistent request; reported as `error: ...` with exit status 2."""


# ---------------------------------------------------------------------------------------------
# Accelerator types: runtime versions and the number of workers (TPU VMs) of a slice.
#
# Runtime versions: the "PyTorch and JAX" table of https://cloud.google.com/tpu/docs/runtimes
# (v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v4 and older:
# tpu-ubuntu2204-base). Override with --runtime-version.
#
# Workers: one TPU VM per host; `--worker=all` reaches each of them.
# * v2, v3, v4, v5p: the number in the accelerator type counts TensorCores, 2 per chip, and a
#   host has 4 chips: workers = cores / 8 (v4-8 and v5p-8 are 4 chips on 1 host, v5p-64 is 32
#   chips on 8 hosts; https://cloud.google.com/tpu/docs/v4, https://cloud.google.com/tpu/docs/v5p).
# * v5e (`v5litepod-N`) and v6e (`v6e-N`): the number counts chips, 1 TensorCore each. Slices of
#   1, 4 or 8 chips are a single VM; larger slices are multi-host with 4 chips per VM, so
#   v6e-16 has 4 workers and v6e-256 has 64 (the "Supported configurations" tables of
#   https://cloud.google.com/tpu/docs/v6e and https://cloud.google.com/tpu/docs/v5e).
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """A TPU generation as named in accelerator types (`v4`, `v5litepod`, ...)."""

    prefix: str
    label: str
    counts: str                  # what the number in the type counts: "cores" or "chips"
    runtime_version: str         # default --runtime-version
    sizes: tuple[int, ...] = ()  # valid numbers, when the family has a fixed list


FAMILIES: dict[str, Family] = {f.prefix: f for f in (
    Family("v2", "TPU v2", "cores", "tpu-ubuntu2204-base"),
    Family("v3", "TPU v3", "cores", "tpu-ubuntu2204-base"),
    Family("v4", "TPU v4", "cores", "tpu-ubuntu2204-base"),
    Family("v5p", "TPU v5p", "cores", "v2-alpha-tpuv5"),
    Family("v5litepod", "TPU v5e", "chips", "v2-alpha-tpuv5-lite", (1, 4, 8, 16, 32, 64, 128, 256)),
    Family("v6e", "TPU v6e (Trillium)", "chips", "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256)),
)}
FAMILY_EXAMPLES = "v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v5p-64, v6e-8, v6e-16"


@dataclasses.dataclass(frozen=True)
class SliceShape:
    """What an accelerator type means for launching: chips, workers, default runtime."""

    accelerator_type: str
    family: Family
    chips: int
    workers: int

    @property
    def multi_host(self) -> bool:
        return self.workers > 1

    @property
    def chips_per_worker(self) -> int:
        return max(1, self.chips // self.workers)

    def describe(self) -> str:
        kind = "multi-host" if self.multi_host else "single-host"
        plural = "s" if self.workers > 1 else ""
        return (f"{self.accelerator_type}: {self.family.label}, {self.chips} chips on "
                f"{self.workers} worker{plural} ({self.chips_per_worker} chips each), {kind}")


def parse_accelerator_type(text: str) -> SliceShape:
    """`v5p-64` -> SliceShape(chips=32, workers=8, ...); LaunchError for anything unknown."""
    known = ", ".join(FAMILIES)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text.strip().lower())
    if not m:
        raise LaunchError(f"accelerator type {text!r} is not FAMILY-SIZE; known families: {known} "
                          f"(e.g. {FAMILY_EXAMPLES})")
    prefix, size = m.group(1), int(m.group(2))
    family = FAMILIES.get(prefix)
    if family is None:
        hint = " (v5e slices are named v5litepod-N)" if prefix in ("v5e", "v5lite") else ""
        raise LaunchError(f"unknown accelerator family {prefix!r} in {text!r}{hint}; known families: "
                          f"{known} (e.g. {FAMILY_EXAMPLES})")
    if family.counts == "cores":
        if size < 8 or size % 8:
            raise LaunchError(f"{text!r}: {family.label} types count TensorCores (2 per chip, 4 chips "
                              f"per host), so the size must be a multiple of 8, e.g. {prefix}-8")
        chips = size // 2
        workers = chips // 4
    else:
        if size not in family.sizes:
            raise LaunchError(f"{text!r}: {family.label} slices have "
                              f"{', '.join(map(str, family.sizes))} chips")
        chips = size
        workers = 1 if chips <= 8 else chips // 4
    return SliceShape(f"{prefix}-{size}", family, chips, workers)


# ---------------------------------------------------------------------------------------------
# Pure command builders. Each returns an argv list (or, for what runs on the workers, a shell
# script as one string that becomes gcloud's --command). Flags follow the gcloud reference:
# https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/{create,ssh,scp,delete}
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tpu:
    """The slice every command addresses."""

    name: str
    zone: str
    project: str | None = None

    def location_flags(self) -> list[str]:
        flags = [f"--zone={self.zone}"]
        if self.project:
            flags.append(f"--project={self.project}")
        return flags


GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def create_command(tpu: Tpu, shape: SliceShape, runtime_version: str, *, spot: bool = False,
                   preemptible: bool = False, extra_flags: Sequence[str] = ()) -> list[str]:
    """`gcloud compute tpus tpu-vm create` for the slice; --spot / --preemptible are exclusive."""
    if spot and preemptible:
        raise LaunchError("--spot and --preemptible are mutually exclusive")
    cmd = [*GCLOUD_TPU, "create", tpu.name, *tpu.location_flags(),
           f"--accelerator-type={shape.accelerator_type}", f"--version={runtime_version}"]
    if spot:
        cmd.append("--spot")
    if preemptible:
        cmd.append("--preemptible")
    return cmd + list(extra_flags)


def ssh_command(tpu: Tpu, script: str, worker: str | int = "all") -> list[str]:
    """Run `script` (one shell command line) on one worker or on all of them at once."""
    return [*GCLOUD_TPU, "ssh", tpu.name, *tpu.location_flags(), f"--worker={worker}",
            f"--command={script}"]


def scp_to_workers_command(tpu: Tpu, local: str, remote: str) -> list[str]:
    """Copy a local file to the same path on every worker."""
    return [*GCLOUD_TPU, "scp", local, f"{tpu.name}:{remote}", *tpu.location_flags(), "--worker=all"]


def scp_from_worker_command(tpu: Tpu, remote: str, local: str, worker: int = 0) -> list[str]:
    """Copy a directory from one worker (recursively) into the local directory `local`."""
    return [*GCLOUD_TPU, "scp", "--recurse", f"{tpu.name}:{remote}", local, *tpu.location_flags(),
            f"--worker={worker}"]


def describe_command(tpu: Tpu) -> list[str]:
    return [*GCLOUD_TPU, "describe", tpu.name, *tpu.location_flags()]


def delete_command(tpu: Tpu) -> list[str]:
    """Delete the slice without the confirmation prompt (gcloud-wide --quiet)."""
    return [*GCLOUD_TPU, "delete", tpu.name, *tpu.location_flags(), "--quiet"]


def archive_command(tarball: str, ref: str = "HEAD", repo_root: str | Path = REPO_ROOT) -> list[str]:
    """The local checkout at `ref` (committed files only) as a gzipped tarball."""
    return ["git", "-C", str(repo_root), "archive", "--format=tar.gz", f"--output={tarball}", ref]


def parse_source(text: str) -> tuple[str, str | None, str | None]:
    """`local` -> ("local", None, None); `git+URL[@ref]` -> ("git", URL, ref or None).

    The ref follows pip's VCS-URL convention: it is split off the path part only, so
    `git+ssh://git@github.com/org/repo.git@v1.0` is the URL `ssh://git@github.com/org/repo.git`
    at ref `v1.0`.
    """
    if text == "local":
        return "local", None, None
    if text.startswith("git+"):
        parts = urlsplit(text[4:])
        if parts.scheme and (parts.netloc or parts.scheme == "file") and parts.path:
            path, ref = parts.path, None
            if "@" in path:
                path, ref = path.rsplit("@", 1)
                if not ref:
                    raise LaunchError(f"--source {text!r}: empty ref after '@'")
            return "git", urlunsplit(parts._replace(path=path)), ref
    raise LaunchError(f"--source {text!r}: expected 'local' or git+URL[@ref], e.g. "
                      "git+https://github.com/ORG/jaxrl_llm.git@main")


def venv_script(python: str = "python3", pip_spec: str = "jax[tpu]") -> str:
    """Create .venv in the current directory and install the project plus JAX for the TPU.

    Ubuntu images may lack the venv module; it is installed with apt when `python -m venv` fails.
    """
    py = shlex.quote(python)
    return "; ".join([
        (f"if [ ! -x .venv/bin/python ]; then {py} -m venv .venv || {{ rm -rf .venv; "
         "sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && "
         f"{py} -m venv .venv; }}; fi"),
        ".venv/bin/pip install -U pip",
        f".venv/bin/pip install -e . {shlex.quote(pip_spec)}",
        ".venv/bin/python -c 'import jax, jaxrl_llm; print(\"installed: jax\", jax.__version__)'",
    ])


def install_local_script(remote_dir: str = DEFAULT_REMOTE_DIR, python: str = "python3",
                         pip_spec: str = "jax[tpu]") -> str:
    """Unpack the shipped tarball into `remote_dir` (keeping runs/, logs/, .venv) and install."""
    d = shlex.quote(remote_dir)
    return "; ".join([
        "set -e", f"mkdir -p {d}", f"tar -xzf {TARBALL_NAME} -C {d}", f"rm -f {TARBALL_NAME}",
        f"cd {d}", venv_script(python, pip_spec)])


def install_git_script(url: str, ref: str | None, remote_dir: str = DEFAULT_REMOTE_DIR,
                       python: str = "python3", pip_spec: str = "jax[tpu]") -> str:
    """Clone (or update) the repository into `remote_dir`, check out `ref`, and install."""
    d = shlex.quote(remote_dir)
    if ref:
        checkout = (f"{{ git checkout -q --detach {shlex.quote('origin/' + ref)} 2>/dev/null || "
                    f"git checkout -q --detach {shlex.quote(ref)}; }}")
    else:
        checkout = "git checkout -q --detach origin/HEAD"
    return "; ".join([
        "set -e", f"if [ ! -d {d}/.git ]; then git clone -q {shlex.quote(url)} {d}; fi", f"cd {d}",
        "git fetch -q --tags origin", checkout, "git log -1 --format='checked out %h %s'",
        venv_script(python, pip_spec)])


GCSFUSE_INSTALL_SH = (  # Cloud Storage FUSE from Google's apt repository (Ubuntu/Debian)
    "if ! command -v gcsfuse >/dev/null; then "
    "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
    "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
    "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
    "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi")


def mount_script(bucket: str, mount_point: str = DEFAULT_MOUNT_POINT, rename_dir_limit: int = 10000) -> str:
    """Install gcsfuse if missing and mount `bucket` at `mount_point` (idempotent).

    Checkpoints are finalised by renaming directories. Buckets with hierarchical namespace do
    that atomically; on flat buckets gcsfuse refuses directory renames unless
    --rename-dir-limit is set (it then copies, which is not atomic).
    """
    bucket = bucket.removeprefix("gs://").rstrip("/")
    if not bucket or "/" in bucket:
        raise LaunchError(f"--bucket {bucket!r}: give a bucket name (gs://NAME or NAME), no path")
    m = shlex.quote(mount_point)
    gcsfuse = ["gcsfuse", "--implicit-dirs"]
    if rename_dir_limit:
        gcsfuse.append(f"--rename-dir-limit={rename_dir_limit}")
    gcsfuse += [bucket, mount_point]
    return "; ".join([
        "set -e", GCSFUSE_INSTALL_SH, f"sudo mkdir -p {m}", f"sudo chown \"$(id -u):$(id -g)\" {m}",
        (f"if mountpoint -q {m}; then echo \"$(hostname): {mount_point} already mounted\"; "
         f"else {shlex.join(gcsfuse)} && echo \"$(hostname): mounted gs://{bucket} at {mount_point}\"; fi")])


def train_command(experiment: str, overrides: Sequence[str] = (), *, run_root: str | None = None,
                  fresh: bool = False, distributed: str | None = None) -> list[str]:
    """The `jaxrl-llm train` argv that every worker runs (from the project directory)."""
    cmd = [".venv/bin/jaxrl-llm", "train", experiment]
    if run_root:
        cmd += ["--set", f"run_root={run_root}"]
    for override in overrides:
        cmd += ["--set", override]
    if fresh:
        cmd.append("--fresh")
    if distributed:
        cmd += ["--distributed", distributed]
    return cmd


def log_path(worker: str | int) -> str:
    """Where worker `worker` appends the output of its training process (in the project dir)."""
    return f"logs/train-w{worker}.log"


def run_script(train: Sequence[str], remote_dir: str = DEFAULT_REMOTE_DIR,
               env: Sequence[str] = ()) -> str:
    """Start `train` in the background on a worker and return at once.

    The process is detached (setsid + nohup, stdin from /dev/null) so it outlives the ssh
    session; its output is appended to logs/train-w<worker index>.log. Left-over XLA/JAX
    variables are removed from its environment; `env` (KEY=VALUE) entries are added.
    """
    d = shlex.quote(remote_dir)
    unset = " ".join(f"-u {name}" for name in SCRUBBED_ENV)
    environment = " ".join(shlex.quote(e) for e in ("PYTHONUNBUFFERED=1", *env))
    log = log_path("$W")
    return "; ".join([
        "set -e", f"cd {d}",
        "[ -x .venv/bin/jaxrl-llm ] || { echo \"$(hostname): not installed, run: launch.py install\" >&2; exit 1; }",
        "mkdir -p logs", WORKER_ID_SH,
        (f"if pgrep -f {shlex.quote(TRAIN_PATTERN)} >/dev/null; then echo \"worker $W: a training process "
         "is already running (launch.py stop first)\" >&2; exit 1; fi"),
        f"echo \"=== $(date -u +%FT%TZ) worker $W: starting\" >> {log}",
        # `&` ends this command, so the next one follows without a `;`
        (f"setsid nohup env {unset} {environment} {shlex.join(train)} >> {log} 2>&1 < /dev/null & "
         f"echo \"worker $W ($(hostname)): started pid $!, log $PWD/{log}\"")])


def logs_script(worker: int, remote_dir: str = DEFAULT_REMOTE_DIR, lines: int = 100,
                follow: bool = True) -> str:
    path = shlex.quote(posixpath.join(remote_dir, log_path(worker)))
    return f"tail -n {lines} {'-F ' if follow else ''}{path}"


def status_script(remote_dir: str = DEFAULT_REMOTE_DIR, lines: int = 3) -> str:
    """Per worker: is training running, and the last lines of its log."""
    d = shlex.quote(remote_dir)
    return "; ".join([
        f"cd {d} 2>/dev/null || {{ echo \"$(hostname): {remote_dir} not installed\"; exit 0; }}",
        WORKER_ID_SH,
        f"if pgrep -f {shlex.quote(TRAIN_PATTERN)} >/dev/null; then S=running; else S='not running'; fi",
        "echo \"== worker $W ($(hostname)): $S\"",
        f"tail -n {lines} {log_path('$W')} 2>/dev/null || true"])


def stop_script(grace_s: int = 30) -> str:
    """SIGTERM the training process, wait up to `grace_s` seconds, then SIGKILL what is left."""
    p = shlex.quote(TRAIN_PATTERN)
    return "; ".join([
        (f"if pkill -TERM -f {p}; then for i in $(seq {grace_s}); do pgrep -f {p} >/dev/null || break; "
         "sleep 1; done"),
        f"if pkill -KILL -f {p}; then echo \"$(hostname): killed\"; else echo \"$(hostname): stopped\"; fi",
        "else echo \"$(hostname): not running\"; fi"])


def gsutil_rsync_command(src: str, dest: str) -> list[str]:
    return ["gsutil", "-m", "rsync", "-r", src, dest]


# ---------------------------------------------------------------------------------------------
# Run directories: where a run lives, and whether every worker sees the same one.
# ---------------------------------------------------------------------------------------------

def run_name_for(experiment: str, overrides: Sequence[str] = ()) -> str:
    """The run's name as the trainer derives it: `--set name=` or the file stem [+ "-" + preset]."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "name" and value:
            return value
    path, _, preset = experiment.partition(":")
    stem = posixpath.splitext(posixpath.basename(path))[0]
    return stem + (f"-{preset}" if preset else "")


def is_under(path: str, root: str) -> bool:
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def shared_storage_warning(shape: SliceShape | None, run_root: str | None, mount_point: str,
                           asserted_shared: bool = False) -> str | None:
    """A warning when a multi-host run would write its run directory to per-worker disks."""
    if shape is None or not shape.multi_host or asserted_shared:
        return None
    root = run_root or "runs"
    if posixpath.isabs(root) and is_under(root, mount_point):
        return None
    return (f"{shape.accelerator_type} is multi-host ({shape.workers} workers) but run_root {root!r} is "
            f"not on shared storage: every process writes checkpoint shards under run_root, so each "
            f"worker must see the same directory. Mount a bucket on all workers (launch.py mount "
            f"--bucket B) and pass --run-root {mount_point}/runs, or pass --shared-storage if "
            f"{root!r} is already shared (e.g. Filestore NFS).")


def parse_overrides(values: Sequence[str]) -> tuple[list[str], str | None]:
    """Check KEY=VALUE syntax; return the overrides and a `run_root=` among them, if any."""
    run_root = None
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key.strip():
            raise LaunchError(f"--set {v!r}: expected KEY=VALUE")
        if key.strip() == "run_root":
            run_root = value
    return list(values), run_root


def check_env(values: Sequence[str]) -> list[str]:
    for v in values:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", v, flags=re.DOTALL):
            raise LaunchError(f"--env {v!r}: expected NAME=VALUE")
    return list(values)


# ---------------------------------------------------------------------------------------------
# Plans: what each subcommand prints (info), warns about, and runs, in order.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """Commands to run in order, with info lines (printed as `# ...`) and warnings."""

    commands: list[list[str]] = dataclasses.field(default_factory=list)
    info: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False  # the last command streams until interrupted (logs)
    local_tarball: str | None = None  # install ships the checkout: check it is clean first

    def extend(self, other: Plan) -> Plan:
        self.commands += other.commands
        self.info += [i for i in other.info if i not in self.info]
        self.warnings += [w for w in other.warnings if w not in self.warnings]
        self.local_tarball = self.local_tarball or other.local_tarball
        return self


def _env_or(value: str | None, var: str) -> str | None:
    return value if value else (os.environ.get(var) or None)


def tpu_from_args(args) -> Tpu:
    name = _env_or(args.name, "JAXRL_TPU_NAME")
    zone = _env_or(args.zone, "JAXRL_TPU_ZONE")
    if not name:
        raise LaunchError("--name is required (the TPU VM slice; or set JAXRL_TPU_NAME)")
    if not zone:
        raise LaunchError("--zone is required (e.g. us-central2-b; or set JAXRL_TPU_ZONE)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise LaunchError(f"--name {name!r}: use lowercase letters, digits and hyphens, starting with a letter")
    return Tpu(name, zone, _env_or(args.project, "JAXRL_TPU_PROJECT"))


def shape_from_args(args, required: bool = False) -> SliceShape | None:
    text = _env_or(getattr(args, "accelerator_type", None), "JAXRL_TPU_ACCELERATOR_TYPE")
    if not text:
        if required:
            raise LaunchError(f"--accelerator-type is required (e.g. {FAMILY_EXAMPLES})")
        return None
    return parse_accelerator_type(text)


def plan_create(args) -> Plan:
    tpu, shape = tpu_from_args(args), shape_from_args(args, required=True)
    version = args.runtime_version or shape.family.runtime_version
    plan = Plan(info=[f"slice {shape.describe()}", f"runtime version {version}"])
    plan.commands.append(create_command(tpu, shape, version, spot=args.spot, preemptible=args.preemptible,
                                        extra_flags=args.create_flag))
    return plan


def plan_install(args) -> Plan:
    tpu = tpu_from_args(args)
    kind, url, ref = parse_source(args.source)
    plan = Plan()
    if kind == "local":
        tarball = args.tarball or str(Path(tempfile.gettempdir()) / f"jaxrl_llm-src-{tpu.name}.tar.gz")
        plan.info.append(f"shipping the local checkout at {args.ref} (committed files only) to every worker")
        plan.commands += [
            archive_command(tarball, args.ref),
            scp_to_workers_command(tpu, tarball, TARBALL_NAME),
            ssh_command(tpu, install_local_script(args.remote_dir, args.python, args.pip_spec)),
        ]
        plan.local_tarball = tarball
    else:
        plan.info.append(f"cloning {url} at {ref or 'its default branch'} on every worker")
        plan.commands.append(ssh_command(tpu, install_git_script(url, ref, args.remote_dir, args.python,
                                                                 args.pip_spec)))
    return plan


def plan_mount(args) -> Plan:
    tpu = tpu_from_args(args)
    if not args.bucket:
        raise LaunchError("--bucket is required for mount (the GCS bucket holding run directories)")
    plan = Plan(info=[f"mounting gs://{args.bucket.removeprefix('gs://')} at {args.mount_point} on every worker"])
    plan.commands.append(ssh_command(tpu, mount_script(args.bucket, args.mount_point, args.rename_dir_limit)))
    return plan


def plan_run(args) -> Plan:
    tpu, shape = tpu_from_args(args), shape_from_args(args)
    overrides, override_root = parse_overrides(args.set)
    if args.run_root and override_root is not None:
        raise LaunchError("give run_root once: either --run-root or --set run_root=...")
    run_root = args.run_root or override_root
    if run_root and run_root.startswith("gs://"):
        raise LaunchError(f"run_root {run_root!r}: the trainer writes through the file system; mount the "
                          f"bucket on every worker (launch.py mount --bucket B) and pass the mount point, "
                          f"e.g. --run-root {args.mount_point}/runs")
    exp_path = args.experiment.partition(":")[0]
    plan = Plan()
    if shape is not None:
        plan.info.append(f"slice {shape.describe()}")
    else:
        plan.info.append("slice shape unknown (pass --accelerator-type to check shared storage)")
    if not (REPO_ROOT / exp_path).is_file() and not posixpath.isabs(exp_path):
        plan.warnings.append(f"{exp_path} is not in the local checkout; it must exist on the workers")
    name = run_name_for(args.experiment, overrides)
    plan.info.append(f"run directory on the workers: {posixpath.join(run_root or 'runs', name)}"
                     + ("" if run_root and posixpath.isabs(run_root) else f" (relative to {args.remote_dir})"))
    warning = shared_storage_warning(shape, run_root, args.mount_point, args.shared_storage)
    if warning:
        plan.warnings.append(warning)
    if args.fresh:
        plan.warnings.append("--fresh deletes the run directory first; never use it to resume after preemption")
    train = train_command(args.experiment, overrides, run_root=args.run_root, fresh=args.fresh,
                          distributed=args.distributed)
    plan.commands.append(ssh_command(tpu, run_script(train, args.remote_dir, check_env(args.env))))
    return plan


def plan_up(args) -> Plan:
    plan = plan_create(args).extend(plan_install(args))
    if args.bucket:
        plan.extend(plan_mount(args))
    return plan.extend(plan_run(args))


def plan_logs(args) -> Plan:
    tpu = tpu_from_args(args)
    plan = Plan(stream=not args.no_follow)
    plan.commands.append(ssh_command(tpu, logs_script(args.worker, args.remote_dir, args.lines,
                                                      not args.no_follow), worker=args.worker))
    return plan


def plan_fetch(args) -> Plan:
    tpu, shape = tpu_from_args(args), shape_from_args(args)
    name = args.run_name or (run_name_for(args.experiment) if args.experiment else None)
    if not name:
        raise LaunchError("fetch needs --run-name NAME or --experiment EXP[:preset] "
                          "(the run directory is <run_root>/<name>)")
    run_root = args.run_root or "runs"
    plan = Plan()
    if run_root.startswith("gs://"):
        src = f"{run_root.rstrip('/')}/{name}"
    elif args.bucket and posixpath.isabs(run_root) and is_under(run_root, args.mount_point):
        rel = posixpath.relpath(posixpath.join(run_root, name), args.mount_point)
        src = f"gs://{args.bucket.removeprefix('gs://').rstrip('/')}/{rel}"
    else:
        src = None
    if src:
        dest = posixpath.join(args.dest, name)
        plan.info.append(f"copying {src} to {dest}")
        plan.commands += [["mkdir", "-p", dest], gsutil_rsync_command(src, dest)]
        return plan
    remote = posixpath.join(run_root, name) if posixpath.isabs(run_root) else \
        posixpath.join(args.remote_dir, run_root, name)
    if shared_storage_warning(shape, run_root, args.mount_point, args.shared_storage):
        plan.warnings.append(f"{shape.accelerator_type} is multi-host and run_root {run_root!r} is on each "
                             f"worker's own disk: worker 0 holds metrics and plots but only its own "
                             f"checkpoint shards, so the fetched checkpoints are incomplete")
    plan.info.append(f"copying {remote} from worker 0 into {args.dest}/")
    plan.commands += [["mkdir", "-p", args.dest], scp_from_worker_command(tpu, remote, args.dest)]
    return plan


def plan_status(args) -> Plan:
    tpu, shape = tpu_from_args(args), shape_from_args(args)
    plan = Plan(info=[f"slice {shape.describe()}"] if shape else [])
    plan.commands += [describe_command(tpu), ssh_command(tpu, status_script(args.remote_dir))]
    return plan


def plan_stop(args) -> Plan:
    tpu = tpu_from_args(args)
    return Plan(commands=[ssh_command(tpu, stop_script(args.grace))])


def plan_delete(args) -> Plan:
    tpu = tpu_from_args(args)
    return Plan(info=[f"deleting {tpu.name} in {tpu.zone}: its disks (and any run directory on them) go too"],
                commands=[delete_command(tpu)])


PLANNERS = {"create": plan_create, "install": plan_install, "mount": plan_mount, "run": plan_run,
            "logs": plan_logs, "fetch": plan_fetch, "status": plan_status, "stop": plan_stop,
            "delete": plan_delete, "up": plan_up}


# ---------------------------------------------------------------------------------------------
# Execution. The only places that start processes are `Runner.run` and `_checkout_is_dirty`,
# and both are unreachable with --dry-run.
# ---------------------------------------------------------------------------------------------

class Runner:
    """Prints each command; runs it unless dry_run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, cmd: Sequence[str], stream: bool = False) -> int:
        line = shlex.join(cmd)
        if self.dry_run:
            print(line, flush=True)
            return 0
        print(f"+ {line}", file=sys.stderr, flush=True)
        try:
            return subprocess.run(list(cmd), check=False).returncode
        except FileNotFoundError:
            raise LaunchError(f"{cmd[0]} not found on PATH (install the Google Cloud CLI: "
                              "https://cloud.google.com/sdk/docs/install)") from None
        except KeyboardInterrupt:
            if stream:
                return 0
            raise


def _checkout_is_dirty() -> bool:
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                         check=False, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def execute(plan: Plan, dry_run: bool) -> int:
    for line in plan.info:
        print(f"# {line}", file=sys.stdout if dry_run else sys.stderr, flush=True)
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    runner = Runner(dry_run)
    if plan.local_tarball and not dry_run and _checkout_is_dirty():
        print("warning: the checkout has uncommitted changes; install ships the committed tree only",
              file=sys.stderr)
    for i, cmd in enumerate(plan.commands):
        rc = runner.run(cmd, stream=plan.stream and i == len(plan.commands) - 1)
        if rc != 0:
            print(f"error: command failed with exit status {rc}: {shlex.join(cmd)}", file=sys.stderr)
            return rc
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parents() -> dict[str, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("slice")
    g.add_argument("--name", help="TPU VM slice name (env JAXRL_TPU_NAME)")
    g.add_argument("--zone", help="zone, e.g. us-central2-b (env JAXRL_TPU_ZONE)")
    g.add_argument("--project", help="GCP project (env JAXRL_TPU_PROJECT; default: gcloud's configured one)")
    g.add_argument("--accelerator-type", help=f"e.g. {FAMILY_EXAMPLES} (env JAXRL_TPU_ACCELERATOR_TYPE); "
                   "required by create/up, used by run/fetch/status to tell single- from multi-host")
    g.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR,
                   help="project directory on the workers, relative to the home directory or absolute "
                        "(default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")

    create = argparse.ArgumentParser(add_help=False)
    g = create.add_argument_group("create")
    g.add_argument("--runtime-version", help="TPU software version (default per family: "
                   + ", ".join(f"{f.prefix} {f.runtime_version}" for f in FAMILIES.values()) + ")")
    g.add_argument("--spot", action="store_true", help="Spot VMs: cheaper, can be preempted at any time")
    g.add_argument("--preemptible", action="store_true", help="preemptible TPUs (older model; prefer --spot)")
    g.add_argument("--create-flag", action="append", default=[], metavar="FLAG",
                   help="extra flag for `gcloud ... create`, e.g. --create-flag=--network=my-net (repeatable)")

    install = argparse.ArgumentParser(add_help=False)
    g = install.add_argument_group("install")
    g.add_argument("--source", default="local", help="'local' (default: ship `git archive` of the checkout) "
                   "or git+URL[@ref] to clone on the workers")
    g.add_argument("--ref", default="HEAD", help="commit of the local checkout to ship (default: %(default)s)")
    g.add_argument("--tarball", help="where to build the local tarball (default: in the temp directory)")
    g.add_argument("--python", default="python3", help="interpreter for the venv (default: %(default)s)")
    g.add_argument("--pip-spec", default="jax[tpu]", help="JAX requirement installed with the project "
                   "(default: %(default)s)")

    bucket = argparse.ArgumentParser(add_help=False)
    bucket.add_argument("--bucket", help="GCS bucket holding run directories: mounted on every worker with "
                        "gcsfuse (mount/up), or where fetch copies the run from")

    mount_point = argparse.ArgumentParser(add_help=False)
    mount_point.add_argument("--mount-point", default=DEFAULT_MOUNT_POINT,
                             help="where the bucket is mounted on the workers (default: %(default)s)")

    gcsfuse = argparse.ArgumentParser(add_help=False)
    gcsfuse.add_argument("--rename-dir-limit", type=int, default=10000,
                         help="gcsfuse --rename-dir-limit, needed for checkpoint renames on buckets without "
                              "hierarchical namespace; 0 leaves it out (default: %(default)s)")

    run_root = argparse.ArgumentParser(add_help=False)
    run_root.add_argument("--run-root", help="the experiment's run_root on the workers; multi-host runs need "
                          "it on shared storage (default: the experiment's, usually runs/)")
    run_root.add_argument("--shared-storage", action="store_true",
                          help="run_root is on storage all workers share (silences the multi-host warning)")

    run = argparse.ArgumentParser(add_help=False)
    g = run.add_argument_group("run")
    g.add_argument("experiment", help="experiment file relative to the project root, optionally with a "
                   "preset: experiments/grpo.py:smoke")
    g.add_argument("--fresh", action="store_true", help="pass --fresh (deletes the run directory first)")
    g.add_argument("--distributed", choices=("auto", "on", "off"),
                   help="pass --distributed to `jaxrl-llm train` (its default, auto, detects the pod slice)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to `jaxrl-llm train` verbatim (repeatable)")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the training process (repeatable)")
    return {"common": common, "create": create, "install": install, "bucket": bucket,
            "mount_point": mount_point, "gcsfuse": gcsfuse, "run_root": run_root, "run": run}


def build_parser() -> argparse.ArgumentParser:
    p = _parents()
    parser = argparse.ArgumentParser(
        prog="launch.py", description=__doc__.split("\n\n")[0],
        epilog="Run `launch.py SUBCOMMAND -h` for its options; see tpu/README.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name, parents, help_):
        return sub.add_parser(name, parents=parents, help=help_, description=help_, formatter_class=fmt)

    add("create", [p["common"], p["create"]], "create the TPU VM slice")
    add("install", [p["common"], p["install"]], "copy or clone the project to every worker and pip install "
        "it with JAX for TPU into .venv")
    add("mount", [p["common"], p["bucket"], p["mount_point"], p["gcsfuse"]],
        "mount a GCS bucket with gcsfuse on every worker (shared run_root)")
    add("run", [p["common"], p["run_root"], p["mount_point"], p["run"]],
        "start the experiment on all workers in the background (returns at once)")
    lg = add("logs", [p["common"]], "stream a worker's training log (tail -F; Ctrl-C stops watching, "
             "not training)")
    lg.add_argument("--worker", type=int, default=0, help="worker index (default: %(default)s)")
    lg.add_argument("--lines", type=int, default=100, help="lines of history first (default: %(default)s)")
    lg.add_argument("--no-follow", action="store_true", help="print the last lines and return")
    ft = add("fetch", [p["common"], p["run_root"], p["bucket"], p["mount_point"]],
             "copy a run directory back: gsutil rsync from the bucket, or scp from worker 0")
    ft.add_argument("--experiment", help="experiment[:preset] whose run to fetch (names the run directory)")
    ft.add_argument("--run-name", help="run directory name under run_root (instead of --experiment)")
    ft.add_argument("--dest", default="runs", help="local directory to copy into (default: %(default)s)")
    add("status", [p["common"]], "describe the slice and show, per worker, whether training runs")
    st = add("stop", [p["common"]], "stop the training process on all workers (SIGTERM, then SIGKILL)")
    st.add_argument("--grace", type=int, default=30, help="seconds between SIGTERM and SIGKILL "
                    "(default: %(default)s)")
    add("delete", [p["common"]], "delete the slice (no prompt)")
    add("up", [p["common"], p["create"], p["install"], p["bucket"], p["mount_point"], p["gcsfuse"],
               p["run_root"], p["run"]],
        "create + install (+ mount with --bucket) + run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = PLANNERS[args.command](args)
        return execute(plan, args.dry_run)
    except LaunchError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
