"""The cluster prior (prior: cluster): its maths on hand-built cases, the spec's edge checks,
and a run with no discovery refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from hdee.clusters import decode, member_log_prior
from hdee.ensemble import posterior_weights
from hdee.ensemble_spec import EnsembleSpec, parse_prior
from hdee.routing import cluster_mixture, cluster_route
from hdee.shapes import cluster_router_flops


def test_member_prior_is_the_cluster_softmax_shared_among_members() -> None:
    # Two texts, three clusters; members 0 and 1 on cluster 0, member 2 on cluster 1, 3 on 2.
    distances = torch.tensor([[0.2, 1.0, 3.0], [2.0, 0.5, 0.1]], dtype=torch.float64)
    temperature = 0.5
    got = member_log_prior(distances, [0, 0, 1, 2], temperature).exp()
    for n, row in enumerate(distances.tolist()):
        weights = [math.exp(-d / temperature) for d in row]
        p = [w / sum(weights) for w in weights]
        expected = [p[0] / 2, p[0] / 2, p[1], p[2]]
        assert got[n].tolist() == pytest.approx(expected, abs=1e-12)
    # top k = 1: only the nearest cluster's members keep mass (renormalised over it).
    top = member_log_prior(distances, [0, 0, 1, 2], temperature, top_k=1).exp()
    assert top[0].tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0], abs=1e-12)
    assert top[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-12)
    # top k = 2 on text 1: clusters 2 and 1, softmax over those two alone.
    two = member_log_prior(distances, [0, 0, 1, 2], temperature, top_k=2).exp()[1]
    a, b = math.exp(-0.5 / temperature), math.exp(-0.1 / temperature)
    assert two.tolist() == pytest.approx([0.0, 0.0, a / (a + b), b / (a + b)], abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        member_log_prior(distances, [0, 0, 1, 2], 0.0)
    with pytest.raises(ValueError, match="needs a member"):
        member_log_prior(distances, [0, 0, 1], 1.0)


def test_token_ids_decode_to_text_through_the_byte_table() -> None:
    table = [b"\n", b"hel", b"lo", b" w", b"orld", "é".encode()[:1], "é".encode()[1:]]
    assert decode([1, 2, 3, 4], table) == "hello world"
    assert decode([5, 6], table) == "é"  # a character cut across two tokens joins again
    assert decode([5], table) == "\ufffd"


def test_cluster_mixture_is_uniform_before_r_and_the_cluster_prior_after() -> None:
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 2, 6, 5, dtype=torch.float64), dim=-1)[..., 0]
    prior = torch.log(torch.tensor([[0.7, 0.2], [0.3, 0.0], [0.0, 0.8]], dtype=torch.float64))
    r = 2
    mixed, kept, got_r = cluster_mixture(lp, prior, "prefix", "none", r)
    assert got_r == r and kept.tolist() == [[True, True], [True, False], [False, True]]
    uniform = posterior_weights(lp, None, "prefix")
    for n in range(2):
        for t in range(6):
            if t < r:
                weights = uniform[:, n, t].exp()
            else:  # P_c(j) * prod_{s<t} p_j(x_s), over the members with mass
                raw = prior[:, n].exp() * lp[:, n, :t].sum(dim=1).exp()
                weights = raw / raw.sum()
            expected = math.log(float((weights * lp[:, n, t].exp()).sum()))
            assert float(mixed[n, t]) == pytest.approx(expected, abs=1e-12)
    # prefix routing under the cluster prior keeps the top k of P_c(j) * P(x_<r | j).
    kept, _ = cluster_route(lp, prior, "prefix", "prefix", r, experts=1)
    for n in range(2):
        score = prior[:, n] + lp[:, n, :r].sum(dim=1)
        assert kept[:, n].nonzero().flatten().tolist() == [int(score.argmax())]


def test_the_router_costs_under_one_percent_of_an_expert() -> None:
    # r = 32 terms, 100 SVD dimensions, 8 clusters, over a window of 256 scored tokens,
    # against the smallest preset expert's forward FLOPs per token.
    from hdee.config import ModelConfig
    from hdee.shapes import Architecture, forward_flops_per_token, model_shapes

    shapes = model_shapes(ModelConfig())
    smallest = min(shapes.values(), key=lambda s: s.hidden_size)
    per_token = cluster_router_flops(32, 100, 8) / 256
    expert = forward_flops_per_token(Architecture.of(smallest, 8192), 256)
    assert per_token < 0.01 * expert
    assert cluster_router_flops(0, 0, 0) == 0


def test_the_spec_checks_the_cluster_keys_at_the_edge() -> None:
    assert str(parse_prior("cluster")) == "cluster"
    spec = EnsembleSpec(prior="cluster", cluster_temperature=0.5, cluster_top_k=2)
    assert spec.prior_choice.kind == "cluster" and spec.cluster_top_k == 2
    for bad, field in [
        ({"cluster_temperature": 0}, "cluster_temperature"),
        ({"cluster_temperature": -1.0}, "cluster_temperature"),
        ({"cluster_temperature": float("nan")}, "cluster_temperature"),
        ({"cluster_top_k": 0}, "cluster_top_k"),
    ]:
        with pytest.raises(ValidationError, match=field):
            EnsembleSpec(prior="cluster", **bad)
    with pytest.raises(ValidationError, match="cluster_top_k is only used with prior: cluster"):
        EnsembleSpec(prior="uniform", cluster_top_k=1)
    with pytest.raises(ValidationError, match="cluster_top_k"):
        EnsembleSpec(prior="cluster", routing="prior", experts=1)
