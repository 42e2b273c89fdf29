"""The live catalogue served by two workers of the session's TorchServe, and the follower's rules in-process."""
import itertools
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from unittest.mock import Mock

import pytest

from handlers.local import load_local_handler, predict_local
from marketplace_search import live
from marketplace_search.files import sha256_file
from marketplace_search.layout import CHECKPOINT
from marketplace_search.schema import check_answer
from marketplace_search.search import Catalogue
from scripts import api, catalogue as cli
from tests.serving_fixtures import (REPO, ClientLoop, archive_tiny_run, extract_archive, make_tiny_run, wait_until,
                                    write_new_listings)
from training.tiny_run import TINY_WORDS

LIVE = "live"  # the model's name on the session's TorchServe
NEW_LISTINGS = 50
# "... W-9012-live_1.0-stdout MODEL_LOG - live catalogue /x: serving generation 2 (22 photos, 1 listings removed)"
SWITCH = re.compile(r"^(\S+) .*?(W-\d+)-\S+ MODEL_LOG - live catalogue \S+: serving generation (\d+) "
                    r"\((\d+) photos, (\d+) listings removed\)", re.MULTILINE)


class Live:
    """The recipe archived with two workers following FOLDER, registered on the session's TorchServe as LIVE."""

    def __init__(self, recipe, server, folder: Path):
        self.run, self.server, self.live = recipe.run, server, folder
        self.mar = archive_tiny_run(self.run, recipe.store, name=LIVE, min_workers=2, max_workers=2, threads=1,
                                    live_catalogue=folder)
        cli.main(["--live", str(folder), "init", "--archive", str(self.mar)])
        api.register(server, self.mar.name, LIVE, initial_workers=2, synchronous=True)
        self.url, self.key = f"{server.inference_url}/predictions/{LIVE}", api.auth_headers(server.token("inference"))

    def query(self, photo: bytes | None = None, title: str | None = None, version: str | None = None) -> dict:
        """The answer to PHOTO (every listing) or to TITLE alone (5 listings), from VERSION or the default."""
        return api.predict(self.server, photo, model=LIVE, version=version, k=5 if title else 100, title=title,
                           retries=0)

    def loop(self, photo: bytes, clients: int) -> ClientLoop:
        return ClientLoop(self.url, photo, {"X-K": "100", **self.key}, clients)

    def switched(self, which: str, number: int) -> dict[str, float]:
        """{worker: when it logged the switch} of the workers serving WHICH ("generation" or "removed") NUMBER."""
        return {worker: datetime.strptime(at, "%Y-%m-%dT%H:%M:%S,%f").timestamp()
                for at, worker, generation, _, removed in SWITCH.findall(self.log())
                if int({"generation": generation, "removed": removed}[which]) == number}

    def log(self) -> str:
        return (self.server.workdir / "model_log.log").read_text()


@pytest.fixture(scope="module")
def following(recipe, served, module_tmp):
    yield Live(recipe, served, module_tmp("live") / "live")
    for description in sorted(api.describe(served, LIVE, "all"), key=lambda version: version["modelVersion"] == "1.0"):
        api.unregister(served, LIVE, description["modelVersion"])  # 1.0, the default, last


@pytest.mark.server
def test_a_removed_listing_leaves_every_answer_within_2_s_on_both_workers(following):
    photo = following.run.photo_bytes("img-000")  # prod-000's own photo: first in every answer while it is there
    assert following.query(photo)["neighbours"][0]["product_id"] == "prod-000"
    with following.loop(photo, clients=4) as loop:
        time.sleep(1.5)
        removed_at, removed_wall = time.monotonic(), time.time()
        cli.main(["--live", str(following.live), "remove", "prod-000"])
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
    # Each worker logged its switch to the new removal list within 2 s (the frontend writes the lines a moment later).
    assert wait_until(lambda: len(following.switched("removed", 1)) == 2, 10), following.log()[-3000:]
    applied = following.switched("removed", 1)
    assert all(at - removed_wall < 2.0 for at in applied.values()), (applied, removed_wall)


