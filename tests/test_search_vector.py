"""The search vector "embedding+features": the embedding and the backbone's pooled features side by side."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import numpy as np
import pytest
import torch

from handlers.local import load_local_handler, predict_local
from marketplace_search.models import (SERVING_LAYOUTS, MarketplaceNet, embed, load_checkpoint, prepare_for_serving,
                                       serve_forward, vector_dim)
from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run
from tests.test_runtime import write_split
from tests.test_training import calibrated, train_args
from training import train


def cosines(vectors: torch.Tensor) -> torch.Tensor:
    vectors = torch.nn.functional.normalize(vectors.float(), dim=1)
    return vectors @ vectors.T


def both_parts(model: MarketplaceNet) -> MarketplaceNet:
    two_part = MarketplaceNet(model.arch, 3, embedding_dim=16, vector="embedding+features")
    two_part.load_state_dict(model.state_dict())
    return two_part.eval()


def test_the_vectors_cosine_is_the_mean_of_the_embeddings_and_the_features():
    model = calibrated("resnet18")
    two_part = both_parts(model)
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        features = model.backbone(images)
        logits, embedding = model.forward_features(features)
        probabilities, vectors = embed(two_part, images)
    assert two_part.vector_dim == 16 + 512 == vectors.shape[1] and model.vector_dim == 16
    torch.testing.assert_close(probabilities, logits.softmax(dim=1))  # the category head is the same
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(vectors @ vectors.T, (cosines(embedding) + cosines(features)) / 2)
    with pytest.raises(ValueError, match="unknown search vector 'logits'"):
        MarketplaceNet("resnet18", 3, vector="logits")


@pytest.mark.parametrize("layout", [layout for layout in SERVING_LAYOUTS if layout != "auto"])  # auto is nhwc
def test_every_serving_layout_gives_the_two_part_vector(layout):
    model = both_parts(calibrated("resnet18"))
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        probabilities, vectors = embed(model, images)
    served_probabilities, served_vectors = serve_forward(prepare_for_serving(both_parts(calibrated("resnet18")),
                                                                             layout), images)
    torch.testing.assert_close(served_probabilities, probabilities, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(served_vectors, vectors, atol=1e-4, rtol=1e-3)


def test_training_saves_the_vector_choice_and_the_checkpoint_rebuilds_it(sample_work, tmp_path):
    run_dir = train.train(train_args(sample_work, tmp_path / "run", vector="embedding+features", epochs=1))
    model, checkpoint = load_checkpoint(run_dir / "weights" / "best.pt")
    assert checkpoint["vector"] == "embedding+features" and model.vector == "embedding+features"
    assert vector_dim(checkpoint) == checkpoint["vector_dim"] == 16 + 512 and checkpoint["embedding_dim"] == 16
    with torch.inference_mode():
        _, vectors = embed(model, torch.randn(2, 3, 56, 56))
    assert vectors.shape == (2, 16 + 512)
    old = {key: value for key, value in checkpoint.items() if key not in ("vector", "vector_dim")}
    assert vector_dim(old) == 16  # checkpoints saved before the option: the embedding alone


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_a_two_part_vector_model_is_archived_and_served(tmp_path, runtime):
    torch.manual_seed(0)
    run = make_tiny_run(tmp_path / "model_evaluation" / "2025-01-31_142233", photos_dir=tmp_path / "photos",
                        model=MarketplaceNet("resnet18", 3, embedding_dim=32, vector="embedding+features"))
    write_split(run, tmp_path)  # the openvino archive's guard compares its answers with torch's on test
    model_dir = extract_archive(archive_tiny_run(run, tmp_path / "store", runtime=runtime), tmp_path / "model")
    handler = load_local_handler(model_dir)
    assert handler.catalogue.dimension == 32 + 512
    photo = run.photo_bytes("img-004")
    [(status, answer)] = predict_local(handler, [{"photo": photo, "embedding": b"true"}])
    assert status == 200 and answer["neighbours"][0]["image_id"] == "img-004"  # a catalogue photo finds itself
    assert len(answer["embedding"]) == 32 + 512
    assert np.linalg.norm(answer["embedding"]) == pytest.approx(1.0, abs=1e-4)
