"""In-process generation with a local transformers model (`backend: hf` in a generation pool).

`HFBackend(spec)` follows `pipeline.llm.base.Backend`. The model loads on the first `generate`
and stays until `close()`: the generate stage keeps one model in memory at a time.

How requests run:
- Prompts are rendered with the model's own chat template (`add_generation_prompt=True`) and
  tokenised without extra special tokens (the template already holds them).
- The principle (a system turn) goes where `spec.system_role` says: "system" keeps the turn,
  "fold" drops it and puts its text before the first user turn's text (a blank line between),
  "auto" keeps it when the template both accepts and shows a system turn, and folds otherwise
  (Gemma-like templates raise; some silently drop it). The decision is made once per backend.
- Requests with the same sampling parameters are batched, `spec.batch_size` per
  `model.generate` call, sorted by prompt length so a batch pads little; padding is on the
  LEFT, so every row's new tokens start at the same column. Results are still reported per
  request, each batch's as soon as that batch is done.

Request params (all optional):
- `temperature` (default 1.0; 0 = greedy), `top_p` (default 1.0), `max_new_tokens`
  (default 256), `top_k` (default 0 = off, whatever the model's generation_config says, so the
  params in the request key are the whole sampling story);
- `seed`: `torch.manual_seed(seed)` before each batch, with the seed of the batch's FIRST
  request. Sampled texts are therefore reproducible for the same batch composition (same
  requests, same batch size), not per request independent of its neighbours;
- `ignore_eos` (default False): never stop at eos, always produce `max_new_tokens` tokens
  (`min_new_tokens = max_new_tokens`). Meant for benchmarks, which need a fixed amount of work.

A batch that raises (a bad parameter, out of memory) reports `on_error(request, reason)` for
each of its requests and the next batch runs; an exception from `on_done`/`on_error` itself
(say the ledger cannot write) propagates, because losing results silently is worse.
"""

from __future__ import annotations

import gc
import logging
from itertools import groupby
from pathlib import Path
from typing import Sequence

from pipeline.llm.base import GenRequest, GenResult, OnDone, OnError

log = logging.getLogger(__name__)

