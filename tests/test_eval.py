"""`peftune eval`'s tasks in-process: perplexity against a direct transformers computation,
multiple choice, generation on a model trained to memorise pairs, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import make_text_rows, read_jsonl, write_jsonl

from peftune.errors import InputError
from peftune.evaluate import resolve_target, run_eval
from peftune.recipe.schema import DataSection, EvalTask

PAIRS = [("red?", "apple"), ("yellow?", "banana"), ("green?", "lime"), ("purple?", "grape"),
         ("orange?", "mango"), ("brown?", "kiwi")]


def _hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _eval(target, tmp_path, tasks, *, name="out", compare=(), **kw):
    from peftune.recipe.schema import EvalSection

    section = EvalSection(tasks=[EvalTask(**t) for t in tasks], **kw)
    targets = [resolve_target(str(target))]
    for other in compare:
        from peftune.evaluate.targets import run_base

        targets.append(run_base(targets[0]) if other == "base" else resolve_target(str(other)))
    return run_eval(targets=targets, config=section, out=tmp_path / name, quiet=True)


def _metric(report, task, name, model=0):
    return report["models"][model]["tasks"][task]["metrics"][name]["value"]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny model fully fine-tuned (80 steps, ~5 s) until it answers every pair."""
    from peftune.models import build_tiny_model
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    root = tmp_path_factory.mktemp("memorised")
    model = build_tiny_model(root / "tiny", hidden_size=32, layers=2, heads=4, seed=0)
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    recipe = root / "mem.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "adapter": {"method": "full"},
        "data": {"train": str(pairs), "format": "instruction", "max_length": 64,
                 "packing": False},
        "train": {"max_steps": 80, "batch_size": 6, "lr": 1e-2, "log_every": 40,
                  "warmup_ratio": 0.0, "scheduler": "constant"},
        "output": {"dir": str(root / "run")}}))
    summary = run_train(load_recipe(recipe), quiet=True)
    assert summary["final_loss"] < 0.05
    return {"run": root / "run", "base": model, "pairs": pairs, "root": root}


# --- perplexity ---------------------------------------------------------------------------


def test_perplexity_equals_a_direct_transformers_computation(tiny_model_dir, text_data, tmp_path):
    report = _eval(tiny_model_dir, tmp_path, [{"task": "perplexity", "data": str(text_data["val"])}],
                   batch_size=5)
    model, tokenizer = _hf(tiny_model_dir)
    total, count, nbytes = 0.0, 0, 0
    for line in text_data["val"].read_text().splitlines():
        text = json.loads(line)["text"]
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
               tokenizer.eos_token_id]
        tensor = __import__("torch").tensor([ids])
        loss = float(model(input_ids=tensor, labels=tensor).loss)
        total, count, nbytes = total + loss * (len(ids) - 1), count + len(ids) - 1, nbytes + len(text.encode())
    assert _metric(report, "perplexity", "tokens") == count
    assert abs(_metric(report, "perplexity", "loss") - total / count) < 1e-5
    assert math.isclose(_metric(report, "perplexity", "perplexity"), math.exp(total / count),
                        rel_tol=1e-5)
    assert math.isclose(_metric(report, "perplexity", "bits_per_byte"),
                        total / math.log(2) / nbytes, rel_tol=1e-5)
    assert report["models"][0]["tasks"]["perplexity"]["metrics"]["loss"]["n"] == 12


