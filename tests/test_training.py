"""Stages 4-7 and the whole pipeline on a tiny generated catalogue; the model's parts and its search vectors."""
import argparse
import json
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.local import predict_local
from marketplace_search import runtime
from marketplace_search.metrics import per_category, top_k_accuracy
from marketplace_search.models import (STAGES, MarketplaceNet, WeightsUnavailable, embed, load_checkpoint,
                                       load_pretrained_backbone, prepare_for_serving, save_checkpoint, serve_forward,
                                       set_trainable, split_backbone, vector_dim)
from marketplace_search.presets import Preprocess, eval_transform
from marketplace_search.runtime import pick_device
from marketplace_search.search import Catalogue
from scripts.benchmark.bare import calibrate_batchnorm
from training import pipeline, train
from training.data import load_embeddings, load_split
from training.evaluate import choose_blend, knn_scores
from training.sample import make_sample_catalogue
from training.trunk import autocast_dtype, cache_key

TINY = ["--arch", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--epochs", "3",
        "--embedding-dim", "32", "--batch-size", "16", "--workers", "0", "--size", "96", "--feature-views", "2"]


def train_args(work, run):
    """training.train's arguments for a 3-epoch run that fine-tunes the last block of a random resnet18."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--arch", "resnet18", "--weights", "none", "--embedding-dim", "16", "--resize", "64",
                              "--crop", "56", "--workers", "0", "--feature-views", "2", "--head-batch-size", "16",
                              "--batch-size", "16", "--epochs", "3", "--trainable-stages", "1", "--device", "cpu",
                              "--precision", "fp32"])
    return argparse.Namespace(**vars(args), work=work, run=run, resume=None)


@pytest.fixture(scope="module")
def tiny_run(module_tmp):
    """One pipeline run over a generated catalogue of 4 visually distinct categories."""
    root = module_tmp("pipeline")
    make_sample_catalogue(root / "data", listings=100, categories=4, photos_per_listing=2, seed=0, size=96)
    return root / "work", pipeline.main(["--data", str(root / "data"), "--out", str(root / "work"), *TINY, "--lr",
                                         "3e-3", "--epochs", "15", "--dropout", "0.2", "--weight-decay", "0.01"])


@pytest.fixture(scope="module")
def fine_tuned(module_tmp, sample_work):
    """`train_args`' run on `sample_work`, trained straight through."""
    return train.train(train_args(sample_work, module_tmp("fine_tuned") / "run"))


def evaluation_recomputed(work, run_dir) -> dict:
    """RUN/evaluation.json, checked against the head's figures recomputed from the saved probabilities."""
    split = load_split(work)
    image_ids, _, probabilities, _ = load_embeddings(run_dir)
    assert image_ids == list(split["image_id"])
    report = json.loads((run_dir / "evaluation.json").read_text())
    is_test = (split["split"] == "test").to_numpy()
    labels = split["label"].to_numpy()[is_test]
    assert report["test_photos"] == is_test.sum() and report["catalogue_photos"] == len(split)
    ranked = np.argsort(-probabilities[is_test], axis=1)
    for k in (1, 3):
        expected = (ranked[:, :k] == labels[:, None]).any(axis=1).mean()
        assert report["fine_tuned"][f"top{k}_accuracy"] == pytest.approx(expected)
    return report


