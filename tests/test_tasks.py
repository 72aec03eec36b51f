"""Multiple-choice tasks by log-likelihood: on the real SmolLM2-135M, `cptrain eval --task` gives the
per-choice scores of a plain transformers implementation of lm-evaluation-harness's rule, and the
same accuracy as lm-evaluation-harness's own library; two ranks score like one during training;
bad task files are one line naming the file and the line."""
import dataclasses
import json
import random
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import transformers

from cptrain.data_pipeline.tasks import word_order_items, write_task
from cptrain.launch.cli import main as cli
from cptrain.launch.launchers import torchrun_command
from cptrain.model.hf import load_weights, save_weights
from cptrain.trainer.config import load_config
from cptrain.trainer.loop import run
from tests.conftest import tiny_overrides
from tests.multiproc import free_port, run_processes

pytestmark = pytest.mark.eval
DEMO = Path(__file__).resolve().parents[1] / "data_pipeline" / "demo"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {"english": write_task(word_order_items((DEMO / "austen.txt").read_text(), 24, seed=1), root / "english_order.jsonl"),
            "spanish": write_task(word_order_items((DEMO / "rv1909_nt.txt").read_text(), 24, seed=1), root / "spanish_order.jsonl")}


def plain_scores(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """lm-evaluation-harness's rule written out with transformers: whitespace ending the context moves
    to the choice; the choice's tokens follow encode(context) in encode(context + choice)."""
    out = []
    for choice in choices:
        ctx, cont = context, choice
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        ctx_ids = tokenizer(ctx, add_special_tokens=False).input_ids
        whole = tokenizer(ctx + cont, add_special_tokens=False).input_ids
        cont_ids = whole[len(ctx_ids):]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(ctx_ids) - 1:len(whole) - 1], dim=-1)
        out.append(logprobs[torch.arange(len(cont_ids)), torch.tensor(cont_ids)].sum().item())
    return out


@pytest.mark.parametrize("shots,n", [(0, 6), (2, 4)])
def test_scores_match_a_plain_transformers_implementation(smollm2_dir, task_files, tmp_path, shots, n):
    out = tmp_path / "eval.json"
    assert cli(["eval", str(smollm2_dir), "--task", str(task_files["english"]), "--num-fewshot", str(shots),
                "--log-samples", "--max-items", str(n), "--json", str(out)]) == 0
    got = json.loads(out.read_text())["tasks"]["english_order"]
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    items = [json.loads(line) for line in task_files["english"].read_text().splitlines()][:n]
    right = right_norm = 0
    for i, (item, logged) in enumerate(zip(items, got["items"])):
        shots_text = ""
        if shots:  # the documented few-shot rule: seeded per item, from the other items of the file
            picks = random.Random(f"1234-{i}").sample([j for j in range(len(items)) if j != i], shots)
            shots_text = "".join(items[j]["context"] + items[j]["choices"][items[j]["answer"]] + "\n\n" for j in picks)
        want = plain_scores(model, tokenizer, shots_text + item["context"], item["choices"])
        assert logged["scores"] == pytest.approx(want, abs=1e-3), i
        right += max(range(len(want)), key=want.__getitem__) == item["answer"]
        norm = [s / len(c) for s, c in zip(want, item["choices"])]
        right_norm += max(range(len(norm)), key=norm.__getitem__) == item["answer"]
    assert got["n"] == n and got["acc"] == right / n and got["acc_norm"] == right_norm / n
    if shots == 0:
        assert got["acc"] > 0.5  # SmolLM2 knows English word order (chance: 0.25)


