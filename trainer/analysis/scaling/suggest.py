"""`cptrain scaling suggest`: Step Law's peak LR and batch size for N parameters and D tokens, and
with --fit the compute-optimal N, D of a fitted (N, D) law (and Step Law's LR and batch there).

Step Law (Li et al. 2025, "Predictable Scale: Part I", arXiv:2503.04715):
    eta_opt(N, D) = 1.79 N^-0.713 D^0.307,    B_opt(D) = 0.58 D^0.571,
N the non-embedding parameters, D the training tokens, B tokens per optimizer step. The authors'
released fit (step-law/steplaw @ 32a8f4c, data/1004_fitted_lr_bs_scaling_model_parameters.csv: the
mean of 1000 bootstrap fits, which their `code/fit_tool.py pred-opt-lr-bs` uses) rounds to these
constants; in their released runs (data/dense_lr_bs_loss.csv) N is n_layers (4 h^2 + 3 h ffn), the
attention and FFN weights, and the batch is converted to tokens (bs * seq_len) before the fit.
Those dense runs span N 2.1e8-1.1e9 and D 4e9-1e11: outside that range the law is extrapolated.
"""
from __future__ import annotations

import numpy as np

from ....errors import UserError
from . import curves as C
from . import laws as L
from .inputs import load_fit

STEP_LAW = "Step Law, Li et al. 2025, arXiv:2503.04715"
LR_COEF, LR_EXP_N, LR_EXP_D = 1.79, -0.713, 0.307
BATCH_COEF, BATCH_EXP_D = 0.58, 0.571
FITTED_RANGE = {"N": (2.1e8, 1.1e9), "D": (4e9, 1e11)}  # their released dense runs
CHINCHILLA = "Hoffmann et al. 2022, eq. 4 and App. D.2"


def step_law(n: float, d: float) -> tuple[float, float]:
    """(peak LR, batch size in tokens) for n non-embedding parameters and d training tokens."""
    return LR_COEF * n ** LR_EXP_N * d ** LR_EXP_D, BATCH_COEF * d ** BATCH_EXP_D


def compute_optimal(res: dict, compute: float) -> dict:
    """N_opt, D_opt, loss at C = 6 N D of a fit.json's (N, D) law, with the formula that gave them."""
    law = L.get_law(res["law"])
    theta = np.array(res["theta"])
    co = L.compute_optimal(law, theta, [compute])
    p = L.chinchilla_equivalent(law, theta)
    if p:
        s = p["alpha"] + p["beta"]
        g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
        terms = (f"E={p['E']:.4g} A={p['A']:.4g} B={p['B']:.4g} alpha={p['alpha']:.4g} beta={p['beta']:.4g}, "
                 f"G = (alpha A / (beta B))^(1/(alpha+beta)) = {g:.4g}")
        forms = (f"G (C/6)^(beta/(alpha+beta)), {terms}", "G^-1 (C/6)^(alpha/(alpha+beta))")
        source = CHINCHILLA
    else:
        forms = ("argmin_N L(N, C/(6N)) (numeric)", "C / (6 N_opt)")
        source = law.doc
    return {"n": co["n_opt"][0], "d": co["d_opt"][0], "loss": co["loss"][0], "forms": forms, "source": source}


def _range_note(name: str, value: float) -> str | None:
    lo, hi = FITTED_RANGE[name]
    if lo <= value <= hi:
        return None
    return (f"note: {name} = {value:.3g} is outside {name} {lo:.2g}-{hi:.2g} of Step Law's released dense runs: "
            f"extrapolated  [{STEP_LAW}]")


def _step_lines(n: float, d: float, seq_len: int | None, where: str) -> list[str]:
    lr, batch = step_law(n, d)
    seqs = f" ({batch / seq_len:.0f} sequences of {seq_len})" if seq_len else ""
    return [f"peak LR{where}: {lr:.3e} = {LR_COEF} N^{LR_EXP_N} D^{LR_EXP_D}, N = {n:.4g} parameters (Step "
            f"Law counts the non-embedding ones), D = {d:.4g} tokens  [{STEP_LAW}]",
            f"batch size{where}: {batch:.4g} tokens{seqs} = {BATCH_COEF} D^{BATCH_EXP_D}, D = {d:.4g} tokens  "
            f"[{STEP_LAW}]"] + [x for x in (_range_note("N", n), _range_note("D", d)) if x]


def suggest(args) -> int:
    if args.cpt or args.dcpt:
        from . import cpt_suggest

        if args.max_forgetting is None or args.max_forgetting < 0:
            raise UserError("--max-forgetting X: give the old domains' allowed rise (0.03 = 3% of their loss at the start)")
        if args.tokens <= 0:
            raise UserError("--tokens: the continual-pretraining budget must be > 0 tokens")
        return cpt_suggest.suggest_cpt(args) if args.cpt else cpt_suggest.suggest_dcpt(args)
    if args.params is None:
        raise UserError("--params N: give the model's non-embedding parameters (or --cpt/--dcpt FIT for a replay ratio)")
    if args.params <= 0 or args.tokens <= 0:
        raise UserError("--params/--tokens: parameter and token counts must be > 0")
    if args.compute is not None and args.compute <= 0:
        raise UserError("--compute: the compute budget must be > 0 FLOPs")
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError("--seq-len: the sequence length must be > 0 tokens")
    lines = _step_lines(args.params, args.tokens, args.seq_len, "")
    if args.fit:
        res = load_fit(args.fit)
        if res["law"] in C.CURVE_LAWS:
            raise UserError(f"--fit {args.fit} holds the {res['law']} loss-curve law; pass the fit.json of an "
                            f"(N, D) law, e.g. from `cptrain scaling fit ... --law chinchilla`")
        compute = args.compute or 6 * args.params * args.tokens
        origin = "(--compute)" if args.compute else f"= 6 N D, N = {args.params:.4g}, D = {args.tokens:.4g}"
        opt = compute_optimal(res, compute)
        fit_src = f"{opt['source']}; fit {args.fit} ({res['law']})"
        n_col = res.get("inputs", {}).get("n_col", "unknown")
        lines += [f"compute: {compute:.4g} FLOPs {origin}  [C = 6 N D: Kaplan et al. 2020, Hoffmann et al. 2022]",
                  f"N_opt(C): {opt['n']:.4g} parameters (counted as the fit's inputs: {n_col}) = {opt['forms'][0]}  "
                  f"[{fit_src}]",
                  f"D_opt(C): {opt['d']:.4g} tokens = {opt['forms'][1]}  [{fit_src}]",
                  f"loss at N_opt, D_opt: {opt['loss']:.4f} = the fitted law  [{fit_src}]"]
        lines += _step_lines(opt["n"], opt["d"], args.seq_len, " at N_opt, D_opt")
    print("\n".join(lines))
    return 0
