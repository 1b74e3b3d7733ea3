"""Knowledge distillation: the loss is the formula, and fine-tuning really uses the teacher."""

import copy

import pytest
import torch
import torch.nn.functional as F

from prunetune.trainers.data import DataConfig, load_splits
from prunetune.trainers.distill import DistillConfig, distilled_loss, kd_loss
from prunetune.trainers.finetune import train_epochs
from prunetune.trainers.models import build_model
from prunetune.trainers.recipe import TrainRecipe


def test_kd_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t, temp = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 3.0
    p_t, p_s = F.softmax(t / temp, -1), F.softmax(s / temp, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * temp ** 2
    assert kd_loss(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-6)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_weight_mixes_hard_and_soft_targets():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    ce, kd = F.cross_entropy(s, y), kd_loss(s, t, 2.0)
    assert distilled_loss(s, y, t, DistillConfig(weight=0.0, temperature=2.0)) == pytest.approx(ce.item())
    assert distilled_loss(s, y, t, DistillConfig(weight=1.0, temperature=2.0)) == pytest.approx(kd.item())
    mixed = distilled_loss(s, y, t, DistillConfig(weight=0.25, temperature=2.0))
    assert mixed.item() == pytest.approx(0.75 * ce.item() + 0.25 * kd.item())
    assert distilled_loss(s, y, None, DistillConfig(weight=0.5)) == pytest.approx(ce.item())


def test_fine_tuning_uses_the_teacher_at_native_resolution(tmp_path):
    splits = load_splits(DataConfig(name="digits", image_size=16, limit_train=200), seed=0, cache_dir=tmp_path)
    torch.manual_seed(0)
    teacher = build_model("cifar:resnet8", in_channels=1, num_classes=10).eval()
    student = build_model("cifar:resnet8", in_channels=1, num_classes=10)
    seen = []
    teacher.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-1]))
    recipe = TrainRecipe(epochs=1, batch_size=50)
    plain, distilled = copy.deepcopy(student), copy.deepcopy(student)
    list(train_epochs(plain, splits.train, splits.val, recipe, device=torch.device("cpu"), resolution=12))
    assert not seen
    list(train_epochs(distilled, splits.train, splits.val, recipe, device=torch.device("cpu"), resolution=12,
                      teacher=teacher, distill=DistillConfig(weight=0.5, temperature=4.0)))
    assert seen and set(seen) == {16}
    assert not torch.equal(plain.fc.weight, distilled.fc.weight)
