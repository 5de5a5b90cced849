"""`hdee tasks`: downstream tasks with lm-evaluation-harness on every ensemble and every expert.

Each configuration's ensemble (the live `HdeeEnsembleForCausalLM`, as an ensemble spec
describes it: by default the run's evaluation keys with a uniform prior, no routing; any spec
`hdee generate` takes, routing included) and, as baselines, each of its members alone are scored
by
`lm_eval.simple_evaluate` through one adapter, `HdeeLM` (registered with the harness as
"hdee"). Results: `RUN/tasks/results.json` (`TasksResults`), and a table in the report.

Offline tasks: `--tasks builtin` writes two task YAMLs over jsonl files built from the run's
own test text (docs/export.md): `hdee_next_chunk` (which of four chunks of the same domain
follows a context: multiple choice, log-likelihoods) and `hdee_cloze` (generate the next word:
exact match, greedy generation through left-padded batches).

lm-evaluation-harness is an optional dependency (`pip install 'hdee[tasks]'`); this module
imports it only inside the functions that need it.
"""

from __future__ import annotations

import copy
import difflib
import json
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedTokenizerFast

from hdee.atomic import write_text
from hdee.config import UsageError
from hdee.data.tokens import load_tokens
from hdee.ensemble_spec import EnsembleSpec, spec_defaults
from hdee.hf_ensemble import CACHE_ARGUMENT, OUTPUT_CACHE_FIELD
from hdee.layout import RunLayout
from hdee.records import BestSingle, Plan, SystemResult, TasksResults
from hdee.report import tasks_markdown

BUILTIN_TASKS = ("hdee_next_chunk", "hdee_cloze")
MISSING_HARNESS = (
    "hdee tasks needs lm-evaluation-harness: pip install 'hdee[tasks]' "
    "(or pip install 'lm_eval>=0.4.9,<0.5')"
)


def require_harness() -> Any:
    """The `lm_eval` module, or ImportError with the one-line install hint."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(MISSING_HARNESS) from None
    return lm_eval


# ----------------------------------------------------------------------------------------------
# Results


# ----------------------------------------------------------------------------------------------
# Built-in offline tasks from the run's test text


def _documents(run_dir: Path, domain: str, tokenizer: PreTrainedTokenizerFast) -> list[list[str]]:
    """The words of each document of a domain's test split (documents are split at EOS)."""
    tokens = load_tokens(RunLayout.of(run_dir).tokens(domain, "test")).tolist()
    eos = tokenizer.eos_token_id
    documents, current = [], []
    for token in tokens + [eos]:
        if token == eos:
            if current:
                documents.append(tokenizer.decode(current).split())
            current = []
        else:
            current.append(token)
    return [words for words in documents if words]


