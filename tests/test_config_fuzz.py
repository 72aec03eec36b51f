"""Property tests: any malformed config, override or command line ends in a one-line UserError or an
argparse error - never a traceback. Any other exception type is a failure."""
import dataclasses
import string
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cptrain.launch.cli import main as cli_main
from cptrain.errors import UserError
from cptrain.model.config import ModelConfig
from cptrain.trainer.config import TrainConfig, load_config

pytestmark = pytest.mark.faults

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _keys(cls) -> list[str]:
    """Every key path of the schema (section.key), so that generated configs reach the deep checks."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [f"{f.name}.{k}" for k in _keys(tp)]
        else:
            out.append(f.name)
    return out


KEYS = [k for k in _keys(TrainConfig) if not k.startswith("model.")]
KEYS += ["model.preset", "model.init_from", "model.load", "model.reset_optimizer"]
KEYS += [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(string.printable, max_size=12)
           | st.sampled_from(["10M", "1.5B", "-3K", "1e3", "nan", "inf", "cosine", "wsd", "bf16", "cuda", "rollback",
                              "[1, 2]", "{a: 1}", "tiny", "7B", "0", "-1", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


configs = (st.dictionaries(st.sampled_from(KEYS), values, max_size=4).map(_nest)  # real keys, wrong values
           | st.dictionaries(st.text(max_size=8), values, max_size=3)  # anything at all
           | values)  # not even a mapping


def _expect_clean(call):
    """Run `call`; a UserError must be one line; anything but success or UserError fails the test."""
    try:
        call()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)


@FUZZ
@given(raw=configs)
def test_random_yaml_gets_a_user_error(tmp_path, raw):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw))
    _expect_clean(lambda: load_config(path))


@FUZZ
@given(text=st.text(max_size=80))
def test_random_text_as_yaml(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    _expect_clean(lambda: load_config(path))


override_values = st.one_of(scalars.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")),
                            st.text(string.printable, max_size=10))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"--{k}={v}", st.sampled_from(KEYS + ["train", "model", "x.y.z"]), override_values),
                               st.text(string.printable, max_size=20)), max_size=4)


@FUZZ
@given(args=overrides)
def test_random_overrides_get_a_user_error(args):
    _expect_clean(lambda: load_config(None, args))


# A command line may fail in argparse (SystemExit 2), with a UserError (exit 2), or succeed (--help);
# `train` fails fast here because no data is configured. `demo` and `launch` are left out: a valid
# `demo` command line runs the whole demo, and `launch` starts real launchers.
commands = st.sampled_from([["train"], ["data", "prepare"], ["convert", "cptrain-to-hf"], ["convert", "hf-to-cptrain"],
                            ["schedule", "plot"], ["report"], ["scaling", "fit"], ["scaling", "predict"], ["bogus"], []])
tokens = st.one_of(st.sampled_from(["--input", "--out", "--seq-len", "abc", "-1", "--train-tokenizer", "--tokenizer",
                                    "--dtype", "float64", "--law", "--fit", "--resume", "--", "-", "--help"]),
                   st.text(string.ascii_letters + string.digits + "-=._/", max_size=10), overrides.map(" ".join))


@FUZZ
@given(command=commands, argv=st.lists(tokens, max_size=5))
def test_random_command_lines_never_trace(tmp_path, monkeypatch, capsys, command, argv):
    monkeypatch.chdir(tmp_path)  # whatever a command line writes lands in the test's folder
    capsys.readouterr()
    try:
        rc = cli_main(command + argv)
    except SystemExit as e:
        assert e.code in (0, 2), e.code
    else:
        assert rc in (0, 2)
        if rc == 2:
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("cptrain: error: "), err


launch_tokens = st.one_of(st.sampled_from(["--launcher", "deepspeed", "torchrun", "slurm", "--nodes", "--node-rank",
                                           "--gpus-per-node", "--master-addr", "--master-port", "--hostfile", "--no-ssh",
                                           "--slurm-backend", "0", "2", "-1", "x"]), tokens)


@FUZZ
@given(raw=configs, argv=st.lists(launch_tokens, max_size=6))
def test_random_launch_command_lines_never_trace(tmp_path, monkeypatch, capsys, raw, argv):
    """`launch` with --dry-run always: it prints the launcher command (or writes the sbatch script) but runs nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    try:
        rc = cli_main(["launch", "--dry-run", *argv, "c.yaml", f"--run_dir={tmp_path / 'run'}"])
    except SystemExit as e:
        assert e.code in (0, 2)  # 0: --help
    else:
        assert rc in (0, 2)


@FUZZ
@given(raw=configs, args=overrides)
def test_train_with_bad_config_and_overrides(tmp_path, capsys, raw, args):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    try:
        rc = cli_main(["train", str(path), f"--run_dir={tmp_path / 'run'}", *args])
    except SystemExit as e:
        assert e.code == 2
    else:
        assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(tmp_path, capsys):
    """A hole found while fuzzing: a valid config asking for CUDA on a CPU machine was a traceback."""
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    rc = cli_main(["train", str(path), "--train.device=cuda", f"--run_dir={tmp_path / 'run'}", "--data.seq_len=256",
                   "--train.global_batch_tokens=2048"])
    assert rc == 2 and "train.device=cuda" in capsys.readouterr().err
