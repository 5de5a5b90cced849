"""A stored cluster transform applied to raw text, and the cluster prior: torch only.

`hdee discover` fits tf-idf -> TruncatedSVD -> L2 norm -> balanced k-means with scikit-learn
(hdee.discover) and stores the fitted transform as plain files: the vocabulary and idf as JSON
(`transform.json`), the SVD components, centroids and per-cluster offsets as safetensors
(`transform.safetensors`). This module reads those files and applies them with torch alone, so
the same code assigns documents to clusters in `hdee discover` and can route text to clusters
wherever torch and transformers run (an exported ensemble): it imports nothing from hdee and
nothing from scikit-learn, and can be copied into a torch-only file as it is.

Tokenisation is scikit-learn's TfidfVectorizer's with the settings hdee fits with: lowercase,
the default token pattern (two or more word characters), every token that starts with a digit
mapped to one token (c-BTM's number normalisation), terms outside the stored vocabulary (stop
words, rare terms) dropped. Then tf = 1 + ln(count) (sublinear tf), times idf, L2-normalised;
projected on the SVD components; L2-normalised again. tests/test_discover.py checks all of it
equals scikit-learn's own transform of the same text.

The offsets are what the balanced fit adds to each cluster's squared distance to keep clusters
within the size band (the duals of its size constraints): a document belongs to
argmin_j (||x - c_j||^2 + offset_j). `cluster_log_prior` turns distances into
log P(cluster | text) = log softmax(-d / temperature), optionally kept to the top k.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

TRANSFORM_FORMAT = "hdee-cluster-transform"
TRANSFORM_VERSION = 1
TOKEN_TABLE_FORMAT = "hdee-token-bytes"  # the bytes of every token id (cluster routing)
# scikit-learn's default token_pattern; a token starting with a digit becomes NUMBER_TOKEN.
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
NUMBER_TOKEN = "#number"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def tokenize(text: str) -> list[str]:
    """The terms of `text` as hdee's TfidfVectorizer sees them (its `tokenizer`)."""
    return [NUMBER_TOKEN if t[0].isdigit() else t for t in _TOKEN_RE.findall(text.lower())]


def term_counts(text: str) -> Counter[str]:
    """How often each term of tokenize(text) occurs (counted first, numbers merged after: the
    same counts, with the per-token work done in C)."""
    counts = Counter(_TOKEN_RE.findall(text.lower()))
    numbers = [term for term in counts if term[0].isdigit()]
    if numbers:
        counts[NUMBER_TOKEN] += sum(counts.pop(term) for term in numbers)
    return counts


@dataclass(frozen=True)
class ClusterTransform:
    """A fitted transform. `features` is "tfidf" (vocabulary, idf, components) or "seed"
    (mean: the sample's mean hidden state; vocabulary empty). Shapes: idf [V], components
    [D, V], mean [D], centroids [K, D], offsets [K]."""

    features: str
    names: list[str]
    vocabulary: dict[str, int]
    idf: torch.Tensor
    components: torch.Tensor
    mean: torch.Tensor
    centroids: torch.Tensor
    offsets: torch.Tensor
    settings: dict


def read_transform(settings_path: str | Path, arrays_path: str | Path) -> ClusterTransform:
    """Read transform.json and transform.safetensors (as hdee discover writes them)."""
    settings = json.loads(Path(settings_path).read_text(encoding="utf-8"))
    form, version = settings.get("format"), settings.get("version")
    if form != TRANSFORM_FORMAT or version != TRANSFORM_VERSION:
        raise ValueError(
            f"{settings_path}: {form!r} version {version!r}, expected {TRANSFORM_FORMAT!r} "
            f"version {TRANSFORM_VERSION}; run `hdee discover` again to rewrite it"
        )
    arrays = load_file(str(arrays_path))
    terms = settings.get("vocabulary", [])
    empty = torch.zeros(0, dtype=torch.float32)
    return ClusterTransform(
        features=settings["features"],
        names=list(settings["clusters"]),
        vocabulary={term: index for index, term in enumerate(terms)},
        idf=torch.tensor(settings.get("idf", []), dtype=torch.float64),
        components=arrays.get("components", empty),
        mean=arrays.get("mean", empty),
        centroids=arrays["centroids"],
        offsets=arrays["offsets"],
        settings=settings,
    )


