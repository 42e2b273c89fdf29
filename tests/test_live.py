"""The live catalogue against a real TorchServe with two workers: removals within 2 s on both workers,
50 added listings searchable within 60 s, no failed request meanwhile, the state kept over a restart,
a generation of other weights refused. Plus the follower's rules in-process (no server)."""
import faiss  # noqa: F401  (before torch: both bring an OpenMP runtime, and this order is the safe one)

import itertools
import json
import logging
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import requests

from handlers.local import load_local_handler, predict_local
from marketplace_search import live
from marketplace_search.files import sha256_file
from marketplace_search.layout import CHECKPOINT
from marketplace_search.schema import check_answer
from marketplace_search.search import Catalogue
from scripts import api, catalogue as cli
from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run, photo_jpeg, running_server
from training.tiny_run import TINY_WORDS, make_tiny_text_model

NAME = "marketplace"
NEW_LISTINGS = 50
# "... W-9012-marketplace_1.0-stdout MODEL_LOG - live catalogue /x: serving generation 2 (22 photos, 1 listings removed)"
SWITCH = re.compile(r"^(\S+) .*?(W-\d+)-\S+ MODEL_LOG - live catalogue \S+: serving generation (\d+) "
                    r"\((\d+) photos, (\d+) listings removed\)", re.MULTILINE)
REFUSAL = re.compile(r"(W-\d+)-\S+ MODEL_LOG - live catalogue \S+: REFUSED generation (gen-\d+): its vectors were "
                     r"embedded by checkpoint sha256 (\w+), this worker serves (\w+)")


def write_new_listings(data: Path, count: int, first: int = 0, titles: list[str] | None = None) -> dict[str, str]:
    """COUNT new listings in the raw format (one distinct generated photo each, TITLES or "New lamp N");
    returns {image_id: product_id}."""
    (data / "images").mkdir(parents=True)
    products, images = [], []
    for number in range(first, first + count):
        product_id, image_id = f"new-{number:04d}", f"new-photo-{number:04d}"
        title = titles[number - first] if titles else f"New lamp {number}"
        products.append({"id": product_id, "product_name": f"{title} | in Leeds, Yorkshire | Gumtree",
                         "category": "Home / Lamps", "product_description": "as new", "price": "£12.50",
                         "location": "Leeds, Yorkshire"})
        images.append({"id": image_id, "product_id": product_id})
        (data / "images" / f"{image_id}.jpg").write_bytes(photo_jpeg(50_000 + number, size=(96, 96)))
    pd.DataFrame(products).to_csv(data / "Products.csv", lineterminator="\n")
    pd.DataFrame(images).to_csv(data / "Images.csv", lineterminator="\n")
    return {image["id"]: image["product_id"] for image in images}


