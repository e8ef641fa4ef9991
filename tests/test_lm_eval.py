"""The lm_eval metric (real lm-eval, HFLM on the in-memory model) and the offline pydoc tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moebench import zoo
from moebench_plugins.metrics import lmeval_tasks
from moebench.adapter import MoEModel
from moebench.data import encode, load_text, windows
from moebench.errors import MoebenchError
from moebench.method import Context
from moebench.params import ParamError, parse
from moebench.plugins import host
from moebench_plugins.metrics.lm_eval_metric import LmEval, LmEvalParams, evaluate, find_tasks, resolve_paths, scores
from moebench_plugins.metrics import Perplexity, PerplexityParams, perplexity


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MoEModel:
    torch.manual_seed(0)
    m = zoo.entry("mixtral").cls(zoo.config("mixtral")).eval()
    return MoEModel(m, host().adapter_for(m), tokenizer=zoo.tokenizer(), source="random:mixtral")


@pytest.mark.parametrize("task", lmeval_tasks.TASKS)
def test_offline_tasks_are_deterministic_well_formed_and_held_out(task):
    build = lmeval_tasks.BUILDERS[task]
    test, validation = build("test"), build("validation")
    assert len(test) >= 300 and len(validation) >= 300
    build.cache_clear()
    assert build("test") == test  # rebuilt from the corpus, same items
    labels = [item["label"] for item in test]
    assert {len(set(item["choices"])) for item in test} == {lmeval_tasks.CHOICES}
    assert set(labels) == set(range(lmeval_tasks.CHOICES)) and max(labels.count(i) for i in set(labels)) < 0.4 * len(labels)
    held_out = load_text("embedded:prose", "test")
    for item in test[:50]:  # the true choice is what the held-out text says next
        true = item["choices"][item["label"]].split()
        after = held_out[held_out.index(item["context"]) + len(item["context"]) :]
        assert after.split()[: len(true)] == true
        if task == "pydoc_mc":  # distractors: the same words, one adjacent pair swapped
            assert all(sorted(c.split()) == sorted(true) for c in item["choices"])
    assert not {i["context"] for i in test} & {i["context"] for i in validation}


def test_lm_eval_scores_the_in_memory_model_with_stderr(model, capfd):
    out = LmEval().measure(model, parse(LmEvalParams, {"limit": 12, "batch_size": 16}), Context())
    printed = "".join(capfd.readouterr())
    assert "Tokenizing inputs" not in printed and "loglikelihood requests" not in printed  # lm-eval's bars stay off
    assert set(out["lm_eval"]) == set(lmeval_tasks.TASKS)
    for task, row in out["lm_eval"].items():
        assert 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
        assert row["acc_stderr"] == pytest.approx(math.sqrt(row["acc"] * (1 - row["acc"]) / 11))  # sample std / sqrt(n)
        assert out["lm_eval_info"]["samples"][task] == 12
    assert out["lm_eval_info"]["how"].startswith("measured: lm-eval")


def test_scores_change_when_the_model_changes(model):
    base = scores(evaluate(model, ["pydoc_cloze"], limit=16, batch_size=16))
    saved = {b.layer: b.router_weight.detach().clone() for b in model.blocks()}
    try:
        with torch.no_grad():
            for block in model.blocks():  # a different routing: every token to the same experts
                block.router_weight.zero_()
            model.model.model.embed_tokens.weight.mul_(-1)
        changed = scores(evaluate(model, ["pydoc_cloze"], limit=16, batch_size=16))
    finally:
        with torch.no_grad():
            for block in model.blocks():
                block.router_weight.copy_(saved[block.layer])
            model.model.model.embed_tokens.weight.mul_(-1)
    assert changed != base


def test_few_shot_examples_come_from_the_validation_split(model):
    task = find_tasks(["pydoc_mc"]).load(["pydoc_mc"])["tasks"]["pydoc_mc"]
    assert [d["context"] for d in task.eval_docs] == [i["context"] for i in lmeval_tasks.mc_items("test")]
    assert [d["context"] for d in task.fewshot_docs()] == [i["context"] for i in lmeval_tasks.mc_items("validation")]
    two = evaluate(model, ["pydoc_mc"], limit=4, batch_size=8, num_fewshot=2)
    assert two["configs"]["pydoc_mc"]["num_fewshot"] == 2 and two["n-samples"]["pydoc_mc"]["effective"] == 4


def test_perplexity_equals_lm_eval_rolling_loglikelihood(model, tmp_path):
    """Same text, same windows: our NLL and lm-eval's agree to 1e-3 relative, both ways round."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    seqlen = 64
    text = load_text("embedded:prose", "validation")[:6000]
    # 1. lm-eval's own rolling protocol (every token predicted, the first from the prefix
    #    token; windows of seqlen predictions): our perplexity() on exactly those windows.
    lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=4, max_length=seqlen)
    while len(lm.tok_encode(text)) % seqlen:  # whole windows only, so no window re-reads context
        text = text[:-1]
    tokens = lm.tok_encode(text)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    stream = [lm.prefix_token_id, *tokens]
    ours = torch.tensor([stream[i : i + seqlen + 1] for i in range(0, len(tokens), seqlen)])
    assert ours.shape == (len(tokens) // seqlen, seqlen + 1)
    assert perplexity(model.model, ours) == pytest.approx(math.exp(-rolling / len(tokens)), rel=1e-3)

    # 2. Our metric's protocol (non-overlapping windows, first token of each as context),
    #    scored by lm-eval's log-likelihood code on the same token windows.
    (tmp_path / "eval.txt").write_text(text)
    spec = PerplexityParams(data=f"file:{tmp_path / 'eval.txt'}", seqlen=seqlen, batch_size=4)
    ppl = Perplexity().measure(model, spec, Context())["perplexity"]
    ids = windows(encode(model.tokenizer, load_text(spec.data, "test")), seqlen)
    requests = [(("", ""), w[:1].tolist(), w[1:].tolist()) for w in ids]
    loglik = sum(lp for lp, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True))
    assert ppl["tokens"] == ids.numel()
    assert ppl["value"] == pytest.approx(math.exp(-loglik / (ids.numel() - len(ids))), rel=1e-3)


