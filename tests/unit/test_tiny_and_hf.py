"""The tiny offline model pool (pipeline.tiny) and the in-process transformers backend (pipeline.llm.hf)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere below

import json
import shutil
import time

import pytest
import torch

from pipeline.config import ModelSpec
from pipeline.llm.base import GenRequest
from pipeline.llm.hf import HFBackend
from pipeline.tiny import build_tiny_pool

PRINCIPLE = "Answer honestly and say when you are not sure."


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_tiny_pool(tmp_path_factory.mktemp("tiny") / "models", count=4, seed=0)


@pytest.fixture(scope="module")
def tokenizer(pool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pool[0], local_files_only=True)


def backend(path, **overrides) -> HFBackend:
    fields = {"name": path.name, "backend": "hf", "path": str(path), "batch_size": 8, **overrides}
    return HFBackend(ModelSpec(**fields))


def run(b: HFBackend, requests):
    """Generate; return ({key: GenResult}, {key: reason})."""
    done, failed = {}, {}

    def on_done(req, res):
        assert req.key not in done and req.key not in failed, "reported twice"
        done[req.key] = res

    def on_error(req, reason):
        assert req.key not in done and req.key not in failed, "reported twice"
        failed[req.key] = reason

    b.generate(requests, on_done, on_error)
    assert set(done) | set(failed) == {r.key for r in requests}, "every request reported"
    return done, failed


def user(text, system=None):
    turns = ({"role": "system", "content": system},) if system else ()
    return turns + ({"role": "user", "content": text},)


QUESTIONS = [
    "Hi",
    "What is the capital of France?",
    "Write a short poem about the first snow of the winter, with three verses and a title.",
    "Explain why the sky looks blue during the day and red at sunset, step by step, "
    "for a curious child who has just asked the question at dinner.",
    "How many legs does a spider have?",
]


# --- the pool --------------------------------------------------------------------------------


def test_pool_has_tiny_distinct_models(pool):
    from transformers import AutoModelForCausalLM

    assert [p.name for p in pool] == ["tiny-a", "tiny-b", "tiny-c", "tiny-d"]
    models = [AutoModelForCausalLM.from_pretrained(p, local_files_only=True) for p in pool]
    for model in models:
        cfg = model.config
        assert cfg.hidden_size <= 64 and cfg.num_hidden_layers == 2 and cfg.num_attention_heads == 4
        assert cfg.intermediate_size <= 256 and cfg.max_position_embeddings == 2048
        assert 1000 <= cfg.vocab_size <= 2000
        assert (pool[0].parent / "tiny-a" / "generation_config.json").is_file()
    assert len({m.config.hidden_size for m in models}) > 1, "sizes differ slightly"
    a, c = models[0].model.embed_tokens.weight, models[2].model.embed_tokens.weight
    assert a.shape == c.shape and not torch.equal(a, c), "different seeds, different weights"


def test_pool_build_is_idempotent_and_deterministic(pool, tmp_path):
    weights = pool[0] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_tiny_pool(pool[0].parent, count=4, seed=0)
    assert again == pool and weights.stat().st_mtime_ns == before
    assert time.perf_counter() - start < 5  # a manifest check, not a rebuild (generous bound)
    manifest = json.loads((pool[0].parent / "tiny_pool.json").read_text())
    assert manifest["count"] == 4 and manifest["seed"] == 0
    # a fresh build with the same seed gives the same bytes; another count rebuilds
    other = build_tiny_pool(tmp_path / "pool", count=2, seed=0)
    assert [p.name for p in other] == ["tiny-a", "tiny-b"]
    assert (other[0] / "model.safetensors").read_bytes() == weights.read_bytes()
    assert (other[0] / "tokenizer.json").read_text() == (pool[0] / "tokenizer.json").read_text()


def test_tokenizer_round_trips_text(tokenizer):
    for text in ["The river runs past the old mill.", "def f(x):\n    return x * 2", "Überraschung! 3.14 😀"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    # a ChatML marker is one token, not spelled out in bytes
    assert len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_generation_prompt_and_tags(tokenizer):
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]
    assert "{% generation %}" in tokenizer.chat_template and "{% endgeneration %}" in tokenizer.chat_template
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    assert full == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert not tokenizer.apply_chat_template(chat[:2], tokenize=False).endswith("assistant\n")
    # the generation tags mark exactly the assistant's answer and its end-of-turn token
    enc = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "Hello!<|im_end|>"


def test_last_model_rejects_system_role_and_backend_folds_it(pool):
    from transformers import AutoTokenizer

    last = AutoTokenizer.from_pretrained(pool[-1], local_files_only=True)
    with pytest.raises(Exception, match="System role not supported"):
        last.apply_chat_template(list(user("Hi", system=PRINCIPLE)), tokenize=False)

    folded = backend(pool[-1]).render(user("What is rain?", system=PRINCIPLE))  # system_role auto
    assert "<|im_start|>system" not in folded
    assert f"<|im_start|>user\n{PRINCIPLE}\n\nWhat is rain?<|im_end|>" in folded
    assert folded.endswith("<|im_start|>assistant\n")

    kept = backend(pool[0]).render(user("What is rain?", system=PRINCIPLE))  # accepts a system turn
    assert f"<|im_start|>system\n{PRINCIPLE}<|im_end|>\n<|im_start|>user\nWhat is rain?" in kept
    forced = backend(pool[0], system_role="fold").render(user("What is rain?", system=PRINCIPLE))
    assert f"<|im_start|>user\n{PRINCIPLE}\n\nWhat is rain?" in forced

    # forcing a system turn on a template that refuses it fails that request, not the call
    done, failed = run(backend(pool[-1], system_role="system"),
                       [GenRequest("k", user("Hi", system=PRINCIPLE), {"temperature": 0, "max_new_tokens": 2})])
    assert not done and "System role not supported" in failed["k"]


def test_auto_folds_when_the_template_silently_drops_the_system_turn(pool, tmp_path):
    copy = tmp_path / "tiny-quiet"
    shutil.copytree(pool[0], copy)
    template = (copy / "chat_template.jinja").read_text()
    # skip system turns without a word, as some real templates do
    (copy / "chat_template.jinja").write_text(template.replace(
        "{%- for message in messages -%}", "{%- for message in messages if message['role'] != 'system' -%}", 1))
    rendered = backend(copy).render(user("What is rain?", system=PRINCIPLE))
    assert f"<|im_start|>user\n{PRINCIPLE}\n\nWhat is rain?" in rendered
    assert backend(copy, system_role="system").render(user("What is rain?", system=PRINCIPLE)).count(PRINCIPLE) == 0


def test_missing_or_non_model_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        backend(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="config.json"):
        backend(tmp_path)


def test_identity(pool):
    assert backend(pool[0]).identity() == {"backend": "hf", "model": "tiny-a", "path": str(pool[0])}


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1], ids=["llama", "qwen2"])
def test_left_padded_batch_matches_one_at_a_time(pool, index):
    params = {"temperature": 0, "max_new_tokens": 16}
    requests = [GenRequest(f"q{i}", user(q, system=PRINCIPLE), params) for i, q in enumerate(QUESTIONS)]
    batched, failed = run(backend(pool[index], batch_size=8), requests)
    assert not failed
    alone, _ = run(backend(pool[index], batch_size=1), requests)
    lengths = {r.prompt_tokens for r in batched.values()}
    assert len(lengths) == len(QUESTIONS), "prompts of different lengths, so the batch is padded"
    assert any(r.text for r in batched.values()), "greedy output is not all empty"
    assert batched == alone


def test_seeded_sampling_is_reproducible(pool):
    b = backend(pool[0])

    def sample(seed):
        done, _ = run(b, [GenRequest("s", user("Tell me a story."),
                                     {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 24, "seed": seed})])
        return done["s"].text

    first = sample(1)
    assert first and sample(1) == first
    assert sample(2) != first


def test_failing_batch_reports_on_error_and_others_still_run(pool):
    good = {"temperature": 0, "max_new_tokens": 4}
    requests = [GenRequest("ok1", user("Hi"), good), GenRequest("bad", user("Hi"), {"temperature": 1.0, "top_p": -0.5}),
                GenRequest("ok2", user("What is rain?"), good)]
    done, failed = run(backend(pool[0]), requests)
    assert set(done) == {"ok1", "ok2"} and set(failed) == {"bad"}
    assert "top_p" in failed["bad"] and "\n" not in failed["bad"]


def test_finish_reason_and_token_counts(pool):
    b = backend(pool[1])
    requests = [GenRequest("five", user("Hi"), {"temperature": 1.0, "max_new_tokens": 5, "seed": 0, "ignore_eos": True}),
                GenRequest("nine", user("Hi there"), {"temperature": 1.0, "max_new_tokens": 9, "seed": 0, "ignore_eos": True})]
    done, _ = run(b, requests)  # two parameter sets in one call: two generate() calls
    assert (done["five"].completion_tokens, done["five"].finish_reason) == (5, "length")
    assert (done["nine"].completion_tokens, done["nine"].finish_reason) == (9, "length")
    tok = b._tokenizer
    rendered = b.render(user("Hi"))
    assert done["five"].prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    # without ignore_eos: "length" exactly when no eos came within the budget
    sampled = [GenRequest(f"s{i}", user("Hi"), {"temperature": 1.0, "max_new_tokens": 6, "seed": i}) for i in range(8)]
    for result in run(b, sampled)[0].values():
        assert result.finish_reason in ("stop", "length") and 1 <= result.completion_tokens <= 6
        if result.finish_reason == "length":
            assert result.completion_tokens == 6


def test_no_repeat_ngram_size_reaches_generate(pool):
    b = backend(pool[0])
    b._load()
    seen = []
    generate = b._model.generate

    def spy(**kwargs):
        seen.append(kwargs.get("no_repeat_ngram_size"))
        return generate(**kwargs)

    b._model.generate = spy
    params = {"temperature": 0.0, "max_new_tokens": 8}
    run(b, [GenRequest("plain", user("Hi"), params),
            GenRequest("guarded", user("Hi"), {**params, "no_repeat_ngram_size": 2})])
    assert sorted(seen, key=str) == [2, None]  # two parameter sets, two generate() calls


def test_each_batch_reported_before_the_next_runs(pool):
    b = backend(pool[0], batch_size=2)
    b._load()
    events = []
    real = b._model.generate

    def counting_generate(*args, **kwargs):
        events.append("generate")
        return real(*args, **kwargs)

    b._model.generate = counting_generate
    requests = [GenRequest(f"r{i}", user(q), {"temperature": 0, "max_new_tokens": 2}) for i, q in enumerate(QUESTIONS[:4])]
    b.generate(requests, lambda req, res: events.append("done"), lambda req, reason: events.append("error"))
    assert events == ["generate", "done", "done", "generate", "done", "done"]


def test_close_frees_and_generate_reloads(pool):
    b = backend(pool[0])
    run(b, [GenRequest("a", user("Hi"), {"temperature": 0, "max_new_tokens": 2})])
    assert b._model is not None
    b.close()
    assert b._model is None
    done, _ = run(b, [GenRequest("a", user("Hi"), {"temperature": 0, "max_new_tokens": 2})])
    assert done["a"].completion_tokens >= 1
    b.close()