def test_perplexity_scores_only_the_response_of_instruction_rows(tiny_model_dir, tmp_path):
    import torch

    rows = [{"prompt": f"question {i}?", "response": "answer " * (i + 1)} for i in range(5)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    report = _eval(tiny_model_dir, tmp_path, [{"task": "perplexity", "data": str(data),
                                               "format": "instruction"}])
    model, tokenizer = _hf(tiny_model_dir)
    total, count = 0.0, 0
    for row in rows:
        prompt = [tokenizer.bos_token_id, *tokenizer(row["prompt"] + "\n", add_special_tokens=False)["input_ids"]]
        answer = [*tokenizer(row["response"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        total += float(model(input_ids=ids, labels=labels).loss) * len(answer)
        count += len(answer)
    assert _metric(report, "perplexity", "tokens") == count
    assert abs(_metric(report, "perplexity", "loss") - total / count) < 1e-5


def test_long_texts_use_the_strided_sliding_window(tiny_model_dir, tmp_path):
    """The window scheme of transformers' perplexity guide, computed directly."""
    import torch

    text = " ".join(row["text"] for row in make_text_rows(30, seed=3))  # ~1,000 tokens
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "short one"}])
    window, stride = 64, 24
    report = _eval(tiny_model_dir, tmp_path, [{"task": "perplexity", "data": str(data),
                                               "window": window, "stride": stride}])
    model, tokenizer = _hf(tiny_model_dir)
    total, count = 0.0, 0
    for row in (text, "short one"):
        ids = torch.tensor([[tokenizer.bos_token_id,
                             *tokenizer(row, add_special_tokens=False)["input_ids"],
                             tokenizer.eos_token_id]])
        previous_end = 0
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + window, ids.shape[1])
            new = end - previous_end
            piece = ids[:, begin:end]
            labels = piece.clone()
            labels[:, :-new] = -100
            scored = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=piece, labels=labels).loss) * scored
            count += scored
            previous_end = end
            if end == ids.shape[1]:
                break
    assert ids.shape[1] < 20 and count == _metric(report, "perplexity", "tokens")
    assert abs(_metric(report, "perplexity", "loss") - total / count) < 1e-5
    # A window longer than every text is the plain computation: a different number here.
    whole = _eval(tiny_model_dir, tmp_path, [{"task": "perplexity", "data": str(data),
                                              "window": 2048}], name="whole")
    assert _metric(whole, "perplexity", "tokens") == count
    assert abs(_metric(whole, "perplexity", "loss") - _metric(report, "perplexity", "loss")) > 1e-4


def test_sliding_windows_score_every_token_once():
    from peftune.evaluate.perplexity import sliding_windows

    for length, window, stride in [(10, 16, 8), (100, 16, 8), (101, 16, 15), (57, 8, 1)]:
        spans = sliding_windows(length, window, stride)
        scored = [i for begin, end, start in spans for i in range(max(start, begin + 1), end)]
        assert scored == list(range(1, length))
        assert all(end - begin <= window and start > begin or start == 0
                   for begin, end, start in spans)


# --- choice ---------------------------------------------------------------------------------


def test_choice_log_likelihoods_and_both_accuracies(tiny_model_dir, tmp_path):
    import torch

    rows = [{"prompt": "the sky is", "choices": [" blue", " green", " a very long option"],
             "answer": 1},
            {"prompt": "two plus two is", "choices": [" four", " five"], "answer": " five"}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    report = _eval(tiny_model_dir, tmp_path, [{"task": "choice", "data": str(data),
                                               "prompt_template": "{prompt}"}])
    model, tokenizer = _hf(tiny_model_dir)
    predictions = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    expected_correct = 0
    for row, prediction in zip(rows, predictions, strict=True):
        context = [tokenizer.bos_token_id, *tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]]
        direct = []
        for option in row["choices"]:
            ids = torch.tensor([context + tokenizer(option, add_special_tokens=False)["input_ids"]])
            labels = ids.clone()
            labels[0, :len(context)] = -100
            n = ids.shape[1] - len(context)
            direct.append(-float(model(input_ids=ids, labels=labels).loss) * n)
        assert np.allclose(prediction["logprobs"], direct, atol=1e-5)
        assert prediction["prediction"] == int(np.argmax(direct))
        expected_correct += prediction["prediction"] == prediction["answer"]
    assert [p["answer"] for p in predictions] == [1, 1]  # an answer given as its text
    assert _metric(report, "choice", "accuracy") == expected_correct / 2


