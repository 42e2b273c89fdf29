"""What a user made in the default places survives `make clean` and a second build of the same version."""
import re
import subprocess
from pathlib import Path

import pytest

from marketplace_search.files import sha256_file
from scripts import api, archive, refresh
from training import pipeline
from tests.serving_fixtures import REPO, make_tiny_run

RUN = "work/marketplace/model_evaluation/2025-01-31_142233"
MAR = Path("model_store") / "marketplace-v1.0.mar"
FP32 = ["--version", "1.0", "--runtime", "torch", "--precision", "fp32"]


@pytest.fixture(scope="module")
def user(module_tmp) -> Path:
    """A checkout after the README's steps: a run in work/marketplace, its archive in model_store/, a key in logs/."""
    root = module_tmp("user")
    make_tiny_run(root / RUN)
    (root / "model_store").mkdir()
    archive.main(["--run", str(root / RUN), "--store", str(root / "model_store"), *FP32])
    (root / "logs").mkdir()
    (root / "logs" / api.KEY_FILE).write_text("{}")
    return root


def user_files(root: Path) -> dict[str, str]:
    """sha256 of each file the user made: the work folder, the archives, the server's key file."""
    paths = [*(root / "work" / "marketplace").rglob("*"), *(root / "model_store").glob("*.mar"),
             root / "logs" / api.KEY_FILE]
    return {str(path.relative_to(root)): sha256_file(path) for path in paths if path.is_file()}


def test_a_second_build_of_a_version_is_refused_naming_the_file_and_the_flag(user, monkeypatch, capsys):
    monkeypatch.chdir(user)
    before = user_files(user)
    with pytest.raises(SystemExit, match=rf"^refused: {re.escape(str(MAR))} exists .* --replace to replace it$"):
        archive.main(["--run", RUN, *FP32])
    assert user_files(user) == before
    archive.main(["--run", RUN, *FP32, "--replace"])
    assert f"replacing {MAR} (--replace)" in capsys.readouterr().out and user_files(user).keys() == before.keys()


def test_refresh_and_pipeline_refuse_to_rewrite_an_archive_or_a_work_folder_before_any_work(user, monkeypatch):
    monkeypatch.chdir(user)
    before = user_files(user)
    refreshed = ["--run", RUN, "--data", "new_data", "--runtime", "torch", "--precision", "fp32"]
    with pytest.raises(SystemExit, match=rf"^refused: {re.escape(str(MAR))} exists .* pass --replace to replace it$"):
        refresh.main([*refreshed, "--work", "work/refresh", "--version", "1.0"])
    made_from = re.escape(str(Path("new_data").resolve()))
    for command, arguments in ((refresh.main, [*refreshed, "--work", "work/marketplace", "--version", "2.0"]),
                               (pipeline.main, ["--data", "new_data", "--out", "work/marketplace"])):
        with pytest.raises(SystemExit, match=r"^refused: work/marketplace holds files this command did not make, "
                                             rf"not \{{'data': '{made_from}'.*pass --replace to rewrite"):
            command(arguments)
    assert user_files(user) == before and not Path("work/refresh").exists()


def test_make_clean_keeps_what_the_user_made_and_distclean_says_what_it_deletes(user, tmp_path):
    (user / "work" / "demo" / "logs").mkdir(parents=True, exist_ok=True)
    (user / ".pytest_cache").mkdir()
    before = user_files(user)
    make = ["make", "-f", str(REPO / "Makefile"), f"VENV={REPO / '.venv'}"]
    subprocess.run([*make, "clean"], cwd=user, check=True, capture_output=True)
    assert user_files(user) == before and not (user / "work" / "demo").exists()
    assert not (user / ".pytest_cache").exists()
    for path in ("work/run/best.pt", "logs/key_file.json", "model_store/m.mar", "model_store/.gitkeep"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    done = subprocess.run([*make, "distclean"], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "deleting every training run (work/), archive (model_store/*.mar) and server log and key" in done.stdout
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["model_store",
                                                                                      "model_store/.gitkeep"]
