"""Stage `evaluate`: the standard evaluations of trained policies, side by side.

Reads `policies` (each a local model folder or a stage's model: `{stage: sft}`, `{stage: dpo}`,
`{stage: ppo}`; an entry with `best_of_n` samples n answers per turn from its model and keeps the
one its reward model scores highest) and runs, for every policy:

- **MT-bench-style single-answer grading** (`mtbench`): the policy answers each question of
  `mtbench.questions` (MT-bench's `question.jsonl` shape: `question_id`, `category`, `turns`, and
  `reference` for some) turn by turn, its own first answer in the context of the second question;
  a judge (`mtbench.judge.judge`, any OpenAI-compatible server) grades every answer from 1 to 10
  with our template (pipeline/judge/grade.py; a reference answer is shown when the row has one).
  The grades go through the same judging session as annotate (pipeline.judge.session.JudgeRun):
  every request is keyed by judge model, template version, messages and sampling parameters and
  recorded in `ledger-judge.jsonl` the moment it is answered, an answer without a last line
  `Rating: [[N]]` is asked again with a corrective message (`max_reasks`), and the throttle,
  `prices` and `budget_usd` work as in annotate. A rerun (or `--force`) sends nothing the ledger
  holds; `--retry-failed` sends the failed requests again. The policies' answers are ledgered
  too (`ledger-answers.jsonl`: model, version, messages, sampling parameters), so a rerun asks the
  judge about the very same answers. Greedy by default (`mtbench.temperature: 0`).
- **TruthfulQA MC1** (`truthfulqa`): for each question the policy's log-likelihood of every
  choice (the sum over the choice's tokens, after the question in the policy's chat template, or
  after "Q: ...\\nA:" with `prompt: qa`); MC1 = the share of questions whose correct choice is the
  most likely. Rows: BIG-bench's `truthful_qa/task_mc.json` (`make real-data` caches it), JSONL
  rows of that shape (`input`, `target_scores` with exactly one 1), or HF truthful_qa's
  `multiple_choice` shape (`question`, `mc1_targets: {choices, labels}`). Not defined for a
  best-of-n entry (it changes which sample is kept, not the model's likelihoods): shown as "-".

What the numbers mean: the MT-bench mean is the judge's mean grade (1-10) over the graded
answers, per turn and overall, with its standard error; it is only as good as the judge (the
stand-in's grades are a fixed rule on surface features, not a model's judgement, and say so). MC1
is an accuracy against chance = the mean of 1/(number of choices), with its binomial standard
error; on 12 sample questions one question moves it by 0.08.

Outputs: `summary.json` (per policy: MT-bench means per turn, per category, graded / failed
counts; MC1, items, chance; the judge's requests, tokens and cost), `answers.jsonl` (every answer
with its grade and the judge's raw verdict), `truthfulqa.jsonl` (per policy and question: the
choices' log-likelihoods and the pick), `failures.jsonl`, `report/table.md` (the table printed at
the end), `report/evaluate.png`, `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelRef,
    ModelSpec,
    PriceSpec,
    RunSection,
    Strict,
    check_judge_section,
    local_paths,
)
from pipeline.judge.grade import GRADE_VERSION, grade_messages, parse_grade
from pipeline.judge.session import Item, JudgeRun, ledger_tokens, spent_so_far
from pipeline.ledger import Ledger, request_key
from pipeline.llm.base import GenRequest, ledgered_generate
from pipeline.records import jsonl_rows, saved_rows
from pipeline.report import figure
from pipeline.runs import (
    RunOptions,
    StageFailed,
    atomic_write_text,
    clear_done,
    mark_done,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)


class BestOfNSpec(Strict):
    n: int = Field(ge=2, description="Samples per turn; the reward model keeps the best")
    reward_model: ModelRef | str = Field(description="A reward model folder or stage ({stage: reward})")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class PolicySpec(Strict):
    name: str = Field(description="The policy's label in the table (sft, dpo, ppo, best-of-4, ...)")
    model: ModelRef | str = Field(description="A model folder or a stage's model ({stage: dpo})")
    best_of_n: BestOfNSpec | None = Field(None, description="Sample n answers per turn, keep the reward model's pick")
    batch_size: int = Field(8, ge=1, description="Sequences per generate() / forward call")


class GradeJudgeSection(Strict):
    """The judge and its spending controls; pipeline.judge.session reads these as annotate's."""

    judge: ModelSpec = Field(description="The judge: an `openai`-backend model")
    temperature: float = Field(0.0, ge=0, le=2)
    max_new_tokens: int = Field(512, ge=16, description="Tokens for the justification and the grade")
    max_reasks: int = Field(2, ge=0, description="Re-asks (with a corrective message) after an unusable answer")
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly once this much is spent")
    prices: dict[str, PriceSpec] = Field(default_factory=dict, description="Judge model id -> price")
    seed: int = Field(0, description="Recorded with each judge request (grades show one answer: nothing to shuffle)")

    @model_validator(mode="after")
    def _judge_is_remote(self) -> "GradeJudgeSection":
        check_judge_section(self, "this section")
        return self

    @property
    def judge_model(self) -> str:
        return self.judge.model or self.judge.name

    @property
    def price(self) -> PriceSpec | None:
        return self.prices.get(self.judge_model)


