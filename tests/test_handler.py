"""The TorchServe handler in-process, on the files of a real archive built from a tiny run."""
import base64
import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext

from handlers.local import load_local_handler, predict_local
from handlers.marketplace_handler import MarketplaceHandler, thread_count
from tests.conftest import encoded
from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run, png_raw
from marketplace_search import inference, runtime
from marketplace_search.images import decode_image
from marketplace_search.inference import RequestError, parse_request
from marketplace_search.models import embed, load_checkpoint
from marketplace_search.presets import Preprocess, eval_transform
from marketplace_search.schema import ANSWER_FIELDS, AnswerError, check_answer
from marketplace_search.search import CATALOGUE_FILES


@pytest.fixture(scope="module")
def tiny(module_tmp):
    root = module_tmp("handler")
    run = make_tiny_run(root / "runs" / "2025-01-31_142233")
    mar = archive_tiny_run(run, root / "store", version="1.0")
    return run, extract_archive(mar, root / "model")


@pytest.fixture(scope="module")
def handler(tiny):
    return load_local_handler(tiny[1])


@pytest.fixture
def forwards(handler):
    """Counts forward passes of the handler's model."""
    calls = []
    hook = handler.model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    yield calls
    hook.remove()


def tiff_16bit_big_endian() -> bytes:
    values = (np.arange(64 * 48) * 20).astype(">u2")
    return encoded(Image.frombytes("I;16B", (64, 48), values.tobytes()), "TIFF")


