"""One candidate start to finish, pure torch (no Ray, no MLflow), on real data."""

import warnings

import pytest
import torch

from prunetune.spaces import PruningVector, describe, measure_cost
from prunetune.spaces.cost import CostConfig
from prunetune.trainers.data import DataConfig, load_splits
from prunetune.trainers.models import build_model
from prunetune.trainers.recipe import TrainRecipe
from prunetune.trainers.trial import CandidateSetup, Epoch, Finished, Materialized, run_candidate


@pytest.mark.parametrize("model_name", ["cifar:resnet8", "torchvision:squeezenet1_0"])
def test_candidate_events(tmp_path, model_name):
    warnings.simplefilter("ignore")
    splits = load_splits(DataConfig(name="digits", image_size=32, limit_train=300), seed=0, cache_dir=tmp_path)
    torch.manual_seed(0)
    parent = build_model(model_name, in_channels=1, num_classes=10).eval()
    x = torch.zeros(1, 1, 32, 32)
    structure = describe(parent, x)
    vector = PruningVector(channels={s.name: 0.5 for s in structure.channel_stages if s.groups}, resolution=24)
    probes = torch.stack([splits.val[i][0] for i in range(16)])
    setup = CandidateSetup(parent=parent, parent_id="p", splits=splits, probes=probes, vector=vector,
                           recipe=TrainRecipe(epochs=2, batch_size=64), model_name=model_name,
                           cost=CostConfig(repeats=2, batch=2), cost_cache=tmp_path / "costs")
    events = list(run_candidate(setup))
    assert [type(e) for e in events] == [Materialized, Epoch, Epoch, Finished]
    m, f = events[0], events[-1]
    assert 0.0 < m.cka["mean"] <= 1.0 + 1e-9 and "penultimate" in m.cka
    assert m.cost.macs < measure_cost(parent, example_input=x).macs
    assert m.cost.latency_ms > 0 and m.cost.peak_activation_bytes > 0
    assert [e.stats.epoch for e in events[1:3]] == [1, 2]
    assert 0.0 <= f.test_acc <= 1.0 and f.subnet.spec.resolution == 24
    assert list((tmp_path / "costs").glob("*.json")), "latency is cached by structure"


def test_finetune_resumes_exactly_from_an_epoch_checkpoint(tmp_path):
    """Stop after epoch 1, save weights + state through weights_only files, resume on a fresh
    subnet: the same epoch-2 stats and weights as the run that never stopped."""
    from prunetune.spaces import Pruned, load_subnet, prune, rebuild, save_subnet
    from prunetune.trainers.trial import finetune_and_test

    warnings.simplefilter("ignore")
    splits = load_splits(DataConfig(name="digits", image_size=16, limit_train=256), seed=0, cache_dir=tmp_path)
    torch.manual_seed(0)
    parent = build_model("cifar:resnet8", in_channels=1, num_classes=10).eval()
    x = torch.zeros(1, 1, 16, 16)
    structure = describe(parent, x)
    vector = PruningVector(channels={s.name: 0.5 for s in structure.channel_stages if s.groups})
    setup = CandidateSetup(parent=parent, parent_id="p", splits=splits, probes=torch.zeros(8, 1, 16, 16),
                           vector=vector, recipe=TrainRecipe(epochs=2, batch_size=64, lr=0.1), structure=structure)

    def fresh():
        return prune(parent, vector, x, structure=structure)

    straight = list(finetune_and_test(setup, fresh()))
    first = finetune_and_test(setup, interrupted := fresh())
    epoch1 = next(first)
    torch.save(epoch1.state(), tmp_path / "state.pt")
    save_subnet(tmp_path / "subnet", interrupted.spec, interrupted.module)
    first.close()

    spec, weights = load_subnet(tmp_path / "subnet")
    restored = rebuild(build_model("cifar:resnet8", in_channels=1, num_classes=10), spec)
    restored.load_state_dict(weights)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = list(finetune_and_test(setup, Pruned(restored, spec), resume=state))
    assert [type(e) for e in resumed] == [Epoch, Finished]
    assert resumed[0].stats.epoch == 2
    assert resumed[0].stats.train_loss == pytest.approx(straight[1].stats.train_loss, rel=1e-5)
    assert resumed[0].stats.val_acc == straight[1].stats.val_acc
    a, b = straight[-1].subnet.module.state_dict(), resumed[-1].subnet.module.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