class MtBenchSection(Strict):
    questions: str = Field(description="MT-bench question.jsonl rows (data/cache/public/mtbench/question.jsonl "
                           "after `make real-data`; data/samples/eval/mt_bench.jsonl is a small sample)")
    max_questions: int | None = Field(None, ge=1, description="The first N questions only")
    turns: int = Field(2, ge=1, le=2, description="1: first turns only; 2: the follow-up too (MT-bench)")
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0, description="Policies' decoding; 0 = greedy (best-of-n entries sample)")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    judge: GradeJudgeSection


class TruthfulQASection(Strict):
    items: str = Field(description="BIG-bench truthful_qa/task_mc.json, or JSONL rows {input, target_scores} "
                       "or {question, mc1_targets}")
    max_items: int | None = Field(None, ge=1)
    prompt: Literal["chat", "qa"] = Field("chat", description="chat: the question as a user turn in the policy's "
                                          "chat template, the choice as its answer; qa: 'Q: ...\\nA: choice'")


class Recipe(Strict):
    stage: Literal["evaluate"]
    run: RunSection
    policies: list[PolicySpec] = Field(min_length=1)
    mtbench: MtBenchSection | None = None
    truthfulqa: TruthfulQASection | None = None
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _something_to_do(self) -> "Recipe":
        if self.mtbench is None and self.truthfulqa is None:
            raise ValueError("give `mtbench`, `truthfulqa` or both")
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            raise ValueError("policies: two policies share a name")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        named = {}
        for i, p in enumerate(self.policies):
            named[f"policies[{i}].model"] = p.model
            if p.best_of_n is not None:
                named[f"policies[{i}].best_of_n.reward_model"] = p.best_of_n.reward_model
        if self.mtbench is not None:
            named["mtbench.questions"] = self.mtbench.questions
        if self.truthfulqa is not None:
            named["truthfulqa.items"] = self.truthfulqa.items
        return local_paths(**named)


ANSWERS_VERSION = "evaluate-answers-v1"  # bump when the way answers are asked changes
LEDGER_ANSWERS = "ledger-answers.jsonl"
LEDGER_JUDGE = "ledger-judge.jsonl"
FAILURES = "failures.jsonl"
REPORT = "report"
PLOT = "evaluate.png"


# ---------------------------------------------------------------- inputs


def load_questions(path: str, limit: int | None, turns: int) -> list[dict]:
    """MT-bench rows: {question_id, category, turns[...], reference[...]?}; ConfigError naming file:line."""
    out, seen = [], set()
    for where, row in saved_rows(Path(path)):
        qid, category, texts = row.get("question_id"), row.get("category", ""), row.get("turns")
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise ConfigError(f"mtbench.questions: {where}: `question_id` must be a number or a string")
        if str(qid) in seen:
            raise ConfigError(f"mtbench.questions: {where}: question_id {qid!r} appears twice")
        if not isinstance(texts, list) or len(texts) < turns or not all(isinstance(t, str) and t.strip()
                                                                          for t in texts[:turns]):
            raise ConfigError(f"mtbench.questions: {where}: `turns` must hold at least {turns} non-empty string(s)")
        reference = row.get("reference") or []
        if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
            raise ConfigError(f"mtbench.questions: {where}: `reference` must be a list of strings")
        if not isinstance(category, str):
            raise ConfigError(f"mtbench.questions: {where}: `category` must be a string")
        seen.add(str(qid))
        out.append({"question_id": str(qid), "category": category or "-", "turns": texts[:turns],
                    "reference": [reference[t] if t < len(reference) else None for t in range(turns)]})
    if not out:
        raise ConfigError(f"mtbench.questions: {path}: no questions")
    return out[:limit] if limit else out