def test_mixed_batch_answers_each_request_in_its_own_slot(tiny, handler, forwards):
    run, _ = tiny
    jpeg = run.photo_bytes("img-003")
    cases = [  # request, status, error type
        ({"body": jpeg}, 200, None),                                                        # raw upload
        ({"photo": run.photo_bytes("img-005"), "k": b"2", "category": b"Home"}, 200, None),  # multipart
        ({"body": {"image": base64.b64encode(run.photo_bytes("img-007")).decode(), "k": 3}}, 200, None),  # JSON
        ({"body": b""}, 400, "invalid_image"),
        ({"body": b"name,price\nlamp,5\n"}, 415, "unsupported_format"),
        ({"body": jpeg[: len(jpeg) // 2]}, 400, "invalid_image"),                           # truncated JPEG
        ({"body": png_raw(30_000, 30_000)}, 413, "image_too_large"),
        ({"body": b'{"image": '}, 400, "bad_json"),
        ({"body": {"image": "not base64!"}}, 400, "bad_base64"),
        ({"photo": jpeg, "k": b"0"}, 400, "bad_option"),
        ({"body": {"image": base64.b64encode(jpeg).decode(), "k": 1000}}, 400, "bad_option"),
        ({"photo": jpeg, "category": b"Spaceships"}, 400, "bad_option"),
        ({"body": tiff_16bit_big_endian()}, 200, None),                                     # 16-bit greyscale
    ]
    headers = [{}] * 7 + [{"Content-Type": "application/json"}] + [{}] * 5
    answers = predict_local(handler, [request for request, _, _ in cases], headers)
    assert [(status, answer.get("type")) for status, answer in answers] == [case[1:] for case in cases]
    for status, answer in answers:
        if status == 200:
            assert check_answer(answer) and set(answer) == set(ANSWER_FIELDS)
        else:
            assert answer["code"] == status and answer["error"]
    assert answers[0][1]["neighbours"][0]["image_id"] == "img-003"
    assert len(answers[1][1]["neighbours"]) == 2
    assert {n["category"] for n in answers[1][1]["neighbours"]} == {"Home"}
    assert answers[2][1]["neighbours"][0]["image_id"] == "img-007" and len(answers[2][1]["neighbours"]) == 3
    assert "Spaceships" in answers[11][1]["error"] and "Garden, Home, Music" in answers[11][1]["error"]
    assert "between 1 and 100" in answers[9][1]["error"] and "1000" in answers[10][1]["error"]
    assert forwards == [4]  # ONE forward pass over the four valid photos
    assert [status for status, _ in predict_local(handler, [{"body": b""}, {}])] == [400, 400]
    assert forwards == [4]  # a batch of only bad requests runs none


def test_neighbours_are_distinct_listings_a_catalogue_photo_finds_itself_first(tiny, handler):
    run, _ = tiny
    for number in (0, 6, 11):
        [(status, answer)] = predict_local(handler, [{"body": run.photo_bytes(f"img-{number:03d}")}])
        neighbours = answer["neighbours"]
        products = [n["product_id"] for n in neighbours]
        assert status == 200
        assert len(products) == len(set(products)) == 6  # 12 photos of 6 listings; k=10 asks for more
        assert neighbours[0]["image_id"] == f"img-{number:03d}"
        assert neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert neighbours[0] == {**run.listings[neighbours[0]["image_id"]], "image_id": neighbours[0]["image_id"],
                                 "similarity": neighbours[0]["similarity"]}
        similarities = [n["similarity"] for n in neighbours]
        assert similarities == sorted(similarities, reverse=True)
        top = answer["top_categories"]
        assert len(top) == 3 and {c["category"] for c in top} == set(run.classes)
        assert answer["category"] == top[0]["category"] and answer["probability"] == top[0]["probability"]
        assert sum(c["probability"] for c in top) == pytest.approx(1.0, abs=1e-5)
        assert answer["model"] == {"name": "marketplace", "version": "1.0", "backend": "torch fp32"}


def test_embedding_only_when_asked_and_equal_to_embed_options_from_headers_fields_win(tiny, handler):
    jpeg = tiny[0].photo_bytes("img-009")
    answers = predict_local(handler, [{"body": jpeg}, {"photo": jpeg, "embedding": b"true", "k": b"4"},
                                      {"body": {"image": base64.b64encode(jpeg).decode(), "embedding": False}},
                                      {"body": jpeg}], [{}, {"X-K": "2"}, {}, {"X-K": "2", "x-embedding": "yes"}])
    assert "embedding" not in answers[0][1] and "embedding" not in answers[2][1]
    assert len(answers[1][1]["neighbours"]) == 4 and len(answers[3][1]["neighbours"]) == 2
    served = np.array(answers[1][1]["embedding"], dtype=np.float32)
    assert answers[3][1]["embedding"] == answers[1][1]["embedding"]
    model, checkpoint = load_checkpoint(tiny[1] / "best.pt")  # as trained: no serving layout
    transform = eval_transform(Preprocess.from_dict(checkpoint["preprocess"]))
    with torch.inference_mode():
        _, expected = embed(model, transform(decode_image(jpeg)).unsqueeze(0))
    np.testing.assert_allclose(served, expected[0].numpy(), atol=1e-5)
    assert np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("request_, message", [
    ({"a": b"1", "b": b"2"}, "one photo per request"),
    ({"k": b"3"}, "no photo"),
    ({"photo": "text, not bytes"}, "holds text"),
    ({"body": {"k": 3}}, "no \"image\" field"),
    ({"body": {"image": "", "k": 3}}, "non-empty base64"),
    ({"body": {"image": "aGk=", "colour": "red"}}, "unknown JSON field(s) colour"),
    ({"body": [1, 2]}, "must be an object"),
    ({"body": "hello"}, "text body is not a photo"),
    ({"photo": b"x", "k": b"two"}, "k must be an integer"),
    ({"photo": b"x", "k": b"3", "embedding": b"maybe"}, "embedding must be true or false"),
])
def test_parse_request_refuses_with_a_named_reason(request_, message):
    with pytest.raises(RequestError) as error:
        parse_request(request_, ["Garden", "Home"])
    assert message in str(error.value)
    assert 400 <= error.value.status < 500


def test_parse_request_accepts_every_form_of_options():
    data = encoded(Image.new("RGB", (8, 8)), "JPEG")
    data_url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    query = parse_request({"body": {"image": data_url, "k": "7", "category": "Home", "embedding": "1"}}, ["Home"])
    assert (query.k, query.category, query.embedding) == (7, "Home", True)
    query = parse_request({"body": data}, ["Home"], "image/jpeg", {"X-Category": "Home"})
    assert (query.k, query.category, query.embedding) == (inference.DEFAULT_K, "Home", False)
    query = parse_request({"file": bytearray(data), "category": b""}, ["Home"])
    assert query.category is None


@pytest.mark.parametrize("layout, runtime", [("mkldnn", "torch"), ("none", "openvino")])  # torch: openvino's fallback
def test_an_archive_in_a_retired_layout_is_refused_saying_how_to_rebuild(tiny, layout, runtime, tmp_path):
    rebuild = (rf"serving layout '{layout}' .* is retired: archive the run again with the default layout, "
               r"`python -m scripts\.archive --run RUN --store STORE`")
    old = shutil.copytree(tiny[1], tmp_path / "model")
    config_file = old / json.loads((old / "MAR-INF" / "MANIFEST.json").read_text())["model"]["configFile"]
    config = yaml.safe_load(config_file.read_text())
    config["handler"].update(layout=layout, runtime=runtime)
    config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=rebuild):
        load_local_handler(old)


def test_threads_and_warm_up_come_from_the_model_config(tiny, tmp_path):
    assert load_local_handler(tiny[1], batch_size=4).warmed_batch_sizes == [1, 2, 3, 4]
    mar = archive_tiny_run(tiny[0], tmp_path / "store", warm_up=False, threads=1)
    assert load_local_handler(extract_archive(mar, tmp_path / "model"), batch_size=4).warmed_batch_sizes == []
    assert torch.get_num_threads() == 1


def test_local_handler_runs_the_archived_code_not_the_checkout(tiny):
    """--local answers as the served archive does: its handler and core package come from the archive."""
    import marketplace_search.search as checkout_search

    handler = load_local_handler(tiny[1])
    model_dir = Path(tiny[1]).resolve()
    assert Path(type(handler).initialize.__globals__["__file__"]).parent == model_dir
    assert Path(type(handler.catalogue).save.__globals__["__file__"]).parent == model_dir / "marketplace_search"
    assert type(handler.catalogue) is not checkout_search.Catalogue
    assert type(handler.catalogue.listings).__name__ == "Listings"  # the mapped table, read by the archive's class
    assert sorted(path.name for path in (model_dir / "catalogue").iterdir()) == sorted(CATALOGUE_FILES)
    import marketplace_search.search as after  # the process's own copy is back for everything else
    assert after is checkout_search


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tiny, handler, monkeypatch):
    archived_inference = vars(type(handler))["prepare_request"].__globals__["parse_request"].__globals__
    decode = Mock(wraps=archived_inference["decode_image"])
    monkeypatch.setitem(archived_inference, "decode_image", decode)
    pixels = np.random.default_rng(0).integers(0, 256, size=(800, 1000, 3), dtype=np.uint8)
    [(status, answer)] = predict_local(handler, [{"body": encoded(Image.fromarray(pixels), "JPEG")}])
    assert status == 200 and len(answer["neighbours"]) == len({row["product_id"] for row in tiny[0].listings.values()})
    assert [call.kwargs for call in decode.call_args_list] == [{"max_pixels": inference.MAX_PIXELS,
                                                                 "fit_size": 72}]  # the tiny run's resize


def test_mock_context_initialises_the_handler(tiny):
    """TorchServe's own unit-test context (trap 10) is enough to load the model."""
    model_dir = tiny[1]
    context = MockContext(model_pt_file="best.pt", model_dir=str(model_dir), model_file=None)
    context.manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    handler = MarketplaceHandler()
    handler.initialize(context)
    assert handler.initialized and handler.catalogue.index.ntotal == 12
    assert handler.model_info == {"name": "marketplace", "version": "1.0", "backend": "torch fp32"}


def test_missing_catalogue_is_named(tiny, tmp_path):
    broken = shutil.copytree(tiny[1], tmp_path / "model")
    shutil.rmtree(broken / "catalogue")
    with pytest.raises(FileNotFoundError, match="catalogue is missing from the model folder"):
        load_local_handler(broken)


def test_the_answer_contract_refuses_what_a_client_could_not_rely_on(handler, tiny):
    [(_, answer)] = predict_local(handler, [{"body": tiny[0].photo_bytes("img-001")}])
    check_answer(answer)
    for broken, message in (({**answer, "neighbours": [{**answer["neighbours"][0], "price": "cheap"}]}, "price"),
                            ({key: value for key, value in answer.items() if key != "model"}, "missing model"),
                            ({**answer, "category": "Other"}, "not the first of top_categories"),
                            ({**answer, "extra": 1}, "unexpected extra")):
        with pytest.raises(AnswerError, match=message):
            check_answer(broken)


@pytest.mark.slow
def test_the_category_blend_chosen_in_evaluation_is_served(tiny, handler, tmp_path):
    """With a blend of weight 1 and one voter, the category is the nearest listing's: a catalogue photo
    finds itself first, so every one is answered with its own listing's category."""
    run = tiny[0]
    copied = replace(run, run_dir=shutil.copytree(run.run_dir, tmp_path / "runs" / run.run_dir.name))
    evaluation = json.loads((copied.run_dir / "evaluation.json").read_text())
    evaluation["category_blend"] = {"k": 1, "temperature": 0.1, "weight": 1.0}
    (copied.run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    blended = load_local_handler(extract_archive(archive_tiny_run(copied, tmp_path / "store"), tmp_path / "model"))
    assert handler.category_blend.weight == 0  # the tiny run's own evaluation: the head alone
    unblended = archive_tiny_run(copied, tmp_path / "store2", category_blend=False)  # --no-category-blend
    assert "category_blend" not in yaml.safe_load(zipfile.ZipFile(unblended).read("model_config.yaml"))["handler"]
    requests = [{"body": run.photo_bytes(image_id)} for image_id in run.photos]
    answers = [answer for _, answer in predict_local(blended, requests)]
    assert [answer["category"] for answer in answers] == [run.listings[i]["category"] for i in run.photos]
    # A category filter narrows the neighbours, not the vote: it still comes from the whole catalogue.
    other = {image_id: next(c for c in run.classes if c != run.listings[image_id]["category"])
             for image_id in run.photos}
    filtered = predict_local(blended, requests, [{"X-Category": other[image_id]} for image_id in run.photos])
    assert [answer["category"] for _, answer in filtered] == [run.listings[i]["category"] for i in run.photos]
    assert all(n["category"] == other[i] for (_, answer), i in zip(filtered, run.photos) for n in answer["neighbours"])
    heads = [answer["category"] for _, answer in predict_local(handler, requests)]
    assert heads != [answer["category"] for answer in answers]  # the random head alone does not get them all


@pytest.mark.parametrize("files, cores", [
    ({}, 2),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 2),  # cgroup v1, no quota
    ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # docker run --cpus 1
    ({"cpu.max": "max 100000"}, 2),  # cgroup v2, no quota
    ({"cpu.max": "50000 100000"}, 1),  # half a core: still one thread
])
def test_worker_threads_follow_the_container_s_cpu_quota(tmp_path, monkeypatch, files, cores):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    monkeypatch.setattr("handlers.marketplace_handler.usable_cores", lambda: runtime.usable_cores(tmp_path))
    assert thread_count({}) == cores
    assert thread_count({"maxWorkers": 2}) == 1 and thread_count({"handler": {"threads": 3}}) == 3
