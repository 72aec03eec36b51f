"""The one place the project imports mosaicml-streaming.

`import streaming` imports `streaming.vision`, which imports torchvision at module load. We use
none of the vision code, and torchvision is absent (or CUDA-linked and unimportable) on our CPU
machines. When - and only when - torchvision cannot be found, register a stand-in module that
provides the two names streaming.vision imports, with a ModuleSpec so `importlib.util.find_spec`
and other import machinery treat it as a real module. Everything else imports streaming from here:

    from .streaming_compat import streaming
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

from ..errors import UserError


def _install_torchvision_stub() -> None:
    names = {
        "torchvision": {},
        "torchvision.datasets": {"VisionDataset": type("VisionDataset", (), {}),
                                 "CIFAR10": type("CIFAR10", (), {})},
        "torchvision.transforms": {},
        "torchvision.transforms.functional": {"to_tensor": _unavailable},
    }
    for name, attrs in names.items():
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    sys.modules["torchvision"].datasets = sys.modules["torchvision.datasets"]
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


def _unavailable(*args, **kwargs):
    raise ImportError("torchvision is not installed; cptrain's stand-in only lets `import streaming` work")


def _torchvision_importable() -> bool:
    if "torchvision" in sys.modules:
        return True
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:  # present but broken (e.g. a CUDA build on a CPU machine)
        import torchvision  # noqa: F401
        return True
    except Exception:
        return False


def _drop_stub() -> None:
    """streaming.vision holds what it needs; drop the stand-in so that later availability checks
    (transformers probes for torchvision) see the truth, not a module with no code behind it."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    utils = sys.modules.get("transformers.utils.import_utils")
    probe = getattr(utils, "is_torchvision_available", None)
    if hasattr(probe, "cache_clear"):  # an lru_cache that may have seen the stand-in
        probe.cache_clear()


_stubbed = not _torchvision_importable()
if _stubbed:
    _install_torchvision_stub()
try:
    import streaming  # noqa: E402
    from streaming.base.compression import decompress  # noqa: E402
    from streaming.base.format import reader_from_json  # noqa: E402
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS, CloudDownloader  # noqa: E402
    from streaming.base.storage.upload import UPLOADERS, CloudUploader  # noqa: E402
    from streaming.base.util import merge_index  # noqa: E402
except ModuleNotFoundError as e:
    if e.name != "streaming":
        raise
    raise UserError("mosaicml-streaming is not installed (it reads and writes the MDS shards); pip install --no-deps "
                    "mosaicml-streaming==0.13.0 (--no-deps: its own pins, transformers<5 and numpy<2.2, conflict with ours)") from None
finally:
    if _stubbed:
        _drop_stub()

__all__ = ["streaming", "decompress", "merge_index", "reader_from_json", "CloudDownloader", "CloudUploader",
           "DOWNLOADER_MAPPINGS", "UPLOADERS"]
