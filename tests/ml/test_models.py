"""Model shapes and parameter counts, and STGCN's sensor-count-independent parameters."""

from __future__ import annotations

import torch

from p2pfl.ml.models import MLP, STGCN, LogisticRegression, SmallCNN, parameter_count


def test_mlp_maps_digits_to_ten_logits_with_17226_parameters() -> None:
    model = MLP()
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert parameter_count(model) == (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)


def test_logistic_regression_has_650_parameters() -> None:
    model = LogisticRegression()
    assert model(torch.zeros(2, 8, 8)).shape == (2, 10)
    assert parameter_count(model) == 650


def test_small_cnn_is_the_lenet_of_the_orchestration_study() -> None:
    model = SmallCNN()
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    convs = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16)
    dense = (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert parameter_count(model) == convs + dense == 62006


def test_stgcn_outputs_three_horizons_per_sensor_with_81571_parameters() -> None:
    model = STGCN()
    n = 9
    out = model(torch.randn(2, 12, n, 1), torch.eye(n))
    assert out.shape == (2, 3, n)
    glu = lambda c_in, c_out, kt: c_in * 2 * c_out * kt + 2 * c_out  # noqa: E731
    cheb = 3 * 64 * 16 + 16
    block1 = glu(1, 64, 3) + cheb + glu(16, 64, 3) + 2 * 64
    block2 = glu(64, 64, 3) + cheb + glu(16, 64, 3) + 2 * 64
    output = glu(64, 64, 4) + 2 * 64 + (64 * 64 + 64) + (64 * 3 + 3)
    assert parameter_count(model) == block1 + block2 + output == 81571


def test_stgcn_state_dict_does_not_depend_on_the_sensor_count() -> None:
    model = STGCN()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    small, large = torch.randn(1, 12, 5, 1), torch.randn(1, 12, 40, 1)
    assert model(small, torch.eye(5)).shape == (1, 3, 5)
    assert model(large, torch.eye(40)).shape == (1, 3, 40)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_stgcn_mixes_information_between_graph_neighbours_only() -> None:
    # Path graph 0-1-2-3-4-5-6: with two blocks of K=3 Chebyshev convs a change at sensor 0
    # reaches at most 4 hops; sensor 6 (6 hops away) must not move.
    torch.manual_seed(0)
    model = STGCN().eval()
    n = 7
    adj = torch.zeros(n, n)
    for i in range(n - 1):
        adj[i, i + 1] = adj[i + 1, i] = 1.0
    from p2pfl.ml.traffic import scaled_laplacian

    lap = torch.from_numpy(scaled_laplacian(adj.numpy()))
    x = torch.randn(1, 12, n, 1)
    y = x.clone()
    y[:, :, 0] += 3.0
    with torch.no_grad():
        a, b = model(x, lap), model(y, lap)
    moved = (a - b).abs().amax(dim=(0, 1))
    assert moved[1] > 1e-4
    assert moved[6] == 0
