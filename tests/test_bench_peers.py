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
from cptrain.model.config import flops_per_token
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
