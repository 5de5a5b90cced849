"""The planner: budgets, lanes across iterations, shared jobs, equalising."""

from __future__ import annotations

import json
import random

import pytest

from hdee.config import parse_config
from hdee.plan import PlanError, auto_schedule, build_plan, equalise_steps
from hdee.records import Plan, RecordError

VOCAB = 300
CLASSES = {f"d{i}": ("easy", "moderate", "difficult")[i % 3] for i in range(9)}


def plan_for(raw, classes=CLASSES, vocab=VOCAB):
    return build_plan(parse_config(raw), vocab, classes=classes)


def test_paper_budgets_are_equal_in_proxy_and_flops(config_dict):
    config_dict["model"] = {"preset": "small-close"}
    plan = plan_for(config_dict, vocab=128256)
    budgets = {name: c.budget for name, c in plan.configurations.items()}
    # 3 iterations x 3 lanes x 3072 x 400 = the baseline's proxy budget.
    assert budgets["MHo-IHo"].proxy == 3 * 3 * 3072 * 400
    for name in ("MHo-IHe", "MHe-IHo"):
        assert budgets[name].proxy == budgets["MHo-IHo"].proxy
        # FLOPs are affine in |FFN| with equal shared parts, so S + L = 2 M holds exactly too.
        assert budgets[name].flops == pytest.approx(budgets["MHo-IHo"].flops, rel=1e-12)
    assert plan.seed_budget.proxy == (2304 + 3072 + 3840) * 1000


def test_every_expert_branches_from_its_own_lane(config_dict):
    plan = plan_for(config_dict)
    for name, configuration in plan.configurations.items():
        assert len(configuration.ensembles) == 3
        for k, ensemble in enumerate(configuration.ensembles):
            assert sorted(ensemble) == ["difficult", "easy", "moderate"]
            for lane, job_id in ensemble.items():
                job = plan.jobs[job_id]
                assert (job.lane, job.iteration) == (lane, k + 1)
                assert job.size == configuration.sizes[lane]
                assert job.steps == configuration.steps[lane]
                assert job.domain == plan.schedule[lane][k]
                assert CLASSES[job.domain] == lane
                if k == 0:
                    assert job.init_from == plan.seeds[job.size], name
                else:
                    parent = plan.jobs[job.init_from]
                    assert job.init_from == configuration.ensembles[k - 1][lane]
                    assert (parent.lane, parent.iteration, parent.size) == (lane, k, job.size)


def test_shared_jobs_run_once(config_dict):
    plan = plan_for(config_dict)
    # The moderate lane (M, 400 steps) is the same in all three paper configurations.
    moderate = {tuple(e["moderate"] for e in c.ensembles) for c in plan.configurations.values()}
    assert len(moderate) == 1
    # 3 seeds + per iteration: easy {M400, M300, S400}, moderate {M400}, difficult {M400,
    # M500, L400} = 7 experts, so 21 experts instead of 27.
    assert len(plan.seeds) == 3
    assert len(plan.expert_jobs()) == 21
    assert len(plan.jobs) == 24


def test_job_ids_depend_on_what_determines_the_result(config_dict):
    base = plan_for(config_dict)
    again = plan_for(config_dict)
    assert base.jobs.keys() == again.jobs.keys()
    config_dict["experts"] = {"training": {"lr": 1e-4, "min_lr": 1e-5}}
    changed = plan_for(config_dict)
    assert set(base.seeds.values()) == set(changed.seeds.values())  # seeds untouched
    assert not set(j.job_id for j in base.expert_jobs()) & set(changed.jobs)


def test_auto_schedule_is_seeded_and_never_reuses_a_domain():
    classes = {f"d{i}": ("easy", "moderate", "difficult")[i % 3] for i in range(12)}
    lanes = ["easy", "moderate", "difficult"]
    first = auto_schedule(classes, lanes, 3, seed=0)
    assert first == auto_schedule(classes, lanes, 3, seed=0)
    used = [d for lane in lanes for d in first[lane]]
    assert len(used) == len(set(used)) == 9
    assert any(auto_schedule(classes, lanes, 3, seed=s) != first for s in range(1, 6))
    with pytest.raises(PlanError, match="class 'easy' has 4 trainable domain"):
        auto_schedule(classes, lanes, 5, seed=0)


def test_held_out_and_unscheduled_domains_are_evaluated_not_trained(config_dict):
    plan = plan_for(config_dict)
    assert set(plan.held_out_domains) == {"d9", "d10", "d11"}
    assert not set(plan.held_out_domains) & set(plan.trained_domains)
    assert {job.domain for job in plan.expert_jobs()} == set(plan.trained_domains)


