"""Training a mixture of experts: the `moe` config section, the router losses' share of what is
backpropagated, the routers' statistics in metrics.jsonl and expert_load.jsonl, and auxiliary-loss-free
balancing (Wang et al. 2024; DeepSeek-V3, Liu et al. 2024): a per-expert bias added to the router's
scores for the top-k selection only, moved after every step by `bias_update_rate` * sign(mean load - load).

The bias is training state, saved with each checkpoint (moe.json) and restored when a run resumes or
starts from one. The families' HF checkpoints have no place for it: an exported model routes without it
(`cptrain convert cptrain-to-hf` says so where one is set, exported_bias_note).

What the loss reports (trainer/loss.py router_terms) are sums over tokens, added over micro-batches and
ranks by the loop (Step.sums): "router" [MoE layers, 2E + 4] (model/moe.py pack_stats) and "router_loss"
[balance * n, z * n, n], the losses weighted by each micro-batch's n tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from ..model.moe import balance_loss, moe_layers, unpack_stats
from .addons import AddOn, Step, saved_state

LOAD_FILE = "expert_load.jsonl"  # per evaluation: each layer's share of assignments per expert since the last one


@dataclass
class MoESection:
    aux_loss_coef: float | None = None  # weight of the family's load-balancing loss; null: the model's (HF router_aux_loss_coef)
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE, Zoph et al. 2022, use 1e-3); 0: not added
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing: the bias step gamma (DeepSeek-V3: 0.001); 0: off
    capacity_factor: float = 0.0  # an expert takes at most this multiple of its even share of assignments; 0: dropless
    experts: Literal["auto", "grouped", "loop"] = "auto"  # expert kernel: grouped GEMM (bf16), a loop over experts, or auto
    layer_stats: bool = True  # per-layer load, entropy and balancing loss in metrics.jsonl (else only their summaries)

    def check(self, arch, src: str) -> None:
        if min(self.aux_loss_coef or 0.0, self.z_loss_coef, self.bias_update_rate, self.capacity_factor) < 0:
            raise UserError(f"{src}: moe.aux_loss_coef, z_loss_coef, bias_update_rate and capacity_factor must be at least 0")
        changed = [k for k, v in (("aux_loss_coef", self.aux_loss_coef), ("z_loss_coef", self.z_loss_coef),
                                  ("bias_update_rate", self.bias_update_rate), ("capacity_factor", self.capacity_factor))
                   if v]
        if changed and not arch.n_experts:
            raise UserError(f"{src}: moe.{changed[0]} is set but the model ({arch.family}) has no mixture of experts; remove it")

    def coefs(self, arch) -> tuple[float, float]:
        """(balancing, z-loss) weights of the losses added to what is backpropagated."""
        return (arch.moe_aux_loss_coef if self.aux_loss_coef is None else self.aux_loss_coef), self.z_loss_coef


class ExpertBalance(AddOn):
    """The routers' row entries each step, expert_load.jsonl at each evaluation and at the end, and the
    selection bias of auxiliary-loss-free balancing when bias_update_rate > 0."""
    name = "moe"

    def __init__(self, cfg: MoESection, arch, engine, run_dir: Path, is_main: bool):
        self.cfg, self.coefs, self.run_dir, self.is_main = cfg, cfg.coefs(arch), Path(run_dir), is_main
        self.top_k, self.layers = arch.moe_top_k, moe_layers(engine.module)
        self.layer_ids = [i for i, moe in enumerate(arch.moe_layers) if moe]  # model layer of each MoE layer
        self.bias = None
        if cfg.bias_update_rate > 0:
            self.bias = torch.zeros(len(self.layers), arch.n_experts, device=engine.spec.layout.device)
            for moe, row in zip(self.layers, self.bias):
                moe.selection_bias = row  # a view: updates in place reach every layer
        self.counts = torch.zeros(len(self.layers), arch.n_experts, dtype=torch.float64)  # since the last expert_load line

    @torch.no_grad()
    def after_update(self, step: Step) -> dict:
        if self.bias is not None and step.updated and "router" in step.sums:
            load = unpack_stats(step.sums["router"])["counts"].to(self.bias)  # [L, E] over the global batch
            self.bias += self.cfg.bias_update_rate * torch.sign(load.mean(dim=1, keepdim=True) - load)
        return {}

    def after_step(self, step: Step, row: dict) -> dict:
        if "router" not in step.sums:
            return {}
        s = unpack_stats(step.sums["router"].double().cpu())
        balance, z, tokens = step.sums["router_loss"].double().cpu().tolist()
        self.counts += s["counts"]
        load = s["counts"] / (s["tokens"][:, None] * self.top_k / s["counts"].shape[1])  # 1: an even share
        entropy = s["entropy_sum"] / s["tokens"]
        out = {"loss_total": row["loss"] + (self.coefs[0] * balance + self.coefs[1] * z) / tokens,
               "moe/aux_loss": balance / tokens, "moe/z_loss": z / tokens,
               "moe/load_max": load.max().item(), "moe/entropy": entropy.mean().item()}
        if self.cfg.capacity_factor > 0:
            out["moe/dropped"] = (s["dropped"].sum() / (s["tokens"].sum() * self.top_k)).item()
        if self.bias is not None:
            out["moe/bias_max"] = self.bias.abs().max().item()
        if self.cfg.layer_stats:
            per_layer = balance_loss(s["counts"], s["prob_sum"], s["tokens"][:, None])
            for i, layer in enumerate(self.layer_ids):
                out.update({f"moe/layer{layer}/load_max": load[i].max().item(), f"moe/layer{layer}/entropy": entropy[i].item(),
                            f"moe/layer{layer}/aux_loss": per_layer[i].item()})
                if self.cfg.capacity_factor > 0:
                    out[f"moe/layer{layer}/dropped"] = (s["dropped"][i] / (s["tokens"][i] * self.top_k)).item()
        if any(k.startswith("val/") for k in row):
            self._write_load(step.number, step.after)
        return out

    def at_end(self, run_dir: Path) -> None:
        if self.counts.sum() > 0:
            self._write_load(None, None)

    def _write_load(self, step: int | None, tokens: int | None) -> None:
        """Each layer's share of the assignments per expert since the last line (the histogram of `cptrain report`)."""
        if self.is_main and self.counts.sum() > 0:
            share = (self.counts / self.counts.sum(dim=1, keepdim=True)).tolist()
            with open(self.run_dir / LOAD_FILE, "a") as f:
                f.write(json.dumps({"step": step, "tokens": tokens, "layers": self.layer_ids,
                                    "share": [[round(x, 6) for x in layer] for layer in share]}) + "\n")
        self.counts.zero_()

    def state_dict(self) -> dict:
        return {"bias": self.bias.tolist()} if self.bias is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.bias is not None and state.get("bias") is not None:
            saved = torch.tensor(state["bias"], dtype=self.bias.dtype)
            if saved.shape != self.bias.shape:
                raise UserError(f"moe.json: a selection bias of shape {tuple(saved.shape)} does not fit this model's "
                                f"{tuple(self.bias.shape)}; start without it (moe.bias_update_rate=0) or from a matching checkpoint")
            self.bias.copy_(saved)

    def load(self, folder: Path, how: str) -> None:
        """The bias is part of what the model computes: restored on resume, rollback and a start from a checkpoint."""
        state = saved_state(folder, self.name)
        if state is not None:
            self.load_state_dict(state)


def exported_bias_note(folder: Path) -> str | None:
    """A line for the export of a checkpoint whose routers carried a selection bias, which the family's HF
    checkpoints cannot hold; None without one."""
    bias = (saved_state(folder, ExpertBalance.name) or {}).get("bias")
    largest = max((abs(b) for layer in bias or [] for b in layer), default=0.0)
    if not largest:
        return None
    where = Path(folder) / f"{ExpertBalance.name}.json"
    return (f"note: this model was trained with auxiliary-loss-free balancing; its per-expert selection bias (up to "
            f"{largest:.3g}, {where}) has no place in the family's checkpoint, so the exported model routes without it")
