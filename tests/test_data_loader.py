"""The training-side loader on real prepared shards: batch contents, mixtures/phases/replay,
exact resume (same size, with prefetching workers, after a weight change), integrity checks."""
import json

import numpy as np
import pytest
import torch

from cptrain.data_pipeline.config import DataConfig, DomainConfig, PhaseConfig, validate_data
from cptrain.data_pipeline.loader import build_train_loader, build_val_loaders
from cptrain.data_pipeline.mixture import Mixture
from cptrain.data_pipeline.shards import ShardSplit
from cptrain.errors import UserError
from test_data_support import AUSTEN, make_domains, run_prepare

pytestmark = pytest.mark.data
SEQ = 32


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("domains"), SEQ)


def _cfg(doms, **kw):
    base = dict(domains=[DomainConfig("en", str(doms["en"]), 3.0), DomainConfig("es", str(doms["es"]), 1.0)],
                seq_len=SEQ)
    return DataConfig(**{**base, **kw})


def _checked(cfg):
    return validate_data(cfg, vocab_size=800)


def _ids(batches):
    return [(int(d), int(s)) for b in batches for d, s in zip(b["domain"], b["sample_id"])]


def test_batch_layout_matches_shards(domains):
    cfg = _cfg(domains)
    data = _checked(cfg)
    manifest = data.manifest
    assert manifest["tokenizer"]["vocab_size"] == 800 and manifest["dtype"] == "uint16"
    batch = next(build_train_loader(data, micro_batch_size=4, rank=0, world_size=1, seed=1))
    assert batch["tokens"].shape == (4, SEQ + 1) and batch["tokens"].dtype == torch.int64
    assert batch["doc_ids"].shape == (4, SEQ + 1) and batch["doc_ids"].dtype == torch.int32
    eos = manifest["tokenizer"]["eos_id"]
    for row, ids in zip(batch["tokens"], batch["doc_ids"]):
        # A new document starts right after each EOS and nowhere else.
        after_eos = torch.zeros_like(ids, dtype=torch.bool)
        after_eos[1:] = row[:-1] == eos
        assert torch.equal(torch.diff(ids) == 1, after_eos[1:])
        assert ids[0] == 0 and torch.all(torch.diff(ids) >= 0)


