"""The experiment spec: one YAML file, validated once, here, with errors that name the key.

Every other module takes these typed objects and never re-reads YAML. Field docstrings
(`description=`) double as the reference in docs/config.md.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hdee.ensemble_spec import EnsembleKeys, EnsembleSpec
from hdee.errors import UsageError  # noqa: F401 - commands raise it through hdee.config

DIFFICULTY_CLASSES = ("easy", "moderate", "difficult")
# "discover" runs only when data.discover is set: after prepare for tf-idf features, after seeds
# for seed features (hdee.pipeline.stage_order).
STAGES = ("prepare", "discover", "seeds", "difficulty", "plan", "experts", "evaluate", "report")


class ConfigError(ValueError):
    """A config file is wrong. The message names the file, the key and what was expected."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos; refuse them instead of silently ignoring. An
    # infinite or NaN number (`lr: .inf`) is never a meaningful setting: refuse it too.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------
# Data


class HFSource(_Strict):
    """A Hugging Face dataset, loaded with `datasets.load_dataset`."""

    type: Literal["hf"] = "hf"
    path: str = Field(description="Dataset name on the hub or a local dataset script/directory.")
    name: str | None = Field(None, description="Dataset configuration name.")
    split: str | None = Field(
        None,
        description="Split to read. Leave empty to use the dataset's own train/validation/test "
        "splits where it has them.",
    )
    text_field: str = Field("text", description="Column holding the document text.")
    streaming: bool = Field(False, description="Stream instead of downloading everything.")
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents.")
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit) to read. Pin a commit to make prepare "
        "reproducible: an unpinned dataset that changes on the hub is not noticed.",
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None,
        description="Files for `load_dataset(path, data_files=...)`: with path json, parquet, "
        "text or csv, local files or globs (relative to the config file); with a hub dataset, "
        "files inside its repository.",
    )


class LocalSource(_Strict):
    """Local files: globs of .txt/.md (one document per file), .jsonl/.json/.parquet (one
    document per record, text in `text_field`), or directories of them; text, jsonl and json
    may be compressed (.gz, .zst). `split_documents` cuts each of those into smaller documents,
    so one big text file per domain is enough."""

    type: Literal["local"] = "local"
    paths: list[str] = Field(min_length=1, description="Files, directories or glob patterns.")
    text_field: str = Field("text", description="Field holding the text in jsonl/json/parquet.")
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents.")
    split_documents: Literal["none", "paragraphs", "chars"] = Field(
        "none",
        description="'none': a file (or record) is one document; 'paragraphs': every run of "
        "text between blank lines is one; 'chars': chunks of about `chunk_chars` characters, "
        "cut at line ends.",
    )
    chunk_chars: int | None = Field(
        None, ge=100, description="Characters per document with split_documents 'chars'."
    )

    @model_validator(mode="after")
    def _chunking(self) -> LocalSource:
        if self.split_documents == "chars" and self.chunk_chars is None:
            raise ValueError("split_documents 'chars' needs chunk_chars (e.g. 4000)")
        if self.split_documents != "chars" and self.chunk_chars is not None:
            raise ValueError("chunk_chars is only used with split_documents: chars")
        return self


Source = Annotated[HFSource | LocalSource, Field(discriminator="type")]


class SplitRatios(_Strict):
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitRatios:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split ratios must sum to 1, got train={self.train} + validation="
                f"{self.validation} + test={self.test} = {total:g}"
            )
        if self.train <= 0:
            raise ValueError("split ratio 'train' must be > 0")
        return self


