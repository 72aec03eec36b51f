"""Sparse-then-dense training: magnitude pruning on a token schedule, masks that hold under every
engine, densification, and the average parameter count of the run.

- Schedule: one-shot at a point, or gradual with Zhu & Gupta's (2017) cubic ramp
  s(u) = s_final * (1 - (1 - u)^3) between 25% and 75% of the budget, the window The Journey
  Matters (Jin et al. 2025) found near-optimal among 80 schedules.
- Masks hold by masking every copy of a weight the optimizer writes (the model parameter and, under
  DeepSpeed, the fp32 master partition) after each optimizer step. Gradients stay dense, so Adam's
  moments of pruned weights keep tracking the true gradient: at densification (SPDF, Thangarasa et
  al. 2023) revived weights take ordinary Adam steps instead of cold-started ones, and no engine's
  gradient buffers (DeepSpeed's reduce-scatter, FSDP2's) need hooks.
- Thresholds are exact across shards: each rank owns a disjoint range of each tensor; the k-th
  smallest magnitude is found by bisection on the float bits with all-reduced counts, and ties at
  the threshold are broken by (tensor order, flat index), so exactly k weights are pruned and a
  sharded run picks the same weights as one process.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from ..errors import UserError
from .addons import AddOn, Step
from .params import collect_targets, read_pieces

MASK_FILE = "sparsity-masks-rank{rank}.safetensors"
STATE_FILE = "sparsity.json"
_MAX_KEY = 0x7F800000  # float32 bits of +inf: every |w| key is <= this


@dataclass
class SparsityConfig:
    enabled: bool = False  # prune during training; false while loading a checkpoint with masks -> dense (SPDF)
    target: float = 0.5  # final fraction of zeros among the pruned tensors (2:4 needs 0.5)
    params: list[Literal["attention", "mlp", "embeddings", "output"]] = field(default_factory=lambda: ["attention", "mlp"])
    pattern: Literal["unstructured", "2of4"] = "unstructured"  # 2of4 = 2:4 semi-structured: two zeros in every 4 consecutive inputs
    scope: Literal["layer", "global"] = "layer"  # magnitude threshold per weight matrix, or one over all of them
    schedule: Literal["gradual", "oneshot"] = "gradual"  # cubic ramp over [start, end], or all at start
    start_fraction: float = 0.25  # of train.max_tokens: where pruning starts (oneshot: where it happens)
    end_fraction: float = 0.75  # of train.max_tokens: where the gradual ramp reaches the target
    interval_tokens: int = 0  # prune every this many tokens inside the ramp; 0 = after every optimizer step
    densify_at_tokens: int = 0  # drop the masks here and let every weight learn again; 0 = stay sparse

    def __post_init__(self):
        if not 0.0 <= self.target < 1.0:
            raise UserError(f"sparsity.target={self.target} must be in [0, 1); e.g. 0.5 for half the weights zero")
        if not (0.0 <= self.start_fraction <= 1.0 and 0.0 <= self.end_fraction <= 1.0):
            raise UserError("sparsity.start_fraction and end_fraction are fractions of train.max_tokens, in [0, 1]")
        if self.schedule == "gradual" and self.start_fraction >= self.end_fraction:
            raise UserError("sparsity.schedule=gradual needs start_fraction < end_fraction (e.g. 0.25, 0.75); or use schedule=oneshot")
        if self.pattern == "2of4" and (self.target != 0.5 or self.schedule != "oneshot"):
            raise UserError("sparsity.pattern=2of4 prunes exactly half in one shot; set sparsity.target=0.5 and sparsity.schedule=oneshot")
        if self.interval_tokens < 0 or self.densify_at_tokens < 0:
            raise UserError("sparsity.interval_tokens and sparsity.densify_at_tokens must be >= 0")
        if not self.params:
            raise UserError("sparsity.params is empty; name at least one of attention, mlp, embeddings, output")

    def check(self, max_tokens: int, arch, src: str) -> None:
        """Checks that need the budget and model shape (called at config load, before any work)."""
        if not self.enabled:
            return
        end = self.window(max_tokens)[1] if self.schedule == "gradual" else self.window(max_tokens)[0]
        if 0 < self.densify_at_tokens < end:
            raise UserError(f"{src}: sparsity.densify_at_tokens={self.densify_at_tokens} comes before pruning ends "
                            f"({end} tokens); densify after end_fraction * train.max_tokens")
        if self.pattern == "2of4" and (arch.dim % 4 or arch.ffn_dim % 4):
            raise UserError(f"{src}: sparsity.pattern=2of4 needs model.dim and model.ffn_dim divisible by 4")

    def window(self, max_tokens: int) -> tuple[int, int]:
        return round(self.start_fraction * max_tokens), round(self.end_fraction * max_tokens)


def target_at(cfg: SparsityConfig, tokens: int, max_tokens: int) -> float:
    """The scheduled sparsity once `tokens` have been trained."""
    start, end = cfg.window(max_tokens)
    if tokens < start:
        return 0.0
    if cfg.schedule == "oneshot" or tokens >= end:
        return cfg.target
    u = (tokens - start) / (end - start)
    return cfg.target * (1.0 - (1.0 - u) ** 3)


def prune_point(cfg: SparsityConfig, before: int, after: int, max_tokens: int) -> int | None:
    """The last pruning point in (before, after], or None. Points: start, every interval_tokens
    after it, and end; a point's sparsity is the schedule's value there, whatever the batch size.
    A point at 0 tokens is taken after the first step (pruning acts after optimizer steps)."""
    start, end = cfg.window(max_tokens)
    start = max(start, 1)
    if cfg.schedule == "oneshot":
        return start if before < start <= after else None
    if after < start or before >= end:
        return None
    if after >= end:
        return end
    step = cfg.interval_tokens
    last = start + (after - start) // step * step if step else after
    return last if last > before else None


# ---------------------------------------------------------------- mask selection

def _keys(values: torch.Tensor, pruned: torch.Tensor | None) -> torch.Tensor:
    """Integer keys ordered like |w| (the float32 bit pattern of a non-negative float is monotone);
    already-pruned weights get -1 so they are always among the k smallest (masks only grow)."""
    keys = values.detach().float().abs().view(torch.int32)
    return keys if pruned is None else keys.masked_fill(pruned, -1)


def _sum(t: torch.Tensor, sharded: bool) -> torch.Tensor:
    if sharded and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _tie_quota(ties: torch.Tensor, need: torch.Tensor, group_of: list[int], sharded: bool) -> torch.Tensor:
    """How many of this rank's ties at the threshold each tensor prunes: ties are taken in
    (tensor, rank, flat index) order - the flat order of one process - until the group has k."""
    everyone = [ties]
    if sharded and dist.is_initialized():
        everyone = [torch.empty_like(ties) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, ties)
    me = dist.get_rank() if sharded and dist.is_initialized() else 0
    left = need.tolist()
    quota = torch.zeros_like(ties)
    for t, g in enumerate(group_of):
        for r, rank_ties in enumerate(everyone):
            take = min(left[g], int(rank_ties[t]))
            left[g] -= take
            if r == me:
                quota[t] = take
    return quota


def select_unstructured(targets, old: dict, s: float, scope: str, sharded: bool) -> dict:
    """Pruned masks with exactly round(s * n) zeros per tensor (scope=layer) or over all (global)."""
    group_of = list(range(len(targets))) if scope == "layer" else [0] * len(targets)
    n_groups = max(group_of) + 1
    dev = targets[0].values.device
    numel = torch.zeros(n_groups, dtype=torch.int64, device=dev)
    already = torch.zeros(n_groups, dtype=torch.int64, device=dev)
    for t, g in zip(targets, group_of):
        numel[g] += torch.Size(t.shape).numel()
        already[g] += int(old[t.name].sum()) if t.name in old else 0
    _sum(already, sharded)
    k = torch.maximum(torch.round(numel.double() * s).long(), already)
    # Keys are recomputed per use rather than stored: a replicated 8B model would need 32 GB for them.
    keys = [lambda t=t: _keys(t.values, old.get(t.name)) for t in targets]
    gi = torch.tensor(group_of, device=dev)
    lo = torch.full((n_groups,), -2, dtype=torch.int64, device=dev)  # count(key <= lo) < k unless k == 0
    hi = torch.full((n_groups,), _MAX_KEY, dtype=torch.int64, device=dev)  # count(key <= hi) >= k
    while bool((hi - lo > 1).any()):  # the same on every rank: counts are all-reduced
        mid = (lo + hi) // 2
        counts = torch.zeros(n_groups, dtype=torch.int64, device=dev)
        for key, g in zip(keys, group_of):
            counts[g] += (key() <= mid[g]).sum()
        ok = _sum(counts, sharded) >= k
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    thr = hi[gi]
    less = torch.stack([(key() < thr[i]).sum() for i, key in enumerate(keys)])
    ties = torch.stack([(key() == thr[i]).sum() for i, key in enumerate(keys)])
    below = _sum(torch.zeros(n_groups, dtype=torch.int64, device=dev).index_add_(0, gi, less), sharded)
    quota = _tie_quota(ties, k - below, group_of, sharded)
    out = {}
    for i, (t, key) in enumerate(zip(targets, keys)):
        k_i = key()
        tie = k_i == thr[i]
        out[t.name] = (k_i < thr[i]) | (tie & (tie.cumsum(0) <= quota[i]))
    return out


def select_2_4(targets) -> dict:
    """Two zeros in every group of 4 consecutive weights along the input dimension (the layout of
    NVIDIA's sparse tensor cores); ties go to the lower index."""
    out = {}
    for t in targets:
        if t.shape[-1] % 4 or t.start % 4 or t.values.numel() % 4:
            raise UserError(f"sparsity.pattern=2of4: shard of {t.name} (start {t.start}, {t.values.numel()} weights) "
                            "splits groups of 4; use shapes divisible by 4 * world_size or unstructured pruning")
        keys = _keys(t.values, None).view(-1, 4)
        order = keys.argsort(dim=1, stable=True)[:, :2]
        out[t.name] = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, order, True).view(-1)
    return out