def _mc_row(row: dict, where: str) -> dict:
    if "target_scores" in row:  # BIG-bench: {"input", "target_scores": {choice: 1 or 0}}
        question, scores = row.get("input"), row["target_scores"]
        if not isinstance(scores, dict):
            raise ConfigError(f"truthfulqa.items: {where}: `target_scores` must map each choice to 1 or 0")
        choices, labels = list(scores), list(scores.values())
    elif "mc1_targets" in row:  # HF truthful_qa multiple_choice: {"question", "mc1_targets": {choices, labels}}
        question, targets = row.get("question"), row["mc1_targets"]
        if not isinstance(targets, dict):
            raise ConfigError(f"truthfulqa.items: {where}: `mc1_targets` must hold `choices` and `labels`")
        choices, labels = targets.get("choices"), targets.get("labels")
    else:
        raise ConfigError(f"truthfulqa.items: {where}: neither `target_scores` (BIG-bench) nor `mc1_targets` "
                          f"(HF truthful_qa) (fields: {', '.join(sorted(row))})")
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"truthfulqa.items: {where}: the question is missing or empty")
    if (not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels)
            or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices)
            or not all(v in (0, 1) and not isinstance(v, bool) for v in labels)):
        raise ConfigError(f"truthfulqa.items: {where}: need two or more non-empty choices, each labelled 1 or 0")
    if labels.count(1) != 1:
        raise ConfigError(f"truthfulqa.items: {where}: MC1 needs exactly one correct choice, found {labels.count(1)}")
    return {"question": question.strip(), "choices": choices, "answer_index": labels.index(1)}


def load_mc_items(path: str, limit: int | None) -> list[dict]:
    """TruthfulQA MC1 items {question, choices, answer_index} from any of the shapes in the module doc."""
    file = Path(path)
    rows = None
    if file.suffix == ".json":  # a whole BIG-bench task file is one JSON document with `examples`
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except ValueError:
            doc = None  # JSON lines with a .json name: read below
        if isinstance(doc, dict):
            if not isinstance(doc.get("examples"), list):
                raise ConfigError(f"truthfulqa.items: {file}: a JSON document without an `examples` list")
            rows = [(f"{file}:examples[{i}]", r) for i, r in enumerate(doc["examples"])]
    if rows is None:
        rows = list(jsonl_rows(file) if file.suffix in (".json", ".jsonl") else saved_rows(file))
    items = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"truthfulqa.items: {where}: expected an object")
        items.append(_mc_row(row, where))
    if not items:
        raise ConfigError(f"truthfulqa.items: {file}: no items")
    return items[:limit] if limit else items


# ---------------------------------------------------------------- answers (MT-bench)


def _spec(policy: PolicySpec, path: Path) -> ModelSpec:
    return ModelSpec(name=policy.name, backend="hf", path=str(path), batch_size=policy.batch_size)