class Corpus(_Strict):
    name: str = Field(description="Short name, used in file names and reports.")
    source: Source
    split: SplitRatios | None = Field(
        None, description="Overrides data.split for this corpus (when it has no own splits)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
        if not value or not set(value) <= allowed or value.startswith("."):
            raise ValueError(
                f"corpus name {value!r} must be non-empty and use only letters, digits, '_', '-', '.'"
            )
        return value


class TokenizerConfig(_Strict):
    kind: Literal["bpe", "pretrained"] = Field(
        "bpe",
        description="'bpe': train a byte-level BPE on the training splits; 'pretrained': load "
        "`name_or_path` with transformers.",
    )
    vocab_size: int = Field(8192, ge=260, description="Vocabulary size of a trained BPE.")
    name_or_path: str | None = Field(None, description="Pretrained tokenizer (hub name or path).")
    train_max_bytes: int = Field(
        200_000_000, gt=0, description="Train the BPE on at most this many bytes of text."
    )

    @model_validator(mode="after")
    def _pretrained_needs_name(self) -> TokenizerConfig:
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("tokenizer.kind 'pretrained' needs tokenizer.name_or_path")
        return self


class DiscoverConfig(_Strict):
    """Domains discovered in one unlabelled corpus (c-BTM's clustering; docs/discovery.md):
    each of `clusters` clusters becomes a domain `cluster-00`, `cluster-01`, ..."""

    corpus: str | Corpus = Field(
        description="The corpus to cluster: a corpus {name, source, split?} like a domain, or "
        "the name of the general corpus (cluster the text the seeds train on)."
    )
    clusters: int = Field(ge=2, description="How many clusters (domains) to discover.")
    features: Literal["tfidf", "seed"] = Field(
        "tfidf",
        description="'tfidf': tf-idf -> TruncatedSVD -> L2 norm (c-BTM); 'seed': the mean last "
        "hidden state of the smallest trained seed over a document's first seed_tokens tokens "
        "(in windows of data.seq_len), centred and L2-normalised (discovery then runs after "
        "the seeds stage).",
    )
    seed_tokens: int = Field(
        2048, ge=1, description="Tokens of each document the seed reads (seed features)."
    )
    sample_documents: int = Field(
        10_000, ge=1, description="Training documents the clustering is fitted on (seeded)."
    )
    svd_dims: int = Field(100, ge=1, description="TruncatedSVD dimensions (tfidf features).")
    balance: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="While fitting, every cluster holds between (1 - balance) and (1 + balance) "
        "times an equal share of the sample (0: equal sizes, as c-BTM).",
    )
    max_features: int = Field(100_000, ge=1, description="Largest tf-idf vocabulary.")
    min_df: int = Field(2, ge=1, description="Keep terms found in at least this many documents.")
    labels: Literal["none", "directory", "file"] = Field(
        "none",
        description="Known labels to measure the clusters against (purity, ARI, NMI; local "
        "sources): 'directory': the name of the directory holding a document's file; 'file': "
        "the file's name.",
    )
    batch_documents: int = Field(
        1024, ge=1, description="Documents featurised at a time in the assignment pass."
    )

    @model_validator(mode="after")
    def _enough_sample(self) -> DiscoverConfig:
        if self.sample_documents < self.clusters:
            raise ValueError(
                f"data.discover.sample_documents: {self.sample_documents} documents cannot fit "
                f"{self.clusters} clusters (data.discover.clusters); expected at least "
                f"{self.clusters}"
            )
        return self

    @property
    def domain_names(self) -> list[str]:
        """cluster-00, cluster-01, ...: the discovered domains (two digits, more from 100 on)."""
        width = max(2, len(str(self.clusters - 1)))
        return [f"cluster-{k:0{width}d}" for k in range(self.clusters)]