def test_length_normalised_accuracy_prefers_likely_bytes():
    from peftune.evaluate.choice import ChoiceTask, Prepared, Question
    from peftune.evaluate.common import Located

    # option 0: -2 nats for 1 byte; option 1: -4 nats for 8 bytes (-0.5 per byte)
    examples = [Located(0, "x:1", Question("q", ["a", "bbbbbbbb"], answer=1))]
    prepared = Prepared(examples_=examples, units=[(0, 0), (0, 1)], rows=[], batches=[])
    metrics, predictions = ChoiceTask().summarise(prepared, {0: {"logprob": -2.0},
                                                            1: {"logprob": -4.0}})
    assert metrics["accuracy"]["value"] == 0.0 and metrics["accuracy_norm"]["value"] == 1.0
    assert predictions[0]["prediction"] == 0 and predictions[0]["prediction_norm"] == 1


def test_choice_on_the_memorised_model_knows_the_answers(memorised, tmp_path):
    fruit = [r for _, r in PAIRS]
    rows = [{"prompt": p, "choices": fruit, "answer": i} for i, (p, _) in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    report = _eval(memorised["run"], tmp_path, [{"task": "choice", "data": str(data)}],
                   compare=["base"])
    assert _metric(report, "choice", "accuracy") == 1.0
    assert _metric(report, "choice", "accuracy_norm") == 1.0
    assert _metric(report, "choice", "accuracy", model=1) < 0.5  # chance is 1/6


# --- generate -------------------------------------------------------------------------------


def test_generate_exact_match_after_memorising_and_low_on_the_base(memorised, tmp_path):
    report = _eval(memorised["run"], tmp_path,
                   [{"task": "generate", "data": str(memorised["pairs"]), "max_new_tokens": 10,
                     "metrics": ["exact_match", "contains"], "batch_size": 4}],
                   compare=["base"])
    assert _metric(report, "generate", "exact_match") == 1.0
    assert _metric(report, "generate", "exact_match", model=1) <= 0.2
    assert report["deltas"]["run - base"]["generate"]["exact_match"] >= 0.8
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(PAIRS)  # every prediction of both models
    mine = [x for x in lines if x["model"] == "run"]
    assert [x["prediction"] for x in mine] == [r for _, r in PAIRS]
    assert mine[0]["prompt"] == "red?\n" and mine[0]["location"].endswith("pairs.jsonl:1")
    from transformers import AutoTokenizer  # each answer's length in tokens, and their mean

    tokenizer = AutoTokenizer.from_pretrained(memorised["base"])
    counts = [len(tokenizer(x["prediction"], add_special_tokens=False)["input_ids"]) for x in mine]
    assert [x["answer_tokens"] for x in mine] == counts
    assert _metric(report, "generate", "answer_tokens") == pytest.approx(sum(counts) / len(counts))
    assert (tmp_path / "out" / "metrics.png").stat().st_size > 5000


def test_generation_is_the_same_batched_with_left_padding_and_one_by_one(memorised, tmp_path):
    # prompts of different lengths: a batch of 6 left-pads all but the longest
    task = {"task": "generate", "data": str(memorised["pairs"]), "max_new_tokens": 6}
    _eval(memorised["base"], tmp_path, [{**task, "batch_size": 6}], name="b")
    _eval(memorised["base"], tmp_path, [{**task, "batch_size": 1}], name="s")
    read = lambda name: [json.loads(x)["prediction"] for x in  # noqa: E731
                         (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    assert read("b") == read("s") and any(read("b"))


def test_stop_strings_sampling_and_chat_prompts(memorised, tmp_path):
    stop = _eval(memorised["run"], tmp_path, [{"task": "generate", "data": str(memorised["pairs"]),
                                               "stop": ["an"], "metrics": ["contains"]}], name="stop")
    predictions = [json.loads(x)["prediction"] for x in
                   (tmp_path / "stop" / "predictions.jsonl").read_text().splitlines()]
    assert predictions[:2] == ["apple", "b"]  # "banana" cut at "an"
    assert _metric(stop, "generate", "contains") == 4 / 6  # banana and mango are cut
    sampled = [{"task": "generate", "data": str(memorised["pairs"]), "temperature": 1.5,
                "top_p": 0.9, "seed": 3}]
    _eval(memorised["base"], tmp_path, sampled, name="a")
    _eval(memorised["base"], tmp_path, sampled, name="b")
    greedy = _eval(memorised["base"], tmp_path, [{**sampled[0], "temperature": 0.0}], name="g")
    text = {name: (tmp_path / name / "predictions.jsonl").read_text() for name in "abg"}
    assert text["a"] == text["b"] != text["g"]  # seeded, and really sampled
    assert greedy["config"]["tasks"][0]["temperature"] == 0.0
    chats = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
             for p, r in PAIRS[:2]]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    _eval(memorised["base"], tmp_path, [{"task": "generate", "data": str(data), "format": "chat",
                                         "max_new_tokens": 4}], name="chat")
    line = json.loads((tmp_path / "chat" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["prompt"] == "<|im_start|>user\nred?<|im_end|>\n<|im_start|>assistant\n"
    assert line["reference"] == "apple"


def test_normalisation_and_answer_extraction():
    from peftune.evaluate.generate import extract_answer, normalize, score

    assert normalize("  The Cat, sat!  ", ["lower", "punctuation", "articles", "whitespace",
                                           "strip"]) == "cat sat"
    assert normalize(" A b ", ["strip"]) == "A b"
    pattern = EvalTask(task="generate").answer_regex
    assert extract_answer("so 3 + 4 = 7, and then 1,234 apples", pattern) == "1234"
    assert extract_answer("#### -12.5", pattern) == "-12.5"
    assert extract_answer("no number", pattern) is None
    assert extract_answer("answer: B", r"answer: (\w)") == "B"
    task = EvalTask(task="generate", metrics=["exact_match", "contains", "regex_match"],
                    normalize=["lower", "strip"])
    assert score("The answer is 42.", "42", task) == {"exact_match": False, "contains": True,
                                                     "regex_match": True}
    assert score(" FORTY ", "forty", task)["exact_match"]


def test_eval_task_keys_mirror_the_data_section():
    from typing import get_args

    from peftune.evaluate.perplexity import DATA_KEYS

    for key in DATA_KEYS:
        mine, theirs = EvalTask.model_fields[key], DataSection.model_fields[key]
        if key == "format":  # pairs and kto rows are not text to score: task preference's
            assert set(get_args(mine.annotation)) == \
                set(get_args(theirs.annotation)) - {"preference", "kto"}
            assert mine.default == theirs.default
            continue
        assert (mine.annotation, mine.default) == (theirs.annotation, theirs.default), key


def test_task_names_are_the_registry():
    from typing import get_args

    from peftune.evaluate.registry import task_names

    assert list(get_args(EvalTask.model_fields["task"].annotation)) == task_names()


def test_models_with_the_same_directory_name_get_unique_labels_and_deltas(tmp_path, text_data):
    """Three `.../merged` directories: three labels, two deltas, one column each."""
    from peftune.models import build_tiny_model

    paths = [build_tiny_model(tmp_path / side / "merged", hidden_size=32, seed=seed)
             for seed, side in enumerate("abc")]
    report = _eval(paths[0], tmp_path, [{"task": "perplexity", "data": str(text_data["val"])}],
                   compare=paths[1:])
    assert [m["label"] for m in report["models"]] == ["merged", "merged-2", "merged-3"]
    assert list(report["deltas"]) == ["merged - merged-2", "merged - merged-3"]
    loss = [_metric(report, "perplexity", "loss", model=i) for i in range(3)]
    delta = report["deltas"]["merged - merged-3"]["perplexity"]["loss"]
    assert delta == pytest.approx(loss[0] - loss[2])
    lines = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert {line["model"] for line in lines} == {"merged", "merged-2", "merged-3"}


def test_generate_answers_prompts_without_a_reference(memorised, tmp_path):
    """Rows with no reference answer are answered and written, not scored; rows with one are
    scored as usual (n counts them only). Chat rows may end with the user's turn."""
    rows = [{"prompt": p} for p, _ in PAIRS[:3]] + [{"prompt": p, "response": r} for p, r in PAIRS[3:]]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    report = _eval(memorised["run"], tmp_path, [{"task": "generate", "data": str(data),
                                                  "max_new_tokens": 10}], compare=["base"])
    metric = report["models"][0]["tasks"]["generate"]["metrics"]["exact_match"]
    assert metric == {"value": 1.0, "n": len(PAIRS) - 3}
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x["model"] == "run"]
    assert [x["prediction"] for x in mine] == [r for _, r in PAIRS]  # the unscored ones too
    assert mine[0]["reference"] is None and "exact_match" not in mine[0]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p, _ in PAIRS])
    only = _eval(memorised["run"], tmp_path, [{"task": "generate", "data": str(prompts),
                                                "max_new_tokens": 10}], name="only",
                 compare=["base"])
    metrics = only["models"][0]["tasks"]["generate"]["metrics"]
    assert set(metrics) == {"answered", "answer_tokens"}
    assert metrics["answered"] == {"value": len(PAIRS), "n": len(PAIRS)}
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    chat = _eval(memorised["base"], tmp_path, [{"task": "generate", "data": str(chats),
                                                 "format": "chat", "max_new_tokens": 4}],
                 name="chat")
    assert chat["models"][0]["tasks"]["generate"]["metrics"]["answered"]["value"] == 1


def test_choice_with_chat_format_renders_the_question_as_the_users_turn(tiny_model_dir,
                                                                        tmp_path):
    """For an instruct model: the question through the chat template up to the assistant's
    turn, each option the assistant's whole answer (its text and <|im_end|>)."""
    from transformers import AutoTokenizer

    from peftune.evaluate.choice import TASK as CHOICE

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "Colour of a lime?", "choices": ["green", "blue"], "answer": 0}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    task = EvalTask(task="choice", data=str(data), format="chat", batch_size=4)
    prepared = CHOICE.prepare(task, tokenizer, key="eval.tasks[0]", context=256)
    ids, labels = prepared.rows[1]
    assert tokenizer.decode(ids.tolist()) == (
        "<|im_start|>user\nColour of a lime?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>")
    assert tokenizer.decode(ids[labels != -100].tolist()) == "blue<|im_end|>"
    report = _eval(tiny_model_dir, tmp_path, [{"task": "choice", "data": str(data),
                                               "format": "chat"}])
    assert report["models"][0]["tasks"]["choice"]["metrics"]["accuracy"]["n"] == 1


def test_a_task_flag_without_task_goes_to_the_tasks_that_read_it(tmp_path):
    """--max-new-tokens with a file of generate and perplexity tasks sets the generate task's
    only; --max-examples (a key every task has) sets both; a flag no task reads is refused."""
    from peftune.evaluate.config import load_eval_config

    path = tmp_path / "eval.yaml"
    path.write_text("eval:\n  tasks:\n    - {task: generate, data: d.jsonl}\n"
                    "    - {task: perplexity, data: d.jsonl}\n")
    config = load_eval_config(path, {"max_new_tokens": 7, "max_examples": 3})
    generate, perplexity = config.tasks
    assert generate.max_new_tokens == 7 and generate.max_examples == 3
    assert perplexity.max_examples == 3 and "max_new_tokens" not in perplexity.model_fields_set
    only_ppl = tmp_path / "ppl.yaml"
    only_ppl.write_text("eval:\n  tasks:\n    - {task: perplexity, data: d.jsonl}\n")
    with pytest.raises(InputError, match="--max-new-tokens: .*only generate tasks do"):
        load_eval_config(only_ppl, {"max_new_tokens": 7})