def test_explicit_schedule(config_dict):
    config_dict["plan"]["schedule"] = {
        "easy": ["d0", "d3", "d6"],
        "moderate": ["d1", "d4", "d7"],
        "difficult": ["d2", "d5", "d8"],
    }
    plan = plan_for(config_dict, classes=None)
    assert not plan.provisional
    assert plan.schedule["difficult"] == ["d2", "d5", "d8"]
    assert plan.classes["d5"] == "difficult"


def test_provisional_plan_before_difficulty_is_known(config_dict):
    plan = plan_for(config_dict, classes=None)
    assert plan.provisional
    assert plan.schedule["easy"][0] == "<easy #1>"
    assert (
        plan.configurations["MHo-IHo"].budget
        == plan_for(config_dict).configurations["MHo-IHo"].budget
    )


def test_unequal_budgets_are_refused_unless_allowed(config_dict):
    config_dict["plan"]["configurations"] = [
        {
            "name": "MHo-IHo",
            "sizes": dict.fromkeys(("easy", "moderate", "difficult"), "M"),
            "steps": dict.fromkeys(("easy", "moderate", "difficult"), 400),
        },
        {
            "name": "big",
            "sizes": dict.fromkeys(("easy", "moderate", "difficult"), "L"),
            "steps": dict.fromkeys(("easy", "moderate", "difficult"), 400),
        },
    ]
    with pytest.raises(PlanError, match=r"big \+25.00%"):
        plan_for(config_dict)
    config_dict["plan"]["allow_unequal_budgets"] = True
    assert plan_for(config_dict).relative_budget_gap("big") == pytest.approx(0.25)
    config_dict["plan"].update(allow_unequal_budgets=False, equalise="proxy")
    plan = plan_for(config_dict)
    assert plan.configurations["big"].steps == dict.fromkeys(("easy", "moderate", "difficult"), 320)
    assert plan.relative_budget_gap("big", "proxy") == 0


def test_equalise_flops_closes_the_gap(config_dict):
    config_dict["plan"].update(
        equalise="flops",
        configurations=[
            {
                "name": "MHo-IHo",
                "sizes": dict.fromkeys(("easy", "moderate", "difficult"), "M"),
                "steps": dict.fromkeys(("easy", "moderate", "difficult"), 400),
            },
            {
                "name": "small",
                "sizes": dict.fromkeys(("easy", "moderate", "difficult"), "S"),
                "steps": dict.fromkeys(("easy", "moderate", "difficult"), 400),
            },
        ],
    )
    plan = plan_for(config_dict)
    steps = plan.configurations["small"].steps
    assert all(s > 400 for s in steps.values())  # smaller models get more steps
    assert abs(plan.relative_budget_gap("small", "flops")) < 1e-3


def test_equalise_steps_math():
    assert equalise_steps({"a": 100, "b": 100}, {"a": 1.0, "b": 1.0}, 300.0) == {"a": 150, "b": 150}
    result = equalise_steps({"a": 10, "b": 10}, {"a": 3.0, "b": 7.0}, 201.0)
    assert abs(3 * result["a"] + 7 * result["b"] - 201) <= 1


def test_unknown_size_in_a_configuration(config_dict):
    config_dict["plan"]["configurations"] = [
        {
            "name": "MHo-IHo",
            "sizes": {"easy": "XL", "moderate": "M", "difficult": "M"},
            "steps": dict.fromkeys(("easy", "moderate", "difficult"), 400),
        },
    ]
    with pytest.raises(PlanError, match="unknown size 'XL'"):
        plan_for(config_dict)


def test_plan_json_round_trip(config_dict, tmp_path):
    plan = plan_for(config_dict)
    plan.write(tmp_path / "plan.json")
    again = Plan.read(tmp_path / "plan.json")
    assert again == plan
    assert again.configurations["MHe-IHo"].ensembles == plan.configurations["MHe-IHo"].ensembles


def test_a_plan_file_of_another_version_or_format_is_refused(config_dict, tmp_path):
    path = tmp_path / "plan.json"
    data = plan_for(config_dict).model_dump(mode="json")
    path.write_text(json.dumps({**data, "version": 1}))
    with pytest.raises(RecordError, match=r"plan.json: hdee-plan version 1, this hdee reads"):
        Plan.read(path)
    path.write_text(json.dumps({"format": "hdee-evaluation", "version": 2}))
    with pytest.raises(RecordError, match="not an hdee-plan file"):
        Plan.read(path)
    del data["lanes"]
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match="invalid hdee-plan file: lanes: Field required"):
        Plan.read(path)
    path.write_text("{not json")
    with pytest.raises(RecordError, match="corrupt JSON"):
        Plan.read(path)