def test_suites_can_point_at_local_task_folders(model, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    docs = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 7)], "label": 0} for a, b in [(1, 2), (3, 4), (5, 6)]]
    (tasks / "sums.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tasks / "sums.yaml").write_text(
        "task: tiny_sums\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'sums.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    suite = tmp_path / "suite.toml"
    suite.write_text("")

    class Suite:
        path = str(suite)

    params = parse(LmEvalParams, {"tasks": ["tiny_sums", "pydoc_mc"], "include_paths": ["my_tasks"], "limit": 3})
    out = LmEval().measure(model, params, Context(suite=Suite()))
    assert set(out["lm_eval"]) == {"tiny_sums", "pydoc_mc"} and out["lm_eval_info"]["samples"]["tiny_sums"] == 3
    with pytest.raises(MoebenchError, match="is not a folder"):
        resolve_paths(["missing_tasks"], str(suite))


@pytest.mark.slow
def test_unknown_task_names_the_alternatives():
    with pytest.raises(MoebenchError, match="unknown lm-eval task 'pydoc_mcq'.*did you mean 'pydoc_mc'"):
        find_tasks(["pydoc_mcq"])


def test_bad_parameters_say_what_was_expected():
    with pytest.raises(ParamError, match="tasks must name at least one"):
        parse(LmEvalParams, {"tasks": []})
    with pytest.raises(ParamError, match="limit must be a whole number"):
        parse(LmEvalParams, {"limit": 2.5})
    with pytest.raises(ParamError, match="num_fewshot"):
        parse(LmEvalParams, {"num_fewshot": -1})


@pytest.mark.slow
def test_trained_zoo_model_scores_clearly_above_chance(trained_zoo):
    from moebench.models import load

    trained = load(str(trained_zoo))
    out = LmEval().measure(trained, parse(LmEvalParams, {"limit": 200, "batch_size": 16}), Context())["lm_eval"]
    for task in lmeval_tasks.TASKS:
        row = out[task]
        assert row["acc"] - 3 * row["acc_stderr"] > 0.25, (task, row)  # chance is 1 in 4


CHAT_TEMPLATE = (  # a Jinja template is data transformers renders; nothing here is executed as Python
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_generation_task_with_settings_chat_template_and_per_sample_logs(model, tmp_path):
    import copy

    from moebench_plugins.metrics.lm_eval_metric import write_samples  # noqa: F401  (the writer measure uses)

    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = MoEModel(model.model, model.adapter, tokenizer=tokenizer, source="random:mixtral")
    params = parse(LmEvalParams, {
        "tasks": ["pydoc_gen"], "limit": 3, "log_samples": True, "apply_chat_template": True, "system_instruction": "Continue the text.",
        "gen_kwargs": {"max_gen_toks": 3, "until": ["\n", "."], "do_sample": False},
    })
    out = LmEval().measure(chat, params, Context(run_dir=tmp_path / "run"))
    score = out["lm_eval"]["pydoc_gen"]["exact_match/first_word"]
    files = out["lm_eval_info"]["files"]
    assert 0 <= score <= 1 and set(files["samples"]) == {"pydoc_gen"}
    results = json.loads(open(files["results"]).read())  # lm-eval's own results file, beside the samples
    assert results["results"]["pydoc_gen"]["exact_match,first_word"] == score
    samples = [json.loads(line) for line in open(files["samples"]["pydoc_gen"])]
    items = lmeval_tasks.gen_items("test")
    assert [s["doc_id"] for s in samples] == [0, 1, 2] and [s["target"] for s in samples] == [i["target"] for i in items[:3]]
    for s, item in zip(samples, items):
        prompt, settings = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        assert prompt == f"system: Continue the text.\nuser: {item['context']}\nassistant:"  # the template, rendered
        assert settings["max_gen_toks"] == 3 and settings["until"] == ["\n", "."] and settings["do_sample"] is False
        generated = s["resps"][0][0]
        assert "\n" not in generated and "." not in generated
        first = generated.split()[:1]
        assert s["filtered_resps"] == (first or ["[invalid]"]) and s["exact_match"] == float(first == [item["target"]])
    assert score == sum(s["exact_match"] for s in samples) / 3
    # greedy (do_sample = false) and max_gen_toks bounds it: twice the tokens, same start
    longer = evaluate(chat, ["pydoc_gen"], limit=3, log_samples=True, apply_chat_template=True, system_instruction="Continue the text.",
                      gen_kwargs={"max_gen_toks": 6, "until": ["\n", "."], "do_sample": False})["samples"]["pydoc_gen"]
    pairs = [(short["resps"][0][0], long["resps"][0][0]) for short, long in zip(samples, longer)]
    assert all(b.startswith(a) for a, b in pairs) and any(len(b) > len(a) for a, b in pairs)


def test_generation_items_are_the_held_out_next_word():
    items, held_out = lmeval_tasks.gen_items("test"), load_text("embedded:prose", "test")
    assert len(items) >= 300 and not {i["context"] for i in items} & {i["context"] for i in lmeval_tasks.gen_items("validation")}
    for item in items[:50]:
        after = held_out[held_out.index(item["context"]) + len(item["context"]) :]
        assert after.split()[0] == item["target"] and item["target"].isalpha()


def test_chat_template_and_sample_logs_refuse_what_they_cannot_do(model):
    with pytest.raises(MoebenchError, match="apply_chat_template: the tokenizer of 'random:mixtral' has no chat template"):
        LmEval().measure(model, parse(LmEvalParams, {"tasks": ["pydoc_gen"], "limit": 1, "apply_chat_template": True}), Context())
    with pytest.raises(MoebenchError, match="log_samples: no run folder"):
        LmEval().measure(model, parse(LmEvalParams, {"tasks": ["pydoc_cloze"], "limit": 1, "log_samples": True}), Context())
    with pytest.raises(ParamError, match=r"gen_kwargs.max_gen_tok: unknown generation setting \(did you mean 'max_gen_toks'"):
        parse(LmEvalParams, {"gen_kwargs": {"max_gen_tok": 3}})
    with pytest.raises(ParamError, match="gen_kwargs.until: expected a string or a list"):
        parse(LmEvalParams, {"gen_kwargs": {"until": 3}})
    with pytest.raises(ParamError, match="fewshot_as_multiturn needs apply_chat_template"):
        parse(LmEvalParams, {"fewshot_as_multiturn": True})


@pytest.mark.slow
def test_a_suite_run_keeps_lm_eval_samples_in_its_run_folder_and_exports_them(checkpoint, tmp_path):
    """`moebench run` with log_samples: lm-eval's files land in <out>/runs/<name>-<run id>/, the record names
    them, and `moebench report --format lm-eval` copies the samples beside each results file."""
    import subprocess
    import sys
    import textwrap

    from moebench.runner import RunOptions, run_suite
    from moebench.suite import load_suite
    from tests.conftest import suite_file

    path = suite_file(tmp_path, checkpoint("mixtral"), textwrap.dedent("""
        [eval.lm_eval]
        tasks = ["pydoc_cloze", "pydoc_gen"]
        limit = 2
        log_samples = true
        gen_kwargs = { max_gen_toks = 4 }
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = 0.5 }
    """), max_samples=1)
    result = run_suite(load_suite(path), RunOptions(out=tmp_path / "out", log=lambda m: None))
    for record in result.records:
        assert record.ok, record.error
        files = record.metrics["lm_eval_info"]["files"]
        folder = tmp_path / "out" / "runs" / f"{record.name}-{record.run_id}"
        assert set(files["samples"]) == {"pydoc_cloze", "pydoc_gen"}
        for task, sample_file in files["samples"].items():
            assert Path(sample_file).parent == folder and len(Path(sample_file).read_text().splitlines()) == 2
        gen = [json.loads(line) for line in open(files["samples"]["pydoc_gen"])]
        assert all(s["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 4 for s in gen)
    done = subprocess.run([sys.executable, "-m", "moebench.cli", "report", str(tmp_path / "out"), "--format", "lm-eval", "--out", str(tmp_path / "lm")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for record in result.records:
        exported = tmp_path / "lm" / f"{record.name}-{record.run_id}"
        (results,) = exported.glob("results_*.json")
        stamp = results.name[len("results_") : -len(".json")]
        assert sorted(p.name for p in exported.glob("samples_*.jsonl")) == [f"samples_pydoc_cloze_{stamp}.jsonl", f"samples_pydoc_gen_{stamp}.jsonl"]
