"""Real processes for multi-rank tests: one per rank (or per simulated node), each in its own
process group so that a hung rank and its data workers go down with it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(cmds: list[list[str]], envs: list[dict] | None = None, timeout: float = 400) -> list[str]:
    """Run commands side by side; assert each exits 0; return their combined stdout/stderr.
    Output goes to files, not pipes, so a chatty rank never blocks on a full pipe mid-collective."""
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    envs = envs or [{}] * len(cmds)
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]
    procs = [subprocess.Popen(c, cwd=REPO, env={**base, **{k: str(v) for k, v in e.items()}}, stdout=log,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c, e, log in zip(cmds, envs, logs)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} ({' '.join(map(str, p.args[:4]))} ...) failed:\n{out[-5000:]}"
    return outs


def rank_envs(world: int) -> list[dict]:
    """Per rank, the env vars torch.distributed's env:// init reads (one job on a free port)."""
    shared = {"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    return [{**shared, "RANK": r, "LOCAL_RANK": r} for r in range(world)]


def run_ranks(argv: list[str], world: int, timeout: float = 300) -> list[str]:
    """`argv` started once per rank as one job."""
    return run_processes([argv] * world, rank_envs(world), timeout)
