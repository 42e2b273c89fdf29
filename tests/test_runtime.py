"""Every runtime and precision served through TorchServe, the accuracy guard, and a CPU without bf16 units."""
import json
import logging
import shutil
import time
import zipfile
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from handlers.local import load_local_handler, predict_local
from marketplace_search import runtime
from marketplace_search.images import decode_image
from marketplace_search.layout import CHECKPOINT, GUARD_REPORTS, KEPT_IR_DIR
from marketplace_search.models import MarketplaceNet, load_checkpoint
from marketplace_search.presets import Preprocess, collate_images, eval_transform
from marketplace_search.schema import check_answer
from scripts import api
from scripts.archive import GuardRefused, build_archive
from scripts.benchmark.bare import calibrate_batchnorm
from training import guard, trunk
from training.data import embed_rows
from training.trunk import trunk_outputs
from tests.serving_fixtures import (CLASSES, TINY_PREPROCESS, TinyRun, archive_tiny_run, extract_archive,
                                    make_tiny_run, photo_jpeg, running_server)

LISTINGS, PHOTOS_PER_LISTING = 12, 2
BACKENDS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]
pytestmark = pytest.mark.slow  # five archives, four of them guarded


def trained_model(seed: int = 0) -> MarketplaceNet:
    """A ResNet18 with a random trunk whose embedding and head are fitted to the tiny run's photos."""
    torch.manual_seed(seed)
    model = MarketplaceNet("resnet18", len(CLASSES), embedding_dim=32)
    count = LISTINGS * PHOTOS_PER_LISTING
    images = collate_images([decode_image(photo_jpeg(number)) for number in range(count)], TINY_PREPROCESS)
    labels = torch.tensor([(number // PHOTOS_PER_LISTING) % len(CLASSES) for number in range(count)])
    calibrate_batchnorm(model, images)
    with torch.no_grad():
        features = model.backbone(images)
    head = list(model.embedding.parameters()) + list(model.classifier.parameters())
    optimizer = torch.optim.Adam(head, lr=1e-2)
    for _ in range(150):  # eval mode throughout: BatchNorm and dropout as served
        optimizer.zero_grad()
        logits, _ = model.forward_features(features)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    return model


def write_split(run: TinyRun, work: Path, splits=("test", "train")) -> None:
    """WORK/split.csv: every photo in each of SPLITS (here test is the guard's set, train int8's calibration)."""
    rows = [{"image_id": image_id, "product_id": listing["product_id"], "label": run.classes.index(listing["category"])}
            for image_id, listing in sorted(run.listings.items())]
    pd.DataFrame([{**row, "split": name} for name in splits for row in rows]).to_csv(work / "split.csv", index=False)


@pytest.fixture(scope="module")
def guarded(module_tmp) -> TinyRun:
    """A trained tiny run in WORK/model_evaluation/<stamp>, WORK holding photos/ and split.csv."""
    work = module_tmp("work")
    run = make_tiny_run(work / "model_evaluation" / "2025-01-31_142233", listings=LISTINGS,
                        photos_per_listing=PHOTOS_PER_LISTING, photos_dir=work / "photos", model=trained_model())
    write_split(run, work)
    return run


def archive_member(mar: Path, name: str) -> bytes:
    with zipfile.ZipFile(mar) as archive:
        return archive.read(name)


@pytest.fixture(scope="module")
def archives(guarded, module_tmp) -> dict[tuple[str, str], Path]:
    store = module_tmp("store")
    return {(name, precision): archive_tiny_run(guarded, store, name=f"m-{name}-{precision}", output_name="{name}",
                                                runtime=name, precision=precision, max_batch_delay=5)
            for name, precision in BACKENDS}


@pytest.mark.server
def test_every_backend_answers_a_photo_with_the_same_fields(guarded, archives, tmp_path, monkeypatch):
    """On a CPU without bf16 units (simulated; the session's server serves openvino bf16 natively where it can)."""
    models = {mar.stem: mar.name for mar in archives.values()}
    store = next(iter(archives.values())).parent
    photo_id = "img-004"
    monkeypatch.setenv(runtime.FLAGS_OFF_ENV, "bf16,vnni")  # read by the workers
    with running_server(store, tmp_path / "torchserve", models, ready_timeout=240) as server:
        answers = {backend: api.predict(server, guarded.photo_bytes(photo_id), model=mar.stem)
                   for backend, mar in archives.items()}
        chunks = {api.worker_serves(server, mar.stem)["chunk"] for mar in archives.values()}
    assert chunks <= {1, 2, 4, 8}  # each worker timed its batch sizes at warm-up (batch size 8)
    assert {backend: answer["model"]["backend"] for backend, answer in answers.items()} == {
        ("torch", "fp32"): "torch fp32", ("torch", "bf16"): "torch fp32", ("openvino", "fp32"): "openvino fp32",
        ("openvino", "bf16"): "openvino fp32", ("openvino", "int8"): "openvino int8"}
    reference = answers["torch", "fp32"]
    for backend, answer in answers.items():
        check_answer(answer)
        assert answer.keys() == reference.keys(), backend
        assert answer["neighbours"][0].keys() == reference["neighbours"][0].keys(), backend
        assert answer["category"] == guarded.listings[photo_id]["category"], backend
        assert answer["neighbours"][0]["image_id"] == photo_id, backend  # a catalogue photo finds itself
        assert answer["probability"] == pytest.approx(reference["probability"], abs=0.05), backend


def test_the_archive_records_its_backend_and_guard(archives):
    for (name, precision), mar in archives.items():
        config = yaml.safe_load(archive_member(mar, "model_config.yaml"))
        card = json.loads(archive_member(mar, "model_card.json"))
        assert (config["handler"]["runtime"], config["handler"]["precision"]) == (name, precision)
        assert (card["inference"]["runtime"], card["inference"]["precision"]) == (name, precision)
        members = zipfile.ZipFile(mar).namelist()
        assert ("openvino/model.xml" in members and "openvino/model.bin" in members) == (name == "openvino")
        if (name, precision) == ("torch", "fp32"):
            continue
        guard = card["inference"]["guard"]
        assert guard["passed"] and not card["inference"]["forced"] and guard["photos"] == 24
        assert guard["fp32"]["top1_accuracy"] == 1.0 and guard["top1_drop"] <= 0.01
        assert 0.9 < guard["cosine_min"] <= guard["cosine_mean"] < 1.01
    assert json.loads(archive_member(archives["openvino", "int8"], "model_card.json"))[
        "inference"]["calibration"]["photos"] == 24


def test_the_guard_refuses_int8_calibrated_on_blank_photos(guarded, tmp_path):
    """Calibrated on flat grey photos, int8's activation ranges are far too narrow for real photos."""
    blank = tmp_path / "blank"
    blank.mkdir()
    for number in range(8):
        Image.new("RGB", (96, 80), (128, 128, 128)).save(blank / f"grey-{number}.jpg")
    with pytest.raises(GuardRefused, match=r"openvino int8 loses .* points of top-1 .*--force"):
        build_archive(guarded.run_dir, tmp_path, "refused", "1.0", runtime="openvino", precision="int8",
                      calibration=blank)
    assert not (tmp_path / "refused.mar").exists()
    forced = build_archive(guarded.run_dir, tmp_path, "forced", "1.0", runtime="openvino", precision="int8",
                           calibration=blank, force=True)
    card = json.loads(archive_member(forced, "model_card.json"))["inference"]
    assert card["forced"] and not card["guard"]["passed"] and card["guard"]["top1_drop"] > 0.01


def test_a_kept_guard_is_reused_while_what_it_read_is_unchanged(guarded, archives, tmp_path, monkeypatch):
    """Each archive above kept its guard in the run; a rebuild of the same backend reuses it (measuring
    would fail here) and its card says where it was measured; --no-reuse-guard measures it again."""
    kept = json.loads((guarded.run_dir / GUARD_REPORTS).read_text())
    assert {(k["key"]["runtime"], k["key"]["precision"]) for k in kept} == set(BACKENDS[1:])
    first = json.loads(archive_member(archives["openvino", "bf16"], "model_card.json"))["inference"]["guard"]
    assert first["measured_on"] == str(guarded.run_dir.resolve())
    monkeypatch.setattr(guard, "run_guard", Mock(side_effect=AssertionError("the guard was measured again")))
    assert (guarded.run_dir / KEPT_IR_DIR).is_dir()  # and the IR is kept: converting again would fail here
    monkeypatch.setattr(guard, "candidate_backend", Mock(side_effect=AssertionError("converted again")))
    again = build_archive(guarded.run_dir, tmp_path, "again", "1.0", runtime="openvino", precision="bf16")
    assert json.loads(archive_member(again, "model_card.json"))["inference"]["guard"] == first
    with pytest.raises(AssertionError, match="measured again"):
        build_archive(guarded.run_dir, tmp_path, "fresh", "1.0", runtime="openvino", precision="bf16",
                      reuse_guard=False)
    with pytest.raises(AssertionError, match="measured again"):  # a subset of the test split is another guard
        build_archive(guarded.run_dir, tmp_path, "fewer", "1.0", runtime="openvino", precision="bf16", guard_limit=3)


def test_the_guard_key_holds_everything_the_guard_reads(guarded, tmp_path, monkeypatch):
    work = guarded.run_dir.parents[1]
    rows = guard.guard_rows(work)
    photos = tmp_path / "photos"
    shutil.copytree(work / "photos", photos)

    def key(checkpoint=guarded.run_dir / CHECKPOINT, runtime="openvino", precision="bf16", rows=rows, calibration=None):
        return guard.guard_key(checkpoint, runtime, precision, rows, photos, calibration)

    base = key()
    assert key() == base and base["test_photos"] == 24
    other_checkpoint = tmp_path / "other.pt"
    torch.save(trained_model(seed=1).state_dict(), other_checkpoint)
    changed = [key(checkpoint=other_checkpoint), key(runtime="torch"), key(precision="int8"),
               key(rows=rows.head(10)), key(rows=rows.assign(label=rows["label"].iloc[::-1].to_numpy())),
               key(rows=rows.assign(product_id=rows["product_id"] + "-x")), key(calibration=[]),
               key(calibration=sorted(photos.iterdir())[:4])]
    monkeypatch.setattr(guard, "package_version", lambda name: "0.0" if name == "openvino" else None)
    changed.append(key())
    monkeypatch.undo()
    by_cpu = []
    for flags in ({"avx2"}, {"avx2", "amx_bf16"}):  # a CPU without bf16 units runs bf16 as fp32
        monkeypatch.setattr(guard, "cpu_flags", lambda: flags)
        by_cpu.append(key())
    monkeypatch.undo()
    assert by_cpu[0] != by_cpu[1]
    first_photo = photos / f"{rows['image_id'].iloc[0]}.jpg"
    first_photo.write_bytes(first_photo.read_bytes() + b"\0")
    changed.append(key())
    distinct = {json.dumps(k, sort_keys=True) for k in changed}
    assert len(distinct) == len(changed) == 10 and json.dumps(base, sort_keys=True) not in distinct


def test_an_unreadable_kept_guard_is_measured_again(tmp_path, caplog):
    (tmp_path / GUARD_REPORTS).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert guard.kept_guard(tmp_path, {"runtime": "torch"}) is None
    assert "measured again" in caplog.text
    guard.keep_guard(tmp_path, {"runtime": "torch"}, {"passed": True}, "here")
    guard.keep_guard(tmp_path, {"runtime": "torch"}, {"passed": False}, "there")  # the newer replaces it
    assert guard.read_guard_reports(tmp_path) == [{"key": {"runtime": "torch"}, "report": {"passed": False},
                                                   "measured_on": "there"}]


def test_a_cpu_without_bf16_units_serves_the_fastest_backend_it_has_and_says_so_once(guarded, archives, tmp_path,
                                                                                       monkeypatch, caplog):
    """openvino bf16 runs its IR at fp32, int8 its IR as it is (no VNNI needed), torch bf16 runs torch fp32."""
    fp32 = load_local_handler(extract_archive(archives["torch", "fp32"], tmp_path / "fp32"))
    native = load_local_handler(extract_archive(archives["openvino", "bf16"], tmp_path / "native"))
    assert native.backend.name == ("openvino bf16" if runtime.precision_supported("bf16") else "openvino fp32")
    monkeypatch.setenv(runtime.FLAGS_OFF_ENV, "bf16,vnni")
    assert not runtime.precision_supported("bf16") and not runtime.precision_supported("int8")
    caplog.clear()  # `native`'s own warning on a CPU without bf16 units
    with caplog.at_level(logging.WARNING):
        served = {backend: load_local_handler(extract_archive(archives[backend], tmp_path / "-".join(backend)))
                  for backend in (("openvino", "bf16"), ("torch", "bf16"), ("openvino", "int8"))}
    assert {backend: (handler.backend.name, handler.backend.requested) for backend, handler in served.items()} == {
        ("openvino", "bf16"): ("openvino fp32", "openvino bf16"), ("torch", "bf16"): ("torch fp32", "torch bf16"),
        ("openvino", "int8"): ("openvino int8", "")}
    photo = {"body": guarded.photo_bytes("img-007")}
    [(_, reference)] = predict_local(fp32, [photo])
    for backend in (("openvino", "bf16"), ("torch", "bf16")):  # both now give the fp32 reference's answers
        [(status, answer)] = predict_local(served[backend], [photo])
        assert status == 200 and answer["probability"] == pytest.approx(reference["probability"], abs=1e-4)
        assert [n["image_id"] for n in answer["neighbours"]] == [n["image_id"] for n in reference["neighbours"]]
        assert answer["model"]["backend"] == served[backend].backend.name
    warnings = [record.getMessage() for record in caplog.records if "but this CPU has none of" in record.getMessage()]
    assert len(warnings) == 2 and any("serving openvino fp32" in message for message in warnings), warnings
    model, _ = load_checkpoint(guarded.run_dir / "weights" / "best.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="marketplace_search.runtime"):
        for _ in range(2):
            assert runtime.load_backend(model, "torch", "bf16").name == "torch fp32"
    assert len([record for record in caplog.records if "serving torch fp32" in record.getMessage()]) == 1


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_an_ir_openvino_cannot_load_serves_torch_fp32_saying_why(archives, damage, tmp_path, caplog):
    broken = extract_archive(archives["openvino", "bf16"], tmp_path / "broken")
    if damage == "corrupt":
        (broken / "openvino" / "model.xml").write_text("<net name='not an IR'")
    else:
        shutil.rmtree(broken / "openvino")
    with caplog.at_level(logging.WARNING):
        handler = load_local_handler(broken)
    assert (handler.backend.name, handler.backend.requested) == ("torch fp32", "openvino bf16")
    assert "OpenVINO could not load openvino/model.xml" in caplog.text and "serving torch fp32" in caplog.text


def test_many_photos_are_embedded_in_openvino_with_the_fp32_answers(guarded, monkeypatch):
    """training.embed, refresh, catalogue add (embed_rows) and the frozen trunk (training.train, evaluate)."""
    work = guarded.run_dir.parents[1]
    rows = pd.read_csv(work / "split.csv").query("split == 'test'")
    model, checkpoint = load_checkpoint(guarded.run_dir / CHECKPOINT)
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    cpu = torch.device("cpu")

    def embedded() -> tuple:
        return (*embed_rows(model, preprocess, rows, work / "photos", batch_size=8, workers=0),
                trunk_outputs(model.backbone, rows, work / "photos", eval_transform(preprocess), 8, 0, cpu, None, ""))

    assert runtime.embedding_backend(model, preprocess.crop, len(rows)).name == "torch fp32"  # too few to convert
    in_torch = embedded()
    monkeypatch.setattr(runtime, "OPENVINO_EMBED_FROM", 0)
    monkeypatch.setattr(trunk, "OPENVINO_EMBED_FROM", 0)
    assert runtime.embedding_backend(model, preprocess.crop, len(rows)).name == "openvino fp32"
    for openvino, reference in zip(embedded(), in_torch):  # vectors, probabilities, trunk outputs (float16)
        assert np.allclose(np.asarray(openvino, np.float32), np.asarray(reference, np.float32), rtol=1e-2, atol=1e-3)


def test_unsupported_backends_and_unchecked_precisions_are_refused(guarded, tmp_path):
    with pytest.raises(FileNotFoundError, match="split.csv"):  # a reduced precision needs a test split to check
        build_archive(guarded.run_dir, tmp_path, runtime="openvino", precision="bf16", work_dir=tmp_path)
    with pytest.raises(ValueError, match="int8 runs on openvino"):
        build_archive(guarded.run_dir, tmp_path, runtime="torch", precision="int8")
    with pytest.raises(ValueError, match="runtime 'onnx'"):
        build_archive(guarded.run_dir, tmp_path, runtime="onnx", precision="fp32")


def test_batches_run_in_chunks_of_the_size_fastest_per_photo_on_this_cpu():
    seconds = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.080}  # 4 photos a pass is the fastest per photo
    sizes = []

    def forward(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        sizes.append(len(images))
        time.sleep(seconds.get(len(images), 0))
        return images.mean(dim=(2, 3)).numpy(), images.amax(dim=(1, 2, 3)).numpy()

    backend = runtime.Backend("torch", "fp32", forward)
    assert runtime.fastest_chunk(backend, 8, crop=4, repeats=2) == 4
    assert sizes[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and sorted(set(sizes[8:])) == [1, 2, 4, 8]
    images = torch.randn(7, 3, 4, 4)
    whole = forward(images)
    backend.chunk, sizes[:] = 4, []
    chunked = backend(images)
    assert sizes == [4, 3] and all(np.array_equal(a, b) for a, b in zip(chunked, whole))
