"""Every registered policy, run for real on real data (digits, CIFAR ResNet-8): its events,
its subnet (rebuilt from the spec alone), its hyperparameters and search ranges. Registering a
policy adds it here; policy-specific behaviour is tested below the generated tests."""

import copy
import warnings

import pytest
import torch

from prunetune.spaces import PruningVector, describe, measure_cost, rebuild, state_hash
from prunetune.spaces.cost import CostConfig
from prunetune.trainers.data import DataConfig, load_splits
from prunetune.trainers.models import build_model
from prunetune.trainers.policies import POLICIES, PolicyError, make_policy
from prunetune.trainers.recipe import TrainRecipe
from prunetune.trainers.trial import CandidateSetup, Epoch, Finished, Iteration, Materialized, run_candidate

MODEL = "cifar:resnet8"


def _world(tmp_path_factory, model_name):
    warnings.simplefilter("ignore")
    splits = load_splits(DataConfig(name="digits", image_size=16, limit_train=500), seed=0,
                         cache_dir=tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    parent = build_model(model_name, in_channels=1, num_classes=10)
    from prunetune.trainers.finetune import fit
    fit(parent, splits.train, splits.val, TrainRecipe(epochs=2, batch_size=64), device=torch.device("cpu"))
    parent.eval()
    x = torch.zeros(1, 1, 16, 16)
    structure = describe(parent, x)
    probes = torch.stack([splits.val[i][0] for i in range(32)])
    return splits, parent, structure, probes, x, model_name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory, MODEL)


@pytest.fixture(scope="module")
def deep_world(tmp_path_factory):
    """ResNet-20: three blocks per stage, so blocks can be removed (ResNet-8 has one)."""
    return _world(tmp_path_factory, "cifar:resnet20")


def _setup(world, policy, vector=None, epochs=1):
    splits, parent, structure, probes, _, model_name = world
    vector = vector or PruningVector(channels={s.name: 0.5 for s in structure.channel_stages if s.groups})
    return CandidateSetup(parent=parent, parent_id="p", splits=splits, probes=probes, vector=vector,
                          recipe=TrainRecipe(epochs=epochs, batch_size=64), model_name=model_name,
                          cost=CostConfig(latency=False), structure=structure, policy=policy)


@pytest.fixture(scope="module", params=sorted(POLICIES))
def outcome(request, world):
    cls = POLICIES[request.param]
    before = state_hash(world[1])
    policy = cls(**cls.test_params)
    events = list(run_candidate(_setup(world, policy)))
    assert state_hash(world[1]) == before, "the parent must not change"
    return policy, events


def test_event_order(outcome):
    _, events = outcome
    kinds = [type(e) for e in events]
    first = kinds.index(Materialized)
    assert all(k is Iteration for k in kinds[:first])
    assert kinds[first + 1:] == [Epoch, Finished]
    steps = [e.step for e in events[:first]]
    assert steps == list(range(1, len(steps) + 1))


def test_subnet_is_smaller_or_sparser_and_consistent(world, outcome):
    policy, events = outcome
    m, f = next(e for e in events if isinstance(e, Materialized)), events[-1]
    parent, x = world[1], world[4]
    parent_cost = measure_cost(parent, example_input=x)
    assert m.cost.macs <= parent_cost.macs
    nonzero = sum(int(p.count_nonzero()) for p in f.subnet.module.parameters())
    assert nonzero < sum(p.numel() for p in parent.parameters()), f"{policy.name} removed nothing"
    assert 0.0 <= m.cka["mean"] <= 1.0 + 1e-9 and 0.0 <= f.test_acc <= 1.0


def test_subnet_rebuilds_from_spec(world, outcome):
    _, events = outcome
    f = events[-1]
    skeleton = build_model(MODEL, in_channels=1, num_classes=10)
    rebuilt = rebuild(skeleton, f.subnet.spec)
    rebuilt.load_state_dict(f.subnet.module.state_dict())
    xb = torch.stack([world[0].test[i][0] for i in range(16)])
    torch.testing.assert_close(rebuilt.eval()(xb), f.subnet.module.eval()(xb))
    assert f.subnet.spec.parent_hash == state_hash(world[1])


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_params_round_trip_and_search_ranges(name):
    cls = POLICIES[name]
    policy = cls(**cls.test_params)
    assert type(policy)(**policy.get_params()).get_params() == policy.get_params()
    assert repr(policy).startswith(type(policy).__name__)
    for key, dist in cls.search_space.items():
        corners = list(dist.choices) if hasattr(dist, "choices") else [dist.low, dist.high]
        for value in corners:
            make_policy(name, {key: value})  # every corner of a default range is a valid setting


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_unknown_hyperparameter_is_named(name):
    with pytest.raises(PolicyError, match=rf"{name}\.no_such_key: unknown key"):
        make_policy(name, {"no_such_key": 1})


def test_unknown_policy_lists_the_registry():
    with pytest.raises(PolicyError, match="registered: allatonce, depgraph-sl, joint, sap"):
        make_policy("obd")


# -- sap ------------------------------------------------------------------------------------