class Live:
    """A tiny run archived with two workers following LIVE, and its server (restartable)."""

    def __init__(self, root: Path):
        self.root = root
        self.run = make_tiny_run(root / "runs" / "2025-01-31_142233", seed=0)
        make_tiny_text_model(self.run.run_dir)  # titles too: listings added live are found by their words
        self.live = root / "live"
        self.store = root / "model_store"
        self.mar = archive_tiny_run(self.run, self.store, min_workers=2, max_workers=2, threads=1,
                                    live_catalogue=self.live)
        cli.main(["--live", str(self.live), "init", "--archive", str(self.mar)])
        self.server, self._context, self.starts = None, None, 0

    def start(self) -> None:
        self.starts += 1
        self._context = running_server(self.store, self.root / f"ts{self.starts}", {NAME: self.mar.name},
                                       enable_model_api=True)
        self.server = self._context.__enter__()
        wait_workers(self.server, 2)

    def stop(self) -> None:
        self._context.__exit__(None, None, None)

    def query(self, photo: bytes, k: int = 100, session=requests, version: str = "") -> dict:
        response = session.post(f"{self.server.inference_url}/predictions/{NAME}{version and '/' + version}",
                                data=photo, timeout=60,
                                headers={"Content-Type": "image/jpeg", "X-K": str(k),
                                         **api.auth_headers(self.server.token("inference"))})
        assert response.status_code == 200, response.text
        return response.json()

    def query_words(self, title: str, k: int = 5) -> dict:
        response = requests.post(f"{self.server.inference_url}/predictions/{NAME}", json={"title": title, "k": k},
                                 headers=api.auth_headers(self.server.token("inference")), timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def log(self) -> str:
        return (self.server.workdir / "model_log.log").read_text()


def wait_workers(server, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = api.describe(server, NAME, token=server.token("management"))[0].get("workers", [])
        if sum(worker["status"] == "READY" for worker in workers) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} workers READY after {timeout} s")


class ClientLoop:
    """CLIENTS threads query in a loop until stopped; every outcome is kept with when it was sent."""

    def __init__(self, served: Live, photo: bytes, clients: int = 4):
        self.served, self.photo, self.clients = served, photo, clients
        self.outcomes: list[tuple[float, float, int, dict | str]] = []  # (sent, answered, status, answer or error)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(clients)]

    def loop(self) -> None:
        session = requests.Session()
        url = f"{self.served.server.inference_url}/predictions/{NAME}"
        headers = {"Content-Type": "image/jpeg", "X-K": "100", **api.auth_headers(self.served.server.token("inference"))}
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                response = session.post(url, data=self.photo, headers=headers, timeout=60)
                self.outcomes.append((sent, time.monotonic(), response.status_code,
                                      response.json() if response.ok else response.text[:300]))
            except requests.RequestException as error:
                self.outcomes.append((sent, time.monotonic(), 0, f"{type(error).__name__}: {error}"))

    def __enter__(self) -> "ClientLoop":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def failures(self) -> list:
        return [outcome for outcome in self.outcomes if outcome[2] != 200]


def switches(log: str) -> list[dict]:
    return [{"at": datetime.strptime(at, "%Y-%m-%dT%H:%M:%S,%f").timestamp(), "worker": worker,
             "generation": int(generation), "photos": int(photos), "removed": int(removed)}
            for at, worker, generation, photos, removed in SWITCH.findall(log)]


@pytest.fixture(scope="module")
def served(module_tmp):
    served = Live(module_tmp("live"))
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.mark.server
def test_a_removed_listing_leaves_every_answer_within_2_s_on_both_workers(served):
    photo = served.run.photo_bytes("img-000")  # prod-000's own photo: first in every answer while it is there
    assert served.query(photo)["neighbours"][0]["product_id"] == "prod-000"
    with ClientLoop(served, photo) as loop:
        time.sleep(1.5)
        removed_at, removed_wall = time.monotonic(), time.time()
        cli.main(["--live", str(served.live), "remove", "prod-000"])
        time.sleep(4)
    assert not loop.failures(), loop.failures()[:3]
    late = [answer for sent, _, _, answer in loop.outcomes if sent >= removed_at + 2]
    early = [answer for _, answered, _, answer in loop.outcomes if answered < removed_at]
    assert len(late) >= 20 and early
    assert all(answer["neighbours"][0]["product_id"] == "prod-000" for answer in early)
    for answer in late:
        check_answer(answer)
        assert "prod-000" not in {neighbour["product_id"] for neighbour in answer["neighbours"]}
        assert answer["catalogue"] == {"generation": 1, "photos": 10}
    assert len({answer["neighbours"][0]["product_id"] for answer in late}) == 1
    # Both workers answered the loop, and each logged its switch to the new removal list within 2 s.
    deadline = time.monotonic() + 10  # the frontend writes the workers' log lines a moment later
    while len({s["worker"] for s in switches(served.log()) if s["removed"] == 1}) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    applied = {s["worker"]: s["at"] for s in switches(served.log()) if s["removed"] == 1}
    assert len(applied) == 2, served.log()[-3000:]
    assert all(at - removed_wall < 2.0 for at in applied.values()), (applied, removed_wall)


@pytest.mark.server
def test_fifty_added_listings_are_each_found_first_within_60_s(served, tmp_path):
    words = [" ".join(nouns) for nouns in itertools.product(*TINY_WORDS.values())][:NEW_LISTINGS]  # each its own
    new = write_new_listings(tmp_path / "new", NEW_LISTINGS, titles=[f"New lamp {w}" for w in words])
    probe = served.run.photo_bytes("img-004")
    with ClientLoop(served, probe, clients=2) as loop:
        started = time.monotonic()
        result = cli.main(["--live", str(served.live), "add", "--data", str(tmp_path / "new"),
                           "--archive", str(served.mar), "--workers", "1"])
        assert result["added_listings"] == NEW_LISTINGS and result["generation"] == 2
        pending = dict(new)
        with ThreadPoolExecutor(4) as pool:
            while pending and time.monotonic() - started < 60:
                photos = {image_id: (tmp_path / "new" / "images" / f"{image_id}.jpg").read_bytes()
                          for image_id in pending}
                answers = dict(zip(photos, pool.map(lambda photo: served.query(photo, k=5), photos.values())))
                pending = {image_id: product for image_id, product in pending.items()
                           if answers[image_id]["neighbours"][0]["product_id"] != product}
        found_within = time.monotonic() - started
        deadline = time.monotonic() + 30  # each worker swaps on its own: wait for both to log generation 2
        while (len({s["worker"] for s in switches(served.log()) if s["generation"] == 2}) < 2
               and time.monotonic() < deadline):
            time.sleep(0.2)
        both_switched = max(s["at"] for s in switches(served.log()) if s["generation"] == 2)
        both_switched += time.monotonic() - time.time()  # the log's wall clock on the loop's monotonic one
        time.sleep(1)
    assert not pending, f"{len(pending)} new photos not found first after 60 s, e.g. {sorted(pending)[:3]}"
    assert found_within < 60
    assert not loop.failures(), loop.failures()[:3]
    # Two workers swap independently, so their answers interleave generations 1 and 2 for a moment; once
    # both have logged the swap, no answer comes from generation 1.
    assert len({s["worker"] for s in switches(served.log()) if s["generation"] == 2}) == 2, served.log()[-3000:]
    outcomes = sorted(loop.outcomes, key=lambda outcome: outcome[1])
    assert outcomes[0][3]["catalogue"]["generation"] == 1
    late = [answer["catalogue"]["generation"] for sent, _, _, answer in outcomes if sent > both_switched + 0.05]
    assert late and set(late) == {2}, late
    last = loop.outcomes[-1][3]
    assert last["catalogue"] == {"generation": 2, "photos": 10 + NEW_LISTINGS}  # prod-000 still removed
    assert "prod-000" not in {neighbour["product_id"] for neighbour in last["neighbours"]}
    # and by their words: a title alone finds each new listing first, whichever worker answers
    for number in (0, 17, NEW_LISTINGS - 1):
        for _ in range(4):
            answer = served.query_words(words[number])
            assert answer["catalogue"]["generation"] == 2
            assert answer["neighbours"][0]["product_id"] == f"new-{number:04d}", answer["neighbours"][:2]


@pytest.mark.server
def test_a_restart_serves_the_live_state(served):
    before = served.query(served.run.photo_bytes("img-000"))
    served.stop()
    served.start()
    after = served.query(served.run.photo_bytes("img-000"))
    assert after["catalogue"] == before["catalogue"] == {"generation": 2, "photos": 10 + NEW_LISTINGS}
    assert after["neighbours"] == before["neighbours"]
    assert "prod-000" not in {neighbour["product_id"] for neighbour in after["neighbours"]}


@pytest.mark.server
def test_a_new_version_with_the_same_weights_follows_the_same_folder(served):
    v2 = archive_tiny_run(served.run, served.store, version="2.0", threads=1, live_catalogue=served.live)
    token = served.server.token("management")
    api.register(served.server, v2.name, NAME, initial_workers=1, token=token)
    try:
        answer = served.query(served.run.photo_bytes("img-000"), version="2.0")
        assert answer["model"]["version"] == "2.0"
        assert answer["catalogue"] == {"generation": 2, "photos": 10 + NEW_LISTINGS}
        assert "prod-000" not in {neighbour["product_id"] for neighbour in answer["neighbours"]}
    finally:
        api.unregister(served.server, NAME, "2.0", token=token)


@pytest.mark.server
def test_a_generation_from_other_weights_is_refused(served, tmp_path):
    other = make_tiny_run(tmp_path / "other" / "2025-02-07_090000", seed=1)
    cli.main(["--live", str(served.live), "init", "--run", str(other.run_dir), "--force"])
    assert live.read_current(served.live)["generation"] == 3
    photo = served.run.photo_bytes("img-002")
    deadline = time.monotonic() + 20
    refused = {}
    with ThreadPoolExecutor(4) as pool:
        while len(refused) < 2 and time.monotonic() < deadline:
            answers = list(pool.map(lambda _: served.query(photo), range(8)))
            assert {answer["catalogue"]["generation"] for answer in answers} == {2}
            refused = {worker: found for worker, *found in REFUSAL.findall(served.log())}
            time.sleep(0.6)
    assert len(refused) == 2, served.log()[-3000:]
    own, others = sha256_file(served.run.run_dir / CHECKPOINT), sha256_file(other.run_dir / CHECKPOINT)
    assert all(found == ["gen-000003", others[:12], own[:12]] for found in refused.values())
    assert served.query(photo)["neighbours"][0]["product_id"] == "prod-001"  # still generation 2's answers


# In-process: the follower's rules, on a tiny run's catalogue (no server).

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tiny(module_tmp):
    return make_tiny_run(module_tmp("tiny") / "run", seed=0)


def seed_live(tiny, folder: Path) -> Path:
    cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir)])
    return folder


