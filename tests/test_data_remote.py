"""Prepared data in an object store, against a real S3-protocol server (moto's server mode, with
IAM authentication on) started on the loopback address: prepare uploads a complete directory
(manifest last); training from s3:// matches training from the same data on disk and resumes
exactly; two ranks on one node download each shard once; the node cache evicts above its limit;
bad credentials, a missing bucket and an unserved scheme fail in one line before any work."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cptrain.data_pipeline import merge
from cptrain.data_pipeline.cache import NodeCache
from cptrain.data_pipeline.config import DataConfig, DomainConfig, validate_data
from cptrain.data_pipeline.loader import build_train_loader, split_batches
from cptrain.data_pipeline.shards import ShardSplit
from cptrain.launch.cli import main as cli_main
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import tiny_overrides
from tests.multiproc import rank_envs, run_processes
from test_data_support import AUSTEN, run_prepare

pytestmark = pytest.mark.data_remote
BUCKET = "cptrain-test"
URL = f"s3://{BUCKET}/austen"
STEPS = 8  # tiny model, 1024 tokens a step


class Server:
    """moto's S3 server in its own process; its request log is the record of every transfer."""

    def __init__(self, folder: Path):
        self.log = folder / "server.log"
        # IAM authentication on after the 3 requests that create a user with a key and a policy.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                         stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (found := re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.endpoint = found.group(1)
        self.key, self.secret = self._make_user()

    def _make_user(self) -> tuple[str, str]:
        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="AKIASETUP0000000000", aws_secret_access_key="setup")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
        return key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, **change) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1", **change}

    def requests(self, method: str) -> list[str]:
        """The paths of the successful requests of one method so far, in order."""
        return re.findall(rf'"{method} /(\S+) HTTP/1\.1" 200', self.log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("s3"))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "S3_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in srv.env().items():
            mp.setenv(name, value)
        import boto3
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prepared(server, austen_data, tmp_path_factory):
    """The same text prepared on disk and to s3:// (small chunks: several shards per split)."""
    root = tmp_path_factory.mktemp("prepared")
    args = ["--tokenizer", austen_data / "tokenizer.model", "--seq-len", 64, "--val-fraction", 0.1, "--chunk-mb", 0.005]
    run_prepare(AUSTEN[:1], root / "local", *args)
    run_prepare(AUSTEN[:1], URL, *args, "--work-dir", root / "work")
    return root


def _remote_files(prefix: str) -> dict[str, bytes]:
    import boto3
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def test_prepare_uploads_a_complete_directory_manifest_last(server, prepared, austen_data, capsys):
    local = prepared / "local"
    expected = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*")
                if p.is_file() and ".work" not in p.parts and p.name != "manifest.json"}
    remote = _remote_files("austen")
    manifest = json.loads(remote.pop("manifest.json"))
    assert remote == expected and sum(k.endswith(".mds") for k in remote) >= 6
    local_manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["out"] == URL
    assert {k: v for k, v in manifest.items() if k not in ("out", "seconds")} == \
           {k: v for k, v in local_manifest.items() if k not in ("out", "seconds")}
    puts = [p for p in server.requests("PUT") if p.startswith(f"{BUCKET}/austen/")]
    assert puts[-1] == f"{BUCKET}/austen/manifest.json" and puts.count(puts[-1]) == 1
    assert not list((prepared / "work").rglob("*.mds")), "uploaded shards are not kept in the work folder"
    # The same command again finds the directory complete and uploads nothing.
    before = len(server.requests("PUT"))
    capsys.readouterr()
    run_prepare(AUSTEN[:1], URL, "--tokenizer", austen_data / "tokenizer.model", "--seq-len", 64, "--val-fraction", 0.1,
                "--chunk-mb", 0.005, "--work-dir", prepared / "work")
    assert len(server.requests("PUT")) == before and "already prepared" in capsys.readouterr().err