def tfidf_features(texts: list[str], transform: ClusterTransform) -> torch.Tensor:
    """[len(texts), D] float32: tf-idf (sublinear tf, idf, L2) projected by the SVD, L2 norm.
    A text with no term of the vocabulary maps to the zero vector."""
    lookup = transform.vocabulary.get
    per_text: list[int] = []
    columns: list[int] = []
    counts: list[int] = []
    for text in texts:
        found = term_counts(text)
        per_text.append(len(found))
        columns.extend(map(lookup, found, repeat(-1)))
        counts.extend(found.values())
    # numpy for the index arithmetic: it turns long Python lists into arrays several times
    # faster than torch.tensor does.
    column = np.array(columns, dtype=np.int64)
    row = np.repeat(np.arange(len(texts)), per_text)
    known = column >= 0  # terms outside the vocabulary (stop words, rare terms) drop out
    row, column = row[known], column[known]
    tf = 1.0 + np.log(np.array(counts, dtype=np.float64)[known])
    weights = tf * transform.idf.numpy()[column]
    # L2 norm of each row's tf-idf vector, in float64 as scikit-learn computes it.
    norms = np.sqrt(np.bincount(row, weights=weights**2, minlength=len(texts)))
    weights = (weights / norms[row]).astype(np.float32)
    # One entry per term of a text: sorted, they are coalesced already (nothing to sum).
    vocabulary_size = transform.components.shape[1]
    order = np.argsort(row * vocabulary_size + column, kind="stable")
    tfidf = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([row[order], column[order]])),
        torch.from_numpy(weights[order]),
        (len(texts), vocabulary_size),
        check_invariants=False,
        is_coalesced=True,
    )
    projected = torch.sparse.mm(tfidf, transform.components.T)
    return _unit_rows(projected)


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, H] float32: the mean of a seed's last hidden states [b, t, H] over each document's
    tokens (padding masked out by attention_mask [b, t])."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden_states.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def centred_unit(pooled: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Pooled states minus the fitted sample mean (language models' states share a large
    common direction that would make every document look alike), L2-normalised."""
    return _unit_rows(pooled.float() - mean.float())


def seed_features(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """[b, H] float32: the seed features of a batch of documents (mean_pool, centred_unit)."""
    return centred_unit(mean_pool(hidden_states, attention_mask), mean)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def squared_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[n, K] squared Euclidean distances, computed directly (no |x|^2 + |c|^2 - 2xc
    cancellation), in float32."""
    diff = features.float().unsqueeze(1) - centroids.float().unsqueeze(0)
    return (diff * diff).sum(-1)


def cluster_distances(texts: list[str], transform: ClusterTransform) -> torch.Tensor:
    """[len(texts), K] squared distances of each text's tf-idf features to the centroids."""
    if transform.features != "tfidf":
        raise ValueError(
            f"a {transform.features!r} transform needs a seed model's hidden states: use "
            "seed_features, then squared_distances"
        )
    return squared_distances(tfidf_features(texts, transform), transform.centroids)


