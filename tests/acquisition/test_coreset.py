import torch

from pipeline.acquisition.coreset import kcenter_greedy, penultimate_features
from pipeline.models import create_model


def test_kcenter_picks_the_farthest_points_in_order() -> None:
    labeled = torch.tensor([[0.0, 0.0]])
    unlabeled = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 4.0], [9.0, 1.0], [-6.0, 0.0]])
    # Farthest from the origin is (10,0); then (-6,0) at 6 from the origin beats (0,4); then (0,4).
    assert kcenter_greedy(unlabeled, labeled, 3) == [1, 4, 2]
    assert sorted(kcenter_greedy(unlabeled, labeled, 10)) == [0, 1, 2, 3, 4]


def test_kcenter_without_labeled_points_and_chunking_agree() -> None:
    torch.manual_seed(0)
    points = torch.randn(300, 5)
    labeled = torch.randn(50, 5)
    assert kcenter_greedy(points, labeled, 20, chunk=7) == kcenter_greedy(points, labeled, 20)
    picks = kcenter_greedy(points, torch.zeros(0, 5), 4)
    assert picks[0] == 0 and len(set(picks)) == 4


def test_penultimate_features_are_the_head_inputs() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3)
    x = torch.randn(4, 1, 28, 28)
    features = penultimate_features(model, x)
    model.eval()
    assert torch.allclose(model.fc(features), model(x), atol=1e-5)