def answer_turn(policy: PolicySpec, backend, questions: list[dict], turn: int, history: list[list[dict]],
                cfg: MtBenchSection, ledger: Ledger, scorer=None) -> list[str]:
    """Each question's answer at `turn` (0-based), after `history` (its earlier turns). A best-of-n
    policy samples n answers per question (each its own seeded, ledgered request) and keeps the one
    `scorer` (reward model, tokenizer) rates highest."""
    from pipeline.train import reward_scores

    bon = policy.best_of_n
    n = bon.n if bon else 1
    params = ({"temperature": bon.temperature, "top_p": bon.top_p, "max_new_tokens": cfg.max_new_tokens}
              if bon else {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens})
    seed = bon.seed if bon else cfg.seed
    identity = backend.identity()
    requests = []
    for i, q in enumerate(questions):
        messages = tuple(history[i] + [{"role": "user", "content": q["turns"][turn]}])
        for k in range(n):
            p = {**params, "seed": seed * 1_000_003 + (i * 2 + turn) * n + k}
            requests.append(GenRequest(key=request_key(identity, ANSWERS_VERSION, messages, p), messages=messages,
                                       params=p))
    todo = [r for r in requests if not ledger.is_ok(r.key)]
    if todo:
        ledgered_generate(backend, todo, ledger, f"evaluate {policy.name} turn {turn + 1}", close=False)
    texts = []
    for req in requests:
        result = ledger.result(req.key)
        if result is None:
            reason = (ledger.failure(req.key) or {}).get("reason", "no outcome recorded")
            raise StageFailed(f"evaluate: policy {policy.name!r} could not answer (turn {turn + 1}): {reason}")
        texts.append(result["text"])
    if n == 1:
        return texts
    conversations = [list(req.messages) + [{"role": "assistant", "content": t}] for req, t in zip(requests, texts)]
    rewards = reward_scores(*scorer, conversations, policy.batch_size)
    picked = []
    for i in range(len(questions)):
        block = range(i * n, (i + 1) * n)
        picked.append(texts[max(block, key=rewards.__getitem__)])
    return picked