def apply_masks(targets, masks: dict) -> None:
    with torch.no_grad():
        for t in targets:
            m = masks.get(t.name)
            if m is not None:
                for lo, hi, view in t.copies:
                    view.masked_fill_(m[lo:hi].to(view.device), 0)  # offloaded masters live on the CPU


# ---------------------------------------------------------------- the run's pruner

@dataclass
class SparsityState:
    """Saved in every checkpoint (sparsity.json) with the masks."""
    sparsity: float = 0.0  # the scheduled sparsity the masks were last selected for
    pruned: int = 0  # pruned weights in the whole model (all ranks)
    densified: bool = False
    param_tokens: int = 0  # sum over steps of nonzero params x tokens of the step (exact integer)
    tokens: int = 0  # tokens counted in param_tokens


class Pruner(AddOn):
    """The loop's hooks: `after_update` (re-mask, prune or densify on schedule, metrics), `save`/`load`
    with checkpoints (masks and sparsity.json), `at_end` (the run's average parameter count into
    run_info.json)."""

    def __init__(self, cfg: SparsityConfig, max_tokens: int, total_params: int, engine, log=print):
        self.cfg, self.max_tokens, self.total, self.engine, self.log = cfg, max_tokens, total_params, engine, log
        self.state = SparsityState()
        self.masks: dict = {}  # name -> bool tensor over this rank's range, True = pruned
        self.active = cfg.enabled

    def _targets(self):
        # Rebuilt at each use: cheap, and robust to engines that re-point parameter storage.
        return collect_targets(self.engine, self.cfg.params)

    def _count(self, sharded: bool) -> int:
        dev = next(iter(self.masks.values())).device if self.masks else "cpu"
        n = torch.tensor(sum(int(m.sum()) for m in self.masks.values()), dtype=torch.int64, device=dev)
        return int(_sum(n, sharded))

    def prune(self, s: float) -> None:
        targets, sharded = self._targets()
        if self.cfg.pattern == "2of4":
            self.masks = select_2_4(targets)
        else:
            self.masks = select_unstructured(targets, self.masks, s, self.cfg.scope, sharded)
        apply_masks(targets, self.masks)
        self.engine.sync_written(targets)
        self.state.sparsity, self.state.pruned = s, self._count(sharded)

    def densify(self, why: str) -> None:
        self.masks, self.state.pruned, self.state.densified = {}, 0, True
        self.log(f"sparsity: densified ({why}); all weights learn again")

    def after_update(self, step: Step) -> dict:
        """After each step (from `step.before` to `step.after` tokens): the optimizer just wrote every copy
        of the weights, so the masks go back on; then pruning or densifying on schedule."""
        before, after = step.before, step.after
        self.state.param_tokens += (self.total - self.state.pruned) * (after - before)
        self.state.tokens += after - before
        if self.masks:
            targets, _ = self._targets()
            apply_masks(targets, self.masks)  # the optimizer just wrote every copy of the weights
            self.engine.sync_written(targets)
        if self.cfg.enabled and not self.state.densified:
            if 0 < self.cfg.densify_at_tokens and before < self.cfg.densify_at_tokens <= after:
                self.densify(f"at {after:,} tokens")
            else:
                point = prune_point(self.cfg, before, after, self.max_tokens)
                if point is not None:
                    self.prune(target_at(self.cfg, point, self.max_tokens))
        return self.metrics() if self.active else {}

    def metrics(self) -> dict:
        return {"nonzero_params": self.total - self.state.pruned, "avg_params": self.average(),
                "sparsity": self.state.pruned / self.total, "flops": "dense"}

    def average(self) -> float:
        """Non-zero parameters averaged over this run's tokens (The Journey Matters' N for scaling laws)."""
        return self.state.param_tokens / self.state.tokens if self.state.tokens else float(self.total - self.state.pruned)

    def save(self, folder: Path, rank: int) -> list[Path]:
        """Every rank writes its pieces of the masks (rank 0 alone when ranks hold full tensors);
        returns the files this rank wrote."""
        from safetensors.torch import save_file

        written = []
        targets, sharded = self._targets() if self.masks else ([], False)
        if self.masks and (sharded or rank == 0):
            starts = {t.name: str(t.start) for t in targets}
            written.append(folder / MASK_FILE.format(rank=rank))
            save_file({k: v.contiguous().cpu() for k, v in self.masks.items()}, str(written[-1]), metadata=starts)
        if rank == 0:
            written.append(folder / STATE_FILE)
            written[-1].write_text(json.dumps(asdict(self.state), indent=1))
        return written

    def load(self, folder: Path, how: str) -> None:
        """Masks kept while sparsity is enabled, dropped when it is not (SPDF's dense phase, e.g.
        continual pretraining from a sparse checkpoint). Counters continue on resume (and rollback)."""
        resume = how != "init"
        files = sorted(folder.glob(MASK_FILE.format(rank="*")))
        saved = SparsityState(**json.loads((folder / STATE_FILE).read_text())) if (folder / STATE_FILE).is_file() else None
        if resume and saved is not None:
            self.state = saved
        self.masks = {}  # a rollback to a checkpoint from before pruning leaves none
        if not files:
            return
        self.active = True
        if not self.cfg.enabled:
            self.state.densified, self.state.pruned = True, 0
            self.log(f"sparsity: {folder} has masks and sparsity.enabled is false; training dense from it")
            return
        targets, sharded = self._targets()
        self.masks = read_pieces(files, targets)
        if not resume:
            self.state.sparsity, self.state.pruned = (saved.sparsity if saved else 0.0), self._count(sharded)
        apply_masks(targets, self.masks)

    def at_end(self, run_dir: Path) -> None:
        """Record the run's average parameter count and what its FLOPs count in run_info.json."""
        if not self.engine.spec.layout.is_main:
            return
        path = Path(run_dir) / "run_info.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.update(avg_nonzero_params=self.average(), nonzero_params=self.total - self.state.pruned, flops="dense")
        path.write_text(json.dumps(info, indent=1))