def test_the_follower_checks_at_most_every_half_second_and_applies_removals(tiny, tmp_path):
    folder = seed_live(tiny, tmp_path / "live")
    clock = Clock()
    bundled = Catalogue.load(tiny.run_dir / "index")
    follower = live.LiveFollower(folder, bundled, sha256_file(tiny.run_dir / CHECKPOINT), clock=clock)
    assert follower.current().generation == 1 and follower.current().info == {"generation": 1, "photos": 12}
    cli.main(["--live", str(folder), "remove", "prod-000", "prod-001"])
    clock.now = 0.4
    assert follower.current().info == {"generation": 1, "photos": 12}  # not looked at yet
    clock.now = 0.5
    served = follower.current()
    assert served.info == {"generation": 1, "photos": 8} and served.removed == {"prod-000", "prod-001"}
    found = served.catalogue.search(tiny_vectors(tiny), k=6)
    assert all({n["product_id"] for n in answer} == {f"prod-{i:03d}" for i in range(2, 6)} for answer in found)
    clock.now = 1.0
    assert follower.current() is served  # nothing changed: the same object, no reload


def test_compaction_folds_removals_and_a_damaged_generation_is_refused(tiny, tmp_path, caplog):
    folder = seed_live(tiny, tmp_path / "live")
    clock = Clock()
    follower = live.LiveFollower(folder, Catalogue.load(tiny.run_dir / "index"),
                                 sha256_file(tiny.run_dir / CHECKPOINT), clock=clock)
    cli.main(["--live", str(folder), "remove", "prod-002"])
    result = cli.main(["--live", str(folder), "compact"])
    assert result == {"generation": 2, "photos": 10, "removed_listings": 1, "removed_photos": 2}
    assert live.read_removed(folder) == {}
    clock.now = 1
    assert follower.current().info == {"generation": 2, "photos": 10}
    status = cli.main(["--live", str(folder), "status"])
    assert (status["generation"], status["listings"], status["removed"]) == (2, 5, 0)
    # A generation whose files do not match its recorded hashes is refused once, with its reason.
    cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir), "--force"])
    listings = folder / "gen-000003" / live.CATALOGUE_DIR / "listings.arrow"
    listings.write_bytes(listings.read_bytes().replace(b"Leeds", b"Leedz"))
    clock.now = 2
    with caplog.at_level(logging.ERROR, logger="marketplace_search.live"):
        assert follower.current().generation == 2
    assert "REFUSED generation gen-000003" in caplog.text and "does not belong with" in caplog.text