class DataConfig(_Strict):
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = Field(1024, ge=2, description="Tokens per training/evaluation sequence.")
    split: SplitRatios = SplitRatios()
    general: Corpus = Field(description="The general corpus the seed models train on.")
    domains: list[Corpus] = Field(
        default_factory=list,
        description="The domains, trained and held-out (may be empty with data.discover).",
    )
    discover: DiscoverConfig | None = Field(
        None, description="Discover domains by clustering a corpus (docs/discovery.md)."
    )
    num_workers: int = Field(0, ge=0, description="Tokenizer processes (0: one per CPU core).")

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        if not self.domains and self.discover is None:
            raise ValueError(
                "data.domains: expected at least one domain (or data.discover, to discover "
                "domains in a corpus)"
            )
        seen: set[str] = {self.general.name}
        for domain in self.domains:
            if domain.name in seen:
                raise ValueError(
                    f"duplicate corpus name {domain.name!r} (domain names must be unique and "
                    f"differ from the general corpus {self.general.name!r})"
                )
            seen.add(domain.name)
        if self.discover is not None:
            self._check_discover(self.discover, seen)
        return self

    def _check_discover(self, discover: DiscoverConfig, seen: set[str]) -> None:
        corpus = discover.corpus
        if isinstance(corpus, str):
            if corpus != self.general.name:
                raise ValueError(
                    f"data.discover.corpus: {corpus!r} is not the general corpus "
                    f"{self.general.name!r}; give a corpus {{name, source}} or the general "
                    "corpus's name"
                )
        elif corpus.name in seen:
            raise ValueError(
                f"data.discover.corpus: the name {corpus.name!r} is already a corpus; the "
                "corpus to cluster needs a name of its own"
            )
        taken = seen & set(discover.domain_names)
        if taken:
            raise ValueError(
                f"data.domains: {sorted(taken)} are the names of discovered clusters "
                "(data.discover); rename those domains"
            )
        source = self.discover_corpus.source if self.discover_corpus else None
        if discover.labels != "none" and not isinstance(source, LocalSource):
            raise ValueError(
                f"data.discover.labels: {discover.labels!r} reads labels from file paths; "
                "the corpus to cluster is not a local source (use labels: none)"
            )

    @property
    def discover_corpus(self) -> Corpus | None:
        """The corpus data.discover clusters (the general corpus when named by it)."""
        if self.discover is None:
            return None
        corpus = self.discover.corpus
        return self.general if isinstance(corpus, str) else corpus

    @property
    def domain_names(self) -> list[str]:
        """Every domain of the run: the configured ones, then the discovered clusters. This is
        the one list every stage reads; a cluster's data is prepared by the 'discover' stage
        at the same place as a configured domain's (RUN/data/<name>/)."""
        discovered = self.discover.domain_names if self.discover else []
        return [d.name for d in self.domains] + discovered

    @property
    def corpus_names(self) -> list[str]:
        """The general corpus and every domain: each has prepared token files."""
        return [self.general.name, *self.domain_names]


# ----------------------------------------------------------------------------------------------
# Models and training


class ModelConfig(_Strict):
    """Llama architecture. Sizes differ only in FFN width (`intermediate_size`)."""

    preset: Literal["tiny", "small-close", "none"] = Field(
        "tiny", description="Named family; explicit fields below override it."
    )
    hidden_size: int | None = Field(None, gt=0)
    num_layers: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    ffn_sizes: dict[str, int] | None = Field(
        None, description="Size name -> intermediate_size, e.g. {S: 2304, M: 3072, L: 3840}."
    )
    rope_theta: float = 10000.0
    tie_embeddings: bool = False