def test_sap_unstructured_masks_hold_and_shrink(world):
    policy = make_policy("sap", {"mode": "unstructured", "scope": "layer", "iterations": 3, "gamma": 2.0})
    events = list(run_candidate(_setup(world, policy, epochs=0)))
    its = [e for e in events if isinstance(e, Iteration)]
    remaining = [e.metrics["remaining"] for e in its]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] < 1.0
    sub = events[-1].subnet.module
    weights = [p for p in sub.parameters() if p.dim() > 1]
    zero_share = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert zero_share == pytest.approx(1 - remaining[-1], abs=1e-6), "masked weights stay zero through training"
    assert events[-1].subnet.spec.importance == "sap-unstructured"


def test_sap_structured_gives_a_smaller_network(world):
    policy = make_policy("sap", {"iterations": 2, "eta_r": 0.5, "scope": "layer"})
    events = list(run_candidate(_setup(world, policy, epochs=0)))
    m = next(e for e in events if isinstance(e, Materialized))
    assert m.cost.params < measure_cost(world[1], example_input=world[4]).params
    its = [e for e in events if isinstance(e, Iteration)]
    assert all(0.0 <= e.metrics["pqi"] <= 1.0 for e in its) and its[-1].metrics["remaining"] < 1.0


def test_sap_rewind_target_is_the_parents_own_init(world):
    from prunetune.trainers.policies.sap import initial_state

    setup = _setup(world, None)
    w_init = initial_state(setup)
    torch.manual_seed(setup.seed)  # how get_parent builds a parent before training it
    built = build_model(setup.model_name, in_channels=1, num_classes=10).state_dict()
    assert all(torch.equal(w_init[k], built[k]) for k in built)
    assert not torch.equal(w_init["conv1.weight"], world[1].state_dict()["conv1.weight"])


def test_sap_neuron_scope_is_unstructured_only():
    with pytest.raises(PolicyError, match="neuron"):
        make_policy("sap", {"mode": "structured", "scope": "neuron"})


# -- allatonce ------------------------------------------------------------------------------

def test_allatonce_reaches_the_target_with_matched_candidates(deep_world):
    policy = make_policy("allatonce", {"target_macs_ratio": 0.6, "min_blocks": 1, "recovery_epochs": 0,
                                       "iteration_epochs": 0})
    events = list(run_candidate(_setup(deep_world, policy, epochs=0)))
    its = [e for e in events if isinstance(e, Iteration)]
    parent_macs = measure_cost(deep_world[1], example_input=deep_world[4]).macs
    assert its and its[-1].metrics["macs"] <= 0.6 * parent_macs
    for e in its:
        assert e.info["choice"] in ("layer", "filter")
        if "macs_layer" in e.metrics and "macs_filter" in e.metrics:
            goal = max(e.metrics["macs_layer"], 0.6 * parent_macs)  # the last step only goes down to the target
            assert e.metrics["macs_filter"] <= goal, "filter candidate removes at least the matched amount"
            assert e.metrics["macs_filter"] >= 0.8 * goal, "and not far more"
            better = "layer" if e.metrics["cka_layer"] >= e.metrics["cka_filter"] else "filter"
            assert e.info["choice"] == better


def test_allatonce_tie_goes_to_the_layer_candidate(deep_world, monkeypatch):
    from prunetune.trainers.policies import allatonce

    # A tie in CKA cannot be arranged with real weights; the comparison is what is tested.
    monkeypatch.setattr(allatonce.AllAtOncePolicy, "_cka", lambda self, setup, reference, cand: 0.5)
    policy = make_policy("allatonce", {"target_macs_ratio": 0.9, "min_blocks": 1, "recovery_epochs": 0,
                                       "iteration_epochs": 0, "max_iterations": 1})
    its = [e for e in run_candidate(_setup(deep_world, policy, epochs=0)) if isinstance(e, Iteration)]
    assert its[0].info["choice"] == "layer"


@pytest.mark.parametrize("candidates", ["layer", "filter"])
def test_allatonce_single_kind_baselines(deep_world, candidates):
    policy = make_policy("allatonce", {"target_macs_ratio": 0.8, "min_blocks": 1, "recovery_epochs": 0,
                                       "iteration_epochs": 0, "candidates": candidates})
    its = [e for e in run_candidate(_setup(deep_world, policy, epochs=0)) if isinstance(e, Iteration)]
    assert its and {e.info["choice"] for e in its} == {candidates}


# -- depgraph-sl ----------------------------------------------------------------------------

def test_group_regulariser_shrinks_group_norms(world):
    def norms(reg):
        policy = make_policy("depgraph-sl", {"reg": reg, "sparse_epochs": 2})
        its = [e for e in run_candidate(_setup(world, policy, epochs=0)) if isinstance(e, Iteration)]
        return its[-1].metrics["group_norm_mean"]

    assert norms(5e-2) < 0.9 * norms(1e-6)


def test_policies_do_not_modify_parent_copy(world):
    parent = copy.deepcopy(world[1])
    h = state_hash(parent)
    list(run_candidate(_setup(world, make_policy("sap", {"iterations": 1}), epochs=0)))
    assert state_hash(parent) == h