def policy_answers(policy: PolicySpec, path: Path, questions: list[dict], cfg: MtBenchSection, ledger: Ledger,
                   scorer) -> list[list[str]]:
    """answers[i][turn] for every question, turn by turn (turn 2 sees the policy's own turn-1 answer)."""
    from pipeline.llm.hf import HFBackend

    backend = HFBackend(_spec(policy, path))
    history: list[list[dict]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    try:
        for turn in range(cfg.turns):
            for i, text in enumerate(answer_turn(policy, backend, questions, turn, history, cfg, ledger, scorer)):
                answers[i].append(text)
                history[i] = history[i] + [{"role": "user", "content": questions[i]["turns"][turn]},
                                           {"role": "assistant", "content": text}]
    finally:
        backend.close()
    return answers


# ---------------------------------------------------------------- grades (the judge)


class GradeRequests:
    """The single-answer grade requests, in the shape JudgeRun asks of a request builder."""

    structured = False

    def __init__(self, rows: list[dict], judge: GradeJudgeSection):
        self.rows = rows
        self.judge = judge
        self.identity = {"backend": "openai", "model": judge.judge_model}

    def first(self, item: Item) -> tuple[list[dict], dict]:
        row = self.rows[item.row]
        return (grade_messages(row["conversation"], row["reference"]),
                {"temperature": self.judge.temperature, "max_new_tokens": self.judge.max_new_tokens})

    def key(self, messages: list[dict], params: dict) -> str:
        return request_key(self.identity, GRADE_VERSION, messages, params)

    def parse(self, item: Item, text: str) -> dict:
        return {"grade": parse_grade(text), "verdict": text}

    def order(self, item: Item):
        return None  # one answer per request: nothing is shown in an order


def grade_all(rows: list[dict], cfg: MtBenchSection, path: Path, opts: RunOptions) -> tuple[dict, dict]:
    """Outcomes per row index, and the judge's tally (requests, re-asks, tokens, cost)."""
    from tqdm import tqdm

    items = [Item(r, "grade", completion=rows[r]["turn"]) for r in range(len(rows))]
    judge = cfg.judge
    with Ledger(path / LEDGER_JUDGE) as ledger:
        session = JudgeRun(SimpleNamespace(annotation=judge), rows, ledger, opts.retry_failed,
                           requests=GradeRequests(rows, judge))
        session.spent_before = spent_so_far(ledger, judge.price)
        # Every grade goes through the session: what the ledger holds is replayed (nothing sent),
        # the rest is asked, re-asked when unusable, and recorded as it comes.
        bar = tqdm(total=len(items), desc=f"evaluate: judge {judge.judge_model}", unit="grade", dynamic_ncols=True,
                   mininterval=0.5)
        try:
            outcomes = asyncio.run(session.run_all(items, bar))
        finally:
            bar.close()
        tally = session.tally
        info = {"judge": judge.judge_model, "template": GRADE_VERSION, "grades_planned": len(items),
                "requests_sent_this_run": tally.sent, "replayed_from_ledger": tally.replayed,
                "reasks_this_run": tally.reasks,
                "requests_failed_this_run": tally.failed_requests, "cost_usd_this_run": round(tally.cost_usd, 6),
                "cost_usd_all_runs": round(spent_so_far(ledger, judge.price), 6) if judge.price else None,
                "tokens_all_runs": ledger_tokens(ledger), "stopped_by_budget": session.stopped}
    return {item.row: outcomes[item] for item in items}, info


# ---------------------------------------------------------------- TruthfulQA MC1


def choice_logprobs(path: Path, items: list[dict], prompt: str, batch_size: int) -> list[list[float]]:
    """Sum of log p(choice tokens | question) for every choice of every item."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    seqs = []  # (item, choice, prompt ids, choice ids)
    for i, item in enumerate(items):
        if prompt == "chat":
            if not tok.chat_template:
                raise ConfigError(f"truthfulqa.prompt: chat, but the tokenizer at {path} has no chat template")
            head = tok.apply_chat_template([{"role": "user", "content": item["question"]}], tokenize=False,
                                           add_generation_prompt=True)
            tails = [c.strip() for c in item["choices"]]
        else:
            head, tails = f"Q: {item['question']}\nA:", [" " + c.strip() for c in item["choices"]]
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        if prompt == "qa" and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            head_ids = [tok.bos_token_id] + head_ids
        for k, tail in enumerate(tails):
            seqs.append((i, k, head_ids, tok(tail, add_special_tokens=False)["input_ids"]))
    out = [[0.0] * len(item["choices"]) for item in items]
    order = sorted(range(len(seqs)), key=lambda s: len(seqs[s][2]) + len(seqs[s][3]))
    for start in range(0, len(order), batch_size):
        batch = [seqs[s] for s in order[start:start + batch_size]]
        width = max(len(h) + len(c) for _, _, h, c in batch)
        ids = torch.tensor([h + c + [pad] * (width - len(h) - len(c)) for _, _, h, c in batch], device=device)
        mask = torch.tensor([[1] * (len(h) + len(c)) + [0] * (width - len(h) - len(c)) for _, _, h, c in batch],
                            device=device)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (i, k, h, c) in enumerate(batch):
            positions = torch.arange(len(h) - 1, len(h) + len(c) - 1, device=device)
            out[i][k] = float(logp[row, positions, ids[row, positions + 1]].sum())
    del model
    return out


def mc1(items: list[dict], logprobs: list[list[float]]) -> dict:
    picks = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
    right = [p == item["answer_index"] for p, item in zip(picks, items)]
    acc = sum(right) / len(right)
    return {"mc1": acc, "items": len(items), "correct": sum(right),
            "stderr": math.sqrt(acc * (1 - acc) / len(items)),
            "chance": sum(1 / len(item["choices"]) for item in items) / len(items), "picks": picks}


# ---------------------------------------------------------------- report


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def mtbench_summary(records: list[dict], turns: int) -> dict:
    grades = [r["grade"] for r in records if r["grade"] is not None]
    mean, se = _mean_se(grades)
    by_turn = {str(t + 1): _mean_se([r["grade"] for r in records if r["turn"] == t and r["grade"] is not None])[0]
               for t in range(turns)}
    categories = sorted({r["category"] for r in records})
    by_category = {c: _mean_se([r["grade"] for r in records if r["category"] == c and r["grade"] is not None])[0]
                   for c in categories}
    return {"mean": mean, "stderr": se, "turns": by_turn, "categories": by_category, "graded": len(grades),
            "failed": len(records) - len(grades)}


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_lines(summary: dict, turns: int) -> list[str]:
    head = ["policy", "MT-bench mean (1-10)", *[f"turn {t + 1}" for t in range(turns)], "graded",
            "TruthfulQA MC1", "chance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in summary.items():
        mt, tq = entry.get("mtbench"), entry.get("truthfulqa")
        cells = [name]
        if mt is not None:
            se = f" ± {mt['stderr']:.2f}" if mt["stderr"] is not None else ""
            cells += [_fmt(mt["mean"]) + se, *[_fmt(mt["turns"][str(t + 1)]) for t in range(turns)],
                      f"{mt['graded']}" + (f" ({mt['failed']} failed)" if mt["failed"] else "")]
        else:
            cells += ["-"] * (turns + 2)
        if tq is not None:
            cells += [f"{tq['mc1']:.3f} ± {tq['stderr']:.3f} ({tq['correct']}/{tq['items']})", f"{tq['chance']:.3f}"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_report(summary: dict, out: Path, turns: int, judge_label: str | None) -> Path:
    names = list(summary)
    xs = range(len(names))
    with figure(out, ncols=2, figsize=(11, 4)) as (_, axes):
        ax = axes[0]
        width = 0.8 / max(turns, 1)
        for t in range(turns):
            values = [(summary[n].get("mtbench") or {}).get("turns", {}).get(str(t + 1)) for n in names]
            ax.bar([x + (t - (turns - 1) / 2) * width for x in xs], [math.nan if v is None else v for v in values],
                   width=width, label=f"turn {t + 1}")
        means = [(summary[n].get("mtbench") or {}).get("mean") for n in names]
        ses = [(summary[n].get("mtbench") or {}).get("stderr") for n in names]
        ax.errorbar(list(xs), [math.nan if m is None else m for m in means],
                    yerr=[0 if s is None else s for s in ses], fmt="ko", label="mean ± s.e.")
        ax.set(title=f"MT-bench-style grades ({judge_label or 'no judge'})", ylabel="grade (1-10)", ylim=(0, 10.5))
        ax.set_xticks(list(xs), names)
        ax.legend(fontsize=8)
        ax = axes[1]
        accs = [(summary[n].get("truthfulqa") or {}).get("mc1") for n in names]
        errs = [(summary[n].get("truthfulqa") or {}).get("stderr") for n in names]
        ax.bar(list(xs), [math.nan if a is None else a for a in accs], yerr=[0 if e is None else e for e in errs],
               color="tab:green")
        chance = [(summary[n].get("truthfulqa") or {}).get("chance") for n in names]
        chance = next((c for c in chance if c is not None), None)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
            ax.legend(fontsize=8)
        ax.set(title="TruthfulQA MC1 (most likely choice is the true one)", ylabel="accuracy", ylim=(0, 1))
        ax.set_xticks(list(xs), names)
    return out


# ---------------------------------------------------------------- run


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from pipeline.llm.openai_backend import api_key
    from pipeline.train import load_scorer

    started = time.time()
    # Every input is checked before anything is written, sampled or sent.
    paths = {p.name: resolve_model(recipe, p.model, f"policies[{i}].model") for i, p in enumerate(recipe.policies)}
    rm_paths = {p.name: resolve_model(recipe, p.best_of_n.reward_model, f"policies[{i}].best_of_n.reward_model")
                for i, p in enumerate(recipe.policies) if p.best_of_n is not None}
    mt, tq = recipe.mtbench, recipe.truthfulqa
    questions = load_questions(mt.questions, mt.max_questions, mt.turns) if mt else []
    items = load_mc_items(tq.items, tq.max_items) if tq else []
    if mt:
        api_key(mt.judge.judge, "mtbench.judge.judge")  # ConfigError now, not after the answers
    scorers = {name: load_scorer(p, f"policies[{name}].best_of_n.reward_model") for name, p in rm_paths.items()}

    path = stage_dir(recipe)
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    save_config(path, recipe)
    summary: dict[str, dict] = {p.name: {"model": str(paths[p.name]),
                                         **({"best_of_n": {"n": p.best_of_n.n, "reward_model": str(rm_paths[p.name])}}
                                            if p.best_of_n else {})} for p in recipe.policies}
    result: dict = {"policies": summary}
    failures: list[dict] = []

    if mt:
        rows = []  # one per policy, question and turn: what the judge grades
        with Ledger(path / LEDGER_ANSWERS) as ledger:
            for p in recipe.policies:
                answers = policy_answers(p, paths[p.name], questions, mt, ledger, scorers.get(p.name))
                for q, texts in zip(questions, answers):
                    conversation = []
                    for turn, text in enumerate(texts):
                        conversation = conversation + [{"role": "user", "content": q["turns"][turn]},
                                                       {"role": "assistant", "content": text}]
                        rows.append({"prompt_id": f"{p.name}:{q['question_id']}:{turn + 1}", "policy": p.name,
                                     "question_id": q["question_id"], "category": q["category"], "turn": turn,
                                     "conversation": conversation, "reference": q["reference"][turn]})
        outcomes, judge_info = grade_all(rows, mt, path, opts)
        records = []
        for r, row in enumerate(rows):
            outcome = outcomes[r]
            ok = outcome.status == "ok"
            if not ok:
                failures.append({"policy": row["policy"], "question_id": row["question_id"], "turn": row["turn"] + 1,
                                 "status": outcome.status, "reason": outcome.reason})
            records.append({"policy": row["policy"], "question_id": row["question_id"], "category": row["category"],
                            "turn": row["turn"], "question": row["conversation"][-2]["content"],
                            "answer": row["conversation"][-1]["content"],
                            "grade": outcome.value["grade"] if ok else None,
                            "verdict": outcome.value["verdict"] if ok else None})
        atomic_write_text(path / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
        if judge_info["stopped_by_budget"]:
            raise StageFailed(f"evaluate: the judge's budget_usd ({mt.judge.budget_usd}) is spent; every grade so far "
                              "is in the ledger: raise the budget and run again to continue")
        if failures and len(failures) / len(rows) > mt.judge.max_failure_fraction:
            reasons = Counter(f["reason"] for f in failures).most_common(3)
            raise StageFailed(f"evaluate: {len(failures)} of {len(rows)} grades failed (more than "
                              f"max_failure_fraction={mt.judge.max_failure_fraction}); see {path / FAILURES}; "
                              + "; ".join(f"{n}x {r}" for r, n in reasons) + ". Rerun with --retry-failed.")
        for p in recipe.policies:
            summary[p.name]["mtbench"] = mtbench_summary([r for r in records if r["policy"] == p.name], mt.turns)
        result["mtbench"] = {"questions": len(questions), "turns": mt.turns, "source": mt.questions, **judge_info,
                             "judge_note": ("the stand-in server: grades from a fixed rule on surface features, "
                                            "NOT a model's judgement") if mt.judge.judge_model.startswith("standin")
                             else None}

    if tq:
        lines = []
        for p in recipe.policies:
            if p.best_of_n is not None:
                summary[p.name]["truthfulqa"] = None  # not defined: best-of-n changes the pick, not the likelihoods
                continue
            logprobs = choice_logprobs(paths[p.name], items, tq.prompt, p.batch_size)
            scored = mc1(items, logprobs)
            for item, lp, pick in zip(items, logprobs, scored.pop("picks")):
                lines.append(json.dumps({"policy": p.name, "question": item["question"], "choices": item["choices"],
                                         "answer_index": item["answer_index"], "logprobs": lp, "pick": pick}))
            summary[p.name]["truthfulqa"] = scored
        atomic_write_text(path / "truthfulqa.jsonl", "".join(line + "\n" for line in lines))
        result["truthfulqa"] = {"items": len(items), "prompt": tq.prompt, "source": tq.items}

    turns = mt.turns if mt else 0
    lines = table_lines(summary, turns)
    atomic_write_text(path / REPORT / "table.md", "\n".join(lines) + "\n")
    plot = plot_report(summary, path / REPORT / PLOT, turns, mt.judge.judge_model if mt else None)
    result.update({"report": str(plot), "seconds": round(time.time() - started, 1)})
    write_json(path / "summary.json", result)
    mark_done(path, {"policies": len(recipe.policies), "grade_failures": len(failures)})
    print(f"evaluate: {len(recipe.policies)} policies; MT-bench {len(questions)} questions x {turns} turn(s)"
          + (f", judge {mt.judge.judge_model}" + (" (stand-in: a fixed rule, NOT a model)"
                                                  if result["mtbench"]["judge_note"] else "") if mt else "")
          + f"; TruthfulQA MC1 on {len(items)} questions -> {path}")
    print("\n".join(lines))
    return result