def test_a_background_load_swaps_in_on_the_first_batch_after_it(tiny, tmp_path):
    folder = seed_live(tiny, tmp_path / "live")
    clock = Clock()
    follower = live.LiveFollower(folder, Catalogue.load(tiny.run_dir / "index"),
                                 sha256_file(tiny.run_dir / CHECKPOINT), clock=clock, background=True)
    assert follower.current().generation == 1  # the first generation loads before the first answer
    cli.main(["--live", str(folder), "remove", "prod-003"])
    cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir), "--force"])
    clock.now = 1
    served = follower.current()  # the removal applies now, generation 2 loads beside
    assert served.removed == {"prod-003"} and served.info["photos"] == 10
    deadline = time.monotonic() + 30
    while follower.current().generation != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert follower.current().info == {"generation": 2, "photos": 10}
    assert follower.current().removed == {"prod-003"}


def test_add_refuses_other_weights(tiny, tmp_path):
    folder = seed_live(tiny, tmp_path / "live")
    other = make_tiny_run(tmp_path / "other", seed=1)
    write_new_listings(tmp_path / "new", 2)
    with pytest.raises(SystemExit, match="embedded by checkpoint sha256"):
        cli.main(["--live", str(folder), "add", "--data", str(tmp_path / "new"), "--run", str(other.run_dir)])
    assert live.read_current(folder)["generation"] == 1


