"""adapt_resolution(): ViT position embeddings resampled, Swin and adaptive-pool CNNs copied."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer, resnet18, swin_transformer

from prunetune.spaces.heads import prune_heads
from prunetune.spaces.resolution import adapt_resolution


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)
    return model.eval()


def make_swin() -> nn.Module:
    torch.manual_seed(0)
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=10).eval()


def images(resolution: int) -> torch.Tensor:
    return torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("resolution, grid", [(48, 6), (16, 2), (64, 8)])
def test_vit_position_embedding_follows_the_resolution(resolution, grid):
    model = make_vit()
    old = model.encoder.pos_embedding.detach().clone()
    adapted = adapt_resolution(model, resolution)
    pos = adapted.encoder.pos_embedding
    assert isinstance(pos, nn.Parameter) and pos.shape == (1, 1 + grid * grid, 32)
    assert adapted.image_size == resolution and adapted.seq_length == 1 + grid * grid
    assert torch.equal(pos[:, 0], old[:, 0])  # class token is not interpolated
    # align_corners bicubic keeps the corner patches of the grid
    old_grid, new_grid = old[0, 1:].reshape(4, 4, 32), pos[0, 1:].reshape(grid, grid, 32)
    assert torch.allclose(new_grid[0, 0], old_grid[0, 0], atol=1e-6)
    assert torch.allclose(new_grid[-1, -1], old_grid[-1, -1], atol=1e-6)
    with torch.no_grad():
        assert adapted(images(resolution)).shape == (2, 10)
        model(images(32))  # the original still takes its own resolution
    assert torch.equal(model.encoder.pos_embedding, old) and model.image_size == 32


def test_vit_at_its_own_resolution_is_unchanged():
    model = make_vit()
    x = images(32)
    with torch.no_grad():
        assert torch.equal(adapt_resolution(model, 32)(x), model(x))


def test_head_pruned_vit_adapts_too():
    adapted = adapt_resolution(prune_heads(make_vit(), 0.5), 48)
    with torch.no_grad():
        assert adapted(images(48)).shape == (2, 10)


@pytest.mark.parametrize("resolution", [33, 4, 0, 32.0])
def test_vit_rejects_resolution_off_the_patch_grid(resolution):
    with pytest.raises(ValueError, match="resolution"):
        adapt_resolution(make_vit(), resolution)


@pytest.mark.parametrize("resolution", [4, 24, 40, 48, 64])
def test_swin_runs_at_other_multiples_of_its_patch(resolution):
    model = make_swin()
    adapted = adapt_resolution(model, resolution)
    assert adapted is not model
    with torch.no_grad():
        assert adapted(images(resolution)).shape == (2, 10)


def test_swin_rejects_resolution_off_the_patch_grid():
    with pytest.raises(ValueError, match="resolution"):
        adapt_resolution(make_swin(), 30)


def test_cnn_with_adaptive_pooling_is_copied_unchanged():
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    adapted = adapt_resolution(model, 48)
    assert adapted is not model
    assert [(n, type(m)) for n, m in adapted.named_modules()] == [
        (n, type(m)) for n, m in model.named_modules()]
    state, new_state = model.state_dict(), adapted.state_dict()
    assert state.keys() == new_state.keys()
    assert all(torch.equal(state[k], new_state[k]) for k in state)
    with torch.no_grad():
        assert adapted(images(48)).shape == (2, 10)


def test_model_without_a_known_way_to_adapt_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    with pytest.raises(ValueError, match="resolution.*Sequential"):
        adapt_resolution(model, 48)
