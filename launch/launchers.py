"""`cptrain launch`: build the real deepspeed / torchrun command for `cptrain train`, print it, run it;
or write a Slurm batch script that does so on every node and survives pre-emption.

Every process a launcher starts runs `python -m cptrain.launch.cli train CONFIG [--resume | --overwrite] [overrides]`;
the trainer reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import UserError


def _tool(name: str) -> str:
    """The launcher script installed next to this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def train_entry(config: str, overrides: list[str], resume: bool, overwrite: bool = False) -> list[str]:
    flags = ["--resume"] * resume + ["--overwrite"] * overwrite
    return ["-m", "cptrain.launch.cli", "train", config, *flags, *overrides]


def gpus_per_node(args) -> int:
    """--gpus-per-node, else the GPUs of this machine, else 1 (on CPU it is the number of local processes)."""
    if args.gpus_per_node:
        return args.gpus_per_node
    import torch

    return torch.cuda.device_count() or 1


def _nodes(args) -> int:
    return args.nodes or 1


def _check_multinode(args) -> None:
    if args.nodes is not None and args.nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {args.nodes}")
    if args.node_rank is not None and not 0 <= args.node_rank < _nodes(args):
        raise UserError(f"--node-rank {args.node_rank} is outside [0, --nodes={_nodes(args)}); number nodes from 0")
    if args.no_ssh and args.node_rank is None:
        raise UserError("--no-ssh starts one node per invocation: give --node-rank (and --master-addr) on each node")
    if _nodes(args) > 1 and args.node_rank is not None and not args.master_addr:
        raise UserError("--node-rank needs --master-addr: the address of node 0, which every node connects to")


def write_hostfile(path: Path, nodes: int, slots: int) -> Path:
    """A DeepSpeed hostfile naming nodes node0..node{N-1}; with --no_ssh only their count and order matter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # each node's call writes it: never show a partial file
    tmp.write_text("".join(f"node{i} slots={slots}\n" for i in range(nodes)))
    tmp.replace(path)
    return path


def deepspeed_command(args, entry: list[str], run_dir: Path) -> list[str]:
    """`deepspeed` for one machine, a hostfile over ssh (pdsh), or one node per call with --no_ssh.
    `entry` is what follows the interpreter: `-m module args` or `script args`."""
    g = gpus_per_node(args)
    cmd = [_tool("deepspeed")]
    hostfile = args.hostfile
    if hostfile is None and _nodes(args) > 1:
        hostfile = str(write_hostfile(run_dir / "hostfile", _nodes(args), g))
    if hostfile:
        if not Path(hostfile).is_file():
            raise UserError(f"--hostfile {hostfile}: no such file; write one line per node: `HOST slots=GPUS`")
        cmd += ["--hostfile", hostfile]
        if args.nodes:  # else every host of the hostfile
            cmd += ["--num_nodes", str(args.nodes)]
    if args.gpus_per_node or not hostfile:  # else each host's `slots`
        cmd += ["--num_gpus", str(g)]
    cmd += ["--master_port", str(args.master_port)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    if args.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    # The trainer takes no --local_rank argument: it reads LOCAL_RANK from the environment.
    script = ["--module", *entry[1:]] if entry[0] == "-m" else entry
    return cmd + ["--no_local_rank", *script]


def torchrun_command(args, entry: list[str], run_dir: Path) -> list[str]:
    """Static ranks with --node-rank and --master-addr, else a c10d rendezvous at --master-addr."""
    cmd = [_tool("torchrun"), "--nnodes", str(_nodes(args)), "--nproc_per_node", str(gpus_per_node(args))]
    if _nodes(args) == 1:
        cmd += ["--master_port", str(args.master_port)]
    elif args.node_rank is not None:
        cmd += ["--node_rank", str(args.node_rank), "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    else:
        if not args.master_addr:
            raise UserError("torchrun over several nodes needs --master-addr (a host every node reaches) or --node-rank")
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{args.master_addr}:{args.master_port}",
                "--rdzv_id", run_dir.name]
    return cmd + entry


# The pre-emption warning goes to the batch shell (B:), which forwards it to the trainer processes
# (started as `python -u -m cptrain.launch.cli train`, which the launchers' own command lines are not) on
# every node; each checkpoints after its current step and exits (trainer/faults.py), and the job
# requeues itself to continue with --resume.
_SLURM_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --output={run_dir}/slurm-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@{warning}
set -uo pipefail
cd {workdir}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={port}
preempted=0
forward() {{ preempted=1; srun --overlap --ntasks-per-node=1 pkill -USR1 -f -- {pattern}; }}
trap forward USR1
srun --kill-on-bad-exit=1 bash -c {node_cmd} &
pid=$!
wait $pid; status=$?
while kill -0 $pid 2>/dev/null; do wait $pid; status=$?; done   # a trapped signal ends `wait` early
if [ "$preempted" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit $status
"""


def slurm_script(args, config: str, overrides: list[str], run_dir: Path) -> str:
    g = gpus_per_node(args)
    entry = train_entry(config, overrides, resume=True)
    if args.slurm_backend == "deepspeed":
        node = (f"{shlex.quote(_tool('deepspeed'))} --hostfile {shlex.quote(str(run_dir / 'hostfile'))} --num_nodes "
                f"$SLURM_NNODES --num_gpus {g} --no_ssh --node_rank $SLURM_NODEID --master_addr $MASTER_ADDR "
                f"--master_port $MASTER_PORT --no_local_rank --module {shlex.join(entry[1:])}")
        write_hostfile(run_dir / "hostfile", _nodes(args), g)
    else:
        node = (f"{shlex.quote(_tool('torchrun'))} --nnodes $SLURM_NNODES --nproc_per_node {g} --node_rank $SLURM_NODEID "
                f"--master_addr $MASTER_ADDR --master_port $MASTER_PORT {shlex.join(entry)}")
    return _SLURM_TEMPLATE.format(name=f"cptrain-{run_dir.name}", nodes=_nodes(args), gpus=g, run_dir=run_dir,
                                  warning=args.slurm_warning, workdir=shlex.quote(str(Path.cwd())), port=args.master_port,
                                  pattern=shlex.quote(f"-u -m cptrain.launch.cli train {config}"), node_cmd=shlex.quote(node))


def main(args) -> int:
    from ..trainer.config import load_config

    _check_multinode(args)
    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process starts
    run_dir = Path(cfg.run_dir).resolve()
    if not (args.hostfile and not args.nodes):  # the world size is known: its layout is checked and shown now
        from ..trainer.engines.layout import Layout

        p = cfg.parallel
        print("process layout: " + Layout(world_size=_nodes(args) * gpus_per_node(args), cp=p.cp, cp_method=p.cp_method,
                                          ep=p.ep).describe(), flush=True)
    if args.launcher == "slurm":
        out = Path(args.slurm_out or run_dir / "launch.sbatch")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(slurm_script(args, args.config, args.overrides, run_dir))
        print(f"wrote {out}; submit it with: sbatch {shlex.quote(str(out))}")
        return 0
    entry = train_entry(args.config, args.overrides, args.resume, args.overwrite)
    build = deepspeed_command if args.launcher == "deepspeed" else torchrun_command
    cmd = build(args, entry, run_dir)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)
