"""`peftune chat`: one answer with --prompt equals greedy `generate` on the template-rendered
ids, history across turns and /reset, --compare base (both answers, each its own history),
--raw, Ctrl-C, and bad input (one line, exit 2). Tiny local models only."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IMPORTTIME, imported_modules, main_in_process, run_cli, write_recipe

from peftune.chat import run_chat
from peftune.errors import InputError

TOKENS = 8  # new tokens per answer: enough to tell answers apart, cheap on CPU


def _cli(*args) -> subprocess.CompletedProcess:
    return run_cli("chat", *args, python_args=IMPORTTIME, env={"HF_HUB_OFFLINE": "1"})


def _lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without `-X importtime`'s lines."""
    return [line for line in result.stderr.splitlines() if not line.startswith("import time:")]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, text_data) -> Path:
    from peftune.recipe import load_recipe
    from peftune.train.run import run_train

    root = tmp_path_factory.mktemp("chat")
    recipe = write_recipe(root / "lora.yaml", model=tiny_model_dir, data=text_data["train"],
                          out=root / "run", train={"max_steps": 6, "lr": 5e-2})
    run_train(load_recipe(recipe), quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, lora_run):
    """Greedy `generate`, outside peftune: the tiny base, and the base + the run's adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(lora_run / "adapter")).eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def greedy(model, ids: list[int], *, stop: list[int] = stops) -> str:
        import torch

        tensor = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor),
                                 do_sample=False, max_new_tokens=TOKENS, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    def chat_ids(messages: list[dict]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return {"tokenizer": tokenizer, "base": base, "tuned": tuned, "greedy": greedy,
            "chat_ids": chat_ids}


def _stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def test_prompt_prints_only_the_greedy_answer(tiny_model_dir, reference, capsys):
    turns = run_chat(target=str(tiny_model_dir), prompt="hello", max_new_tokens=TOKENS)
    ids = reference["chat_ids"]([{"role": "user", "content": "hello"}])
    expected = reference["greedy"](reference["base"], ids)
    (turn,) = turns
    assert turn.prompt_ids == ids and turn.answer == expected and expected
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"  # streamed, and nothing else on stdout
    assert "loading" in captured.err


def test_history_is_kept_across_turns_and_reset_clears_it(tiny_model_dir, reference,
                                                          monkeypatch, capsys):
    _stdin(monkeypatch, "hello\nsecond\n/reset\nthird\n/quit\nnever read\n")
    first, second, third = run_chat(target=str(tiny_model_dir), system="be brief",
                                    max_new_tokens=TOKENS)
    decode = reference["tokenizer"].decode
    assert second.prompt_ids[:len(first.prompt_ids)] == first.prompt_ids
    assert "hello" in decode(second.prompt_ids) and first.answer in decode(second.prompt_ids)
    # what generate saw: the answer is greedy on exactly these ids
    assert second.answer == reference["greedy"](reference["base"], second.prompt_ids)
    assert third.prompt_ids == reference["chat_ids"]([{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "third"}])
    captured = capsys.readouterr()
    assert captured.out == "".join(t.answer + "\n" for t in (first, second, third))
    assert "history cleared" in captured.err


def test_compare_base_prints_both_answers(lora_run, reference, capsys):
    first, second = run_chat(target=str(lora_run), prompt="alpha beta", compare="base",
                             max_new_tokens=TOKENS)
    ids = reference["chat_ids"]([{"role": "user", "content": "alpha beta"}])
    tuned = reference["greedy"](reference["tuned"], ids)
    base = reference["greedy"](reference["base"], ids)
    assert tuned != base  # the adapter changes the answer: the two sides are not one model
    assert (first.side, first.answer, second.side, second.answer) == \
        ("fine-tuned", tuned, "base", base)
    assert capsys.readouterr().out == f"[fine-tuned]\n{tuned}\n[base]\n{base}\n"


def test_compare_base_keeps_a_history_per_side(tiny_model_dir, lora_run, reference,
                                               monkeypatch, capsys):
    _stdin(monkeypatch, "alpha\nbeta\n")
    turns = run_chat(target=str(tiny_model_dir), adapter=str(lora_run / "adapter"),
                     compare="base", max_new_tokens=TOKENS)
    assert [t.side for t in turns] == ["fine-tuned", "base"] * 2
    tuned_2, base_2 = turns[2], turns[3]
    for side, model, earlier in ((tuned_2, "tuned", turns[0]), (base_2, "base", turns[1])):
        assert side.prompt_ids == reference["chat_ids"]([
            {"role": "user", "content": "alpha"}, {"role": "assistant", "content": earlier.answer},
            {"role": "user", "content": "beta"}])
        assert side.answer == reference["greedy"](reference[model], side.prompt_ids)
    assert capsys.readouterr().out.count("[base]\n") == 2


def test_raw_feeds_the_text_as_is_with_the_history_concatenated(tiny_model_dir, reference,
                                                                monkeypatch):
    tokenizer = reference["tokenizer"]
    _stdin(monkeypatch, "alpha beta\ngamma\n")
    first, second = run_chat(target=str(tiny_model_dir), raw=True, max_new_tokens=TOKENS)
    bos = [tokenizer.bos_token_id]
    assert first.prompt_ids == bos + tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    assert first.answer == reference["greedy"](reference["base"], first.prompt_ids,
                                               stop=[tokenizer.eos_token_id])
    assert tokenizer.decode(second.prompt_ids, skip_special_tokens=True) == \
        f"alpha beta{first.answer}\ngamma"


def test_sampling_is_seeded(tiny_model_dir):
    def sample(seed: int) -> str:
        (turn,) = run_chat(target=str(tiny_model_dir), prompt="hello", temperature=1.0,
                           top_p=0.9, seed=seed, max_new_tokens=TOKENS)
        return turn.answer

    assert sample(3) == sample(3) != sample(4)


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_model_dir, monkeypatch, capsys):
    from peftune import chat

    put = chat.Printer.put
    pressed = []

    def interrupted(self, value):  # Ctrl-C after the third new token of the first answer
        put(self, value)
        if len(self.ids) == 3 and not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    monkeypatch.setattr(chat.Printer, "put", interrupted)
    _stdin(monkeypatch, "hello\nagain\n")
    first, second = run_chat(target=str(tiny_model_dir), max_new_tokens=TOKENS)
    assert first.stopped and not second.stopped
    assert first.answer in reference_text(second.prompt_ids, tiny_model_dir)
    assert "(stopped)" in capsys.readouterr().err

    def at_the_prompt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", at_the_prompt)
    with pytest.raises(KeyboardInterrupt):
        run_chat(target=str(tiny_model_dir), max_new_tokens=TOKENS)


def reference_text(ids: list[int], model_dir: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode(ids)


def test_ctrl_c_at_the_prompt_exits_130_with_one_line(monkeypatch, capsys):
    from peftune import chat

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "run_chat", interrupted)
    code, _, err = main_in_process(capsys, "chat", "some-model")
    assert code == 130
    assert err.splitlines() == ["interrupted (SIGINT): peftune chat stopped"]


def test_a_model_without_a_chat_template_is_refused_unless_raw(tiny_model_dir, tmp_path,
                                                                 capsys):
    from peftune.models import build_byte_tokenizer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain,
                    ignore=shutil.ignore_patterns("tokenizer*", "*.jinja", "special_tokens*"))
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    with pytest.raises(InputError) as refused:  # the CLI prints InputError lines, exit 2
        run_chat(target=str(plain), prompt="hi")
    (line,) = refused.value.lines
    assert "no chat template" in line and "--raw" in line
    assert "loading" not in capsys.readouterr().err  # refused before the weights load
    (turn,) = run_chat(target=str(plain), raw=True, prompt="hi", max_new_tokens=2)
    assert turn.prompt_ids[0] == tokenizer.bos_token_id


def _bad_inputs(root: Path, tiny: Path, run: Path) -> list[tuple[list, str]]:
    (root / "empty").mkdir()
    (root / "unfinished").mkdir()
    shutil.copy(run / "recipe.yaml", root / "unfinished" / "recipe.yaml")
    return [
        ([root / "missing-run"], "missing-run: no such directory; give a training run"),
        ([tiny, "--adapter", root / "empty"], "no adapter_config.json, so not a PEFT adapter"),
        ([tiny, "--compare", "base"], "is a model without an adapter, so it has no base"),
        ([tiny, "--compare", "other"], "chat compares with `base` only"),
        ([tiny, "--temperature", "-1"], "--temperature: must be >= 0, got -1"),
        ([tiny, "--top-p", "0"], "--top-p: must be > 0 and <= 1, got 0"),
        ([tiny, "--quant", "int3"], "--quant int3: must be one of none, nf4"),
        ([run, "--adapter", run / "adapter"], "brings its own; give MODEL --adapter DIR"),
        ([root / "unfinished"], "the run has no adapter/ or model/"),
        ([root / "nope.gguf"], "no such model directory or .gguf file"),
    ]


def test_bad_input_is_one_line_exit_2_before_torch(tiny_model_dir, lora_run, tmp_path):
    for args, message in _bad_inputs(tmp_path, tiny_model_dir, lora_run):
        result = _cli(*args, "--prompt", "hi")
        lines = _lines(result)
        assert result.returncode == 2 and result.stdout == "", (args, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
        assert not imported_modules(result.stderr) & {"torch", "transformers", "peft"}, args