def test_parts_merged_into_the_store_equal_one_prepare(server, prepared, austen_data, tmp_path):
    args = ["--tokenizer", austen_data / "tokenizer.model", "--seq-len", 64, "--val-fraction", 0.1, "--chunk-mb", 0.005]
    parts = [tmp_path / f"part-{i}" for i in range(2)]
    for i, p in enumerate(parts):
        run_prepare(AUSTEN[:1], p, *args, "--part", f"{i}/2")
    merged = merge.run([str(p) for p in parts], f"s3://{BUCKET}/merged", str(tmp_path / "work"))
    local = prepared / "local"
    remote = _remote_files("merged")
    assert json.loads(remote.pop("manifest.json")) == merged
    assert remote == {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*")
                      if p.is_file() and ".work" not in p.parts and p.name != "manifest.json"}
    assert merged["splits"] == json.loads((local / "manifest.json").read_text())["splits"]


def _cfg(run_dir: Path, data: str, cache: Path, **extra):
    return load_config(None, tiny_overrides(run_dir, data, **{
        "train.max_tokens": STEPS * 1024, "eval.at_start": False, "checkpoint.interval_tokens": 4096,
        "data.cache_dir": str(cache), **extra}))


def _curve(rows) -> dict:
    return {r["step"]: (r["loss"], r["grad_norm"], r.get("val/austen")) for r in rows if "loss" in r}


@pytest.mark.resume
def test_training_from_s3_matches_local_and_resumes_exactly(prepared, tmp_path):
    local = _curve(run(_cfg(tmp_path / "local", str(prepared / "local"), tmp_path / "c0")))
    remote = _curve(run(_cfg(tmp_path / "remote", URL, tmp_path / "c1")))
    assert len(local) == STEPS and remote == local
    # Interrupted after step 4: a new run directory holding only that checkpoint, a cold cache.
    shutil.copytree(tmp_path / "remote" / "checkpoints" / "step-00000004",
                    tmp_path / "resumed" / "checkpoints" / "step-00000004")
    resumed = _curve(run(_cfg(tmp_path / "resumed", URL, tmp_path / "c2"), resume=True))
    assert resumed == {s: v for s, v in local.items() if s > 4}


@pytest.mark.distributed
def test_two_ranks_on_one_node_download_each_shard_once(server, prepared, tmp_path):
    """Two gloo ranks, each with a DataLoader worker, train on the s3:// domain through one cache:
    every shard any of them read was fetched from the server exactly once."""
    (tmp_path / "empty.yaml").write_text("{}\n")
    cache = tmp_path / "cache"
    overrides = tiny_overrides(tmp_path / "run", URL, **{"train.max_tokens": 4 * 1024, "data.cache_dir": str(cache),
                                                          "data.num_workers": 1, "train.device": "cpu"})
    before = len(server.requests("GET"))
    cmd = [sys.executable, "-m", "cptrain.launch.cli", "train", str(tmp_path / "empty.yaml"), *overrides]
    run_processes([cmd, cmd], rank_envs(2), timeout=240)
    gets = Counter(p for p in server.requests("GET")[before:] if p.endswith(".mds"))
    assert len(gets) >= 4 and set(gets.values()) == {1}, gets
    # The cache holds what was fetched: one folder per split, the index's chunk/shard names inside.
    cached = Counter(str(p.relative_to(p.parents[1])) for p in cache.rglob("*.mds"))
    assert cached == Counter(p.split("/", 3)[3] for p in gets)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 4


def test_cache_evicts_least_recently_used_above_its_limit(server, prepared, tmp_path):
    """With room for about two shards, reading the whole split shard by shard keeps the cache
    under its limit, never evicts the shard being read, and reads the same samples as the disk."""
    local = ShardSplit(prepared / "local" / "train")
    largest = max(s["raw_data"]["bytes"] for s in local.shards)
    cache = NodeCache.open(str(tmp_path / "cache"), 2.5 * largest / 1e9)
    remote = ShardSplit(f"{URL}/train", cache=cache)
    sizes = []
    for i in range(local.num_samples):
        a, b = local.get(i), remote.get(i)
        assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["doc_starts"], b["doc_starts"])
        sizes.append(sum(p.stat().st_size for p in cache.root.rglob("*.mds")))
    assert max(sizes) <= cache.limit_bytes and len(local.shards) >= 4
    assert len(list(cache.root.rglob("*.mds"))) == 2  # the two used last
    before = len(server.requests("GET"))
    assert np.array_equal(remote.get(0)["tokens"], local.get(0)["tokens"])  # evicted earlier: fetched again
    assert len(server.requests("GET")) == before + 1