_PROBE_SYSTEM = "zq-probe-system-text"  # unlikely in any template, so finding it means "shown"
_PROBE_USER = "zq-probe-user-text"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fold_system(messages: Sequence[dict]) -> list[dict]:
    """Drop system turns; put their text in front of the first user turn's text."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m.get("content"))
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return [{"role": "user", "content": system}] + rest  # no user turn at all: the principle is one


def _sampling_key(params: dict) -> tuple:
    """The params that must be equal within one generate() call (the seed may differ)."""
    return tuple(sorted((k, repr(v)) for k, v in params.items() if k != "seed"))


class HFBackend:
    def __init__(self, spec):
        self.spec = spec
        if spec.path is not None and not isinstance(spec.path, str):
            raise ValueError(f"model {spec.name!r}: path {spec.path!r} names a stage; resolve it first "
                             "(pipeline.runs.resolve_model_paths, which the launcher calls)")
        path = Path(spec.path or "")
        if not path.is_dir():
            raise ValueError(f"model {spec.name!r}: path {str(path)!r} is not a folder")
        if not (path / "config.json").is_file():
            raise ValueError(f"model {spec.name!r}: {str(path)!r} has no config.json (not a transformers model folder)")
        self.path = path
        self._model = None
        self._tokenizer = None
        self._device = None
        self._fold: bool | None = None if spec.system_role == "auto" else spec.system_role == "fold"

    def identity(self) -> dict:
        return {"backend": "hf", "model": self.spec.name, "path": self.spec.path}

    # --- loading ---------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        tokenizer.padding_side = "left"  # new tokens of every row start at the same column
        if tokenizer.pad_token is None:
            # Only fills the pad positions, which the attention mask hides.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"model {self.spec.name!r}: the tokenizer has no pad, eos or unk token")
        if not tokenizer.chat_template:
            raise ValueError(f"model {self.spec.name!r}: the tokenizer at {str(self.path)!r} has no chat template")
        model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=getattr(torch, self.spec.dtype), local_files_only=True
        )
        model.to(device).eval()
        self._tokenizer, self._model, self._device = tokenizer, model, device
        log.info("loaded %s from %s on %s (%s)", self.spec.name, self.path, device, self.spec.dtype)

    def close(self) -> None:
        if self._model is None:
            return
        on_cuda = str(self._device).startswith("cuda")
        self._model = self._tokenizer = None
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    # --- prompts ---------------------------------------------------------------------------

    def _template_shows_system(self) -> bool:
        probe = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
        try:
            text = self._tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja raise_exception (TemplateError) or a template bug: fold
            return False
        return _PROBE_SYSTEM in text

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text for `messages`, principle placed per `spec.system_role`."""
        self._load()
        messages = [dict(m) for m in messages]
        if any(m["role"] == "system" for m in messages):
            if self._fold is None:
                self._fold = not self._template_shows_system()
                log.info("%s: system turn %s", self.spec.name, "folded into the user turn" if self._fold else "kept")
            if self._fold:
                messages = _fold_system(messages)
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenRequest], on_done: OnDone, on_error: OnError) -> None:
        if not requests:
            return  # nothing left to do (all in the ledger): do not load a model for it
        self._load()
        tok = self._tokenizer
        rendered: list[tuple[GenRequest, list[int]]] = []
        for req in requests:
            try:
                ids = tok(self.render(req.messages), add_special_tokens=False)["input_ids"]
            except Exception as err:  # one bad conversation must not sink the others
                on_error(req, _one_line(err))
                continue
            rendered.append((req, ids))

        # Group by sampling params (one generate() call takes one set), then by length.
        rendered.sort(key=lambda item: (_sampling_key(item[0].params), len(item[1])))
        size = self.spec.batch_size
        for _, group in groupby(rendered, key=lambda item: _sampling_key(item[0].params)):
            group = list(group)
            for start in range(0, len(group), size):
                batch = group[start : start + size]
                try:
                    results = self._generate_batch(batch)
                except Exception as err:
                    reason = _one_line(err)
                    log.warning("%s: batch of %d failed: %s", self.spec.name, len(batch), reason)
                    for req, _ in batch:
                        on_error(req, reason)
                    continue
                for (req, _), result in zip(batch, results):
                    on_done(req, result)

    def _eos_ids(self) -> list[int]:
        """The ids generate() stops at; passed to it explicitly so both sides agree."""
        ids = self._model.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
        if not ids and self._tokenizer.eos_token_id is not None:
            ids = [self._tokenizer.eos_token_id]
        return ids

    def _generate_batch(self, batch: list[tuple[GenRequest, list[int]]]) -> list[GenResult]:
        import torch

        tok, model = self._tokenizer, self._model
        params = batch[0][0].params  # equal across the batch (grouped), except the seed
        max_new = int(params.get("max_new_tokens", 256))
        temperature = float(params.get("temperature", 1.0))
        eos = self._eos_ids()
        kwargs: dict = {"max_new_tokens": max_new, "pad_token_id": tok.pad_token_id, "eos_token_id": eos or None}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(params.get("top_p", 1.0)),
                          top_k=int(params.get("top_k", 0)))
        else:
            # Explicit Nones: a model's generation_config sampling defaults must not leak in.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_new
        if params.get("no_repeat_ngram_size"):  # greedy decoding of a small model can loop
            kwargs["no_repeat_ngram_size"] = int(params["no_repeat_ngram_size"])
        seed = params.get("seed")
        if seed is not None:
            torch.manual_seed(int(seed))

        # Left padding by hand: pad ids in front, masked out; generate() derives position ids
        # from the mask, so a padded row computes what it would alone.
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(ids)) + ids for _, ids in batch],
                                 device=self._device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch],
                                      device=self._device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new = out[:, width:].tolist()

        eos = set(eos)
        results = []
        for row, (_, ids) in zip(new, batch):
            stop_at = next((i for i, t in enumerate(row) if t in eos), None)
            if stop_at is None:
                produced, finish = row, "length"
            else:
                # Count the eos the model emitted; what follows it is fill from finished rows.
                produced, finish = row[: stop_at + 1], "stop"
            text = tok.decode(produced, skip_special_tokens=True).strip()
            results.append(GenResult(text=text, prompt_tokens=len(ids), completion_tokens=len(produced),
                                     finish_reason=finish))
        return results
