import numpy as np
import torch

from pipeline.models import create_model
from pipeline.scoring import RowScorer, gradnorm_scores


def test_rows_pass_keys_through_and_keep_upstream_errors_unscored() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3)
    scorer = RowScorer(lambda: (model, None, None), device="cpu")
    images = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    images[3, 0, 0, 0] = np.inf
    batch = {
        "image": images,
        "key": np.array(["a", "b", "c", "d"]),
        "shard": np.array(["s0"] * 4),
        "error": np.array([None, "not an image", None, None], dtype=object),
    }
    rows = scorer(batch)
    assert "image" not in rows and list(rows["key"]) == ["a", "b", "c", "d"] and list(rows["shard"]) == ["s0"] * 4
    assert list(rows["error"]) == [None, "not an image", None, "non-finite logits"]
    assert np.isnan(rows["score"][[1, 3]]).all() and list(rows["pred_class"][[1, 3]]) == [-1, -1]
    expected = gradnorm_scores(model, torch.from_numpy(images[[0, 2]]))
    assert np.allclose(rows["score"][[0, 2]], expected.numpy(), rtol=1e-5)