def tiny_vectors(tiny):
    catalogue = Catalogue.load(tiny.run_dir / "index")
    return catalogue.index.reconstruct_n(0, catalogue.index.ntotal)


def test_prune_keeps_the_newest_generations_and_a_follower_on_a_deleted_one_moves_on(tiny, tmp_path):
    folder = seed_live(tiny, tmp_path / "live")
    clock = Clock()
    follower = live.LiveFollower(folder, Catalogue.load(tiny.run_dir / "index"),
                                 sha256_file(tiny.run_dir / CHECKPOINT), clock=clock)
    assert follower.current().generation == 1  # serving gen-000001 (its index and files open)
    for _ in range(3):
        cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir), "--force"])
    with pytest.raises(SystemExit, match="at least 2"):
        cli.main(["--live", str(folder), "prune", "--keep", "1"])
    result = cli.main(["--live", str(folder), "prune", "--keep", "2"])
    assert result == {"deleted": ["gen-000001", "gen-000002"], "kept": ["gen-000003", "gen-000004"]}
    assert not (folder / "gen-000001").exists() and live.read_current(folder)["generation"] == 4
    # The deleted generation still answers until the next check, which loads the current one.
    assert len(follower.current().catalogue.search(tiny_vectors(tiny)[:1], k=3)[0]) == 3
    clock.now = 1
    assert follower.current().info == {"generation": 4, "photos": 12}
    assert cli.main(["--live", str(folder), "prune"])["deleted"] == []  # default --keep 3: nothing more to delete