def assign(distances: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[n] the cluster of each row: argmin_j (d_j + offset_j), the rule the balanced fit
    found (ties go to the lower index)."""
    return torch.argmin(distances.float() + offsets.float(), dim=1)


def cluster_log_prior(
    distances: torch.Tensor, temperature: float, top_k: int | None = None
) -> torch.Tensor:
    """log P(cluster | text) = log softmax(-distances / temperature) over the last dimension;
    with top_k, only the k nearest clusters keep mass (the others get -inf) and the softmax
    is renormalised over them (c-BTM's router: temperature 0.1 over squared distances)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    logits = -distances / temperature
    if top_k is not None:
        clusters = distances.shape[-1]
        if not 1 <= top_k <= clusters:
            raise ValueError(f"top_k must be in 1..{clusters}, got {top_k}")
        kept = torch.topk(logits, top_k, dim=-1).indices
        mask = torch.full_like(logits, float("-inf")).scatter(-1, kept, 0.0)
        logits = logits + mask
    return torch.log_softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# The cluster prior of an ensemble: text -> P(member | text), no expert runs


def member_log_prior(
    distances: torch.Tensor,
    member_clusters: list[int],
    temperature: float,
    top_k: int | None = None,
) -> torch.Tensor:
    """[n, E] float64 log P(member | text) from squared distances [n, K] to the K clusters the
    members were trained on: `cluster_log_prior` over those clusters, each cluster's mass split
    equally among its members (`member_clusters[j]`: member j's cluster, an index into K)."""
    clusters = distances.shape[-1]
    if not member_clusters or min(member_clusters) < 0 or max(member_clusters) >= clusters:
        raise ValueError(f"member_clusters must index {clusters} clusters, got {member_clusters}")
    if set(member_clusters) != set(range(clusters)):
        raise ValueError(f"every one of the {clusters} clusters needs a member: {member_clusters}")
    per_cluster = cluster_log_prior(distances.double(), temperature, top_k)
    index = torch.tensor(member_clusters, dtype=torch.long)
    sharing = torch.bincount(index, minlength=clusters).double().log()
    return per_cluster[:, index] - sharing[index]


def read_token_table(path: str | Path) -> list[bytes]:
    """The bytes of every token id (`hdee.cluster_routing.write_token_table`): what turns the
    ids a model reads back into the text the transform reads."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != TOKEN_TABLE_FORMAT or data.get("version") != 1:
        raise ValueError(f"{path}: expected {TOKEN_TABLE_FORMAT!r} version 1")
    return [bytes.fromhex(token) for token in data["tokens"]]


def decode(token_ids: list[int], table: list[bytes]) -> str:
    """The text of `token_ids` (bytes joined, then UTF-8; a byte sequence cut mid-character
    becomes U+FFFD, which no term contains)."""
    return b"".join(table[i] for i in token_ids).decode("utf-8", errors="replace")


@dataclass
class ClusterRouter:
    """Everything the cluster prior needs: the tf-idf transform restricted to the members'
    clusters, the token table, which cluster each member was trained on, the temperature, top k
    and r (the prior reads a sequence's first r tokens and weighs the members from position r)."""

    transform: ClusterTransform
    table: list[bytes]
    member_clusters: list[int]
    temperature: float
    top_k: int | None
    route_tokens: int

    @classmethod
    def of(
        cls,
        transform: ClusterTransform,
        table: list[bytes],
        clusters: list[str],
        members: list[str],
        temperature: float,
        top_k: int | None,
        route_tokens: int,
    ) -> ClusterRouter:
        """`clusters`: the clusters the prior spreads over (each with a member); `members`: each
        member's cluster name."""
        missing = [name for name in clusters if name not in transform.names]
        if missing or transform.features != "tfidf":
            raise ValueError(
                f"the transform ({transform.features} features, clusters "
                f"{', '.join(transform.names)}) cannot route to {', '.join(missing) or clusters}"
            )
        rows = torch.tensor([transform.names.index(name) for name in clusters])
        kept = ClusterTransform(
            **{
                **transform.__dict__,
                "names": list(clusters),
                "centroids": transform.centroids[rows],
                "offsets": transform.offsets[rows],
            }
        )
        member_clusters = [clusters.index(name) for name in members]
        return cls(kept, table, member_clusters, temperature, top_k, route_tokens)

    def distances(self, prefixes: list[list[int]]) -> torch.Tensor:
        """[len(prefixes), K] squared distances of the text of each prefix's token ids."""
        return cluster_distances([decode(ids, self.table) for ids in prefixes], self.transform)

    def log_prior(self, prefixes: list[list[int]]) -> torch.Tensor:
        """[len(prefixes), E] float64 log P(member | the text of each prefix's token ids)."""
        distances = self.distances(prefixes)
        return member_log_prior(distances, self.member_clusters, self.temperature, self.top_k)

    def member_names(self, members: list[str]) -> dict[str, str]:
        """Member name -> the cluster it was trained on."""
        return {
            m: self.transform.names[c] for m, c in zip(members, self.member_clusters, strict=True)
        }