def test_lm_evaluation_harness_scores_our_tasks_the_same(smollm2_dir, task_files, tmp_path):
    """A task YAML of lm-evaluation-harness over the same file, scored by its library through our
    adapter: its acc and acc_norm equal ours."""
    pytest.importorskip("lm_eval")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "english_order.yaml").write_text(
        "task: english_order_lm\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_files['english']}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    out = tmp_path / "eval.json"
    assert cli(["eval", str(smollm2_dir), "--task", str(task_files["english"]), "--lm-eval", "english_order_lm",
                "--lm-eval-include", str(tmp_path / "tasks"), "--max-items", "12", "--json", str(out)]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["english_order_lm"]["acc"] == tasks["english_order"]["acc"]
    assert tasks["english_order_lm"]["acc_norm"] == tasks["english_order"]["acc_norm"]


def test_training_logs_task_accuracy_and_two_ranks_score_like_one(austen_data, task_files, tmp_path):
    tasks = (f"[{{name: english, path: {task_files['english']}, role: old}}, "
             f"{{name: spanish, path: {task_files['spanish']}, num_fewshot: 1, max_items: 10}}]")
    extra = {"train.max_tokens": 4096, "eval.interval_tokens": 2048, "eval.tasks": tasks, "eval.task_batch_size": 5,
             "train.device": "cpu", "train.precision": "fp32", "train.global_batch_tokens": 2048}
    one = run(load_config(None, tiny_overrides(tmp_path / "one", austen_data, **extra)))
    evaluated = [r for r in one if "eval/english/acc" in r]
    assert [r["step"] for r in evaluated] == [0, 1, 2]  # the start and every evaluation
    assert all(0 <= r["eval/spanish/acc_norm"] <= 1 for r in evaluated)
    jobs = [{"overrides": tiny_overrides(tmp_path / name, austen_data, **extra, **engine)}
            for name, engine in (("ddp", {}), ("fsdp2", {"train.engine": "fsdp2"}))]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    args = Namespace(nodes=1, gpus_per_node=2, hostfile=None, master_addr=None, master_port=free_port(), no_ssh=False,
                     node_rank=None)
    run_processes([torchrun_command(args, ["tests/dist_worker.py", str(tmp_path / "jobs.json")], tmp_path)], timeout=600)
    keys = [k for k in evaluated[0] if k.startswith("eval/")]
    for name in ("ddp", "fsdp2"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        got = [r for r in rows if "eval/english/acc" in r]
        assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in evaluated], name


def test_bad_task_files_are_one_line_naming_file_and_line(smollm2_dir, tmp_path, capsys):
    good = '{"context": "a", "choices": [" b", " c"], "answer": 0}\n'
    cases = {"no_answer": (good + '{"context": "a", "choices": [" b"]}\n', ":2: an item needs"),
             "out_of_range": (good + good + '{"context": "a", "choices": [" b", " c"], "answer": 2}\n',
                              ':3: "answer" 2 is out of range for 2 choices'),
             "empty": ("\n", "the task file is empty"),
             "not_json": ("{oops\n", ":1: not valid JSON")}
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        assert cli(["eval", str(smollm2_dir), "--task", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and message in err[0], err
    (tmp_path / "good.jsonl").write_text(good)
    spm = tmp_path / "spm"  # a tokenizer larger than the model's vocabulary
    assert cli(["data", "prepare", "--input", str(DEMO / "austen.txt"), "--out", str(spm), "--train-tokenizer", "1000",
                "--seq-len", "64"]) == 0
    capsys.readouterr()
    tiny = tmp_path / "tiny"
    run(load_config(None, tiny_overrides(tiny, spm, **{"model.vocab_size": 1024, "train.max_tokens": 1024})))
    cfg, sd = load_weights(tiny / "checkpoints" / "step-00000001")
    save_weights(tmp_path / "small", dataclasses.replace(cfg, vocab_size=512),
                 {k: v[:512] if v.shape[0] == 1024 else v for k, v in sd.items()})
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "small"), "--task", str(tmp_path / "good.jsonl"),
                "--tokenizer", str(spm / "tokenizer.model")]) == 2
    assert "tokenizer vocabulary 1000 exceeds the model's vocab_size 512" in capsys.readouterr().err