@pytest.mark.server
def test_fifty_added_listings_are_each_found_first_within_60_s(following, tmp_path):
    words = [" ".join(nouns) for nouns in itertools.product(*TINY_WORDS.values())][:NEW_LISTINGS]  # each its own
    new = write_new_listings(tmp_path / "new", NEW_LISTINGS, titles=[f"New lamp {w}" for w in words])
    photos = {image_id: (tmp_path / "new" / "images" / f"{image_id}.jpg").read_bytes() for image_id in new}
    with following.loop(following.run.photo_bytes("img-004"), clients=2) as loop:
        started = time.monotonic()
        result = cli.main(["--live", str(following.live), "add", "--data", str(tmp_path / "new"),
                           "--archive", str(following.mar), "--workers", "1"])
        assert result["added_listings"] == NEW_LISTINGS and result["generation"] == 2
        pending = dict(new)
        with ThreadPoolExecutor(4) as pool:
            while pending and time.monotonic() - started < 60:
                answers = dict(zip(pending, pool.map(lambda image_id: following.query(photos[image_id]), pending)))
                pending = {image_id: product for image_id, product in pending.items()
                           if answers[image_id]["neighbours"][0]["product_id"] != product}
        assert not pending, f"{len(pending)} new photos not found first after 60 s, e.g. {sorted(pending)[:3]}"
        # The two workers swap independently; once both have logged it, no answer comes from generation 1.
        assert wait_until(lambda: len(following.switched("generation", 2)) == 2, 30), following.log()[-3000:]
        both_switched = max(following.switched("generation", 2).values()) + time.monotonic() - time.time()
        time.sleep(1)
    assert not loop.failures(), loop.failures()[:3]
    outcomes = sorted(loop.outcomes, key=lambda outcome: outcome[1])
    assert outcomes[0][3]["catalogue"]["generation"] == 1
    late = [answer["catalogue"]["generation"] for sent, _, _, answer in outcomes if sent > both_switched + 0.05]
    assert late and set(late) == {2}, late
    last = outcomes[-1][3]
    assert last["catalogue"] == {"generation": 2, "photos": 10 + NEW_LISTINGS}  # prod-000 still removed
    assert "prod-000" not in {neighbour["product_id"] for neighbour in last["neighbours"]}
    for number in (0, 17, NEW_LISTINGS - 1):  # and by their words alone, whichever worker answers
        for _ in range(4):
            answer = following.query(title=words[number])
            assert answer["catalogue"]["generation"] == 2
            assert answer["neighbours"][0]["product_id"] == f"new-{number:04d}", answer["neighbours"][:2]


@pytest.mark.server
def test_a_new_version_with_the_same_weights_follows_the_same_folder(following):
    before = following.query(following.run.photo_bytes("img-000"))
    v2 = archive_tiny_run(following.run, following.mar.parent, name=LIVE, version="2.0", threads=1,
                          live_catalogue=following.live)
    api.register(following.server, v2.name, LIVE, initial_workers=1)
    answer = following.query(following.run.photo_bytes("img-000"), version="2.0")  # a fresh worker, as after a restart
    assert answer["model"]["version"] == "2.0"
    assert answer["catalogue"] == before["catalogue"] == {"generation": 2, "photos": 10 + NEW_LISTINGS}
    assert answer["neighbours"] == before["neighbours"]
    assert "prod-000" not in {neighbour["product_id"] for neighbour in answer["neighbours"]}


# In-process: the follower's rules, on the recipe's run (no server).

@pytest.fixture(scope="module")
def tiny(recipe_run):
    return recipe_run.run


@pytest.fixture(scope="module")
def other(module_tmp):
    """A run of other weights."""
    return make_tiny_run(module_tmp("other") / "2025-02-07_090000", seed=1)


def follow(tiny, folder: Path, **options) -> tuple[live.LiveFollower, Mock]:
    """A follower of FOLDER, seeded from the run, on a clock the test moves."""
    cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir)])
    clock = Mock(return_value=0.0)
    return live.LiveFollower(folder, Catalogue.load(tiny.run_dir / "index"), sha256_file(tiny.run_dir / CHECKPOINT),
                             clock=clock, **options), clock


def tiny_vectors(tiny):
    catalogue = Catalogue.load(tiny.run_dir / "index")
    return catalogue.index.reconstruct_n(0, catalogue.index.ntotal)


def test_the_follower_checks_at_most_every_half_second_and_applies_removals(tiny, tmp_path):
    follower, clock = follow(tiny, tmp_path / "live")
    assert follower.current().generation == 1 and follower.current().info == {"generation": 1, "photos": 12}
    cli.main(["--live", str(tmp_path / "live"), "remove", "prod-000", "prod-001"])
    clock.return_value = 0.4
    assert follower.current().info == {"generation": 1, "photos": 12}  # not looked at yet
    clock.return_value = 0.5
    served = follower.current()
    assert served.info == {"generation": 1, "photos": 8} and served.removed == {"prod-000", "prod-001"}
    found = served.catalogue.search(tiny_vectors(tiny), k=6)
    assert all({n["product_id"] for n in answer} == {f"prod-{i:03d}" for i in range(2, 6)} for answer in found)
    clock.return_value = 1.0
    assert follower.current() is served  # nothing changed: the same object, no reload