# ----------------------------------------------------------------------------------------------
# check_plannable: what the config alone decides, before any stage runs


def _configurations(sizes: dict[str, str], steps: int = 4) -> list[dict]:
    lanes = ("easy", "moderate", "difficult")
    return [{"name": "MHo-IHo", "sizes": sizes, "steps": dict.fromkeys(lanes, steps)}]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda r: r["plan"].update(
                configurations=_configurations({"easy": "M", "moderate": "XL", "difficult": "M"})
            ),
            r"plan\.configurations\.0\.sizes\.moderate \('MHo-IHo'\): unknown size 'XL'",
        ),
        (lambda r: r.update(seeds={"sizes": ["M", "XXL"]}), r"seeds\.sizes\.1: unknown size 'XXL'"),
        (
            lambda r: r.update(difficulty={"seed_size": "Q"}),
            r"difficulty\.seed_size: unknown size 'Q'",
        ),
        # 9 trainable domains under terciles: 3 per class, so 4 iterations cannot be filled.
        (
            lambda r: r["plan"].update(iterations=4),
            r"plan\.iterations: 4 iterations need 4 domains per class, but difficulty\.method "
            r"'tercile' splits the 9 trainable domains into classes of easy 3, moderate 3, "
            r"difficult 3: too few for \['difficult', 'easy', 'moderate'\]",
        ),
        (
            lambda r: r.update(
                difficulty={
                    "method": "fixed",
                    "fixed": {f"d{i}": "easy" if i < 7 else "difficult" for i in range(9)},
                }
            ),
            r"difficulty\.fixed gives classes of easy 7, moderate 0, difficult 2: too few for "
            r"\['difficult', 'moderate'\]",
        ),
        (
            lambda r: r.update(difficulty={"method": "fixed", "fixed": {"d0": "easy"}}),
            r"difficulty\.fixed: no class for trainable domain\(s\) \['d1'",
        ),
        (
            lambda r: (
                r.update(difficulty={"method": "thresholds", "thresholds": [5, 50]})
                or r["plan"].update(iterations=4)
            ),
            r"plan\.iterations: 4 iterations of 3 lanes need at least 12 trainable domains, the "
            r"config has 9",
        ),
        (
            lambda r: r["plan"]["configurations"][1]["steps"].update(easy=9000),
            r"differ from the baseline 'MHo-IHo' by more than plan\.budget_tolerance",
        ),
    ],
)
def test_check_plannable_refuses_with_the_key(config_dict, mutate, expected):
    from hdee.plan import check_plannable

    config_dict["plan"]["configurations"] = [
        {"name": c.name, "sizes": dict(c.sizes), "steps": dict(c.steps)}
        for c in parse_config(config_dict).plan.configurations
    ]
    mutate(config_dict)
    with pytest.raises(PlanError, match=expected):
        check_plannable(parse_config(config_dict))


def test_check_plannable_accepts_what_the_planner_accepts(config_dict):
    from hdee.plan import check_plannable

    check_plannable(parse_config(config_dict))
    # 3 iterations over 9 trainable domains fill every tercile exactly.
    config_dict["plan"]["iterations"] = 3
    check_plannable(parse_config(config_dict))


def test_tercile_class_sizes_match_the_classifier():
    """The planner's numpy-free count must agree with how difficulty.py really splits."""
    from hdee.difficulty import tercile_groups
    from hdee.plan import tercile_class_sizes

    for n in range(3, 17):
        groups = tercile_groups([f"d{i}" for i in range(n)])
        counted = {
            cls: list(groups.values()).count(cls) for cls in ("easy", "moderate", "difficult")
        }
        assert tercile_class_sizes(n) == counted, n


def test_flop_budgets_of_an_unknown_pretrained_vocabulary_wait_for_prepare(config_dict):
    """With a hub tokenizer whose size is not known yet, a FLOP-measured budget cannot be
    compared; it must not be compared with a made-up vocabulary size either."""
    from hdee.plan import check_plannable

    config_dict["data"]["tokenizer"] = {"kind": "pretrained", "name_or_path": "some/tokenizer"}
    lanes = ("easy", "moderate", "difficult")
    config_dict["plan"]["configurations"] = [
        {"name": "MHo-IHo", "sizes": dict.fromkeys(lanes, "M"), "steps": dict.fromkeys(lanes, 400)},
        # Equal |FFN| x steps (160 x 320 = 128 x 400), fewer steps: fewer attention FLOPs.
        {"name": "big", "sizes": dict.fromkeys(lanes, "L"), "steps": dict.fromkeys(lanes, 320)},
    ]
    config_dict["plan"]["budget_measure"] = "flops"
    config = parse_config(config_dict)
    check_plannable(config)  # 'big' differs from the baseline in FLOPs with any vocabulary
    with pytest.raises(PlanError, match="in the flops budget"):
        check_plannable(config, vocab_size=300)


