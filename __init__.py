"""cptrain: pretraining and continual pretraining of decoder LLMs.

The distribution installs this one package; its sub-packages are the repository's folders
(pyproject.toml maps them): `cptrain.model` (decoders, attention, HF interop), `cptrain.data_pipeline`
(tokenizers, MDS shards, mixtures), `cptrain.trainer` (config, engines, loop, checkpoints, analysis)
and `cptrain.launch` (the `cptrain` command and the launchers). docs/design.md draws the layers.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cptrain")
except PackageNotFoundError:  # imported from a checkout that was not installed
    __version__ = "0+unknown"
