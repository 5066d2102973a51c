"""The construction's guarantees: exact above the rank threshold, optimal for linear models."""

import copy

import pytest
import torch

from lora_expressivity import RunConfig, run
from lora_expressivity.construction import construct_fnn, construct_tfn, matrix_step
from lora_expressivity.models import build_models


def exact_config(**overrides):
    settings = dict(width=16, batch_size=256, n_test=2000, method="ours", std=0.25)
    settings.update(overrides)
    return RunConfig(**settings)


def float64_construction_loss(config: RunConfig) -> float:
    """Test loss of the construction computed in float64, to separate algebra from round-off."""
    torch.manual_seed(config.seed)
    target, frozen = build_models(config)
    target.double()
    frozen.double()
    model = copy.deepcopy(frozen)
    torch.manual_seed(config.seed)
    if config.exp == "fnn":
        construct_fnn(model, target, config, [])
        x = torch.randn(config.n_test, config.width)
    else:
        construct_tfn(model, target, config, [])
        x = torch.randn(config.n_test, config.width, config.seq_length)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x.double()), target(x.double())).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("activation,use_bias", [("linear", 0), ("relu", 1)])
def test_fnn_exact_at_threshold(seed, activation, use_bias):
    for rank in (8, 11):
        config = exact_config(activation=activation, use_bias=use_bias, rank=rank, seed=seed)
        assert run(config).test_loss < 1e-8, (rank, config)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fnn_depth_4_exact_in_float64(seed):
    # Two depth-2 groups chain four float32 inverses, so float32 round-off alone leaves
    # about 1e-6; in float64 the same steps are exact.
    config = exact_config(target_depth=2, frozen_depth=4, rank=8, seed=seed)
    assert float64_construction_loss(config) < 1e-8
    assert run(config).test_loss < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("depth", [1, 2])
def test_tfn_exact_at_half_width(seed, depth):
    config = exact_config(exp="tfn", target_depth=depth, frozen_depth=depth, rank=8, n_head=2, seq_length=10,
                          seed=seed, n_test=500)
    assert float64_construction_loss(config) < 1e-8
    if depth == 1:
        assert run(config).test_loss < 1e-3


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("rank", [1, 3, 5, 7])
def test_linear_loss_matches_closed_form(seed, rank):
    config = exact_config(activation="linear", use_bias=0, rank=rank, seed=seed, n_test=20000)
    result = run(config)
    singular_values = torch.tensor(result.singular_values[0])
    optimum = (singular_values[2 * rank:] ** 2).sum().item() / 16
    # Gaussian test inputs: the empirical MSE has a relative standard error of about
    # sqrt(2 / n_test) per output coordinate, so 5% is many standard errors.
    assert result.test_loss == pytest.approx(optimum, rel=0.05)


def test_matrix_step_is_best_low_rank_fix():
    torch.manual_seed(0)
    frozen = [torch.randn(6, 6) for _ in range(3)]
    target = torch.randn(6, 6)
    adapters = matrix_step(target, frozen, rank=1)
    product = torch.eye(6)
    for weight, (A, B) in zip(frozen, adapters):
        product = (weight + A @ B.T) @ product
    frozen_product = frozen[2] @ frozen[1] @ frozen[0]
    U, S, Vh = torch.linalg.svd(target - frozen_product)
    best = frozen_product + (U[:, :3] * S[:3]) @ Vh[:3]
    assert torch.allclose(product, best, atol=1e-3)
