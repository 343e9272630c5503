"""Shared pieces of the R-Tuning stages (`rtuning-probe`, `rtuning-data`, `rtuning-eval`).

Prompt shapes (all through the model's own chat template):
- a question turn: the user asks `question_text(item)` (context first when the item has one; for
  multiple choice the choices follow, lettered "A. ...", and the model is asked for the letter);
- the assistant answers: open QA free text (cut at the first period), multiple choice the letter
  alone ("B"), so the letter is the FIRST token of the assistant turn. The letter ids are found by
  tokenising the rendered prompt plus each letter and taking the first new token (no leading
  space: in a ChatML-like template the turn starts right after a newline); they must differ;
- the probe: a second user turn, `PROBE_QUESTION`, answered "I am sure" or "I am unsure". At
  evaluation the assistant turn is opened and pre-filled with "I am"; p_sure compares the
  next-token probabilities of the first sub-token of " sure" and of " unsure" (found the same
  way, by tokenising prompt + "I am" + word; a ConfigError when they do not differ).
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Sequence

from pipeline.config import ConfigError
from pipeline.records import check_qa_rows, split_rows

PROBE_QUESTION = ("Was your last answer based on knowledge you actually have? "
                  "Reply with 'I am sure' or 'I am unsure'.")
SURE, UNSURE, SURE_PREFIX = "I am sure", "I am unsure", "I am"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_INSTRUCTION = "Reply with the letter of the right option only."

# R-Tuning-R: answers of uncertain questions become one of these (seeded choice per question).
REFUSALS = (
    "I don't know the answer to this.",
    "I am not able to answer that reliably.",
    "Sorry, I don't have the knowledge to answer this question.",
    "I can't answer this with any confidence.",
    "That is beyond what I know, so I won't guess.",
)


# --- items -------------------------------------------------------------------------------------


def question_text(item: dict) -> str:
    parts = []
    if item.get("context"):
        parts.append(item["context"].strip())
    parts.append(item["question"].strip())
    if item["kind"] == "choice":
        parts.append("\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])))
        parts.append(CHOICE_INSTRUCTION)
    return "\n\n".join(parts)


def gold_answer(item: dict) -> str:
    """What the training data puts in the answer turn: the letter, or the first gold string."""
    if item["kind"] == "choice":
        return LETTERS[item["answer_index"]]
    return item["answers"][0].strip()


def cut_answer(text: str) -> str:
    """The answer up to (not including) its first period, stripped."""
    return text.split(".", 1)[0].strip()


def is_correct(item: dict, answer: str) -> bool:
    if item["kind"] == "choice":
        return answer.strip()[:1] == LETTERS[item["answer_index"]]
    if item["kind"] == "unanswerable":
        return False
    low = answer.lower()
    return any(g.strip() and g.strip().lower() in low for g in item["answers"])


def normalise(answer: str) -> str:
    """For counting equal answers (R-Tuning-U): cut, lower-case, no punctuation, single spaces."""
    text = cut_answer(answer).lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def entropy(answers: Sequence[str]) -> float:
    """Entropy (nats) of the frequencies of the normalised answers."""
    counts: dict[str, int] = {}
    for a in answers:
        key = normalise(a)
        counts[key] = counts.get(key, 0) + 1
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def check_item(item: dict, where: str) -> None:
    """ConfigError naming `where` (key, split, row, qid) when an item cannot be asked or scored."""
    label = f"{where}: item {item.get('qid', '?')[:12]} ({item.get('question', '')[:40]!r})"
    kind = item.get("kind")
    if kind not in ("open", "choice", "unanswerable"):
        raise ConfigError(f"{label}: kind {kind!r} is not open, choice or unanswerable")
    if not str(item.get("question") or "").strip():
        raise ConfigError(f"{label}: empty question")
    if kind == "open" and not any(str(a).strip() for a in item.get("answers") or []):
        raise ConfigError(f"{label}: an open item has no gold answers")
    if kind == "choice":
        choices = item.get("choices") or []
        if len(choices) < 2 or len(choices) > len(LETTERS) or not 0 <= item.get("answer_index", -1) < len(choices):
            raise ConfigError(f"{label}: a choice item needs 2-{len(LETTERS)} choices and answer_index in range")


def load_splits(ref, key: str, splits: Sequence[str], recipe, split_key: str, limit: int | None = None,
                answerable_only: bool = False) -> tuple[dict[str, list[dict]], Path]:
    """{split: rows} from a DatasetDict input, every row checked; nothing is written here."""
    from datasets import Dataset

    from pipeline.hub import open_dataset
    from pipeline.runs import resolve_input

    path = resolve_input(recipe, ref, key)
    try:
        data = open_dataset(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {path} is not a `datasets` folder ({err})") from None
    if isinstance(data, Dataset):
        raise ConfigError(f"{key}: {path} is a single Dataset; a DatasetDict with named splits is needed")
    out = {}
    for name in splits:
        if name not in data:
            raise ConfigError(f"{split_key}: no split {name!r} in {path} (it has: {', '.join(data)})")
        need = {"qid", "kind", "question", "context", "choices", "answer_index", "answers"}
        missing = need - set(data[name].column_names)
        if missing:
            raise ConfigError(f"{key}: split {name!r} of {path} lacks QA columns: {', '.join(sorted(missing))}")
        rows = data[name].to_list()
        if limit:
            rows = rows[:limit]
        if not rows:
            raise ConfigError(f"{split_key}: split {name!r} of {path} is empty")
        check_qa_rows(split_rows(rows, path, name), key)
        for i, row in enumerate(rows):
            check_item(row, f"{key} split {name!r} row {i}")
            if answerable_only and row["kind"] == "unanswerable":
                raise ConfigError(f"{key} split {name!r} row {i}: item {row['qid'][:12]} is unanswerable; "
                                  "the probe needs questions with a gold answer")
        out[name] = rows
    return out, path



# --- the model ---------------------------------------------------------------------------------


def first_new_token(tokenizer, prompt: str, continuation: str) -> int:
    """The first token id that `continuation` adds after `prompt` (prompt's ids must be a prefix)."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(base)] != base or len(full) <= len(base):
        raise ValueError(f"tokenising {continuation!r} after the prompt changes the prompt's tokens; "
                         "cannot read its first sub-token")
    return full[len(base)]


class QAModel:
    """A local causal LM asked questions in batches (left padding, greedy unless sampling)."""

    def __init__(self, path: str | Path, section):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)  # checked by the stage (pipeline.runs.resolve_model)
        self.section = section
        device = section.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        if not tok.chat_template:
            raise ConfigError(f"model: the tokenizer in {self.path} has no chat template")
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        self.tok = tok
        self.model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=getattr(torch, section.dtype),
                                                          local_files_only=True).to(device).eval()
        self.device = device
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        self.eos = set(eos or ([tok.eos_token_id] if tok.eos_token_id is not None else []))
        self._letters: list[int] | None = None
        self._sure: tuple[int, int] | None = None

    # prompts
    def render(self, messages: list[dict], prefill: str = "") -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill

    @staticmethod
    def ask(item: dict) -> list[dict]:
        return [{"role": "user", "content": question_text(item)}]

    @staticmethod
    def probe_chat(item: dict, answer: str) -> list[dict]:
        return QAModel.ask(item) + [{"role": "assistant", "content": answer},
                                    {"role": "user", "content": PROBE_QUESTION}]

    def letter_ids(self, sample_prompt: str) -> list[int]:
        if self._letters is None:
            ids = [first_new_token(self.tok, sample_prompt, letter) for letter in LETTERS]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"model: in the tokenizer of {self.path} two choice letters start with the same "
                                  "token, so the letters cannot be scored apart")
            self._letters = ids
        return self._letters

    def sure_ids(self, sample_prompt: str) -> tuple[int, int]:
        """Ids of the first sub-token of " sure" and " unsure" after a prompt ending in "I am"."""
        if self._sure is None:
            sure = first_new_token(self.tok, sample_prompt, SURE[len(SURE_PREFIX):])
            unsure = first_new_token(self.tok, sample_prompt, UNSURE[len(SURE_PREFIX):])
            if sure == unsure:
                raise ConfigError(f"model: in the tokenizer of {self.path} ' sure' and ' unsure' start with the "
                                  "same token, so p_sure cannot be read")
            self._sure = (sure, unsure)
        return self._sure

    def _batch(self, prompts: Sequence[str]):
        import torch

        enc = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(e) for e in enc)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=self.device)
        return ids, mask

    def _chunks(self, seq: Sequence):
        size = self.section.batch_size
        for start in range(0, len(seq), size):
            yield seq[start:start + size]

    def next_token_probs(self, prompts: Sequence[str]):
        """Softmax over the vocabulary after each prompt: a (len(prompts), vocab) float tensor."""
        import torch

        out = []
        for chunk in self._chunks(list(prompts)):
            ids, mask = self._batch(chunk)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :]
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out)

    def letter_probs(self, items: Sequence[dict]) -> list[list[float]]:
        """Per choice item: probabilities of its letters, renormalised over its own letters."""
        prompts = [self.render(self.ask(it)) for it in items]
        if not prompts:
            return []
        letters = self.letter_ids(prompts[0])
        probs = self.next_token_probs(prompts)
        out = []
        for row, it in zip(probs, items):
            p = row[letters[: len(it["choices"])]]
            out.append((p / p.sum()).tolist())
        return out

    def greedy(self, prompts: Sequence[str]) -> list[tuple[str, float]]:
        """(answer cut at its first period, geometric mean of the kept tokens' probabilities)."""
        import torch

        results = []
        for chunk in self._chunks(list(prompts)):
            ids, mask = self._batch(chunk)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=self.section.max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=self.tok.pad_token_id,
                    eos_token_id=sorted(self.eos) or None, output_logits=True, return_dict_in_generate=True)
            new = out.sequences[:, ids.shape[1]:]
            logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)  # b, t, v
            for r in range(new.shape[0]):
                toks = new[r].tolist()
                kept: list[float] = []
                for t, tid in enumerate(toks):
                    if tid in self.eos:
                        if not kept:  # answered nothing: the confidence is that of stopping
                            kept.append(float(logp[r, t, tid]))
                        break
                    kept.append(float(logp[r, t, tid]))
                    if "." in self.tok.decode(toks[: t + 1], skip_special_tokens=True):
                        break
                text = self.tok.decode([t for t in toks if t not in self.eos], skip_special_tokens=True)
                results.append((cut_answer(text), math.exp(sum(kept) / len(kept)) if kept else 0.0))
        return results

    def answer(self, items: Sequence[dict]) -> list[tuple[str, float]]:
        """Greedy answer and answer confidence per item: letters by argmax (confidence = the max
        letter probability), open and unanswerable items by generation."""
        results: list[tuple[str, float] | None] = [None] * len(items)
        choice = [i for i, it in enumerate(items) if it["kind"] == "choice"]
        other = [i for i, it in enumerate(items) if it["kind"] != "choice"]
        for i, probs in zip(choice, self.letter_probs([items[i] for i in choice])):
            best = max(range(len(probs)), key=probs.__getitem__)
            results[i] = (LETTERS[best], probs[best])
        for i, res in zip(other, self.greedy([self.render(self.ask(items[i])) for i in other])):
            results[i] = res
        return results  # type: ignore[return-value]

    def p_sure(self, items: Sequence[dict], answers: Sequence[str]) -> list[float]:
        """P(sure) / (P(sure) + P(unsure)) after the probe, the assistant turn pre-filled "I am"."""
        prompts = [self.render(self.probe_chat(it, a), prefill=SURE_PREFIX) for it, a in zip(items, answers)]
        if not prompts:
            return []
        sure, unsure = self.sure_ids(prompts[0])
        probs = self.next_token_probs(prompts)
        return [float(row[sure] / (row[sure] + row[unsure])) for row in probs]

    def sample(self, items: Sequence[dict], k: int, temperature: float, seed: int) -> list[list[str]]:
        """k sampled answers per item (letters drawn from the tempered letter distribution)."""
        import torch

        out: list[list[str] | None] = [None] * len(items)
        gen = torch.Generator().manual_seed(seed)
        choice = [i for i, it in enumerate(items) if it["kind"] == "choice"]
        if choice:
            prompts = [self.render(self.ask(items[i])) for i in choice]
            letters = self.letter_ids(prompts[0])
            probs = self.next_token_probs(prompts)
            for i, row in zip(choice, probs):
                logits = torch.log(row[letters[: len(items[i]["choices"])]].clamp_min(1e-30)) / temperature
                draws = torch.multinomial(torch.softmax(logits, -1), k, replacement=True, generator=gen)
                out[i] = [LETTERS[d] for d in draws.tolist()]
        other = [i for i, it in enumerate(items) if it["kind"] != "choice"]
        torch.manual_seed(seed)
        for chunk in self._chunks(other):
            ids, mask = self._batch([self.render(self.ask(items[i])) for i in chunk])
            with torch.inference_mode():
                seqs = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=self.section.max_new_tokens, do_sample=True,
                    temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=k,
                    pad_token_id=self.tok.pad_token_id, eos_token_id=sorted(self.eos) or None)
            texts = self.tok.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True)
            for j, i in enumerate(chunk):
                out[i] = [cut_answer(t) for t in texts[j * k:(j + 1) * k]]
        return out  # type: ignore[return-value]

