"""Tiny local chat models for offline demos and tests, built from nothing in a few seconds.

`build_tiny_pool(out_dir, count, seed)` trains a small byte-level BPE tokenizer on a built-in
English corpus (plus the texts of the `TOKENIZER_SAMPLES` files under `data/samples/` when the source
tree has them),
wraps it as a transformers fast tokenizer with a ChatML chat template, and saves `count`
randomly initialised causal LMs (hidden <= 64, 2 layers) as `out_dir/tiny-a`, `tiny-b`, ...
Each folder is a complete `from_pretrained` model: config, weights, tokenizer, generation config.

The models are untrained, so their text is noise; what matters is that every code path a real
model takes (chat template, padding, sampling, training) runs on them. Two deliberate quirks:
- the chat template wraps assistant turns in `{% generation %}` tags, which TRL's
  assistant-only loss needs;
- the LAST model's template refuses a system turn (as Gemma's does), so the code that folds a
  principle into the user turn is exercised by every pool (a pool of one model keeps the
  ordinary template, so the system-turn path is the one it exercises).

A `tiny_pool.json` manifest records what was built; a second call with the same count, seed and
corpus returns at once. Completion markers (`_SUCCESS`) are the caller's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

MANIFEST = "tiny_pool.json"
# Bump when the recipe below changes, so an old pool on disk gets rebuilt instead of reused.
_BUILD_VERSION = 1
_VOCAB_SIZE = 1536
_MAX_POSITIONS = 2048

PAD, BOS, EOS_TEXT, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS_TEXT, IM_START, IM_END]

# ChatML. Assistant content (with its <|im_end|>, which the model must learn to emit) sits
# inside the generation tags so `return_assistant_tokens_mask` marks exactly what it says.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# Same, but like Gemma it has no system role and says so instead of silently dropping it.
_NO_SYSTEM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ raise_exception('System role not supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}" + _CHAT_TEMPLATE
)

# Written for this project. Topics lean towards what the pipeline's prompts, judge outputs and
# QA sets talk about, so the tokenizer learns whole words for them.
_PASSAGES = [
    "The river runs past the old mill and turns east before it reaches the sea.",
    "A good answer is honest about what it does not know and says so plainly.",
    "Please write a short poem about the first snow of the winter.",
    "Explain why the sky looks blue during the day and red at sunset.",
    "The recipe needs two cups of flour, one egg, a pinch of salt and some warm milk.",
    "How many legs does a spider have? A spider has eight legs.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a Python function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "The committee met on Tuesday to review the budget for the next year.",
    "I am not sure about the answer, but I think it is about forty kilometres.",
    "I am sure. The boiling point of water at sea level is 100 degrees Celsius.",
    "Confidence: 7 out of 10. The evidence points one way, but it is thin.",
    "Rating: 4. Rationale: the response follows the instruction and is mostly correct.",
    "Rating: 2. Rationale: the text ignores part of the task and invents a source.",
    "Instruction following, honesty, truthfulness and helpfulness are rated from 1 to 5.",
    "Overall score: 7.5. The critique points out a missing step in the proof.",
    "The model should refuse to answer questions that it cannot answer reliably.",
    "Summarise the following article in three sentences for a busy reader.",
    "Translate the sentence into German: the cat sleeps on the warm stone.",
    "Once upon a time a small robot learned to paint with the colours of the morning.",
    "She opened the window, and the smell of rain filled the quiet kitchen.",
    "Step 1: read the question. Step 2: check the facts. Step 3: write the answer.",
    "Numbers such as 3.14, 2024, 1,000 and -17 appear in many questions.",
    "The train leaves at 9:45 and arrives in the city two hours later.",
    "Which planet is closest to the sun? Mercury is the closest planet to the sun.",
    "A false premise question asks about something that never happened.",
    "Be helpful, stay truthful, and avoid harm when you answer the user.",
    "The teacher asked the students to compare two stories and explain the difference.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The market was busy: apples, pears, bread, cheese and fresh fish were for sale.",
    "Can you help me plan a three day trip to the mountains in early spring?",
    "Thank you for the question. Here is a clear and careful answer.",
    "Let me think step by step before giving the final answer.",
    "The final answer is 42.",
    "Chosen and rejected responses form a preference pair for reward modelling.",
    "A reward model scores a response; a policy is trained to earn higher scores.",
]
_SUBJECTS = ["the student", "a careful writer", "the small dog", "our team", "the old teacher",
             "a young farmer", "the assistant", "every reader", "the engineer", "my neighbour",
             "the doctor", "a curious child", "the city council", "the musician", "the scientist"]
_VERBS = ["explains", "writes", "finds", "checks", "builds", "describes", "remembers", "answers",
          "measures", "reads", "compares", "plans", "paints", "questions", "repairs", "chooses"]
_OBJECTS = ["the long letter", "a simple proof", "the broken bridge", "an honest answer",
            "the morning news", "a new garden", "the difficult question", "the summer festival",
            "a short story", "the map of the island", "the results of the test", "a quiet song",
            "the history of the town", "a list of facts", "the price of bread", "the weather report"]
_TAILS = ["before dinner.", "with great care.", "for the second time.", "in the library.",
          "after a long day.", "without any help.", "because it matters.", "at the end of the week.",
          "near the river.", "during the lesson.", "while it rains.", "as quickly as possible."]


# The sample files the tokenizer learns from, frozen: a new file under data/samples would change
# every tiny model's vocabulary, hence every figure the tiny-model method checks were tuned on
# (adding the real-fact questions moved the R-Tuning check's refusal rate from 0.10 to 0).
TOKENIZER_SAMPLES = (
    "bad/empty.jsonl", "bad/malformed.jsonl", "bad/missing_field.jsonl", "bad/non_string.jsonl",
    "eval/eval_questions.jsonl", "instructions/evol_instruct.jsonl", "instructions/false_qa.jsonl",
    "instructions/flan.jsonl", "instructions/sharegpt.jsonl", "instructions/truthful_qa.jsonl",
    "instructions/ultrachat.jsonl", "preferences/anthropic_hh.jsonl", "preferences/shp.jsonl",
    "preferences/summarize.jsonl", "qa/falseqa.jsonl", "qa/fever.jsonl", "qa/hotpotqa.jsonl", "qa/mmlu.jsonl",
    "qa/nec.jsonl", "qa/pararel.jsonl", "qa/selfaware.jsonl", "qa/wice.jsonl",
)


def _sample_texts(root: Path) -> list[str]:
    """Every string value in the TOKENIZER_SAMPLES files under `root` (data/samples), in a fixed
    order (sorted paths, file order); a missing file is skipped."""
    texts: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            if value.strip():
                texts.append(value)
        elif isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted(root / name for name in TOKENIZER_SAMPLES):
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                walk(json.loads(line))
            except json.JSONDecodeError:
                continue  # a sample file being edited mid-line must not break a build
    return texts


def _corpus() -> list[str]:
    """The tokenizer's training text: deterministic for a given source tree."""
    rng = random.Random(1234)  # fixed: the corpus must not depend on the pool seed
    generated = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(3000)
    ]
    samples_root = Path(__file__).resolve().parent.parent / "data" / "samples"
    samples = _sample_texts(samples_root) if samples_root.is_dir() else []
    return _PASSAGES * 20 + generated + samples


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which the assistant-token mask relies on.
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=IM_END,  # chat models end a turn with <|im_end|>; generation stops there
        pad_token=PAD,  # distinct from eos, so collators that mask padding keep the eos label
        additional_special_tokens=[EOS_TEXT, IM_START],
        model_max_length=_MAX_POSITIONS,
        chat_template=_CHAT_TEMPLATE,
    )