def test_job_ids_hash_what_determines_the_weights_and_nothing_else(config_dict):
    """Cadence and device settings leave every job id as it is; a setting that changes the
    weights (learning rate, precision, DDP ranks) changes them."""

    def ids(seeds: dict | None = None, experts: dict | None = None, **sections) -> list[str]:
        raw = json.loads(json.dumps(config_dict))
        raw["seeds"] = {"training": seeds or {}}
        raw["experts"] = {"training": experts or {}}
        raw.update(sections)
        return sorted(plan_for(raw).jobs)

    base = ids()
    cadence = {
        "eval_every": 7,
        "eval_batches": 3,
        "checkpoint_every": 11,
        "keep_checkpoints": 5,
        "device": "cpu",
    }
    assert ids(seeds=cadence, experts=cadence) == base
    assert ids(seeds={"device": "auto"}, experts={"device": "cuda:1"}) == base
    for changed in ({"lr": 1e-3}, {"precision": "bf16"}, {"grad_clip": 0.5}):
        assert set(ids(seeds=changed)).isdisjoint(base), changed
        assert ids(experts=changed) != base, changed
    assert set(ids(runner={"gpus_per_job": 2})).isdisjoint(base)


def _gap(steps: dict[str, int], costs: dict[str, float], target: float) -> float:
    return abs(target - sum(costs[lane] * s for lane, s in steps.items()))


def test_equalise_steps_keeps_proportions_and_ends_where_no_step_helps():
    """One factor first (steps on target stay as they are, a doubled target doubles them),
    then +-1 steps of single lanes while they bring the total closer: at the end no single
    step of any lane (>= 1) gets closer, so the gap is at most half a step of the cheapest
    lane that can move. Seeded random cases, several passes, lanes at 1, ties."""
    assert equalise_steps({"a": 1, "b": 100}, {"a": 5.0, "b": 1.0}, 105.0) == {"a": 1, "b": 100}
    # A lane at 1 stays there: started at 2, no single step would find the exact fit again.
    assert equalise_steps({"a": 1, "b": 10}, {"a": 3.0, "b": 2.0}, 23.0) == {"a": 1, "b": 10}
    # The cheapest lane moves first: here that reaches the budget exactly, where moving the
    # lanes in name order would stop 2 short (13 / 16).
    assert equalise_steps({"a": 6, "b": 7}, {"a": 6.0, "b": 4.0}, 144.0) == {"a": 14, "b": 15}
    assert equalise_steps({"a": 10, "b": 20}, {"a": 1.0, "b": 1.0}, 60.0) == {"a": 20, "b": 40}
    # No lane goes below 1 step, however far over the target that leaves it.
    assert equalise_steps({"a": 1, "b": 1}, {"a": 1.0, "b": 10.0}, 8.0) == {"a": 1, "b": 1}
    # Rounding leaves 3 short, closed by the cheap lane, one step per pass.
    assert equalise_steps({"a": 4, "b": 2}, {"a": 1.0, "b": 10.0}, 27.0) == {"a": 7, "b": 2}
    assert equalise_steps({"a": 2, "b": 5}, {"a": 1.0, "b": 10.0}, 51.0) == {"a": 1, "b": 5}  # to 1
    # A tie (the gap is half a step either way) stops rather than going back and forth.
    assert equalise_steps({"a": 3}, {"a": 2.0}, 7.0) == {"a": 4}  # round(3.5) is 4
    rng = random.Random(7)
    for _ in range(300):
        lanes = ["easy", "moderate", "difficult"][: rng.randint(1, 3)]
        steps = {lane: rng.randint(1, 60) for lane in lanes}
        costs = {lane: float(rng.randint(1, 9)) for lane in lanes}
        target = sum(costs[x] * steps[x] for x in lanes) * rng.uniform(0.2, 3.0)
        result = equalise_steps(steps, costs, target)
        assert set(result) == set(steps) and all(s >= 1 for s in result.values())
        for lane in lanes:
            for delta in (1, -1):
                trial = {**result, lane: result[lane] + delta}
                if trial[lane] >= 1:
                    assert _gap(trial, costs, target) >= _gap(result, costs, target) - 1e-9, (
                        steps,
                        costs,
                        target,
                        result,
                        lane,
                        delta,
                    )