def test_listings_added_live_are_found_by_their_words(tmp_path, caplog):
    run = make_tiny_run(tmp_path / "runs" / "2025-01-31_142233", seed=0)
    make_tiny_text_model(run.run_dir)
    folder = tmp_path / "live"
    mar = archive_tiny_run(run, tmp_path / "store", live_catalogue=folder)
    seeded = cli.main(["--live", str(folder), "init", "--archive", str(mar)])
    bundled = live.load_generation(folder)
    bundled_listing_words, bundled_sha256 = bundled.listing_words, bundled.listing_words_sha256
    assert seeded["listings_by_words"] == len(bundled_listing_words.product_ids) > 0
    handler = load_local_handler(extract_archive(mar, tmp_path / "model"))
    title = "wooden drum violin mirror spade"  # no generated listing is called this

    def by_words(**options):
        (status, answer), = predict_local(handler, [{"body": {"title": title, "k": 3, **options}}], [{}])
        assert status == 200, answer
        return answer

    def wait_generation(number):
        deadline = time.monotonic() + 30
        while by_words()["catalogue"]["generation"] != number:
            assert time.monotonic() < deadline, f"generation {number} not served within 30 s"
            time.sleep(0.1)

    assert all(not n["product_id"].startswith("new-") for n in by_words()["neighbours"])
    write_new_listings(tmp_path / "new", 2, titles=[title, "Garden lamp"])
    added = cli.main(["--live", str(folder), "add", "--data", str(tmp_path / "new"), "--archive", str(mar)])
    assert added["words"] == {"added_listings": 2, "unknown_category": 0, "from": "generation"}
    wait_generation(2)
    first = by_words()["neighbours"][0]
    assert first["product_id"] == "new-0000" and first["word_similarity"] > 0.8  # its title + "as new"
    assert handler.text_model.listing_words is None  # the archive's words let go while the generation's serve
    assert by_words(category="Garden")["neighbours"][0]["product_id"] != "new-0000"  # listed under Home
    # photo + words: the new listing's own photo and title find it first, with both similarities
    photo = (tmp_path / "new" / "images" / "new-photo-0000.jpg").read_bytes()
    (status, answer), = predict_local(handler, [{"body": photo}], [{"Content-Type": "image/jpeg", "X-Title": title}])
    assert status == 200 and answer["neighbours"][0]["product_id"] == "new-0000"
    assert answer["neighbours"][0]["similarity"] > 0.99 and answer["neighbours"][0]["word_similarity"] > 0.8
    # removed: out of the answers at once; compacted: out of the generation's words
    cli.main(["--live", str(folder), "remove", "new-0000"])
    time.sleep(live.CHECK_SECONDS + 0.1)
    assert all(n["product_id"] != "new-0000" for n in by_words()["neighbours"])
    cli.main(["--live", str(folder), "compact"])
    compacted = live.load_generation(folder).listing_words
    assert "new-0000" not in compacted.product_ids and "new-0001" in compacted.product_ids
    assert len(compacted.product_ids) == len(bundled_listing_words.product_ids) + 1
    # served without a live folder's words again: the archive's are read back, and answer as they did before
    handler.live, handler.served = None, live.Served(handler.served.catalogue, 3)
    assert handler.text_model.listing_words is None
    assert all(not n["product_id"].startswith("new-") for n in by_words()["neighbours"])
    assert len(handler.text_model.listing_words.product_ids) == len(bundled_listing_words.product_ids)
    # damaged words: the generation still serves its photos, with the archive's words (logged)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    current = live.read_current(damaged)["name"]
    (damaged / current / "words.npz").write_bytes(b"not a numpy archive")
    follower = live.LiveFollower(damaged, Catalogue.load(run.run_dir / "index"), sha256_file(run.run_dir / CHECKPOINT),
                                 text_listing_words=bundled_listing_words, text_sha256=bundled_sha256)
    with caplog.at_level(logging.ERROR, logger="marketplace_search.live"):
        assert follower.current().generation == 3 and follower.current().listing_words is None
    assert "words are unreadable" in caplog.text
    assert live.load_generation(damaged).listing_words is None  # writers too: the next add writes them anew
    # words made by another text model are left aside: the generation serves its photos, the archive's words
    follower = live.LiveFollower(folder, Catalogue.load(run.run_dir / "index"), sha256_file(run.run_dir / CHECKPOINT),
                                 text_listing_words=bundled_listing_words, text_sha256="0" * 64)
    with caplog.at_level(logging.WARNING, logger="marketplace_search.live"):
        assert follower.current().generation == 3 and follower.current().listing_words is None
    assert "made by a text model reading with sha256" in caplog.text
