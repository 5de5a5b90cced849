"""The cluster prior of a run (prior: cluster): which clusters its members were trained on, the
run's transform and token table, the text `hdee evaluate` routes by, and what routing costs.

`hdee.clusters` holds the maths and runs inside an exported model (torch only); this module is
hdee's side of it: it reads the run directory (discovery record, transform, tokenizer, plan)
and turns a spec's `prior: cluster` into a `ClusterRouter`, or a SpecError naming what to run or
change. docs/discovery.md, "Routing by clusters".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hdee.atomic import write_json
from hdee.clusters import TOKEN_TABLE_FORMAT, ClusterRouter, read_transform
from hdee.ensemble_spec import EnsembleKeys, SpecError, trained_on
from hdee.layout import RunLayout
from hdee.records import DiscoveryRecord, Plan, RecordError
from hdee.shapes import cluster_router_flops


def member_clusters(plan: Plan, members: dict[str, str], clusters: list[str]) -> dict[str, str]:
    """Member name -> the discovered cluster its expert was trained on (its own domain, else
    the nearest ancestor's that is a cluster). SpecError names members trained on none."""
    found: dict[str, str] = {}
    for name, job_id in members.items():
        hits = [domain for domain in trained_on(plan, job_id) if domain in clusters]
        if hits:
            found[name] = hits[0]
    strays = [name for name in members if name not in found]
    if strays:
        raise SpecError(
            f"prior cluster: member(s) {', '.join(strays)} were trained on no discovered "
            f"cluster ({', '.join(clusters)}): withdraw them with exclude, or use another prior"
        )
    return found


def load_router(
    layout: RunLayout, plan: Plan, members: dict[str, str], keys: EnsembleKeys
) -> ClusterRouter:
    """The cluster prior `keys` describe for these members of the run. SpecError (exit 2):
    a run with no discovery, seed features, a member on no cluster, a top k above the
    clusters the members cover."""
    if not layout.discovery_record.is_file():
        raise SpecError(
            f"prior cluster routes by the clusters `hdee discover` finds, and this run has no "
            f"discovery record ({layout.discovery_record}): give the config data.discover and "
            "run `hdee discover CONFIG` (or `hdee run CONFIG`), or use another prior"
        )
    try:
        record = DiscoveryRecord.read(layout.discovery_record)
    except RecordError as error:
        raise SpecError(str(error)) from None
    if record.features != "tfidf":
        raise SpecError(
            f"prior cluster: this run's clusters were found in a seed model's hidden states "
            f"(data.discover.features: {record.features}), and routing by them would run that "
            "model on every text: rediscover with features: tfidf"
        )
    by_member = member_clusters(plan, members, list(record.clusters))
    covered = sorted(set(by_member.values()))
    top_k = keys.cluster_top_k
    if top_k is not None and top_k > len(covered):
        raise SpecError(
            f"cluster_top_k: must be in 1..{len(covered)} (the clusters the members were "
            f"trained on: {', '.join(covered)}), got {top_k}"
        )
    transform = read_transform(layout.discovery_transform, layout.discovery_arrays)
    table = token_bytes_table(layout.tokenizer)
    return ClusterRouter.of(
        transform,
        table,
        covered,
        list(by_member.values()),
        keys.cluster_temperature,
        top_k,
        keys.route_tokens,
    )


# ----------------------------------------------------------------------------------------------
# Token ids back to text: the bytes of every token


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (what hdee's tokenizer spells tokens in): char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes_table(tokenizer_dir: str | Path) -> list[bytes]:
    """The bytes of every token id of the run's tokenizer, so the ids a model reads turn back
    into text with no tokenizer: byte-level BPE tokens exactly; SentencePiece-style tokens
    ('▁' for a space) and others by their own decoding; special tokens as a line break (a
    document boundary)."""
    from hdee.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    alphabet = _byte_level_alphabet()
    special = set(tokenizer.all_special_ids)
    table = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special:
            table.append(b"\n")
        elif all(char in alphabet for char in token):
            table.append(bytes(alphabet[char] for char in token))
        elif "\u2581" in token:
            table.append(token.replace("\u2581", " ").encode("utf-8"))
        else:
            table.append(tokenizer.decode([token_id]).encode("utf-8"))
    return table


def write_token_table(path: str | Path, table: list[bytes]) -> None:
    """The table as JSON (hex bytes per token id), read by `hdee.clusters.read_token_table`."""
    write_json(
        path, {"format": TOKEN_TABLE_FORMAT, "version": 1, "tokens": [t.hex() for t in table]}
    )


# ----------------------------------------------------------------------------------------------
# Evaluation windows and costs


def window_prefixes(tokens: np.ndarray, seq_len: int, count: int, route_tokens: int) -> list[Any]:
    """The first r input tokens of each of `count` evaluation windows (window n's inputs are
    tokens[n * seq_len : (n + 1) * seq_len], hdee.data.loaders.eval_batches)."""
    r = min(route_tokens, seq_len)
    return [tokens[n * seq_len : n * seq_len + r].astype(np.int64).tolist() for n in range(count)]


def router_flops_per_token(router: ClusterRouter, scored_tokens: int) -> float:
    """The cluster prior's FLOPs per scored token of a sequence of `scored_tokens` labels: one
    prior per sequence, from at most r terms (a byte-level token never spans two words)."""
    dims, clusters = router.transform.centroids.shape[1], router.transform.centroids.shape[0]
    terms = min(router.route_tokens, scored_tokens)
    return cluster_router_flops(terms, dims, clusters) / scored_tokens