def _model_config(index: int, tokenizer):
    """Slightly different shapes and two architectures, so the pool is not one model four times."""
    from transformers import LlamaConfig, Qwen2Config

    hidden, kv_heads, inter = [(64, 4, 256), (48, 2, 192), (64, 2, 128), (32, 4, 128)][index % 4]
    common = dict(
        vocab_size=len(tokenizer),  # exactly the tokenizer: a sampled id must always decode
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=_MAX_POSITIONS,
        # Untied: with tied embeddings a random model greedily repeats its last input token
        # (here "\n"), so greedy output would be empty after strip and tests could not compare it.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (LlamaConfig if index % 2 == 0 else Qwen2Config)(**common)


def _inputs_digest(texts: list[str]) -> str:
    digest = hashlib.sha256(f"v{_BUILD_VERSION}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace") + b"\0")
    return digest.hexdigest()[:16]


def build_tiny_pool(out_dir: Path, count: int = 4, seed: int = 0) -> list[Path]:
    """Build (or reuse) `count` tiny chat models under `out_dir`; return their folders in order."""
    if not 1 <= count <= 26:
        raise ValueError(f"count must be between 1 and 26, got {count}")
    out_dir = Path(out_dir)
    names = [f"tiny-{chr(ord('a') + i)}" for i in range(count)]
    paths = [out_dir / name for name in names]
    texts = _corpus()
    wanted = {"version": _BUILD_VERSION, "count": count, "seed": seed,
              "corpus": _inputs_digest(texts), "models": names}
    manifest = out_dir / MANIFEST
    try:
        if json.loads(manifest.read_text()) == wanted and all((p / "config.json").is_file() for p in paths):
            return paths
    except (OSError, ValueError):
        pass  # missing or unreadable manifest: build

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # a build interrupted from here on is not mistaken for done
    tokenizer = _train_tokenizer(texts)
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(EOS_TEXT)]
    for index, path in enumerate(paths):
        torch.manual_seed(seed * 1000 + index)  # different weights per model, same for a given seed
        model = AutoModelForCausalLM.from_config(_model_config(index, tokenizer))
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
        )
        model.save_pretrained(path)
        tokenizer.chat_template = _NO_SYSTEM_TEMPLATE if index == count - 1 and count > 1 else _CHAT_TEMPLATE
        tokenizer.save_pretrained(path)
    tokenizer.chat_template = _CHAT_TEMPLATE
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    os.replace(tmp, manifest)
    return paths
