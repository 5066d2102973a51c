"""The batched engine against the single-run path: each member of a batch must match run() alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lora_expressivity import ConfigError, RunConfig, run
from lora_expressivity import engine
from lora_expressivity.batched import StackedAdam
from lora_expressivity.engine import Member, PretrainingCache, flushed_subnormals, prepare_member, run_batch
from lora_expressivity.stacked import ClampedSoftmax, StackedFNN, StackedTFN, clamped_softmax_is_exact
from lora_expressivity.training import pretrain, tuned_parameters

# Relative tolerance of a gradient run against run(). On the project's test machine
# the FNN members match to about 1e-7 or exactly; the margin covers other BLAS builds.
TOLERANCE = 1e-4
METRICS = ("test_loss", "val_loss", "final_train_loss")

FNN_BASE = dict(width=8, target_depth=1, frozen_depth=2, method="sgd", batch_size=64, n_epochs=200,
                n_test=1000, seed=0)
TFN_BASE = dict(exp="tfn", width=8, target_depth=1, frozen_depth=1, method="sgd", batch_size=64, n_epochs=200,
                n_test=1000, seed=0)
SWEEP = [dict(lr=1e-2, weight_decay=0), dict(lr=1e-3, weight_decay=1e-3)]


def fnn(**settings) -> RunConfig:
    return RunConfig(**{**FNN_BASE, **settings})


def tfn(**settings) -> RunConfig:
    return RunConfig(**{**TFN_BASE, **settings})


# Every scenario trains in the same run_batch call, so the call also has to split
# mixed settings into groups and return the results in input order.
FNN_SCENARIOS = {
    "linear_no_bias": [fnn(use_bias=0, activation="linear", rank=rank, **sweep)
                       for rank in (1, 3) for sweep in SWEEP],
    "relu_tune_bias": [fnn(rank=2, tune_bias=tune_bias, **sweep) for tune_bias in (0, 1) for sweep in SWEEP],
    "pretrained_mixed_ranks": [fnn(rank=rank, pretrained=1, pretrained_epochs=100, **sweep)
                               for rank in (1, 4) for sweep in SWEEP],
    "rank_step": [fnn(width=16, target_depth=2, frozen_depth=4, rank=2, rank_step=step, **SWEEP[0])
                  for step in (1, -1)],
    "explicit_ranks": [fnn(ranks=(0, 3), **SWEEP[0]), fnn(ranks=(2, 1), **SWEEP[1])],
    "nothing_to_train": [fnn(ranks=(0, 0), tune_bias=0, **SWEEP[0])],
    "flt_mixed_last_layers": [fnn(width=16, frozen_depth=4, method="flt", last_layers=last, **SWEEP[0])
                              for last in (1, 2, 4)],
    "flt_no_bias": [fnn(frozen_depth=3, method="flt", use_bias=0, activation="linear", last_layers=last,
                        **SWEEP[1]) for last in (1, 2)],
    "mixed_seeds": [fnn(rank=2, seed=seed, **SWEEP[0]) for seed in (0, 1, 2)],
    "uniform_singular_values": [fnn(rank=2, init_mode="uniform_singular_values", **SWEEP[1])],
}
CONSTRUCTIONS = [fnn(method="ours", rank=3), fnn(method="ours", rank=2, pretrained=1, pretrained_epochs=100)]


@pytest.fixture(scope="module")
def fnn_results():
    # Module fixtures start before conftest's per-test one_thread fixture, so this one
    # sets one thread itself, as the single runs it compares against need.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        configs = [config for group in FNN_SCENARIOS.values() for config in group] + CONSTRUCTIONS
        batched = run_batch(configs)
        single = [run(config) for config in configs]
    finally:
        torch.set_num_threads(previous)
    return configs, batched, single


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def assert_matches(batched, single, tolerance: float):
    for metric in METRICS:
        value, reference = getattr(batched, metric), getattr(single, metric)
        assert relative_difference(value, reference) <= tolerance, (
            f"{metric}: batched {value!r}, single run {reference!r}, config {single.config}"
        )
    assert batched.pretraining_stopped_at_epoch == single.pretraining_stopped_at_epoch
    assert batched.pretraining_val_loss == single.pretraining_val_loss


@pytest.mark.parametrize("scenario", sorted(FNN_SCENARIOS))
def test_fnn_member_matches_single_run(fnn_results, scenario):
    configs, batched, single = fnn_results
    expected = FNN_SCENARIOS[scenario]
    found = 0
    for config, batched_result, single_result in zip(configs, batched, single):
        if any(config is member for member in expected):
            assert_matches(batched_result, single_result, TOLERANCE)
            found += 1
    assert found == len(expected)


def test_results_follow_input_order(fnn_results):
    configs, batched, _ = fnn_results
    assert [result.config for result in batched] == [config.to_dict() for config in configs]


def test_construction_runs_identical(fnn_results):
    configs, batched, single = fnn_results
    for config, batched_result, single_result in zip(configs, batched, single):
        if config.method == "ours":
            first, second = batched_result.to_dict(), single_result.to_dict()
            first.pop("wall_time_s")
            second.pop("wall_time_s")
            assert first == second


def test_gradient_results_have_every_field(fnn_results):
    configs, batched, _ = fnn_results
    for config, result in zip(configs, batched):
        if config.method == "ours":
            continue
        assert result.singular_values == []
        assert result.device == "cpu"
        assert result.wall_time_s > 0
        assert (result.pretraining_stopped_at_epoch is None) == (not config.pretrained)


@pytest.mark.parametrize("depth", [1, 2])
def test_tfn_member_matches_single_run(depth):
    # Depth-2 training amplifies any change of rounding (0.5% within 100 steps), so
    # this holds only because StackedTFN repeats a single run's products.
    configs = [tfn(target_depth=depth, frozen_depth=depth, rank=rank, seed=seed, **sweep)
               for rank in (1, 3) for seed in (0, 1) for sweep in SWEEP]
    for batched, single in zip(run_batch(configs), map(run, configs)):
        assert_matches(batched, single, TOLERANCE)


def test_tfn_paper_width_matches_single_run():
    configs = [tfn(width=16, target_depth=2, frozen_depth=2, rank=rank, batch_size=256, n_test=2000, **SWEEP[0])
               for rank in (4, 8)]
    for batched, single in zip(run_batch(configs), map(run, configs)):
        assert_matches(batched, single, TOLERANCE)


def _tfn_member_with_active_adapters(width: int, depth: int, rank: int, generator: torch.Generator) -> Member:
    config = RunConfig(exp="tfn", width=width, target_depth=depth, frozen_depth=depth, rank=rank, method="sgd",
                       batch_size=64, seed=0)
    member = prepare_member(config, "cpu", PretrainingCache())
    with torch.no_grad():
        for module in member.frozen.modules():
            if isinstance(getattr(module, "A", None), torch.nn.Parameter):
                module.A.copy_(0.05 * torch.randn(module.A.shape, generator=generator))
    return member


def test_tfn_gradients_match_single_run():
    generator = torch.Generator().manual_seed(1)
    member = _tfn_member_with_active_adapters(width=16, depth=2, rank=2, generator=generator)
    x = torch.randn(64, 16, 10, generator=generator)
    model = copy.deepcopy(member.frozen)
    with torch.no_grad():
        y = member.target(x)
    named = [(name, p) for name, p in model.named_parameters() if "adapter" in name]
    single = dict(zip([name for name, _ in named],
                      torch.autograd.grad(F.mse_loss(model(x), y), [p for _, p in named])))

    stacked = StackedTFN([member.frozen], seq_length=10, device="cpu")
    rows = x.transpose(1, 2).reshape(1, -1, 16)
    _, gradients = stacked.loss_and_gradients(rows, y.transpose(1, 2).reshape(1, -1, 16))
    batched = {}
    for (name, block, _), gradient in zip(stacked.trained(), gradients):
        factor = name[-1]
        if name.startswith("attention"):
            for adapter in range(gradient.shape[1]):
                batched[f"blocks.{block}.attention_adapters.{adapter}.{factor}"] = gradient[0, adapter]
        elif name.startswith("W2"):
            batched[f"blocks.{block}.W2_adapter.{factor}"] = gradient[0]
        else:
            batched[f"output_adapter.{factor}"] = gradient[0]

    assert batched.keys() == single.keys()
    for name, gradient in single.items():
        assert torch.allclose(batched[name], gradient, rtol=1e-6, atol=1e-6 * gradient.abs().max().item()), name


def test_fnn_padded_columns_get_zero_gradients():
    configs = [fnn(rank=1), fnn(rank=3)]
    members = [prepare_member(config, "cpu", PretrainingCache()) for config in configs]
    model = StackedFNN([m.frozen for m in members], "cpu")
    model.train_adapters = True
    generator = torch.Generator().manual_seed(3)
    for A in model.A:
        A[0, :, :1] = 0.1 * torch.randn(A.shape[1], 1, generator=generator)
        A[1] = 0.1 * torch.randn(A.shape[1:], generator=generator)
    params = [tensor for _, _, tensor in model.trained()]
    optimizer = StackedAdam(params, [1e-2, 1e-2], [1e-2, 1e-2])
    for _ in range(5):
        x = torch.randn(1, 64, 8, generator=generator).expand(2, 64, 8)
        y = torch.randn(1, 64, 8, generator=generator).expand(2, 64, 8)
        _, gradients = model.loss_and_gradients(x, y)
        for (kind, _, _), gradient in zip(model.trained(), gradients):
            assert torch.count_nonzero(gradient[0, :, 1:]) == 0, kind
            assert torch.count_nonzero(gradient[1]) > 0, kind
        optimizer.step(gradients)
    for A, B in zip(model.A, model.B):
        assert torch.count_nonzero(A[0, :, 1:]) == 0
        assert torch.count_nonzero(B[0, :, 1:]) == 0


def _saturated_scores(seq_length: int) -> torch.Tensor:
    # Scores spread over hundreds, as in saturated attention, so many lie more than
    # 87.75 below their column's maximum and some close to that distance.
    generator = torch.Generator().manual_seed(7)
    scores = 80 * torch.randn(512, seq_length, seq_length, generator=generator)
    scores[0, :, 0] = torch.linspace(-95.0, 0.0, seq_length)
    return scores


def _softmax_and_gradient(function, scores: torch.Tensor, grad: torch.Tensor):
    scores = scores.clone().requires_grad_(True)
    attention = function(scores)
    attention.backward(grad)
    return attention.detach(), scores.grad


@pytest.mark.parametrize("seq_length", [3, 10, 16])
def test_clamped_softmax_keeps_bits_when_flushed(seq_length):
    scores = _saturated_scores(seq_length)
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(8))
    with flushed_subnormals(True):
        assert clamped_softmax_is_exact(seq_length)
        clamped, clamped_grad = _softmax_and_gradient(ClampedSoftmax.apply, scores, grad)
        plain, plain_grad = _softmax_and_gradient(lambda x: torch.softmax(x, dim=1), scores, grad)
    assert torch.count_nonzero(clamped == 0) > 0
    assert torch.equal(clamped, plain)
    assert torch.equal(clamped_grad, plain_grad)


def test_clamped_softmax_rejected_without_flushing():
    # Unflushed, exp(-87.75) is a subnormal but exp of a score 200 below the maximum
    # is 0, so clamping would change the attention.
    assert not clamped_softmax_is_exact(10)


def test_clamped_softmax_skips_huge_scores():
    # Near 2e8 float32 values are 16 apart, so maximum - 87.75 rounds to maximum - 80,
    # where exp is normal. ClampedSoftmax must then leave the scores as they are.
    scores = _saturated_scores(10) + 2e8
    with flushed_subnormals(True):
        clamped = ClampedSoftmax.apply(scores)
        plain = torch.softmax(scores, dim=1)
    assert torch.equal(clamped, plain)


def test_tfn_softmax_choice_follows_flushing_and_threads():
    member = prepare_member(tfn(rank=2), "cpu", PretrainingCache())
    model = StackedTFN([member.frozen], seq_length=10, device="cpu")
    assert not model.choose_softmax()
    with flushed_subnormals(True):
        assert model.choose_softmax()
        torch.set_num_threads(2)
        assert not model.choose_softmax()


def test_tfn_padded_columns_get_zero_gradients():
    generator = torch.Generator().manual_seed(4)
    members = [_tfn_member_with_active_adapters(8, 2, rank, generator) for rank in (1, 3)]
    model = StackedTFN([m.frozen for m in members], seq_length=10, device="cpu")
    x = torch.randn(1, 64 * 10, 8, generator=generator).expand(2, -1, -1)
    y = torch.randn(1, 64 * 10, 8, generator=generator).expand(2, -1, -1)
    _, gradients = model.loss_and_gradients(x, y)
    for (name, _, _), gradient in zip(model.trained(), gradients):
        assert torch.count_nonzero(gradient[0, ..., 1:]) == 0, name
        assert torch.count_nonzero(gradient[1]) > 0, name


def test_stacked_adam_equals_torch_adam():
    generator = torch.Generator().manual_seed(0)
    lrs, weight_decays = [1e-2, 1e-3, 1e-2, 1e-4], [1e-3, 0.0, 1e-3, 1e-2]
    shapes = [(16, 3), (1, 16), (16, 16), (5,)]
    stacked = [torch.randn((4,) + shape, generator=generator) for shape in shapes]
    singles = [[torch.nn.Parameter(tensor[member].clone()) for tensor in stacked] for member in range(4)]
    optimizers = [torch.optim.Adam(singles[m], lr=lrs[m], weight_decay=weight_decays[m]) for m in range(4)]
    optimizer = StackedAdam(stacked, lrs, weight_decays)
    for step in range(50):
        # Gradients over many magnitudes, down to the subnormal range of float32.
        gradients = [torch.randn((4,) + shape, generator=generator) * 10.0 ** -(6 * (step % 8)) for shape in shapes]
        for member in range(4):
            for param, gradient in zip(singles[member], gradients):
                param.grad = gradient[member].clone()
            optimizers[member].step()
        optimizer.step(gradients)
    for member in range(4):
        for tensor, param in zip(stacked, singles[member]):
            assert torch.equal(tensor[member], param.detach())


def test_stacked_adam_masks_untrained_members():
    tensor = torch.ones(2, 3)
    optimizer = StackedAdam([tensor], [0.1, 0.1], [0.01, 0.01], masks=[torch.tensor([[1.0], [0.0]])])
    optimizer.step([torch.ones(2, 3)])
    assert torch.all(tensor[0] < 1)
    assert torch.equal(tensor[1], torch.ones(3))


def test_fnn_pretraining_independent_of_rank():
    weights = []
    for settings in (dict(rank=1), dict(rank=4), dict(rank=2, rank_step=1)):
        config = fnn(width=16, frozen_depth=4, target_depth=2, pretrained=1, pretrained_epochs=50, **settings)
        torch.manual_seed(config.seed)
        member = prepare_member(config, "cpu", PretrainingCache())  # pretrains for this rank alone
        weights.append({name: p for name, p in member.frozen.named_parameters() if "adapter" not in name})
    for other in weights[1:]:
        assert weights[0].keys() == other.keys()
        for name in weights[0]:
            assert torch.equal(weights[0][name], other[name]), name


def test_pretraining_cache_rejects_mismatched_member():
    config = fnn(pretrained=1, pretrained_epochs=20)
    cache = PretrainingCache()
    prepare_member(config, "cpu", cache)
    member = prepare_member(fnn(pretrained=0), "cpu", cache)
    with torch.no_grad():
        member.frozen.layers[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="internal error"):
        cache.apply(config, member, "cpu")


def test_pretraining_runs_once_per_seed(monkeypatch):
    calls = []

    def counting_pretrain(*args, **kwargs):
        calls.append(args[2].seed)
        return pretrain(*args, **kwargs)

    monkeypatch.setattr(engine, "pretrain", counting_pretrain)
    configs = [fnn(rank=rank, seed=seed, pretrained=1, pretrained_epochs=20, n_epochs=5, **sweep)
               for rank in (1, 2) for seed in (0, 1) for sweep in SWEEP]
    run_batch(configs)
    assert sorted(calls) == [0, 1]


def test_member_chunks_keep_results(monkeypatch):
    configs = [fnn(rank=rank, n_epochs=20, **sweep) for rank in (1, 2, 3) for sweep in SWEEP]
    whole = run_batch(configs)
    monkeypatch.setattr(engine, "EVALUATION_MEMORY_BYTES", 1)
    split = run_batch(configs, max_members=2)
    for first, second in zip(whole, split):
        for metric in METRICS:
            assert getattr(first, metric) == getattr(second, metric), metric


def test_device_argument_overrides_config():
    results = run_batch([fnn(rank=2, n_epochs=5, device="auto"), fnn(method="ours", rank=2, device="auto")],
                        device="cpu")
    for result in results:
        assert result.device == "cpu"
        assert result.config["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_raises_before_training():
    with pytest.raises(ConfigError, match="cuda"):
        run_batch([fnn(n_epochs=5)], device="cuda")


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_invalid_max_members_raises(value):
    with pytest.raises(ValueError, match="max_members"):
        run_batch([fnn(n_epochs=5)], max_members=value)


def test_tuned_parameters_match_engine_choice():
    # The engine's choice of trained tensors must stay in step with training.tuned_parameters.
    for config in (fnn(rank=2, tune_bias=1), fnn(rank=2, tune_bias=0), fnn(method="flt", last_layers=2),
                   fnn(method="flt", use_bias=0, activation="linear", last_layers=1)):
        member = prepare_member(config, "cpu", PretrainingCache())
        expected = sum(p.numel() for p in tuned_parameters(copy.deepcopy(member.frozen), config))
        model = StackedFNN([member.frozen], "cpu", with_adapters=config.method == "sgd")
        engine.configure_fnn_training(model, [config], "cpu")
        assert sum(tensor.numel() for _, _, tensor in model.trained()) == expected


@pytest.mark.parametrize("exp,depths", [("fnn", (2, 4)), ("tfn", (1, 1)), ("tfn", (2, 2))])
def test_construction_reuses_pretraining_exactly(exp, depths):
    # The construction reads the job's pretraining cache; for the transformer its test
    # set continues the generator stream after pretraining, so the cache restores it.
    target_depth, frozen_depth = depths
    configs = [RunConfig(exp=exp, width=8, target_depth=target_depth, frozen_depth=frozen_depth, rank=rank,
                         method=method, batch_size=64, n_epochs=20, n_test=500, pretrained=1,
                         pretrained_epochs=100, seed=1)
               for rank in (2, 5) for method in ("sgd", "ours")]
    for config, batched, single in zip(configs, run_batch(configs), map(run, configs)):
        assert batched.pretraining_stopped_at_epoch == single.pretraining_stopped_at_epoch
        if config.method == "ours":
            assert batched.test_loss == single.test_loss
            assert batched.singular_values == single.singular_values
