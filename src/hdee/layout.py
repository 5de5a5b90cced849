"""Where things live inside a run directory. One place, so no module invents a path.

RUN/
  config.yaml                  the resolved experiment config
  run.lock                     held while `hdee run` writes here
  data/tokenizer/              PreTrainedTokenizerFast directory
  data/<corpus>/<split>.bin    flat token array (uint16 or uint32), memory-mapped
  data/<corpus>/<split>.json   manifest of that array
  jobs/<job_id>/               one training job (seed or expert), see train.py
  difficulty/                  difficulty.json, difficulty.png
  plan.json                    lanes, iterations, configurations, budgets, job graph
  evaluation/logprobs/<job_id>/<domain>.<split>.safetensors   cached label log-probs
  evaluation/results.json, results.csv
  report/report.md, report/*.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, root: str | Path) -> RunLayout:
        return cls(Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    # data
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    def corpus(self, name: str) -> Path:
        return self.data / name

    def tokens(self, corpus: str, split: str) -> Path:
        return self.corpus(corpus) / f"{split}.bin"

    def manifest(self, corpus: str, split: str) -> Path:
        return self.corpus(corpus) / f"{split}.json"

    # training jobs
    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job(self, job_id: str) -> Path:
        return self.jobs / job_id

    # method stages
    @property
    def difficulty(self) -> Path:
        return self.root / "difficulty"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    def label_logprobs(self, job_id: str, domain: str, split: str) -> Path:
        return self.evaluation / "logprobs" / job_id / f"{domain}.{split}.safetensors"

    @property
    def report(self) -> Path:
        return self.root / "report"