def builtin_items(
    words_by_document: list[list[str]],
    domain: str,
    items: int,
    seed: int,
    context_words: int = 24,
    chunk_words: int = 6,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(next-chunk items, cloze items) of one domain, deterministic given `seed`.

    Next chunk: the `context_words` words before a position, and four `chunk_words`-word
    chunks: the true next one and three taken elsewhere from the same domain's test text.
    Cloze: the same context, and the word that follows it.
    """
    rng = random.Random(f"{seed}:{domain}")
    positions = [
        (d, p)
        for d, words in enumerate(words_by_document)
        for p in range(min(context_words, 8), len(words) - chunk_words + 1, chunk_words * 2)
    ]
    all_chunks = [
        (d, p)
        for d, words in enumerate(words_by_document)
        for p in range(len(words) - chunk_words + 1)
    ]
    rng.shuffle(positions)
    choice_items, cloze_items = [], []
    for d, p in positions[:items]:
        words = words_by_document[d]
        context = " ".join(words[max(0, p - context_words) : p])
        true = " ".join(words[p : p + chunk_words])
        # Distractors: other chunks of the domain that do not overlap the true one's text.
        candidates = [
            " ".join(words_by_document[e][q : q + chunk_words])
            for e, q in all_chunks
            if e != d or abs(q - p) >= chunk_words
        ]
        distinct = sorted(set(candidates) - {true})
        if len(distinct) < 3:
            continue
        choices = rng.sample(distinct, 3)
        gold = rng.randrange(4)
        choices.insert(gold, true)
        choice_items.append(
            {"domain": domain, "context": context, "choices": choices, "gold": gold}
        )
        cloze_items.append({"domain": domain, "context": context, "target": words[p]})
    return choice_items, cloze_items


def _task_yaml(name: str, data_file: Path, body: dict[str, Any]) -> str:
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "context",
        **body,
        "metadata": {"version": 1.0},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def _round_robin(groups: list[list[dict]]) -> list[dict]:
    """The first item of every group, then every second item, ...: [[a1, a2], [b1]] ->
    [a1, b1, a2]."""
    longest = max((len(group) for group in groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]


def build_builtin_tasks(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    items_per_domain: int = 16,
    seed: int = 0,
) -> Path:
    """Write the built-in tasks (YAML + jsonl) for a run; returns the directory holding them
    (default RUN/tasks/builtin). Every evaluation domain (trained and held out) contributes."""
    layout = RunLayout.of(run_dir)
    out = Path(out_dir) if out_dir is not None else layout.builtin_tasks
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    domains = list(Plan.read(layout.plan).domain_kinds())
    per_domain = [
        builtin_items(_documents(layout.root, domain, tokenizer), domain, items_per_domain, seed)
        for domain in domains
    ]
    # Domains take turns, so the harness's --limit N (the first N items) samples every domain.
    choice_rows = _round_robin([choice for choice, _ in per_domain])
    cloze_rows = _round_robin([cloze for _, cloze in per_domain])
    if not choice_rows:
        raise ValueError(f"{layout.root}: the test splits are too short to build any task item")
    files = {
        "hdee_next_chunk": (
            choice_rows,
            {
                "output_type": "multiple_choice",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            },
        ),
        "hdee_cloze": (
            cloze_rows,
            {
                "output_type": "generate_until",
                "doc_to_target": "target",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                # The model's first generated word against the held-out word.
                "filter_list": [
                    {
                        "name": "first_word",
                        "filter": [
                            {"function": "regex", "regex_pattern": r"(\S+)"},
                            {"function": "take_first"},
                        ],
                    }
                ],
                "metric_list": [
                    {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
                ],
            },
        ),
    }
    for name, (rows, body) in files.items():
        data_file = out / f"{name}.jsonl"
        write_text(data_file, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        write_text(out / f"{name}.yaml", _task_yaml(name, data_file, body))
    return out


def resolve_tasks(run_dir: str | Path, tasks: str) -> tuple[list[str], list[str]]:
    """(task names, include paths) from --tasks: "builtin", NAME[,NAME...] or PATH.yaml[,...]."""
    names: list[str] = []
    include: list[str] = []
    for part in [p.strip() for p in tasks.split(",") if p.strip()]:
        if part == "builtin":
            include.append(str(build_builtin_tasks(run_dir)))
            names += BUILTIN_TASKS
        elif part.endswith((".yaml", ".yml")):
            path = Path(part)
            if not path.is_file():
                raise UsageError(f"--tasks {part}: no such task file")
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise UsageError(f"--tasks {path}: a task YAML needs a 'task: NAME' key")
            include.append(str(path.resolve().parent))
            names.append(spec["task"])
        else:
            names.append(part)
    if not names:
        raise UsageError("--tasks: give task names, task YAML files, or 'builtin'")
    return names, list(dict.fromkeys(include))


# ----------------------------------------------------------------------------------------------
# The harness adapter


def _adapter_class() -> type:
    """`HdeeLM`: lm-eval's HFLM that scores every continuation of one context from one
    forward pass over the context (its KV cache, and for an ensemble its posterior state,
    copied per continuation batch) instead of re-running the context per continuation."""
    require_harness()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class HdeeLM(HFLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.forwards = 0  # model calls, for the benchmark and the tests
            self.requests = 0  # harness requests answered

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            self.requests += len(requests)
            return super().generate_until(requests, disable_tqdm)

        def _loglikelihood_tokens(
            self,
            requests: list[tuple[tuple[str, str], list[int], list[int]]],
            disable_tqdm: bool = False,
            override_bs: int | None = None,
        ) -> list[tuple[float, bool]]:
            self.requests += len(requests)
            groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
            for index, (_, context, continuation) in enumerate(requests):
                if not context or not continuation:
                    raise ValueError(
                        "every loglikelihood request needs a context and a continuation"
                    )
                # The harness's truncation: keep the last max_length + 1 tokens.
                whole = (context + continuation)[-(self.max_length + 1) :]
                if len(continuation) >= len(whole):
                    raise ValueError(
                        f"a continuation of {len(continuation)} tokens does not fit the model's "
                        f"{self.max_length} positions"
                    )
                groups.setdefault(tuple(whole[: -len(continuation)]), []).append(
                    (index, continuation)
                )
            answers: list[tuple[float, bool] | None] = [None] * len(requests)
            batch = int(override_bs or (self.batch_size if self.batch_size != "auto" else 8))
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="hdee")
            for context, items in groups.items():
                for index, answer in self._score_group(list(context), items, batch):
                    answers[index] = answer
                    key = requests[index][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    bar.update(1)
            bar.close()
            return [a for a in answers if a is not None]

        @torch.no_grad()
        def _score_group(
            self, context: list[int], items: list[tuple[int, list[int]]], batch: int
        ) -> Iterator[tuple[int, tuple[float, bool]]]:
            ids = torch.tensor([context], dtype=torch.long, device=self.device)
            # Only the last position's distribution is read (it predicts token 0).
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self.forwards += 1
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts token 0
            cache = getattr(out, OUTPUT_CACHE_FIELD)
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                longest = max(len(c) for _, c in chunk)
                rest = None
                if longest > 1:
                    # Right padding after each continuation's last input token: causal
                    # attention keeps it out of the positions that are read.
                    pad = self.tokenizer.pad_token_id or 0
                    rows = [c[:-1] + [pad] * (longest - len(c)) for _, c in chunk]
                    expanded = copy.deepcopy(cache)
                    expanded.batch_repeat_interleave(len(chunk))
                    step = torch.tensor(rows, dtype=torch.long, device=self.device)
                    rest = self.model(input_ids=step, use_cache=True, **{CACHE_ARGUMENT: expanded})
                    rest = torch.log_softmax(rest.logits.float(), dim=-1)  # [B, longest-1, V]
                    self.forwards += 1
                for row, (index, continuation) in enumerate(chunk):
                    dists = [first]
                    if rest is not None:
                        dists += [rest[row, i] for i in range(len(continuation) - 1)]
                    total, greedy = 0.0, True
                    for dist, token in zip(dists, continuation, strict=True):
                        total += float(dist[token])
                        greedy = greedy and int(dist.argmax()) == token
                    yield index, (total, greedy)

    register_model("hdee")(HdeeLM)
    return HdeeLM


_ADAPTER: type | None = None


def hdee_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int = 8) -> Any:
    """An `HdeeLM` around an in-memory model (ensemble or single expert) and tokenizer."""
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = _adapter_class()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _ADAPTER(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# Running the harness on a run's systems


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in task_results.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }


def task_manager(names: Sequence[str], include: Sequence[str]) -> Any:
    """The harness's TaskManager for `names`: indexing the harness's thousands of bundled task
    YAMLs takes most of a minute, so they are left out when every task is a local YAML."""
    require_harness()
    from lm_eval.tasks import TaskManager

    local = set()
    for directory in include:
        for path in Path(directory).glob("*.y*ml"):
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(spec, dict) and isinstance(spec.get("task"), str):
                local.add(spec["task"])
    return TaskManager(include_path=list(include) or None, include_defaults=not set(names) <= local)


def check_task_names(manager: Any, names: Sequence[str]) -> None:
    """Refuse, before any model loads, a task name the harness does not know (UsageError:
    exit 2). The harness installs thousands of tasks: the message names hdee's own, the closest
    installed ones and how to list them all."""
    known = manager.all_tasks
    unknown = [name for name in names if name not in set(known)]
    if not unknown:
        return
    closest = [m for name in unknown for m in difflib.get_close_matches(name, known, n=5)]
    version = getattr(require_harness(), "__version__", "")
    raise UsageError(
        f"--tasks: unknown task {', '.join(map(repr, unknown))}. Available: builtin (hdee's "
        f"{' and '.join(BUILTIN_TASKS)} from the run's test text), a task YAML file, or one of "
        f"the {len(known)} tasks, groups and tags lm-evaluation-harness {version} has installed "
        "(`lm-eval ls tasks` lists them)"
        + (f"; closest: {', '.join(dict.fromkeys(closest))}" if closest else "")
    )


def evaluate_system(
    lm: Any,
    tasks: Sequence[str],
    manager: Any,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    """(task -> metrics, task -> higher_is_better) of one adapter over the tasks."""
    lm_eval = require_harness()
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    metrics = {task: _metrics(values) for task, values in output["results"].items()}
    higher = {
        task: {
            key: bool(output["higher_is_better"][task].get(key.split(",")[0], True))
            for key in values
        }
        for task, values in metrics.items()
    }
    return metrics, higher


def run_tasks(
    run_dir: str | Path,
    tasks: str,
    spec: EnsembleSpec | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TasksResults:
    """Score every configuration's ensemble (as `spec` describes it; default: the run's
    evaluation keys) and each of its members alone on `tasks`; writes RUN/tasks/results.json
    (atomically) and returns it."""
    lm_eval = require_harness()
    from hdee.config import load_config
    from hdee.inference import build_ensemble, resolve_ensemble
    from hdee.scoring import load_expert

    layout = RunLayout.of(run_dir)
    config = load_config(layout.config, overrides={"run_dir": str(layout.root)})
    if spec is None:
        spec = EnsembleSpec(**spec_defaults(config.evaluation))
    names, include = resolve_tasks(run_dir, tasks)
    manager = task_manager(names, include)
    check_task_names(manager, names)
    plan = Plan.read(layout.plan)
    resolved = {name: resolve_ensemble(spec, config, layout, name) for name in plan.configurations}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = _Scorer(tokenizer, names, manager, limit, num_fewshot, batch_size)
    systems: dict[str, SystemResult] = {}
    singles: dict[str, list[str]] = {}  # job id -> member names
    for configuration, ensemble in resolved.items():
        for member, job_id in ensemble.members.items():
            singles.setdefault(job_id, []).append(member)
        model = build_ensemble(ensemble, layout, config.data.seq_len, device)
        systems[configuration] = scorer.score(
            model,
            kind="ensemble",
            configuration=configuration,
            members=list(ensemble.members),
            ensemble=ensemble,
        )
        del model
    for job_id, member_names in singles.items():
        model = load_expert(layout.job(job_id).final, torch.device(device))
        systems[job_id] = scorer.score(
            model, kind="single_expert", job_id=job_id, members=sorted(set(member_names))
        )
        del model
    results = TasksResults(
        tasks=names,
        limit=limit,
        num_fewshot=num_fewshot,
        posterior=spec.posterior,
        prior=spec.prior,
        harness_version=str(getattr(lm_eval, "__version__", "unknown")),
        higher_is_better=scorer.higher_is_better,
        systems=systems,
        best_single=best_single(systems, scorer.higher_is_better),
    )
    results.write(layout.tasks_results)
    if progress:
        print(tasks_markdown(results))
    return results


class _Scorer:
    """One harness run per system, with the settings every system shares."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        names: list[str],
        manager: Any,
        limit: int | None,
        num_fewshot: int | None,
        batch_size: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.names, self.manager = names, manager
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.higher_is_better: dict[str, dict[str, bool]] = {}

    def score(self, model: torch.nn.Module, **identity: Any) -> SystemResult:
        lm = hdee_lm(model, copy.deepcopy(self.tokenizer), self.batch_size)
        start = time.perf_counter()
        metrics, higher = evaluate_system(
            lm, self.names, self.manager, self.limit, self.num_fewshot
        )
        seconds = time.perf_counter() - start
        self.higher_is_better.update(higher)
        return SystemResult(metrics=metrics, requests=lm.requests, seconds=seconds, **identity)


def best_single(
    systems: dict[str, SystemResult], higher_is_better: dict[str, dict[str, bool]]
) -> dict[str, dict[str, BestSingle]]:
    """The best single expert per task and metric (ties: the first in the results' order)."""
    best: dict[str, dict[str, BestSingle]] = {}
    for name, system in systems.items():
        if system.kind != "single_expert":
            continue
        for task, metrics in system.metrics.items():
            for key, value in metrics.items():
                current = best.setdefault(task, {}).get(key)
                higher = higher_is_better.get(task, {}).get(key, True)
                if current is None or (value > current.value if higher else value < current.value):
                    best[task][key] = BestSingle(system=name, value=value)
    return best