def test_compaction_folds_removals_and_a_generation_damaged_or_of_other_weights_is_refused(tiny, other, tmp_path,
                                                                                            caplog):
    folder = tmp_path / "live"
    follower, clock = follow(tiny, folder)
    cli.main(["--live", str(folder), "remove", "prod-002"])
    result = cli.main(["--live", str(folder), "compact"])
    assert result == {"generation": 2, "photos": 10, "removed_listings": 1, "removed_photos": 2}
    assert live.read_removed(folder) == {}
    clock.return_value = 1
    assert follower.current().info == {"generation": 2, "photos": 10}
    status = cli.main(["--live", str(folder), "status"])
    assert (status["generation"], status["listings"], status["removed"]) == (2, 5, 0)
    # A generation of mismatched files, or embedded by other weights, is refused once with its reason; 2 serves on.
    cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir), "--force"])
    listings = folder / "gen-000003" / live.CATALOGUE_DIR / "listings.arrow"
    listings.write_bytes(listings.read_bytes().replace(b"Leeds", b"Leedz"))
    clock.return_value = 2
    with caplog.at_level(logging.ERROR, logger="marketplace_search.live"):
        assert follower.current().generation == 2
    assert "REFUSED generation gen-000003" in caplog.text and "does not belong with" in caplog.text
    cli.main(["--live", str(folder), "init", "--run", str(other.run_dir), "--force"])
    clock.return_value = 3
    with caplog.at_level(logging.ERROR, logger="marketplace_search.live"):
        assert follower.current().generation == 2
    own, others = sha256_file(tiny.run_dir / CHECKPOINT), sha256_file(other.run_dir / CHECKPOINT)
    assert (f"REFUSED generation gen-000004: its vectors were embedded by checkpoint sha256 {others[:12]}, this "
            f"worker serves {own[:12]}") in caplog.text


def test_a_background_load_swaps_in_on_the_first_batch_after_it(tiny, tmp_path):
    follower, clock = follow(tiny, tmp_path / "live", background=True)
    assert follower.current().generation == 1  # the first generation loads before the first answer
    cli.main(["--live", str(tmp_path / "live"), "remove", "prod-003"])
    cli.main(["--live", str(tmp_path / "live"), "init", "--run", str(tiny.run_dir), "--force"])
    clock.return_value = 1
    served = follower.current()  # the removal applies now, generation 2 loads beside
    assert served.removed == {"prod-003"} and served.info["photos"] == 10
    assert wait_until(lambda: follower.current().generation == 2, 30, interval=0.01)
    assert follower.current().info == {"generation": 2, "photos": 10} and follower.current().removed == {"prod-003"}


def test_prune_keeps_the_newest_generations_and_a_follower_on_a_deleted_one_moves_on(tiny, tmp_path):
    folder = tmp_path / "live"
    follower, clock = follow(tiny, folder)
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
    clock.return_value = 1
    assert follower.current().info == {"generation": 4, "photos": 12}
    assert cli.main(["--live", str(folder), "prune"])["deleted"] == []  # default --keep 3: nothing more to delete


def test_add_refuses_other_weights(tiny, other, tmp_path):
    cli.main(["--live", str(tmp_path / "live"), "init", "--run", str(tiny.run_dir)])
    write_new_listings(tmp_path / "new", 2)
    with pytest.raises(SystemExit, match="embedded by checkpoint sha256"):
        cli.main(["--live", str(tmp_path / "live"), "add", "--data", str(tmp_path / "new"), "--run",
                  str(other.run_dir)])
    assert live.read_current(tmp_path / "live")["generation"] == 1


def test_listings_added_live_are_found_by_their_words(tiny, tmp_path, caplog):
    run, folder = tiny, tmp_path / "live"
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

    assert all(not n["product_id"].startswith("new-") for n in by_words()["neighbours"])
    write_new_listings(tmp_path / "new", 2, titles=[title, "Garden lamp"])
    added = cli.main(["--live", str(folder), "add", "--data", str(tmp_path / "new"), "--archive", str(mar)])
    assert added["words"] == {"added_listings": 2, "unknown_category": 0, "from": "generation"}
    assert wait_until(lambda: by_words()["catalogue"]["generation"] == 2, 30, interval=0.1)
    first = by_words()["neighbours"][0]
    assert first["product_id"] == "new-0000" and first["word_similarity"] > 0.8  # its title + "as new"
    assert handler.text_model.listing_words is None  # the archive's words let go while the generation's serve
    assert by_words(category="Garden")["neighbours"][0]["product_id"] != "new-0000"  # listed under Home
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


def test_remove_writes_the_removal_without_loading_a_model(tiny, tmp_path):
    folder = tmp_path / "live"
    cli.main(["--live", str(folder), "init", "--run", str(tiny.run_dir)])
    removed = subprocess.run([sys.executable, "-X", "importtime", "-m", "scripts.catalogue", "--live", str(folder),
                              "remove", "prod-001"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert removed.returncode == 0, removed.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in removed.stderr.splitlines()
                if line.startswith("import time:")}
    assert "marketplace_search.live" in imported
    assert not imported & {"torch", "torchvision", "marketplace_search.models", "marketplace_search.sentences"}
    assert json.loads(removed.stdout) == {"removed": ["prod-001"], "already_removed": [], "removal_list": 1}
    assert set(live.read_removed(folder)) == {"prod-001"}
