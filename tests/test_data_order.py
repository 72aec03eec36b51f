"""The per-domain sample order: a keyed bijection on [0, N) in constant memory (state version 2),
well mixed, and version-1 states (a numpy permutation per epoch) resuming in their old order."""
import tracemalloc
import zlib

import numpy as np
import pytest

from cptrain.data_pipeline.config import DataConfig, DomainConfig, validate_data
from cptrain.data_pipeline.loader import build_train_loader
from cptrain.data_pipeline.mixture import STATE_VERSION, Mixture
from cptrain.data_pipeline.permutation import Permutation
from cptrain.errors import UserError
from test_data_support import make_domains

pytestmark = pytest.mark.data
SEQ = 32


@pytest.mark.parametrize("n", [*range(1, 40), 63, 64, 65, 1000, 4097])
def test_every_index_once_for_any_size(n):
    for key in ([0, 0, 0], [7, 123, 5]):
        assert sorted(Permutation(n, key)(np.arange(n)).tolist()) == list(range(n))


def test_billion_samples_in_constant_memory():
    """The first draws of an epoch of 10^9 samples, through the mixture: distinct, in range, and
    without touching O(N) memory (the numpy order held 8 bytes per sample: 8 GB here)."""
    n, draws = 10**9, 5000
    cfg = DataConfig(domains=[DomainConfig("web")], seq_len=2048)
    tracemalloc.start()
    mix = Mixture(cfg, seed=1, sizes=[n], state=None)
    got = [k for _, k in mix.take(draws)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(got)) == draws and 0 <= min(got) and max(got) < n
    assert peak < 4_000_000, peak  # a few MB for 5000 draws, against N = 10^9 bytes
    assert mix.state_dict()["version"] == STATE_VERSION == 2


def _chi2(a: np.ndarray, b: np.ndarray, n: int, bins: int = 16) -> float:
    """Chi-square of the bins x bins table of (a, b) against independence under uniform margins."""
    table = np.histogram2d(a, b, bins=bins, range=[[0, n], [0, n]])[0]
    expected = len(a) / bins**2
    return float(((table - expected) ** 2 / expected).sum())


def test_order_is_well_mixed():
    """Not a stride, nor a shift: position and index are uncorrelated, consecutive indices are
    independent (a strided order fills one diagonal of the table), the gaps between consecutive
    indices are as varied as a random permutation's, and the next epoch is independent too."""
    n = 100_003  # not a power of 4: cycle walking is exercised
    pos = np.arange(n)
    first, second = Permutation(n, [3, 9, 0])(pos), Permutation(n, [3, 9, 1])(pos)
    dof = 16**2 - 1
    bound = dof + 6 * np.sqrt(2 * dof)  # 6 sigma of a chi-square with 255 degrees of freedom
    assert abs(np.corrcoef(pos, first)[0, 1]) < 6 / np.sqrt(n)
    assert _chi2(pos, first, n) < bound
    assert _chi2(first[:-1], first[1:], n) < bound
    assert _chi2(first, second, n) < bound
    distinct_gaps = len(np.unique((first[1:] - first[:-1]) % n))
    assert distinct_gaps > 0.6 * n  # a random permutation: ~(1 - 1/e) n = 0.632 n
    # Composing two epochs' orders: fixed points ~ Poisson(1) for independent orders.
    assert (first == second).sum() < 10


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("domains"), SEQ)


@pytest.mark.resume
def test_version_one_state_resumes_in_the_old_order(domains):
    """A state saved before the Feistel order (version 1) continues with the numpy permutation of
    its epoch, as the run that saved it would have; a new run uses version 2, another order."""
    cfg = DataConfig(domains=[DomainConfig("es", str(domains["es"]))], seq_len=SEQ)
    data = validate_data(cfg, vocab_size=800)
    n = data.train_splits()[0].num_samples
    seed, cursor = 5, n - 3  # resume near the end of epoch 0: the draws cross into epoch 1
    old = {"version": 1, "seed": seed, "position": cursor, "cursors": {"es": cursor},
           "weights_override": None, "num_samples": {"es": n}}
    resumed = build_train_loader(data, micro_batch_size=8, rank=0, world_size=1, seed=seed, state=old)
    got = next(resumed)["sample_id"].tolist()

    def numpy_order(epoch):
        return np.random.default_rng([seed, zlib.crc32(b"es"), epoch]).permutation(n)
    expected = [int(numpy_order(c // n)[c % n]) for c in range(cursor, cursor + 8)]
    assert got == expected
    assert resumed.state_dict()["version"] == 1 and resumed.state_dict()["cursors"] == {"es": cursor + 8}

    fresh = build_train_loader(data, micro_batch_size=n, rank=0, world_size=1, seed=seed)
    first_epoch = next(fresh)["sample_id"].tolist()
    assert sorted(first_epoch) == list(range(n)) and first_epoch != numpy_order(0).tolist()
    assert fresh.state_dict()["version"] == 2


@pytest.mark.faults
def test_unknown_state_version_is_refused():
    cfg = DataConfig(domains=[DomainConfig("web")])
    with pytest.raises(UserError, match="version 3"):
        Mixture(cfg, seed=0, sizes=[10], state={"version": 3, "seed": 0})