def test_epochs_cover_each_sample_once(domains):
    cfg = _cfg(domains, domains=[DomainConfig("es", str(domains["es"]))])
    n = json.loads((domains["es"] / "manifest.json").read_text())["splits"]["train"]["samples"]
    loader = build_train_loader(_checked(cfg), micro_batch_size=n // 4, rank=0, world_size=1, seed=0)
    ids = [s for _, s in _ids(next(loader) for _ in range(8))]
    first, second = ids[:n], ids[n:2 * n]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second  # each epoch has its own order


def test_mixture_proportions_phases_and_replay():
    cfg = DataConfig(domains=[DomainConfig("a", weight=6), DomainConfig("b", weight=3), DomainConfig("c", weight=1)],
                     replay=[DomainConfig("old")], replay_fraction=0.2, seq_len=100,
                     phases=[PhaseConfig(until_tokens=2_000_000, weights={"c": 0.0}, replay_fraction=0.5)])
    mix = Mixture(cfg, seed=3, sizes=[10**6] * 4, state=None)
    boundary = 20_000  # first global sample at token 2M
    n = 20_000

    def shares(start):
        d = mix.domains_of(start, n)
        return np.bincount(d, minlength=4) / n

    in_phase, after = shares(0), shares(boundary)
    tol = 4 * np.sqrt(0.25 / n)  # 4 sigma of a binomial proportion
    np.testing.assert_allclose(in_phase, [0.5 * 6 / 9, 0.5 * 3 / 9, 0.0, 0.5], atol=tol)
    np.testing.assert_allclose(after, [0.8 * 0.6, 0.8 * 0.3, 0.8 * 0.1, 0.2], atol=tol)
    # The phase ends exactly at its token boundary, also when a draw straddles it.
    straddle = mix.domains_of(boundary - 500, 1000)
    assert 2 not in straddle[:500] and 2 in straddle[500:]
    np.testing.assert_array_equal(straddle, np.concatenate([mix.domains_of(boundary - 500, 500),
                                                            mix.domains_of(boundary, 500)]))


@pytest.mark.parametrize("replay", [False, True])
def test_loader_proportions_on_real_shards(domains, replay):
    """English share 3/4: by weight (3:1), or as replay of the old domain under Spanish."""
    cfg = _cfg(domains)
    if replay:
        cfg = _cfg(domains, domains=[DomainConfig("es", str(domains["es"]))],
                   replay=[DomainConfig("en", str(domains["en"]))], replay_fraction=0.75)
    loader = build_train_loader(_checked(cfg), micro_batch_size=50, rank=0, world_size=1, seed=5)
    english = 1 if replay else 0  # batch["domain"] indexes domains + replay
    dom = np.array([d for d, _ in _ids(next(loader) for _ in range(40))])
    assert abs((dom == english).mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(dom))


@pytest.mark.resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_same_size_is_exact(domains, workers):
    cfg = _cfg(domains, num_workers=workers)
    ref = build_train_loader(_checked(cfg), micro_batch_size=3, rank=0, world_size=1, seed=7)
    head = [next(ref) for _ in range(5)]
    state = ref.state_dict()
    tail = [next(ref) for _ in range(6)]
    json.dumps(state)  # checkpointable as is
    resumed = build_train_loader(_checked(cfg), micro_batch_size=3, rank=0, world_size=1, seed=7, state=state)
    again = [next(resumed) for _ in range(6)]
    for a, b in zip(tail, again):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert _ids(head) != _ids(tail)


@pytest.mark.resume
@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_the_global_rng_to_training(domains, workers):
    """Opening a train or validation iterator draws nothing from torch's global RNG, which training owns
    (stochastic rounding) and a resume restores: a resumed run opens its iterator later than the run it
    continues, and every evaluation opens new ones."""
    cfg = _cfg(domains, num_workers=workers)
    before = torch.get_rng_state()
    train = build_train_loader(_checked(cfg), micro_batch_size=3, rank=0, world_size=1, seed=7)
    next(train)
    for val in build_val_loaders(_checked(cfg), micro_batch_size=4, rank=0, world_size=1, max_samples=8).values():
        list(val())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.resume
def test_new_weights_at_resume_continue_cursors(domains):
    """A resume under new weights keeps each domain's cursor: no sample repeats within an epoch."""
    cfg = _cfg(domains, shuffle=True)
    first = build_train_loader(_checked(cfg), micro_batch_size=8, rank=0, world_size=1, seed=2)
    seen = _ids(next(first) for _ in range(5))
    state = first.state_dict()
    reweighted = _cfg(domains, domains=[DomainConfig("en", str(domains["en"]), 1.0),
                                        DomainConfig("es", str(domains["es"]), 1.0)])
    later = build_train_loader(_checked(reweighted), micro_batch_size=8, rank=0, world_size=1, seed=2, state=state)
    more = _ids(next(later) for _ in range(5))
    en = [s for d, s in seen + more if d == 0]
    assert len(en) == len(set(en))
    assert later.state_dict()["position"] == state["position"] + 40


@pytest.mark.resume
def test_online_set_weights_is_saved_and_resumed(domains):
    cfg = _cfg(domains)
    loader = build_train_loader(_checked(cfg), micro_batch_size=4, rank=0, world_size=1, seed=0, state=None)
    next(loader)
    loader.set_weights({"en": 0.0, "es": 1.0})
    assert all(int(d) == 1 for d in next(loader)["domain"])
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = build_train_loader(_checked(cfg), micro_batch_size=4, rank=0, world_size=1, seed=0, state=state)
    assert _ids(expected) == _ids(next(resumed) for _ in range(3))
    with pytest.raises(UserError, match="unknown domains"):
        loader.set_weights({"fr": 1.0})


def test_val_loaders_are_deterministic_and_split_over_ranks(domains):
    cfg = _cfg(domains, val_domains=[DomainConfig("en_again", str(domains["en"]))])
    one = build_val_loaders(_checked(cfg), micro_batch_size=4, rank=0, world_size=1, max_samples=10)
    assert set(one) == {"en", "es", "en_again"}
    ids = [b["sample_id"].tolist() for b in one["en"]()]
    assert ids == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ids == [b["sample_id"].tolist() for b in one["en"]()]
    data = _checked(cfg)
    halves = [[s for b in build_val_loaders(data, micro_batch_size=4, rank=r, world_size=2, max_samples=10)["en"]()
               for s in b["sample_id"].tolist()] for r in range(2)]
    assert halves == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.faults
def test_validate_data_rejects_mismatches(domains, tmp_path):
    with pytest.raises(UserError, match="seq_len 32 but data.seq_len is 64"):
        validate_data(_cfg(domains, seq_len=64), vocab_size=800)
    with pytest.raises(UserError, match="exceeds the model's vocab_size 500"):
        validate_data(_cfg(domains), vocab_size=500)
    with pytest.raises(UserError, match=r"nowhere/manifest.json: missing"):
        validate_data(_cfg(domains, val_domains=[DomainConfig("x", str(tmp_path / "nowhere"))]), vocab_size=800)
    with pytest.raises(UserError, match="unknown domains"):
        validate_data(_cfg(domains, phases=[PhaseConfig(10, {"fr": 1.0})]), vocab_size=800)


@pytest.mark.faults
def test_corrupt_shard_is_named(domains, tmp_path):
    import shutil
    copy = tmp_path / "en"
    shutil.copytree(domains["en"], copy)
    shard = sorted((copy / "train").rglob("shard.*.mds"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    cfg = DataConfig(domains=[DomainConfig("en", str(copy))], seq_len=SEQ, shuffle=False)
    prepared = validate_data(cfg, vocab_size=800)  # sizes match; the loader checks hashes on first use
    with pytest.raises(UserError, match=rf"{shard.name}: shard is corrupt"):
        next(build_train_loader(prepared, micro_batch_size=2, rank=0, world_size=1, seed=0))
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match=rf"{shard.name}: shard is \d+ bytes, index.json says"):
        validate_data(cfg, vocab_size=800)


def test_compressed_shards_read_like_raw_ones(domains, tmp_path):
    """A zstd split (same text and tokenizer as the raw 'en') gives the same samples; each shard is
    checked and expanded once into a whole raw file, which later readers use; a damaged
    compressed shard is named before it is expanded."""
    run_prepare(AUSTEN, tmp_path / "z", "--tokenizer", domains["en"] / "tokenizer.model", "--seq-len", SEQ,
                "--val-fraction", 0.2, "--compression", "zstd")
    raw, zipped = ShardSplit(domains["en"] / "train"), ShardSplit(tmp_path / "z" / "train")
    folder = tmp_path / "z" / "train" / "chunk-00000"
    assert raw.num_samples == zipped.num_samples and not list(folder.glob("*.mds"))
    for i in range(raw.num_samples):
        a, b = raw.get(i), zipped.get(i)
        assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["doc_starts"], b["doc_starts"])
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "shard.00000.mds", "shard.00000.mds.zstd"]
    expanded = (folder / "shard.00000.mds").stat().st_ino
    assert ShardSplit(tmp_path / "z" / "train").get(0)["tokens"].tolist() == raw.get(0)["tokens"].tolist()
    assert (folder / "shard.00000.mds").stat().st_ino == expanded  # read as is, not expanded again

    (folder / "shard.00000.mds").unlink()
    packed = bytearray((folder / "shard.00000.mds.zstd").read_bytes())
    packed[len(packed) // 2] ^= 0xFF
    (folder / "shard.00000.mds.zstd").write_bytes(bytes(packed))
    with pytest.raises(UserError, match=r"shard.00000.mds.zstd: shard is corrupt"):
        ShardSplit(tmp_path / "z" / "train").get(0)
    assert not (folder / "shard.00000.mds").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("micro,world,accum", [(12, 1, 1), (6, 2, 1), (3, 2, 2), (2, 3, 2), (1, 4, 3)])
def test_global_step_samples_do_not_depend_on_world_size(domains, micro, world, accum):
    """Global batch 12: step k holds global samples [12k, 12k + 12) in order, for any split into
    ranks x micro-batches x accumulation (ranks simulated in one process; the real two-process
    run is in test_data_distributed.py)."""
    cfg = _cfg(domains)
    data = _checked(cfg)
    ref = build_train_loader(data, micro_batch_size=12, rank=0, world_size=1, seed=4)
    expected = [_ids([next(ref)]) for _ in range(4)]
    ranks = [build_train_loader(data, micro_batch_size=micro, rank=r, world_size=world, seed=4) for r in range(world)]
    for step in range(4):
        per_rank = [[next(r) for _ in range(accum)] for r in ranks]
        got = [s for j in range(accum) for r in range(world) for s in _ids([per_rank[r][j]])]
        assert got == expected[step]
    assert all(r.state_dict() == ref.state_dict() for r in ranks)


def test_loader_imports_without_datasets_and_streaming_shim():
    """The GPU image has no `datasets`: the training side must not need it. `import streaming`
    works through the shim, and where torchvision is missing its stand-in does not outlive the
    import (later torchvision probes, e.g. transformers', must see the truth)."""
    import subprocess
    import sys
    code = ("import importlib.util, sys, cptrain.data_pipeline.loader\n"
            "from cptrain.data_pipeline.streaming_compat import streaming\n"
            "assert 'datasets' not in sys.modules, 'datasets imported'\n"
            "assert streaming.StreamingDataset and streaming.MDSWriter and 'streaming.vision' in sys.modules\n"
            "if importlib.util.find_spec('torchvision') is None:\n"
            "    assert 'torchvision' not in sys.modules, 'stand-in leaked'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
