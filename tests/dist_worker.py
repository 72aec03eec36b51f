"""Several training runs inside one launched process group, since a launch costs 10-20 s:
`python tests/dist_worker.py JOBS.json` under deepspeed/torchrun (or alone, as one process).
JOBS.json: a list of {"overrides": ["--a.b=v", ...], "resume": bool, "config": YAML or absent}; each job
is one `run()`."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        run(load_config(job.get("config"), job["overrides"]), resume=job.get("resume", False))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