class TrainingConfig(_Strict):
    steps: int = Field(1000, gt=0, description="Optimizer steps (experts: set by the plan).")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(6e-4, gt=0)
    min_lr: float = Field(6e-5, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm (0: off).")
    eval_every: int = Field(100, gt=0, description="Validation perplexity every N steps.")
    eval_batches: int = Field(8, gt=0, description="Validation batches per evaluation.")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last K step checkpoints.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="'auto': bf16 autocast (fp32 master weights) on CUDA and on CPUs with bf16 "
        "units (avx512_bf16 / amx_bf16), at any model size; fp32 elsewhere.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model and its loss. 'auto': when it pays, judged from "
        "timed eager steps against the expected compile time (hdee.compiling; never without a "
        "C++ compiler or Triton); true: always; false: never.",
    )
    loss_chunk_tokens: int | None = Field(
        None,
        gt=0,
        description="Positions per chunk of the fused LM-head + loss (hdee.loss); None: chosen "
        "from the vocabulary and device (auto_chunk_tokens).",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")

    @model_validator(mode="after")
    def _lr_order(self) -> TrainingConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    def weight_settings(self) -> dict[str, Any]:
        """The settings that determine the trained weights: what a job id hashes and what a
        resumed job must keep. Cadence (`eval_every`, `eval_batches`, `checkpoint_every`,
        `keep_checkpoints`) and where it runs (`device`) are left out (docs/config.md)."""
        settings = self.model_dump(mode="json", exclude=set(NOT_WEIGHT_SETTINGS))
        # `auto` decides on the machine that trains (like device: auto), after the plan is made,
        # so it hashes as false, which keeps the ids of jobs made before `auto` existed; what
        # ran is in result.json (compiled_from_step) and each checkpoint. docs/config.md.
        settings["compile"] = self.compile is True
        return settings


# TrainingConfig settings that never change a job's weights: when it validates, checkpoints
# and prunes (resume is exact, validation reads no randomness), and the device it runs on
# ("auto" and "cpu" on a CPU machine are the same job; see docs/config.md for why "cuda" is too).
NOT_WEIGHT_SETTINGS = (
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
)


class SeedsConfig(_Strict):
    sizes: list[str] | None = Field(
        None, description="Which sizes get a seed (default: every size a configuration uses)."
    )
    training: TrainingConfig = TrainingConfig()


class ExpertsConfig(_Strict):
    training: TrainingConfig = TrainingConfig(
        steps=400, lr=6e-5, min_lr=3e-5, warmup_steps=50, eval_every=100
    )


# ----------------------------------------------------------------------------------------------
# Method


class DifficultyConfig(_Strict):
    method: Literal["tercile", "thresholds", "fixed"] = Field(
        "tercile", description="How seed perplexities become classes."
    )
    seed_size: str | None = Field(
        None,
        description="Which seed's perplexity ranks the domains (default: all, averaged "
        "in log space).",
    )
    thresholds: tuple[float, float] | None = Field(
        None, description="Perplexity cut points [easy/moderate, moderate/difficult]."
    )
    fixed: dict[str, Literal["easy", "moderate", "difficult"]] | None = Field(
        None, description="Domain -> class, for every trained domain ('fixed' method)."
    )
    eval_batches: int = Field(16, gt=0, description="Validation batches per domain.")

    @model_validator(mode="after")
    def _method_inputs(self) -> DifficultyConfig:
        if self.method == "thresholds":
            if self.thresholds is None:
                raise ValueError("difficulty.method 'thresholds' needs difficulty.thresholds")
            if not self.thresholds[0] < self.thresholds[1]:
                raise ValueError("difficulty.thresholds must be increasing")
        if self.method == "fixed" and not self.fixed:
            raise ValueError("difficulty.method 'fixed' needs difficulty.fixed")
        return self


class Configuration(_Strict):
    """One ensemble configuration: the size and the step count of each lane's experts."""

    name: str
    sizes: dict[str, str] = Field(description="Difficulty class -> model size name.")
    steps: dict[str, int] = Field(description="Difficulty class -> training steps per iteration.")

    @model_validator(mode="after")
    def _positive_steps(self) -> Configuration:
        for cls, steps in self.steps.items():
            if steps <= 0:
                raise ValueError(f"configuration {self.name!r}: steps[{cls!r}] must be > 0")
        return self


PAPER_CONFIGURATIONS = (
    Configuration(
        name="MHo-IHo",
        sizes={"easy": "M", "moderate": "M", "difficult": "M"},
        steps={"easy": 400, "moderate": 400, "difficult": 400},
    ),
    Configuration(
        name="MHo-IHe",
        sizes={"easy": "M", "moderate": "M", "difficult": "M"},
        steps={"easy": 300, "moderate": 400, "difficult": 500},
    ),
    Configuration(
        name="MHe-IHo",
        sizes={"easy": "S", "moderate": "M", "difficult": "L"},
        steps={"easy": 400, "moderate": 400, "difficult": 400},
    ),
)


class PlanConfig(_Strict):
    iterations: int = Field(3, gt=0, description="BTM iterations (new domain per lane each).")
    schedule: Literal["auto"] | dict[str, list[str]] = Field(
        "auto",
        description="'auto': each iteration takes the next unused domain of each class in a "
        "seeded order; or class -> list of domains, one per iteration.",
    )
    held_out: list[str] = Field(
        default_factory=list, description="Domains evaluated but never trained."
    )
    configurations: list[Configuration] = Field(default_factory=lambda: list(PAPER_CONFIGURATIONS))
    baseline: str = Field("MHo-IHo", description="The configuration others are compared with.")
    equalise: Literal["none", "proxy", "flops"] = Field(
        "none",
        description="Adjust steps so every configuration's budget equals the baseline's, in the "
        "paper's |FFN| x steps proxy or in training FLOPs.",
    )
    budget_tolerance: float = Field(
        0.01, ge=0, description="Largest allowed relative budget difference from the baseline."
    )
    budget_measure: Literal["proxy", "flops"] = Field(
        "proxy", description="Which budget the tolerance is checked in."
    )
    allow_unequal_budgets: bool = False

    @model_validator(mode="after")
    def _names(self) -> PlanConfig:
        names = [c.name for c in self.configurations]
        if len(set(names)) != len(names):
            raise ValueError(f"plan.configurations: duplicate names in {names}")
        if self.baseline not in names:
            raise ValueError(f"plan.baseline {self.baseline!r} is not one of {names}")
        return self


class EvaluationConfig(EnsembleKeys):
    """`hdee evaluate`: the ensemble keys every inference command shares (members, exclude,
    prior, posterior, routing, route_tokens, flop_budget; defaults in `EnsembleKeys`), plus the
    methods to score, their windows and intervals, and the sweep of k for routed ensembles."""

    methods: list[str] = Field(
        default_factory=lambda: [
            "simple_average",
            "uniform_prior",
            "cached_prior",
            "best_single",
        ],
        description="Ensembling methods to score (hdee.ensemble.METHODS): simple_average, "
        "uniform_prior, cached_prior, best_single (also spelt single_experts: every member "
        "alone, and the best of them).",
    )
    cached_prior_sequences: int = Field(
        100, gt=0, description="Validation sequences for the prior."
    )
    cached_prior_decay: float = Field(0.3, gt=0, le=1, description="EWMA weight of each new one.")
    cached_prior_update: Literal["window", "last_token"] = Field(
        "window",
        description="What each validation window adds to the cached prior's moving average: "
        "'window': its whole-window posterior, starting from uniform (BTM / DEMix paper); "
        "'last_token': the one-token posterior at its last position, starting from the first "
        "window's (DEMix code).",
    )
    max_test_sequences: int | None = Field(None, gt=0, description="Cap on test sequences/domain.")
    batch_size: int = Field(8, gt=0)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Precision of the experts' forward passes when label log-probs are "
        "computed: 'fp32' (the same numbers on every machine) or 'bf16' (autocast, faster on "
        "GPUs and CPUs with bf16 units; the log-softmax stays fp32). Part of the cache key, so "
        "the two are never mixed.",
    )
    every_iteration: bool = Field(
        False,
        description="Also evaluate earlier iterations' ensembles (and so every lane's experts on "
        "every domain after every iteration: the report's forgetting table).",
    )
    bootstrap_resamples: int = Field(
        1000,
        ge=0,
        description="Paired bootstrap resamples for the confidence intervals of differences "
        "(0: none; the report then cannot tell wins from noise).",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of those intervals.")
    min_effect: float = Field(
        0.005,
        description="Equivalence margin on relative perplexity (0.005: 0.5%): a comparison is a "
        "win or a loss only when its whole interval lies beyond this margin on one side, "
        "'equivalent' when it lies within it, else 'undecided' (docs/config.md says why 0.5%).",
    )
    experts: list[int] | None = Field(
        None,
        description="The k values to route to (routing: prefix, prior); default: every k from 1 "
        "to the number of members - 1.",
    )
    opt_out: list[str] = Field(
        default_factory=list,
        description="Opt-out study: withdraw each of these (a domain, member or job id, as in "
        "exclude) from every configuration's final ensemble in turn, and report how each "
        "domain's perplexity moves, with paired intervals.",
    )

    @field_validator("methods")
    @classmethod
    def _methods_are_in_the_table(cls, methods: list[str]) -> list[str]:
        from hdee.ensemble import METHOD_ALIASES, METHODS  # torch: only when a config is read

        names = [METHOD_ALIASES.get(name, name) for name in methods]
        unknown = [name for name in names if name not in METHODS]
        if unknown:
            raise ValueError(
                f"unknown method(s) {unknown}; expected some of {sorted(METHODS)} "
                f"(or single_experts, the old name of best_single)"
            )
        if not names:
            raise ValueError("list at least one method")
        return list(dict.fromkeys(names))

    @field_validator("min_effect")
    @classmethod
    def _margin_is_a_fraction(cls, value: float) -> float:
        # 1 or more would make "better by the margin" a perplexity of zero or below.
        if not 0 <= value < 1:
            raise ValueError(
                f"evaluation.min_effect: expected a fraction of perplexity in [0, 1) "
                f"(0.005 is 0.5%), got {value}"
            )
        return value

    @field_validator("opt_out", mode="before")
    @classmethod
    def _opt_out_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _sweep_fits(self) -> EvaluationConfig:
        if self.experts is not None:
            if not self.experts or any(k < 1 for k in self.experts):
                raise ValueError(
                    f"evaluation.experts: expected a non-empty list of integers >= 1, "
                    f"got {self.experts}"
                )
            if len(set(self.experts)) != len(self.experts):
                raise ValueError(f"evaluation.experts: {self.experts} lists a k twice")
        if self.opt_out and self.prior_choice.kind == "cluster":
            raise ValueError(
                "evaluation.opt_out: the study mixes the dense posterior with the ensemble "
                "keys' prior; with prior cluster use routing by clusters alone (no opt_out)"
            )
        if self.opt_out and self.prior_choice.kind == "weights":
            raise ValueError(
                "evaluation.opt_out: explicit prior weights name one weight per member, and "
                "withdrawing a member changes the members; use prior uniform or cached"
            )
        return self

    @property
    def needs_validation(self) -> bool:
        """Whether validation windows are scored: a method estimates something there, or the
        spec's prior is the domain's cached prior (estimated on validation text)."""
        from hdee.ensemble import METHODS

        return any(METHODS[m].needs_validation for m in self.methods) or (
            self.prior_choice.kind == "cached"
        )

    def ensemble_spec(self, iteration: int | None = None) -> EnsembleSpec:
        """The dense ensemble these keys describe (routing off: the sweep is separate)."""
        keys = self.model_dump(include=set(EnsembleKeys.model_fields) - {"routing", "flop_budget"})
        return EnsembleSpec(**keys, iteration=iteration)


class LocalRunnerConfig(_Strict):
    """Jobs on this machine (hdee.runners.local)."""

    kind: Literal["local"] = "local"
    workers: int = Field(0, ge=0, description="Concurrent jobs (0: one per GPU, or by CPU cores).")
    gpus_per_job: int = Field(1, ge=0, description="GPUs per training job (>1 launches torchrun).")


class RayRunnerConfig(_Strict):
    """Jobs on a Ray cluster (hdee.runners.ray_runner): Ray schedules them by resources."""

    kind: Literal["ray"]
    gpus_per_job: int = Field(1, ge=0, description="GPUs per training job (>1 launches torchrun).")
    cpus_per_job: int | None = Field(
        None, gt=0, description="CPU cores per job (default: derived from the cluster)."
    )
    address: str | None = Field(None, description="Ray cluster address (None: a local Ray).")


# Keys hdee wrote for every kind before runners had their own configs: a run directory's saved
# config.yaml holds them with these values, which mean "unset".
_UNSET_OF_THE_OTHER_KIND = {"local": {"cpus_per_job": None, "address": None}, "ray": {"workers": 0}}


def _local_by_default(value: Any) -> Any:
    # `runner: {workers: 1}` (no kind) is the local runner, as it always was.
    if not isinstance(value, dict):
        return value
    value = {"kind": "local", **value}
    unset = _UNSET_OF_THE_OTHER_KIND.get(value["kind"], {})
    return {k: v for k, v in value.items() if not (k in unset and v == unset[k])}


# One config class per runner, told apart by `kind` (a Slurm runner: one more class here and
# one line in hdee.runners.base.RUNNERS).
RunnerConfig = Annotated[
    LocalRunnerConfig | RayRunnerConfig,
    BeforeValidator(_local_by_default),
    Field(discriminator="kind"),
]


class RunConfig(_Strict):
    """Repeats: the experiment again with other training seeds, on the same prepared data."""

    repeats: int = Field(
        1,
        ge=1,
        description="Run the experiment this many times: repeat k trains every job with seed "
        "`seed + k` (data order, and initialisation where a job starts from scratch) on the "
        "same prepared data; the report gives mean and standard deviation over repeats.",
    )
    repeat: int = Field(
        0,
        ge=0,
        description="The repeat `hdee plan` and `hdee jobs` work on (0: the base run). "
        "`hdee run` runs every repeat whatever this says.",
    )

    @model_validator(mode="after")
    def _repeat_in_range(self) -> RunConfig:
        if self.repeat >= self.repeats:
            raise ValueError(
                f"run.repeat {self.repeat} is not a repeat of run.repeats={self.repeats} "
                f"(expected 0 to {self.repeats - 1})"
            )
        return self


class ExperimentConfig(_Strict):
    run_dir: str = Field(description="Directory that holds everything this run produces.")
    seed: int = Field(
        0,
        description="Global seed: splits, domain schedule, data order, initialisation (repeat "
        "k trains with seed + k; splits and schedule always use this one).",
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    seeds: SeedsConfig = SeedsConfig()
    experts: ExpertsConfig = ExpertsConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    plan: PlanConfig = PlanConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    runner: RunnerConfig = LocalRunnerConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _route_tokens_within_a_window(self) -> ExperimentConfig:
        routed = self.evaluation.routing in ("prefix", "budget")
        routed = routed or self.evaluation.prior_choice.kind == "cluster"
        if routed and self.evaluation.route_tokens >= self.data.seq_len:
            raise ValueError(
                f"evaluation.route_tokens: {self.evaluation.route_tokens} leaves nothing to "
                f"route in windows of data.seq_len {self.data.seq_len} labels; expected < "
                f"{self.data.seq_len}"
            )
        return self

    @model_validator(mode="after")
    def _domains_referenced_exist(self) -> ExperimentConfig:
        names = set(self.data.domain_names)
        for name in self.plan.held_out:
            if name not in names:
                raise ValueError(f"plan.held_out: {name!r} is not a domain in data.domains")
        if isinstance(self.plan.schedule, dict):
            # A domain trains in one lane at one iteration; twice would train its expert twice
            # and count it twice in the ensemble.
            placed: dict[str, str] = {}
            for cls, lane in self.plan.schedule.items():
                if cls not in DIFFICULTY_CLASSES:
                    raise ValueError(
                        f"plan.schedule: unknown class {cls!r}, expected one of {DIFFICULTY_CLASSES}"
                    )
                if len(lane) != self.plan.iterations:
                    raise ValueError(
                        f"plan.schedule.{cls}: {len(lane)} domains for {self.plan.iterations} "
                        "iterations"
                    )
                for name in lane:
                    if name not in names:
                        raise ValueError(f"plan.schedule.{cls}: {name!r} is not in data.domains")
                    if name in self.plan.held_out:
                        raise ValueError(f"plan.schedule.{cls}: {name!r} is also held out")
                    if name in placed:
                        raise ValueError(
                            f"plan.schedule.{cls}: {name!r} is already scheduled in "
                            f"plan.schedule.{placed[name]}; a domain may appear once in the "
                            "whole schedule"
                        )
                    placed[name] = cls
        if self.difficulty.fixed:
            for name in self.difficulty.fixed:
                if name not in names:
                    raise ValueError(f"difficulty.fixed: {name!r} is not in data.domains")
        return self

    @property
    def training_seed(self) -> int:
        """The seed of this repeat's training jobs (data order, initialisation). Prepared data
        and the domain schedule use `seed` itself, so every repeat shares them."""
        return self.seed + self.run.repeat

    def for_repeat(self, repeat: int) -> ExperimentConfig:
        """This config as repeat `repeat` of the experiment (0: the base run)."""
        if not 0 <= repeat < self.run.repeats:
            raise ValueError(f"repeat {repeat} is not one of 0..{self.run.repeats - 1}")
        return self.model_copy(update={"run": self.run.model_copy(update={"repeat": repeat})})

    @property
    def trainable_domains(self) -> list[str]:
        """The domains that may be trained: every domain not held out."""
        return [name for name in self.data.domain_names if name not in self.plan.held_out]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        return stable_hash(self.to_dict())


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object that does not depend on key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid experiment config"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = str(item["msg"]).removeprefix("Value error, ")
        key, sep, rest = message.partition(": ")
        # A check across keys names its key first ("flop_budget: required ..."): say where.
        if sep and key.isidentifier() and item["loc"]:
            location, message = f"{location}.{key}", rest
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/config.md)"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def _resolve_local_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a config are relative to the config file, not the working directory."""
    if isinstance(raw.get("run_dir"), str) and not Path(raw["run_dir"]).is_absolute():
        raw["run_dir"] = str((base / raw["run_dir"]).resolve())
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    corpora = [data.get("general")] + list(data.get("domains") or [])
    discover = data.get("discover")
    if isinstance(discover, dict) and isinstance(discover.get("corpus"), dict):
        corpora.append(discover["corpus"])
    for corpus in corpora:
        if not isinstance(corpus, dict):
            continue
        source = corpus.get("source")
        if isinstance(source, dict) and source.get("type") == "local":
            paths = source.get("paths")
            if isinstance(paths, list):
                source["paths"] = [
                    p if not isinstance(p, str) or Path(p).is_absolute() else str(base / p)
                    for p in paths
                ]
        if isinstance(source, dict) and source.get("type") == "hf":
            # Only what exists beside the config: a hub name or repo-relative file stays as is.
            if isinstance(source.get("path"), str) and (base / source["path"]).exists():
                source["path"] = str(base / source["path"])
            source["data_files"] = _resolve_existing(source.get("data_files"), base)
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and isinstance(tokenizer.get("name_or_path"), str):
        candidate = base / tokenizer["name_or_path"]
        if candidate.exists():
            tokenizer["name_or_path"] = str(candidate)


def _resolve_existing(value: Any, base: Path) -> Any:
    """Relative paths/globs in `value` (a string, list or dict of them) that match files under
    `base` become absolute; anything else is returned unchanged."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        return str(base / value) if glob.glob(str(base / value), recursive=True) else value
    if isinstance(value, list):
        return [_resolve_existing(item, base) for item in value]
    if isinstance(value, dict):
        return {key: _resolve_existing(item, base) for key, item in value.items()}
    return value


def parse_config(
    raw: Any,
    source: Path | str = "<config>",
    base_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Validate a config given as a dict. `base_dir` anchors relative paths."""
    path = Path(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        raw = json.loads(json.dumps(raw))  # deep copy, and rejects non-JSON values early
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: a value is not plain data ({error})") from None
    if overrides:
        for dotted, value in overrides.items():
            _set_dotted(raw, dotted, value)
    if base_dir is not None:
        _resolve_local_paths(raw, base_dir)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(path, error)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML experiment config. Raises ConfigError with a precise message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 ({error})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    raw = read_yaml(text, path)
    return parse_config(raw, path, base_dir=path.parent.resolve(), overrides=overrides)


def read_yaml(text: str, path: Path | str = "<config>") -> Any:
    """Parse one YAML document, refusing a key given twice in one mapping (plain YAML keeps
    the last one silently, so a second `plan:` block would quietly replace the first)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: the file is empty (expected an experiment config)")
        _refuse_duplicate_keys(node, path, "", set())
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: Path | str, where: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *defaults` then an explicit key is YAML's way to override: allowed.
                _refuse_duplicate_keys(value_node, path, where, seen)
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            dotted = f"{where}.{key}" if where else str(key)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(
                    f"{path}:{line}: duplicate key {dotted!r} (first given on line "
                    f"{first_line[key]}); YAML would silently keep only the last one"
                )
            first_line[key] = line
            _refuse_duplicate_keys(value_node, path, dotted, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{where}.{index}" if where else str(index), seen)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.2.c` in nested dicts and lists (a number indexes a list, from 0)."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override {dotted!r}: empty key (expected e.g. plan.iterations)")
    node: Any = raw
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        here = ".".join(keys[:depth]) or "the top level"
        if isinstance(node, list):
            if not key.isdigit():
                raise ConfigError(
                    f"override {dotted!r}: {here} is a list; expected an item number, got {key!r}"
                )
            index = int(key)
            if index >= len(node):
                raise ConfigError(
                    f"override {dotted!r}: {here} has {len(node)} item(s) (0 to "
                    f"{len(node) - 1}), no item {index}"
                )
        elif isinstance(node, dict):
            if not last and key not in node:
                if keys[depth + 1].isdigit():
                    raise ConfigError(
                        f"override {dotted!r}: {'.'.join(keys[: depth + 1])} is not in the "
                        "config file, so it has no items to change; write the list in the file"
                    )
                node[key] = {}
        else:
            raise ConfigError(f"override {dotted!r}: {here} is not a mapping or a list")
        if last:
            if isinstance(node, list):
                node[int(key)] = value
            else:
                node[key] = value
        else:
            node = node[int(key)] if isinstance(node, list) else node[key]
