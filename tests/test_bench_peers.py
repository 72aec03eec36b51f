"""bench/bench_peers.py, the harness that times cptrain against OLMo-core and torchtitan: one process
per row under a time limit, so a peer that is missing, crashes or hangs is a row with an error and
the others still come back; MFU from cptrain's FLOP count for every row. The peers themselves run
where their packages are installed (the GPU stage carries them; bench/README.md)."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cptrain.errors import UserError
from cptrain.model.config import flops_per_token, param_counts
from cptrain.model.presets import preset

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bench


def _bench_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_specs_are_checked_before_any_run():
    bp = _bench_peers()
    run = bp.parse_run("olmo-core:model=1.3B,mb=12,fp8=tensorwise")
    assert (run["impl"], run["model"], run["mb"], run["fp8"], run["seq"]) == ("olmo-core", "1.3B", 12, "tensorwise", 2048)
    with pytest.raises(UserError, match="unknown key 'micro'"):
        bp.parse_run("ours:micro=8")
    with pytest.raises(UserError, match="impl must be one of"):
        bp.parse_run("megatron:mb=8")
    with pytest.raises(UserError, match="plain Llama shapes"):
        bp.parse_run("torchtitan:model=qwen3-0.6b")  # q/k norm: no peer builds it from these numbers


def test_shape_carries_the_preset_numbers_and_mfu_uses_its_flop_count():
    bp = _bench_peers()
    s = bp.shape("1B")
    assert (s["vocab_size"], s["dim"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["ffn_dim"], s["tie_embeddings"]) == \
        (128256, 2048, 16, 32, 8, 8192, True)
    assert bp.mfu(50_000, "1B", 2048, 989.0) == round(50_000 * flops_per_token(preset("1B"), 2048) / 989e12, 4)


def test_a_hung_child_is_stopped_at_its_limit():
    bp = _bench_peers()
    t0 = time.perf_counter()
    out, stopped, wall = bp.run_child([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(120)"],
                                      {}, 2)
    assert stopped == "timed out after 2 s" and "started" in out
    assert time.perf_counter() - t0 < 30 and wall >= 2


def test_a_missing_peer_is_a_row_and_ours_still_runs(tmp_path):
    """CPU, tiny preset: ours through bench_mfu's path; a peer whose package is absent gives its error
    row (this environment has neither OLMo-core nor torchtitan installed, or runs them when it has)."""
    out = tmp_path / "peers.jsonl"
    r = subprocess.run([sys.executable, "bench/bench_peers.py", "--device", "cpu", "--steps", "2", "--warmup", "1",
                        "--out", str(out), "--profile-dir", str(tmp_path / "prof"),
                        "--run", "ours:model=tiny,seq=64,mb=2,compile=0,attn=sdpa,profile=1",
                        "--run", "olmo-core:model=tiny,seq=64,mb=2,compile=0", "--run", "ours:model=tiny,seq=64,limit=5"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ours, olmo, skipped = [json.loads(line) for line in out.read_text().splitlines()]
    assert ours["impl"] == "ours" and ours["tokens_per_s"] > 0 and "error" not in ours
    assert ours["mfu"] == round(ours["tokens_per_s"] * flops_per_token(preset("tiny"), 64) / 989e12, 4)
    if importlib.util.find_spec("olmo_core") is None:
        assert olmo["impl"] == "olmo-core" and "ModuleNotFoundError" in olmo["error"] and "log_tail" in olmo
    else:
        assert olmo["params_match"] and olmo["tokens_per_s"] > 0
    assert skipped["error"].startswith("skipped")  # a row with under 30 s to run is not started
    report = (tmp_path / "prof" / "ours-tiny-seq64-mb2-bf16-ac0.txt").read_text()  # the profiled row's report
    assert "GPU busy" in report and "top kernels" in report


def test_moe_runs_carry_the_expert_numbers_and_refuse_what_no_peer_builds():
    """An MoE preset (cut by layers=) gives the peers its expert numbers; params_expected and MFU count the
    cut model; what no peer builds (OLMo-core's MoE, dense layers, a dense preset cut) is refused before any run."""
    bp = _bench_peers()
    s = bp.shape("qwen3-30b-a3b", 8)
    assert (s["n_layers"], s["experts"], s["top_k"], s["expert_dim"], s["head_dim"], s["qk_norm"], s["norm_topk"],
            s["router"]) == (8, 128, 8, 768, 128, "head", True, "softmax")
    olmoe = bp.shape("olmoe-1b-7b")
    assert (olmoe["n_layers"], olmoe["experts"], olmoe["expert_dim"], olmoe["qk_norm"], olmoe["norm_topk"]) == \
        (16, 64, 1024, "full", False)
    cut = bp.architecture("qwen3-30b-a3b", 8)
    assert bp.mfu(50_000, "qwen3-30b-a3b", 2048, 989.0, 8) == round(50_000 * flops_per_token(cut, 2048) / 989e12, 4)
    assert bp.mfu(50_000, "qwen3-30b-a3b", 2048, 989.0, 8) < bp.mfu(50_000, "qwen3-30b-a3b", 2048, 989.0)
    run = bp.parse_run("torchtitan:model=tiny-qwen3-moe,layers=1,experts=loop")
    assert (run["layers"], run["experts"]) == (1, "loop")
    with pytest.raises(UserError, match="olmo-core runs no mixture of experts"):
        bp.parse_run("olmo-core:model=olmoe-1b-7b")
    with pytest.raises(UserError, match=r"dense layers \[1\]"):
        bp.parse_run("torchtitan:model=tiny-qwen3-moe")  # layer 1 keeps its dense MLP
    with pytest.raises(UserError, match="'1B' is dense"):
        bp.parse_run("ours:model=1B,layers=4")
    with pytest.raises(UserError, match="experts= is grouped or loop"):
        bp.parse_run("torchtitan:model=olmoe-1b-7b,experts=gmm")


def test_an_moe_row_of_ours_and_of_torchtitan_at_a_cut_depth(tmp_path):
    """CPU, tiny-mixtral cut to one layer: ours through bench_mfu's MoE keys; torchtitan's row is its error
    (not installed) or its own MoE model with our parameter count."""
    out = tmp_path / "moe.jsonl"
    r = subprocess.run([sys.executable, "bench/bench_peers.py", "--device", "cpu", "--steps", "2", "--warmup", "1",
                        "--out", str(out), "--run", "ours:model=tiny-mixtral,layers=1,seq=64,mb=2,compile=0,attn=sdpa",
                        "--run", "torchtitan:model=tiny-mixtral,layers=1,seq=64,mb=2,compile=0"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ours, titan = [json.loads(line) for line in out.read_text().splitlines()]
    expected = param_counts(_bench_peers().architecture("tiny-mixtral", 1))[0]
    assert expected < param_counts(preset("tiny-mixtral"))[0]
    assert ours["tokens_per_s"] > 0 and "layers=1,experts=auto" in ours["options"] and ours["params_expected"] == expected
    if importlib.util.find_spec("torchtitan") is None:
        assert "torchtitan" in titan["error"] and titan["params_expected"] == expected  # its package metadata, first
    else:
        assert titan["params"] == expected and titan["params_match"]