@pytest.mark.slow
def test_run_folder_has_checkpoints_logs_and_the_model_that_made_the_embeddings(tiny_run):
    work, run_dir = tiny_run
    weights = sorted(path.name for path in (run_dir / "weights").iterdir())
    assert weights == ["best.pt"] + sorted(f"epoch_{n}.pt" for n in range(1, 16))
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["train"]["history"]) == 15 and info["weights_source"] == "random initialisation"
    assert set(info["pipeline_seconds"]) == {"tables", "photos", "split", "train", "embed", "index", "evaluate", "text"}
    model, checkpoint = load_checkpoint(run_dir / "weights" / "best.pt")
    decoder = json.loads((work / "tables" / "decoder.json").read_text())
    assert checkpoint["classes"] == [decoder[str(i)] for i in range(len(decoder))]
    assert checkpoint["arch"] == "resnet18" and checkpoint["embedding_dim"] == 32
    assert checkpoint["preprocess"]["crop"] == 64 and checkpoint["config"]["epochs"] == 15
    assert set(checkpoint["metrics"]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    image_ids, vectors, probabilities, meta = load_embeddings(run_dir)
    photo = Image.open(work / "photos" / f"{image_ids[0]}.jpg").convert("RGB")
    batch = eval_transform(Preprocess.from_dict(checkpoint["preprocess"]))(photo)[None]
    with torch.inference_mode():
        probability, vector = embed(model, batch)
    np.testing.assert_allclose(vector[0].numpy(), vectors[0], atol=1e-4)
    np.testing.assert_allclose(probability[0].numpy(), probabilities[0], atol=1e-4)
    assert meta["normalisation"] == "l2" and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    as_json = json.loads((run_dir / "embeddings" / "image_embeddings.json").read_text())
    assert list(as_json) == image_ids
    np.testing.assert_allclose(np.array([as_json[i] for i in image_ids]), vectors, atol=1e-6)


@pytest.mark.slow
def test_index_finds_each_photo_first_and_carries_listing_metadata(tiny_run):
    _, run_dir = tiny_run
    image_ids, vectors, _, _ = load_embeddings(run_dir)
    catalogue = Catalogue.load(run_dir / "index")
    assert list(catalogue.image_ids) == image_ids
    assert catalogue.meta["model"]["checkpoint"].endswith("best.pt")
    for row in (0, 5, 17):
        first = catalogue.search(vectors[row:row + 1], k=3)[0][0]
        assert first["similarity"] == pytest.approx(1.0, abs=1e-4)
        # exact duplicate photos may tie: the winner has the same vector
        assert np.allclose(vectors[image_ids.index(first["image_id"])], vectors[row], atol=1e-5)
    assert set(catalogue.listings[image_ids[0]]) == {"product_id", "title", "price", "location", "category"}


@pytest.mark.slow
def test_evaluation_beats_chance_and_the_frozen_backbone(tiny_run):
    report = evaluation_recomputed(*tiny_run)
    figures = {"top1_accuracy", "top3_accuracy", "precision@1", "precision@5", "precision@10"}
    assert set(report["fine_tuned"]) == {"model"} | figures
    assert set(report["frozen_backbone"]) == {"model", "weights"} | figures
    # four categories of distinct colours and shapes: far above chance (0.25) even from random features
    assert report["fine_tuned"]["top1_accuracy"] >= 0.5
    # training the embedding layer makes neighbours share the query's category more than raw features do
    assert report["fine_tuned"]["precision@5"] > report["frozen_backbone"]["precision@5"]


@pytest.mark.slow
def test_resnet50_path_runs_end_to_end_on_a_few_real_listings(tmp_path, shared_data):
    run_dir = pipeline.main(["--data", str(shared_data), "--out", str(tmp_path), "--max-listings", "30", *TINY,
                             "--arch", "resnet50", "--epochs", "1"])
    assert load_checkpoint(run_dir / "weights" / "best.pt")[1]["arch"] == "resnet50"
    assert evaluation_recomputed(tmp_path, run_dir)["catalogue_photos"] > 30


def calibrated(arch: str, **options) -> MarketplaceNet:
    """A small random model whose BatchNorm statistics are not the identity, so folding them matters."""
    torch.manual_seed(0)
    model = MarketplaceNet(arch, 3, embedding_dim=16, **options)
    calibrate_batchnorm(model, torch.randn(8, 3, 64, 64) * 2 + 0.5)
    return model


@pytest.mark.parametrize("arch, vector", [("resnet18", "embedding"), ("mobilenet_v2", "embedding"),
                                          ("resnet18", "embedding+features")])
def test_the_serving_model_gives_the_model_outputs(arch, vector):
    model = calibrated(arch, vector=vector)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        probabilities, vectors = embed(model, images)
    served = prepare_for_serving(calibrated(arch, vector=vector))
    for rows in (slice(0, 1), slice(0, 3)):  # batch 1 and a larger batch through one prepared model
        served_probabilities, served_vectors = serve_forward(served, images[rows])
        torch.testing.assert_close(served_probabilities, probabilities[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(served_vectors, vectors[rows], atol=1e-5, rtol=1e-4)
    assert not torch.equal(probabilities[0], probabilities[1])  # the comparison is not between constants


def cosines(vectors: torch.Tensor) -> torch.Tensor:
    vectors = torch.nn.functional.normalize(vectors.float(), dim=1)
    return vectors @ vectors.T


def test_the_vectors_cosine_is_the_mean_of_the_embeddings_and_the_features():
    model = calibrated("resnet18", vector="embedding+features")
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        features = model.backbone(images)
        logits, _ = model.forward_features(features)
        embedding = model.embedding(features)
        probabilities, vectors = embed(model, images)
    assert model.vector_dim == 16 + 512 == vectors.shape[1]
    torch.testing.assert_close(probabilities, logits.softmax(dim=1))  # the category head is the same
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(vectors @ vectors.T, (cosines(embedding) + cosines(features)) / 2)
    with pytest.raises(ValueError, match="unknown search vector 'logits'"):
        MarketplaceNet("resnet18", 3, vector="logits")


def test_the_checkpoint_keeps_the_vector_choice_and_rebuilds_it(tmp_path):
    save_checkpoint(tmp_path / "best.pt", calibrated("resnet18", vector="embedding+features"), classes=["a", "b", "c"],
                    preprocess=Preprocess(), epoch=1, metrics={}, config={})
    model, checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint["vector"] == model.vector == "embedding+features"
    assert vector_dim(checkpoint) == checkpoint["vector_dim"] == 16 + 512 and checkpoint["embedding_dim"] == 16
    with torch.inference_mode():
        assert embed(model, torch.randn(2, 3, 56, 56))[1].shape == (2, 16 + 512)
    old = {key: value for key, value in checkpoint.items() if key not in ("vector", "vector_dim")}
    assert vector_dim(old) == 16  # checkpoints saved before the option: the embedding alone


@pytest.mark.slow
def test_a_two_part_vector_model_is_archived_and_served(recipe, recipe_handler):
    """The recipe's archive: a two-part vector model served by the default backend (OpenVINO bf16)."""
    assert recipe_handler.catalogue.dimension == 32 + 512
    [(status, answer)] = predict_local(recipe_handler, [{"photo": recipe.run.photo_bytes("img-004"),
                                                        "embedding": b"true"}])
    assert status == 200 and answer["neighbours"][0]["image_id"] == "img-004"  # a catalogue photo finds itself
    assert len(answer["embedding"]) == 32 + 512
    assert np.linalg.norm(answer["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_top_k_accuracy_knn_vote_and_per_category_figures_on_known_cases():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    votes = knn_scores(np.eye(3, dtype=np.float32), np.array([0, 1, 1]), np.array([[1, 0, 0]], np.float32), 2, k=1)
    assert votes.argmax() == 0
    rows, confusion = per_category(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), ["a", "b", "c"])
    assert confusion.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert rows[0] == {"category": "a", "count": 2, "precision": 0.5, "recall": 0.5}
    assert rows[1] == {"category": "b", "count": 2, "precision": 1.0, "recall": 0.5}
    assert rows[2]["precision"] == pytest.approx(2 / 3) and rows[2]["recall"] == 1.0


def test_frozen_training_only_updates_the_head():
    model = MarketplaceNet("resnet18", 3, embedding_dim=8)
    set_trainable(model, 0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert set_trainable(model, 1) == ["layer4"]
    trainable = {name.split(".")[0] for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}


@pytest.mark.slow
def test_fine_tuning_changes_the_unfrozen_block_only(fine_tuned):
    model, _ = load_checkpoint(fine_tuned / "weights" / "epoch_1.pt")
    torch.manual_seed(0)  # training seeds the same way before building its model
    initial = MarketplaceNet("resnet18", 3, embedding_dim=16).state_dict()
    trained = model.state_dict()
    assert not torch.equal(trained["backbone.layer4.0.conv1.weight"], initial["backbone.layer4.0.conv1.weight"])
    assert torch.equal(trained["backbone.layer1.0.conv1.weight"], initial["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(trained["classifier.2.weight"], initial["classifier.2.weight"])


def test_pretrained_weights_from_a_file_and_clear_failures_offline(tmp_path, monkeypatch):
    source = MarketplaceNet("mobilenet_v2", 3)
    torch.save(source.backbone.features.state_dict(), tmp_path / "features.pth")
    target = MarketplaceNet("mobilenet_v2", 3)
    assert "features.pth" in load_pretrained_backbone(target, str(tmp_path / "features.pth"))
    assert torch.equal(target.backbone.features[0][0].weight, source.backbone.features[0][0].weight)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained_backbone(target, str(tmp_path / "missing.pth"))
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not match"):
        load_pretrained_backbone(target, str(tmp_path / "other.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", Mock(side_effect=OSError("no network")))
    with pytest.raises(WeightsUnavailable, match="--weights PATH.*--weights none"):
        load_pretrained_backbone(MarketplaceNet("resnet50", 3), "imagenet")


def test_device_auto_picks_cuda_only_when_present_and_autocast_only_where_the_precision_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda" and pick_device("cpu").type == "cpu"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv(runtime.FLAGS_OFF_ENV, "bf16")
    assert autocast_dtype(cpu, "auto") is None  # emulated bf16 would be slower: plain fp32
    assert autocast_dtype(cpu, "fp32") is None
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512_bf16"})
    assert autocast_dtype(cpu, "auto") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        autocast_dtype(cpu, "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype(cuda, "auto") == torch.float16  # with a gradient scaler in train()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype(cuda, "auto") == torch.bfloat16


@pytest.mark.slow
def test_an_interrupted_run_resumed_ends_as_an_uninterrupted_one(sample_work, fine_tuned, tmp_path, monkeypatch):
    real_run_epoch, calls = train.run_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's training pass: the process dies here
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(train_args(sample_work, tmp_path / "broken"))
    monkeypatch.setattr(train, "run_epoch", real_run_epoch)
    assert sorted(p.name for p in (tmp_path / "broken" / "weights").glob("epoch_*.pt")) == ["epoch_1.pt"]
    resumed = train.train(argparse.Namespace(resume=tmp_path / "broken"))
    expected, _ = load_checkpoint(fine_tuned / "weights" / "epoch_3.pt")
    got, checkpoint = load_checkpoint(resumed / "weights" / "epoch_3.pt")
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, msg=name)
    assert checkpoint["training_state"]["args"]["epochs"] == 3
    history = json.loads((resumed / "run.json").read_text())["train"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert (resumed / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_trained_anywhere_loads_on_the_cpu_but_a_retired_option_is_not_resumed(tmp_path):
    model = MarketplaceNet("resnet18", 3, embedding_dim=8)
    save_checkpoint(tmp_path / "weights" / "epoch_1.pt", model, classes=["a", "b", "c"], preprocess=Preprocess(72, 64),
                    epoch=1, metrics={}, config={},
                    training_state={"optimizer": {}, "args": {"device": "cuda", "ema_decay": 0.99, "eval_sizes": None}})
    loaded, checkpoint = load_checkpoint(tmp_path / "weights" / "epoch_1.pt")
    assert next(loaded.parameters()).device.type == "cpu" and checkpoint["training_state"]["args"]["device"] == "cuda"
    with torch.inference_mode():
        probabilities, _ = embed(loaded, torch.randn(1, 3, 64, 64))
    assert probabilities.shape == (1, 3)
    with pytest.raises(ValueError, match=r"retired option\(s\) \['ema_decay'\]"):
        train.train(argparse.Namespace(resume=tmp_path))


def test_cache_key_changes_with_weights_cut_photo_size_and_seed():
    torch.manual_seed(0)
    model, other = MarketplaceNet("resnet18", 3), MarketplaceNet("resnet18", 3)
    base = cache_key(model, 1, Preprocess(72, 64), 0)
    assert base == cache_key(model, 1, Preprocess(72, 64), 0)
    assert len({base, cache_key(other, 1, Preprocess(72, 64), 0), cache_key(model, 2, Preprocess(72, 64), 0),
                cache_key(model, 1, Preprocess(96, 64), 0), cache_key(model, 1, Preprocess(72, 64), 1)}) == 5


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_lite2"])
def test_trunk_and_tail_compose_to_the_backbone(arch):
    torch.manual_seed(0)
    model = MarketplaceNet(arch, 3).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        whole = model.backbone(images)
        for stages in range(len(STAGES[arch]) + 1):
            trunk, tail = split_backbone(model, stages)
            torch.testing.assert_close(tail(trunk(images)), whole, atol=1e-4, rtol=1e-4)


def test_the_blend_is_chosen_on_validation_and_only_when_it_helps():
    classes = ["a", "b"]
    labels = np.array([0, 1, 0, 1])
    wrong_head = np.array([[0.4, 0.6], [0.6, 0.4], [0.45, 0.55], [0.55, 0.45]], np.float32)
    right_voters = [[{"category": classes[label], "similarity": 0.9}] * 20 for label in labels]
    blend, figures = choose_blend(wrong_head, right_voters, labels, classes)
    assert blend.weight > 0 and figures == {"val_top1_head": 0.0, "val_top1_blend": 1.0}
    right_head = wrong_head[:, ::-1].copy()
    wrong_voters = [[{"category": classes[1 - label], "similarity": 0.9}] * 20 for label in labels]
    blend, figures = choose_blend(right_head, wrong_voters, labels, classes)
    assert blend.weight == 0 and figures["val_top1_blend"] == 1.0  # the head alone wins: no blend is served


@pytest.mark.slow
def test_text_stage_adds_its_rows_and_a_model_the_handler_loads(tiny_run):
    from marketplace_search.text import INPUT_KINDS, TextModel, kind_name

    _, run_dir = tiny_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    rows = {row["inputs"]: row for row in evaluation["text"]["rows"]}
    assert set(rows) == {"photo", "title", "title+description", "photo+title", "photo+title+description"}
    served = evaluation.get("fine_tuned_blend", evaluation["fine_tuned"])
    assert rows["photo"]["top1_accuracy"] == pytest.approx(served["top1_accuracy"])  # the same test split
    model = TextModel.load(run_dir / "text_model")
    # photo + words: the neighbours' ranking and weight with the best val P@10; the test rows' P@k are the choice's
    rerank = model.info["rerank"]
    assert (rerank["weight"], rerank["fill"]) == (model.listing_words.rerank_weight, model.listing_words.fill)
    assert model.listing_words.product_ids
    best = max(p["precision@10"] for p in rerank["val_precision"].values())
    chosen = f"{'fill' if rerank['fill'] else 'photo pool'} w={rerank['weight']}"
    assert rerank["val_precision"][chosen]["precision@10"] == best
    chosen_test = rerank["test_precision"]["photo+title"]["precision@5"]  # rounded to 4 places
    assert rows["photo+title"]["precision@5"] == pytest.approx(chosen_test, abs=5e-5)
    if not rerank["weight"]:
        assert rows["photo+title"]["precision@5"] == served["precision@5"]  # neighbours stay the photo's
    assert 0 < rows["title"]["precision@10"] <= 1 and "found by words" in rows["title"]["model"]
    assert model.info["evaluation"]["title"]["precision@5"] == rows["title"]["precision@5"]  # on the model card
    assert model.classes == json.loads((run_dir / "run.json").read_text())["classes"]
    assert set(model.calibrations) == {kind_name(inputs) for inputs in INPUT_KINDS}
    assert len(evaluation["text"]["per_category"]) == len(model.classes)
