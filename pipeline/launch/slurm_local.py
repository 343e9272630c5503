"""A one-node Slurm cluster on this machine: for the tests, and for trying the Slurm launcher.

    python -m pipeline.launch.slurm_local up [FOLDER]    # prints `export SLURM_CONF=...`
    python -m pipeline.launch.slurm_local down FOLDER

Needs root (the daemons run as root) and Debian's `slurm-wlm` and `munge`; `ensure_installed()`
installs them with apt-get when they are missing. Everything else lives in one folder: the munge
key and socket, slurm.conf, the controller's state, the node's spool, logs and pid files; the
ports are free ones picked at start. Nothing under /etc is read or changed, so it runs beside any
other Slurm or munge on the machine, and clients find it through SLURM_CONF.

The configuration, and why:
- one node declaring more CPUs than the machine has (`CPUs=8`, real topology ignored with
  `SlurmdParameters=config_overrides`), so that a 4-task array runs at once on 2 cores;
- `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`: no cgroups needed (containers);
- no accounting (`AccountingStorageType=accounting_storage/none`, no slurmdbd): `sacct` does not
  work here, so `rlhf status` reads squeue (jobs stay listed for MinJobAge seconds after they
  end) and the record each job script writes (slurm/state/<job>.json) with its exit code;
- `KillWait=5`: a cancelled job is killed 5 s after its SIGTERM instead of 30;
- `AuthInfo=...,cred_expire=10`: a requeued job may start again after 11 s instead of 121 (Slurm
  waits until the old run's credential has expired), and `sched_interval=2` starts it then.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PARTITION = "local"
COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun", "slurmctld", "slurmd", "munged")
PACKAGES = ("slurm-wlm", "munge")


@dataclass
class LocalCluster:
    folder: Path
    conf: Path
    partition: str = PARTITION
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons this cluster started (by pid)."""
        if self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            self.command("scancel", f"--partition={self.partition}", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                out = self.command("squeue", "-h", "-o", "%i", check=False).stdout
                if not out.strip():
                    break
                time.sleep(0.5)
        pids = [self.pids[name] for name in ("slurmd", "slurmctld", "munged") if self.pids.get(name)]
        pids = [pid for pid in pids if _alive(pid)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def unavailable() -> str | None:
    """Why a local cluster cannot run here (None when it can, after installing what is missing)."""
    if not sys.platform.startswith("linux"):
        return "a local Slurm cluster needs Linux"
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(c for c in COMMANDS if not shutil.which(c))} missing) and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it with"
    return ensure_installed()


def ensure_installed() -> str | None:
    """apt-get install slurm-wlm munge (once; a lock keeps two test sessions from racing)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(Path(tempfile.gettempdir()) / "rlhf-slurm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(shutil.which(c) for c in COMMANDS):
            return None
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-500:]}"
    missing = [c for c in COMMANDS if not shutil.which(c)]
    return f"installed {', '.join(PACKAGES)} but {', '.join(missing)} still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(folder: Path, host: str, cpus: int, munge_socket: Path) -> str:
    return "\n".join([
        "# One-node cluster written by pipeline/launch/slurm_local.py (see its docstring for why each line)",
        "ClusterName=rlhf-local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "KillWait=5",
        "MinJobAge=600",
        "SchedulerParameters=sched_interval=2",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _pid(path: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"no pid file {path}")


def start(folder: str | Path | None = None, cpus: int = 8, timeout_s: float = 60) -> LocalCluster:
    """Start munged, slurmctld and slurmd for a fresh one-node cluster in `folder`."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    # Short path: the munge socket path must stay under the 108 bytes a Unix socket allows.
    folder = Path(folder or tempfile.mkdtemp(prefix="rlhf-slurm-"))
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    key = folder / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    munge_socket = folder / "munge" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, host, cpus, munge_socket))
    cluster = LocalCluster(folder=folder, conf=conf)
    deadline = time.monotonic() + timeout_s
    try:
        subprocess.run(["munged", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                        f"--log-file={folder / 'munge' / 'munged.log'}", f"--pid-file={folder / 'munge' / 'munged.pid'}",
                        f"--seed-file={folder / 'munge' / 'munged.seed'}"], check=True, capture_output=True, timeout=30)
        cluster.pids["munged"] = _pid(folder / "munge" / "munged.pid", deadline)
        env = {**os.environ, **cluster.env}
        subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, capture_output=True, timeout=30)
        cluster.pids["slurmctld"] = _pid(folder / "slurmctld.pid", deadline)
        subprocess.run(["slurmd", "-f", str(conf), "-N", host], env=env, check=True, capture_output=True, timeout=30)
        cluster.pids["slurmd"] = _pid(folder / "slurmd.pid", deadline)
        while time.monotonic() < deadline:
            state = cluster.command("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.2)
        raise RuntimeError(f"the node did not come up (sinfo says {state!r})")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as err:
        cluster.stop()
        logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                       for p in (folder / "slurmctld.log", folder / "slurmd.log", folder / "munge" / "munged.log")
                       if p.exists())
        stderr = getattr(err, "stderr", None)
        raise RuntimeError(f"local Slurm did not start: {err}{(': ' + stderr.decode(errors='replace')) if isinstance(stderr, bytes) else ''}{logs}") from None


def _main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "up":
        cluster = start(argv[1] if len(argv) > 1 else None)
        print(f"export SLURM_CONF={cluster.conf}   # partition {cluster.partition}; profile recipes/slurm/local.yaml")
        print(f"# stop it with: python -m pipeline.launch.slurm_local down {cluster.folder}")
        return 0
    if len(argv) == 2 and argv[0] == "down":
        folder = Path(argv[1])
        cluster = LocalCluster(folder=folder, conf=folder / "slurm.conf")
        for name, pid_file in (("slurmd", "slurmd.pid"), ("slurmctld", "slurmctld.pid"), ("munged", "munge/munged.pid")):
            if (folder / pid_file).is_file():
                cluster.pids[name] = int((folder / pid_file).read_text().strip())
        cluster.stop()
        return 0
    print("usage: python -m pipeline.launch.slurm_local up [FOLDER] | down FOLDER", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
