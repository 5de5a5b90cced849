"""Where things live inside a run directory. One place, so no module invents a path.

RUN/
  config.yaml                  the resolved experiment config
  run.lock                     held while an hdee command writes here
  data/tokenizer/              PreTrainedTokenizerFast directory
  data/<corpus>/<split>.bin    flat token array (uint16 or uint32), memory-mapped
  data/<corpus>/<split>.json   manifest of that array
  discovery/                   data.discover: discovery.json (the record), transform.json
                               (vocabulary, idf, settings), transform.safetensors (SVD
                               components, centroids, offsets), assignment.safetensors (each
                               document's cluster and split); the clusters' token files are
                               data/cluster-NN/ like any domain's
  jobs/<job_id>/               one training job (seed or expert): see JobLayout
  difficulty/                  difficulty.json, difficulty.png
  plan.json                    lanes, iterations, configurations, budgets, job graph
  evaluation/logprobs/<job_id>/<domain>.<split>.safetensors   cached label log-probs
  evaluation/results.json, results.csv
  tasks/results.json, tasks/builtin/   `hdee tasks`: downstream accuracy, the built-in tasks
  report/report.md, report/*.png
  repeats/<k>/                 repeat k >= 1 of the experiment (run.repeats): its own
                               difficulty/, plan.json and evaluation/; data/ and jobs/ are
                               the run's (RunLayout.repeat). Repeat 0 is the files above.

The typed contents of plan.json, result.json, difficulty.json and results.json are in
`hdee.records`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class JobLayout:
    """One training job's directory:

    spec.json          the TrainSpec (what determines the result)
    checkpoints/step_XXXXXXX/   HF model files + trainer state, the last few kept
    final/             the finished model (HF directory: config.json + model.safetensors)
    metrics.jsonl      one JSON row per logged step / evaluation
    tensorboard/       the same metrics for TensorBoard
    train.log          what the job printed, when it ran in a worker process
    result.json        written last: a job is finished exactly when it exists
    """

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:07d}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    def is_done(self) -> bool:
        return self.result.is_file()

    def status(self) -> str:
        """'done', 'partial' (has checkpoints) or 'pending'."""
        if self.is_done():
            return "done"
        return "partial" if self.checkpoints.is_dir() else "pending"


@dataclass(frozen=True)
class RunLayout:
    """A run directory, or one repeat's view of it (`repeat(k)`): `root` holds the repeat's
    own stage outputs (difficulty, plan, evaluation); the config, lock, prepared data, jobs,
    tasks and report are always the run's, under `run_root`."""

    root: Path
    shared: Path | None = None  # the run directory, when this is the view of a repeat k >= 1

    @classmethod
    def of(cls, root: str | Path) -> RunLayout:
        return cls(Path(root))

    @property
    def run_root(self) -> Path:
        """The run directory itself (the same as `root` except in a repeat's view)."""
        return self.shared or self.root

    def top_level(self) -> tuple[Path, ...]:
        """Everything hdee writes at the top of the run directory (hdee.outputs refuses to
        start a run in a directory where one of these names is already someone else's)."""
        run = RunLayout(self.run_root)
        return (
            run.config,
            run.lock,
            run.data,
            run.jobs,
            run.difficulty,
            run.plan,
            run.evaluation,
            run.tasks,
            run.report,
            run.repeats,
        )

    def repeat(self, index: int) -> RunLayout:
        """Repeat `index` of the experiment. Repeat 0 is the run directory itself, so a run
        with one repeat is laid out exactly as one without repeats; repeat k >= 1 keeps its
        stage outputs in RUN/repeats/<k>/ and shares the run's prepared data and jobs (a job
        id already says which seed trained it)."""
        if index < 0:
            raise ValueError(f"repeat {index}: expected 0 or more")
        if index == 0:
            return RunLayout(self.run_root)
        return RunLayout(self.repeats / str(index), shared=self.run_root)

    @property
    def repeats(self) -> Path:
        return self.run_root / "repeats"

    @property
    def config(self) -> Path:
        return self.run_root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.run_root / "run.lock"

    # data
    @property
    def data(self) -> Path:
        return self.run_root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    def corpus(self, name: str) -> Path:
        return self.data / name

    def tokens(self, corpus: str, split: str) -> Path:
        return self.corpus(corpus) / f"{split}.bin"

    def manifest(self, corpus: str, split: str) -> Path:
        return self.corpus(corpus) / f"{split}.json"

    # discovered domains (data.discover): shared by every repeat, like the prepared data
    @property
    def discovery(self) -> Path:
        return self.run_root / "discovery"

    @property
    def discovery_record(self) -> Path:
        return self.discovery / "discovery.json"

    @property
    def discovery_transform(self) -> Path:
        """Vocabulary, idf and settings of the fitted transform (JSON)."""
        return self.discovery / "transform.json"

    @property
    def discovery_arrays(self) -> Path:
        """SVD components, centroids and offsets of the fitted transform (safetensors)."""
        return self.discovery / "transform.safetensors"

    @property
    def discovery_assignment(self) -> Path:
        """Each document's cluster, split and label code, in corpus order (safetensors)."""
        return self.discovery / "assignment.safetensors"

    # training jobs
    @property
    def jobs(self) -> Path:
        return self.run_root / "jobs"

    def job(self, job_id: str) -> JobLayout:
        return JobLayout(self.jobs / job_id)

    # method stages
    @property
    def difficulty(self) -> Path:
        return self.root / "difficulty"

    @property
    def difficulty_record(self) -> Path:
        return self.difficulty / "difficulty.json"

    @property
    def difficulty_plot(self) -> Path:
        return self.difficulty / "difficulty.png"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    def label_logprobs(self, job_id: str, domain: str, split: str) -> Path:
        return self.evaluation / "logprobs" / job_id / f"{domain}.{split}.safetensors"

    @property
    def results(self) -> Path:
        return self.evaluation / "results.json"

    @property
    def results_csv(self) -> Path:
        return self.evaluation / "results.csv"

    @property
    def tasks(self) -> Path:
        return self.run_root / "tasks"

    @property
    def tasks_results(self) -> Path:
        return self.tasks / "results.json"

    @property
    def builtin_tasks(self) -> Path:
        return self.tasks / "builtin"

    @property
    def report(self) -> Path:
        return self.run_root / "report"

    @property
    def report_markdown(self) -> Path:
        return self.report / "report.md"

    def report_plot(self, name: str) -> Path:
        return self.report / f"{name}.png"
