"""Stages 4-7 (train, embed, index, evaluate) and the whole pipeline on a tiny generated catalogue."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from marketplace_search.metrics import per_category, top_k_accuracy
from marketplace_search import runtime
from marketplace_search.runtime import pick_device
from training import pipeline, train
from training.data import load_embeddings
from training.evaluate import knn_scores
from training.trunk import autocast_dtype, cache_key
from marketplace_search.models import (SERVING_LAYOUTS, STAGES, MarketplaceNet, WeightsUnavailable, embed,
                                       load_checkpoint, load_pretrained_backbone, prepare_for_serving, save_checkpoint,
                                       serve_forward, serving_layout, set_trainable, split_backbone)
from marketplace_search.presets import Preprocess, eval_transform
from training.sample import make_sample_catalogue
from marketplace_search.search import Catalogue

TINY = ["--arch", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--epochs", "3",
        "--embedding-dim", "32", "--batch-size", "16", "--workers", "0", "--size", "96", "--feature-views", "2"]


@pytest.fixture(scope="module")
def tiny_run(module_tmp):
    """One pipeline run over a generated catalogue of 4 visually distinct categories."""
    root = module_tmp("pipeline")
    make_sample_catalogue(root / "data", listings=100, categories=4, photos_per_listing=2, seed=0, size=96)
    args = argparse_pipeline(["--data", str(root / "data"), "--out", str(root / "work"), *TINY,
                              "--lr", "3e-3", "--epochs", "15", "--dropout", "0.2", "--weight-decay", "0.01"])
    run_dir = pipeline.run_pipeline(args)
    return root / "work", run_dir


def argparse_pipeline(argv):
    import argparse

    parser = argparse.ArgumentParser()
    pipeline.add_pipeline_arguments(parser)
    return parser.parse_args(argv)


def test_run_folder_has_a_checkpoint_per_epoch_logs_and_reports(tiny_run):
    _, run_dir = tiny_run
    weights = sorted(path.name for path in (run_dir / "weights").iterdir())
    assert weights == ["best.pt"] + sorted(f"epoch_{n}.pt" for n in range(1, 16))
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    info = json.loads((run_dir / "run.json").read_text())
    assert len(info["train"]["history"]) == 15
    assert set(info["pipeline_seconds"]) == {"tables", "photos", "split", "train", "embed", "index", "evaluate", "text"}
    assert info["weights_source"] == "random initialisation"


def test_checkpoint_describes_itself_and_rebuilds_the_model(tiny_run):
    work, run_dir = tiny_run
    model, checkpoint = load_checkpoint(run_dir / "weights" / "best.pt")
    decoder = json.loads((work / "tables" / "decoder.json").read_text())
    assert checkpoint["classes"] == [decoder[str(i)] for i in range(len(decoder))]
    assert checkpoint["arch"] == "resnet18" and checkpoint["embedding_dim"] == 32
    assert checkpoint["preprocess"]["crop"] == 64 and checkpoint["config"]["epochs"] == 15
    assert set(checkpoint["metrics"]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    # the stored embeddings are what the rebuilt model computes for the same photo
    image_ids, vectors, probabilities, meta = load_embeddings(run_dir)
    from PIL import Image

    photo = Image.open(work / "photos" / f"{image_ids[0]}.jpg").convert("RGB")
    batch = eval_transform(Preprocess.from_dict(checkpoint["preprocess"]))(photo)[None]
    with torch.inference_mode():
        probability, vector = embed(model, batch)
    np.testing.assert_allclose(vector[0].numpy(), vectors[0], atol=1e-4)
    np.testing.assert_allclose(probability[0].numpy(), probabilities[0], atol=1e-4)
    assert meta["normalisation"] == "l2" and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_embeddings_json_matches_binary_form(tiny_run):
    _, run_dir = tiny_run
    image_ids, vectors, _, _ = load_embeddings(run_dir)
    as_json = json.loads((run_dir / "embeddings" / "image_embeddings.json").read_text())
    assert list(as_json) == image_ids
    np.testing.assert_allclose(np.array([as_json[i] for i in image_ids]), vectors, atol=1e-6)


def test_index_finds_each_photo_first_and_carries_listing_metadata(tiny_run):
    work, run_dir = tiny_run
    image_ids, vectors, _, _ = load_embeddings(run_dir)
    catalogue = Catalogue.load(run_dir / "index")
    assert catalogue.image_ids == image_ids
    assert catalogue.meta["model"]["checkpoint"].endswith("best.pt")
    for row in (0, 5, 17):
        first = catalogue.search(vectors[row:row + 1], k=3)[0][0]
        assert first["similarity"] == pytest.approx(1.0, abs=1e-4)
        # exact duplicate photos may tie: the winner has the same vector
        assert np.allclose(vectors[image_ids.index(first["image_id"])], vectors[row], atol=1e-5)
    listing = catalogue.listings[image_ids[0]]
    assert set(listing) == {"product_id", "title", "price", "location", "category"}


def test_evaluation_beats_chance_and_reports_the_frozen_backbone(tiny_run):
    _, run_dir = tiny_run
    report = json.loads((run_dir / "evaluation.json").read_text())
    figures = {"top1_accuracy", "top3_accuracy", "precision@1", "precision@5", "precision@10"}
    assert set(report["fine_tuned"]) == {"model"} | figures
    assert set(report["frozen_backbone"]) == {"model", "weights"} | figures
    # four categories of distinct colours and shapes: far above chance (0.25) even from random features
    assert report["fine_tuned"]["top1_accuracy"] >= 0.5
    # training the embedding layer makes neighbours share the query's category more than raw features do
    assert report["fine_tuned"]["precision@5"] > report["frozen_backbone"]["precision@5"]
    assert report["fine_tuned"]["top3_accuracy"] >= report["fine_tuned"]["top1_accuracy"]


def calibrated(arch: str) -> MarketplaceNet:
    """A small random model whose BatchNorm statistics are not the identity, so folding them matters."""
    torch.manual_seed(0)
    model = MarketplaceNet(arch, 3, embedding_dim=16)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # running statistics = this batch's
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("layout", [layout for layout in SERVING_LAYOUTS if layout != "auto"])  # auto is nhwc
def test_serving_layouts_give_the_model_outputs(arch, layout):
    model = calibrated(arch)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        probabilities, vectors = embed(model, images)
    served = prepare_for_serving(calibrated(arch), layout)
    assert served.serving_layout == layout
    for rows in (slice(0, 1), slice(0, 3)):  # batch 1 and a larger batch through one prepared model
        served_probabilities, served_vectors = serve_forward(served, images[rows])
        torch.testing.assert_close(served_probabilities, probabilities[rows], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(served_vectors, vectors[rows], atol=1e-5, rtol=1e-4)
    assert not torch.equal(probabilities[0], probabilities[1])  # the comparison is not between constants


def test_auto_serving_layout_is_nhwc_and_the_retired_mkldnn_is_refused():
    assert serving_layout() == serving_layout("auto") == "nhwc" and serving_layout("none") == "none"
    with pytest.raises(ValueError, match=r"serving layout 'mkldnn' .* is retired: archive the run again with the "
                                         r"default layout, `python -m scripts\.archive --run RUN"):
        serving_layout("mkldnn")
    with pytest.raises(ValueError, match="serving layout 'fast' is not one of auto, nhwc, none"):
        serving_layout("fast")


def test_top_k_accuracy_and_knn_vote_on_known_cases():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    reference = np.eye(3, dtype=np.float32)
    votes = knn_scores(reference, np.array([0, 1, 1]), np.array([[1, 0, 0]], np.float32), 2, k=1)
    assert votes.argmax() == 0


def test_frozen_training_only_updates_the_head():
    model = MarketplaceNet("resnet18", 3, embedding_dim=8)
    set_trainable(model, 0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    unfrozen = set_trainable(model, 1)
    assert unfrozen == ["layer4"]
    trainable = {name.split(".")[0] for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}


def test_one_fine_tuning_step_changes_the_unfrozen_block(tmp_path):
    make_sample_catalogue(tmp_path / "data", listings=12, categories=2, photos_per_listing=1, seed=1, size=64)
    args = argparse_pipeline(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "work"), *TINY,
                              "--epochs", "1", "--trainable-stages", "1", "--no-baseline"])
    run_dir = pipeline.run_pipeline(args)
    model, _ = load_checkpoint(run_dir / "weights" / "epoch_1.pt")
    torch.manual_seed(args.seed)  # training seeds the same way before building its model
    initial = MarketplaceNet("resnet18", 2, embedding_dim=32).state_dict()
    trained = model.state_dict()
    assert not torch.equal(trained["backbone.layer4.0.conv1.weight"], initial["backbone.layer4.0.conv1.weight"])
    assert torch.equal(trained["backbone.layer1.0.conv1.weight"], initial["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(trained["classifier.2.weight"], initial["classifier.2.weight"])


def test_refit_trains_on_train_and_val_for_the_chosen_epochs_and_serves_the_chosen_blend(tmp_path):
    make_sample_catalogue(tmp_path / "data", listings=40, categories=2, photos_per_listing=1, seed=2, size=64)
    args = argparse_pipeline(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "work"), *TINY,
                              "--no-baseline", "--refit-train-val", "--eval-sizes", "48", "64"])
    refit_dir = pipeline.run_pipeline(args)
    info = json.loads((refit_dir / "run.json").read_text())
    first = Path(info["refit"]["from_run"])
    first_info = json.loads((first / "run.json").read_text())
    assert first != refit_dir.resolve() and first_info["refit"]["run"] == str(refit_dir.resolve())
    chosen = first_info["train"]["best_epoch"]
    assert [row["epoch"] for row in info["train"]["history"]] == list(range(1, chosen + 1))
    assert info["train"]["best_epoch"] == chosen == info["refit"]["epochs"]
    split = pd.read_csv(tmp_path / "work" / "split.csv")
    counts = split["split"].value_counts()
    assert first_info["train"]["cache"]["train_items"] == 2 * counts["train"]
    assert info["train"]["cache"]["train_items"] == 2 * (counts["train"] + counts["val"])
    _, checkpoint = load_checkpoint(refit_dir / "weights" / "epoch_1.pt")
    assert checkpoint["training_state"]["args"]["epochs"] == 3  # the same schedule, stopped at the chosen epoch
    assert load_checkpoint(refit_dir / "weights" / "best.pt")[1]["epoch"] == chosen
    size = first_info["train"]["eval_size"]["chosen"]  # chosen on validation by the train-only run, served as is
    assert set(first_info["train"]["eval_size"]["val_top1_head"]) == {"48", "64"}
    assert info["train"]["eval_size"] == {"trained": 64, "chosen": size, "val_top1_head": {}}
    assert load_checkpoint(refit_dir / "weights" / "best.pt")[1]["preprocess"]["crop"] == size
    first_blend = json.loads((first / "evaluation.json").read_text())["category_blend"]
    report = json.loads((refit_dir / "evaluation.json").read_text())
    assert {key: report["category_blend"][key] for key in ("k", "temperature", "weight")} == \
        {key: first_blend[key] for key in ("k", "temperature", "weight")}
    assert report["category_blend"]["chosen_by_run"] == str(first.resolve())
    assert report["refit"]["train_splits"] == ["train", "val"] and report["test_photos"] == counts["test"]
    assert {"refit train", "refit embed", "refit index", "refit evaluate"} <= set(info["pipeline_seconds"])
    # the text fusion stays the one calibrated against the train-only photo model (which never saw val)
    assert (refit_dir / "text_model" / "text_model.json").read_bytes() == \
        (first / "text_model" / "text_model.json").read_bytes()
    assert report["text"]["photo_model_run"] == first.name


def test_pretrained_weights_from_a_file_and_clear_failures(tmp_path):
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


def test_imagenet_weights_unavailable_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(WeightsUnavailable, match="--weights PATH.*--weights none"):
        load_pretrained_backbone(MarketplaceNet("resnet50", 3), "imagenet")


def test_resnet50_path_runs_end_to_end_on_a_few_real_listings(tmp_path, shared_data):
    args = argparse_pipeline(["--data", str(shared_data), "--out", str(tmp_path),
                              "--max-listings", "30", *TINY, "--arch", "resnet50", "--epochs", "1"])
    run_dir = pipeline.run_pipeline(args)
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["catalogue_photos"] > 30 and 0 <= report["fine_tuned"]["top1_accuracy"] <= 1


# --- device, precision, resume (the CUDA path is exercised on the CPU) -----------------------------

def test_device_auto_picks_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda" and pick_device("cpu").type == "cpu"


def test_autocast_only_where_the_hardware_has_the_precision(monkeypatch):
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


def train_args(work, run, **overrides):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--resume", type=Path)
    train.add_arguments(parser)
    arguments = ["--work", str(work), "--run", str(run), "--arch", "resnet18", "--weights", "none",
                 "--embedding-dim", "16", "--resize", "64", "--crop", "56", "--workers", "0",
                 "--feature-views", "2", "--head-batch-size", "16", "--batch-size", "16", "--epochs", "3",
                 "--trainable-stages", "1", "--device", "cpu", "--precision", "fp32"]
    for name, value in overrides.items():
        arguments += [f"--{name.replace('_', '-')}", str(value)]
    return parser.parse_args(arguments)


def test_an_interrupted_run_resumed_ends_as_an_uninterrupted_one(sample_work, tmp_path, monkeypatch):
    whole = train.train(train_args(sample_work, tmp_path / "whole"))
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
    import argparse

    resumed = train.train(argparse.Namespace(resume=tmp_path / "broken"))
    expected, _ = load_checkpoint(whole / "weights" / "epoch_3.pt")
    got, checkpoint = load_checkpoint(resumed / "weights" / "epoch_3.pt")
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, msg=name)
    assert checkpoint["training_state"]["args"]["epochs"] == 3
    history = json.loads((resumed / "run.json").read_text())["train"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert (resumed / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_sizes_serve_the_size_the_head_reads_validation_best_at(sample_work, tmp_path):
    args = train_args(sample_work, tmp_path / "run")
    args.eval_sizes = [72, 40, 56]
    run_dir = train.train(args)
    eval_size = json.loads((run_dir / "run.json").read_text())["train"]["eval_size"]
    grid = {int(size): accuracy for size, accuracy in eval_size["val_top1_head"].items()}
    assert sorted(grid) == [40, 56, 72] and eval_size["trained"] == 56
    assert eval_size["chosen"] == max(sorted(grid), key=grid.get)  # the first best: ties go to the smaller
    model, checkpoint = load_checkpoint(run_dir / "weights" / "best.pt")
    chosen = eval_size["chosen"]
    assert checkpoint["preprocess"]["crop"] == chosen and checkpoint["preprocess"]["resize"] == round(chosen * 64 / 56)
    assert load_checkpoint(run_dir / "weights" / "epoch_1.pt")[1]["preprocess"]["crop"] == 56  # as trained
    # the grid is the best model's head on the validation photos at each size, as the embed stage reads them
    split = pd.read_csv(sample_work / "split.csv", dtype=str)
    val = split[split["split"] == "val"]
    for size in (40, 72):
        transform = eval_transform(Preprocess(round(size * 64 / 56), size))
        images = torch.stack([transform(Image.open(sample_work / "photos" / f"{image_id}.jpg").convert("RGB"))
                              for image_id in val["image_id"]])
        with torch.inference_mode():
            probabilities, _ = embed(model, images)
        accuracy = float((probabilities.argmax(dim=1).numpy() == val["label"].astype(int).to_numpy()).mean())
        assert grid[size] == pytest.approx(accuracy, abs=1e-4)


def test_eval_size_ties_go_to_the_smaller_and_a_choice_needs_validation_held_out(sample_work, tmp_path, monkeypatch):
    readings = {40: 0.5, 56: 0.75, 72: 0.75}
    monkeypatch.setattr(train, "head_accuracy", lambda model, preprocess, *rest: readings[preprocess.crop])
    chosen, grid = train.choose_eval_size(None, Preprocess(64, 56), None, None, [72, 40, 56], 1, 0, None)
    assert chosen == Preprocess(64, 56) and grid == readings
    args = train_args(sample_work, tmp_path / "refit")
    args.eval_sizes, args.train_splits = [40, 56], ["train", "val"]
    with pytest.raises(ValueError, match="validation photos held out"):
        train.train(args)
    assert not (tmp_path / "refit").exists()


def test_a_checkpoint_trained_anywhere_loads_on_the_cpu(tmp_path):
    model = MarketplaceNet("resnet18", 3, embedding_dim=8)
    save_checkpoint(tmp_path / "epoch_1.pt", model, classes=["a", "b", "c"], preprocess=Preprocess(72, 64), epoch=1,
                    metrics={}, config={}, training_state={"optimizer": {}, "args": {"device": "cuda"}})
    loaded, checkpoint = load_checkpoint(tmp_path / "epoch_1.pt")
    assert next(loaded.parameters()).device.type == "cpu" and checkpoint["training_state"]["args"]["device"] == "cuda"
    with torch.inference_mode():
        probabilities, _ = embed(loaded, torch.randn(1, 3, 64, 64))
    assert probabilities.shape == (1, 3)


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
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        whole = model.backbone(images)
        for stages in range(len(STAGES[arch]) + 1):
            trunk, tail = split_backbone(model, stages)
            torch.testing.assert_close(tail(trunk(images)), whole, atol=1e-4, rtol=1e-4)


def test_per_category_precision_recall_and_confusion_on_a_known_case():
    predicted, labels = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    rows, confusion = per_category(predicted, labels, ["a", "b", "c"])
    assert confusion.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert rows[0] == {"category": "a", "count": 2, "precision": 0.5, "recall": 0.5}
    assert rows[1] == {"category": "b", "count": 2, "precision": 1.0, "recall": 0.5}
    assert rows[2]["precision"] == pytest.approx(2 / 3) and rows[2]["recall"] == 1.0


def test_the_blend_is_chosen_on_validation_and_only_when_it_helps():
    from training.evaluate import choose_blend

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


def test_text_stage_adds_its_rows_and_a_model_the_handler_loads(tiny_run):
    from marketplace_search.text import INPUT_KINDS, TextModel, kind_name

    _, run_dir = tiny_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    rows = {row["inputs"]: row for row in evaluation["text"]["rows"]}
    assert set(rows) == {"photo", "title", "title+description", "photo+title", "photo+title+description"}
    served = evaluation.get("fine_tuned_blend", evaluation["fine_tuned"])
    assert rows["photo"]["top1_accuracy"] == pytest.approx(served["top1_accuracy"])  # the same test split
    model = TextModel.load(run_dir / "text_model")
    # photo + words: the neighbours' ranking (with or without the listings nearest by words) and weight with
    # the best val P@10, the test rows' P@k those of the way chosen
    rerank = model.info["rerank"]
    assert (rerank["weight"], rerank["fill"]) == (model.listing_words.rerank_weight, model.listing_words.fill)
    assert model.listing_words.product_ids
    best = max(p["precision@10"] for p in rerank["val_precision"].values())
    chosen = f"{'fill' if rerank['fill'] else 'photo pool'} w={rerank['weight']}"
    assert rerank["val_precision"][chosen]["precision@10"] == best
    way = "fill" if rerank["fill"] else "photo pool"
    assert rows["photo+title"]["precision@5"] == pytest.approx(rerank["test_precision"][f"photo+title {way}"]["precision@5"])
    if not rerank["weight"]:
        assert rows["photo+title"]["precision@5"] == served["precision@5"]  # neighbours stay the photo's
    # a title alone: the listings nearest by words
    assert 0 < rows["title"]["precision@10"] <= 1 and "found by words" in rows["title"]["model"]
    assert model.info["evaluation"]["title"]["precision@5"] == rows["title"]["precision@5"]  # on the model card
    assert model.classes == json.loads((run_dir / "run.json").read_text())["classes"]
    assert set(model.calibrations) == {kind_name(inputs) for inputs in INPUT_KINDS}
    assert len(evaluation["text"]["per_category"]) == len(model.classes)


def test_figures_over_splits_are_each_runs_own_and_a_shared_split_is_refused(tiny_run, module_tmp, capsys):
    from training import splits

    work, run_dir = tiny_run
    root = module_tmp("pipeline-seed-1")
    other = pipeline.run_pipeline(argparse_pipeline(["--data", str(work.parent / "data"), "--out", str(root / "work"),
                                                     *TINY, "--seed", "1", "--no-baseline"]))
    test_listings = [set(pd.read_csv(folder / "split.csv").query("split == 'test'")["product_id"])
                     for folder in (work, root / "work")]
    assert test_listings[0] != test_listings[1]  # the seed draws another test set

    summary = splits.main([str(run_dir), str(other), "--json", str(root / "splits.json")])
    table = capsys.readouterr().out
    assert "seeds 0 / 1" in table and "| photo+title |" in table
    top1 = {row["inputs"]: row for row in summary if row["figure"] == "top1_accuracy"}
    assert {"photo (head)", "photo", "title", "title+description", "photo+title",
            "photo+title+description"} == set(top1)
    for position, folder in enumerate((run_dir, other)):
        evaluation = json.loads((folder / "evaluation.json").read_text())
        rows = {row["inputs"]: row for row in evaluation["text"]["rows"]}
        assert top1["photo+title"]["values"][position] == rows["photo+title"]["top1_accuracy"]
        assert top1["photo (head)"]["values"][position] == evaluation["fine_tuned"]["top1_accuracy"]
    first, second = top1["title"]["values"]
    assert top1["title"]["mean"] == pytest.approx((first + second) / 2)
    assert top1["title"]["sd"] == pytest.approx(abs(first - second) / 2 ** 0.5)
    written = json.loads((root / "splits.json").read_text())
    assert [run["seed"] for run in written["runs"]] == [0, 1] and len(written["summary"]) == len(summary)

    with pytest.raises(SystemExit):  # one split twice is not two splits
        splits.main([str(run_dir), str(run_dir)])
    assert "share a split seed" in capsys.readouterr().err
    assert splits.main([str(run_dir), str(run_dir), "--allow-same-split"])[0]["sd"] == 0