def _one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.faults
def test_bad_locations_fail_in_one_line_before_any_work(server, prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a URL taken as a path would create a folder named 's3:'
    (tmp_path / "empty.yaml").write_text("{}\n")
    train = ["train", str(tmp_path / "empty.yaml")]
    cache = {"data.cache_dir": str(tmp_path / "cache")}
    cases = {"s3://no-such-bucket/austen": "no bucket 'no-such-bucket'",
             "ftp://example.org/austen": "cannot read from ftp:// URLs"}
    for data, message in cases.items():
        assert message in _one_line_error(train + tiny_overrides(tmp_path / "run", data, **cache), capsys)
    assert message in _one_line_error(["eval", str(tmp_path), "--data", "ftp://example.org/austen"], capsys)
    assert "run_dir: s3://cptrain-test/runs is a URL" in _one_line_error(
        train + tiny_overrides("s3://cptrain-test/runs", prepared / "local", **cache), capsys)
    prepare = ["data", "prepare", "--input", AUSTEN[0], "--tokenizer", str(prepared / "local" / "tokenizer.model")]
    err = _one_line_error(prepare + ["--out", "s3://no-such-bucket/x", "--work-dir", str(tmp_path / "w")], capsys)
    assert "bucket 'no-such-bucket' does not exist" in err
    assert "cannot write to ftp:// URLs" in _one_line_error(prepare + ["--out", "ftp://example.org/x"], capsys)
    with monkeypatch.context() as mp:  # an uploader opens its own client: bad credentials show here too
        mp.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        err = _one_line_error(prepare + ["--out", f"s3://{BUCKET}/y", "--work-dir", str(tmp_path / "w")], capsys)
    assert f"s3://{BUCKET}/y: access denied" in err
    assert "--input: s3://cptrain-test/x is a URL" in _one_line_error(
        ["data", "prepare", "--input", "s3://cptrain-test/x", "--out", str(tmp_path / "o"), "--train-tokenizer", "8"], capsys)
    assert "--json: s3://cptrain-test/x.json is a URL" in _one_line_error(
        ["eval", str(tmp_path), "--data", str(prepared / "local"), "--json", "s3://cptrain-test/x.json"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "empty.yaml"]  # no run, no 's3:' folder

    # Bad credentials, in a process of their own (this one keeps its client): one line, no run.
    env = {**os.environ, **server.env(AWS_SECRET_ACCESS_KEY="wrong")}
    result = subprocess.run([sys.executable, "-m", "cptrain.launch.cli", *train,
                             *tiny_overrides(tmp_path / "run", URL, **cache)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(rf"cptrain: error: {URL}/manifest.json: access denied \(\w+\); check the credentials "
                        r"\(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE\) and the bucket's permissions", line)
    assert not (tmp_path / "run").exists()


def test_a_mixture_with_a_remote_domain_reads_as_on_disk(prepared, tmp_path):
    """validate_data reads the remote manifest and index (no shard); a mixture of an s3:// and a
    local domain yields the batches of the same mixture read from disk, and resumes alike."""
    disk = str(prepared / "local")

    def data(first: str):
        cfg = DataConfig(domains=[DomainConfig("first", first, 2.0), DomainConfig("second", disk, 1.0)], seq_len=64,
                         cache_dir=str(tmp_path / "c"))
        return validate_data(cfg, vocab_size=512)
    remote, local = data(URL), data(disk)
    assert not list((tmp_path / "c").rglob("*.mds")), "validation fetched no shard"
    assert remote.tokenizer_path().read_bytes() == (prepared / "local" / "tokenizer.model").read_bytes()
    a, b = (build_train_loader(d, micro_batch_size=8, rank=0, world_size=1, seed=3) for d in (remote, local))
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    resumed = build_train_loader(remote, micro_batch_size=8, rank=0, world_size=1, seed=3, state=a.state_dict())
    x, y = next(resumed), next(b)
    assert all(torch.equal(x[k], y[k]) for k in x)
    # `cptrain eval --data s3://...` reads its split the same way.
    _, from_store = split_batches(URL, "val", 4, cache=remote.cache)
    _, from_disk = split_batches(disk, "val", 4)
    assert [b["tokens"].tolist() for b in from_store] == [b["tokens"].tolist() for b in from_disk]
