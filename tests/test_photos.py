"""Stage 2 (training/photos.py): every photo becomes an RGB square JPEG, bad files are reported."""
import json

import pytest
from PIL import Image

from training import photos, tables
from training.data import PHOTOS_REPORT, read_training_table

SIZE = 64


@pytest.fixture(scope="module")
def messy_photos(messy_catalogue, module_tmp):
    """Stages 1 and 2 on the messy catalogue, in two worker processes."""
    work = module_tmp("messy_photos")
    tables.clean_tables(messy_catalogue.data_dir, work)
    image_ids = list(read_training_table(work)["image_id"])
    report = photos.normalise_photos(image_ids, messy_catalogue.data_dir / "images", work / "photos",
                                     size=SIZE, workers=2)
    return work, image_ids, report


def test_bad_files_are_reported_not_fatal(messy_photos, messy_catalogue):
    _, image_ids, report = messy_photos
    manifest = messy_catalogue.manifest
    errors = {failure["image_id"]: failure["error"] for failure in report["failures"]}
    assert errors.keys() == {*manifest["corrupt_files"], *manifest["truncated_files"], *manifest["empty_files"]}
    assert "not a recognised image" in errors[manifest["corrupt_files"][0]]
    assert "truncated" in errors[manifest["truncated_files"][0]]
    assert "empty file" in errors[manifest["empty_files"][0]]
    assert (report["photos"], report["written"], report["skipped"], report["failed"]) == (40, 37, 0, 3)


def test_outputs_are_rgb_squares(messy_photos, messy_catalogue):
    work, image_ids, report = messy_photos
    written = sorted(path.stem for path in (work / "photos").glob("*.jpg"))
    failed = {failure["image_id"] for failure in report["failures"]}
    assert written == sorted(set(image_ids) - failed)
    for name in ("cmyk_files", "png_alpha_files"):
        with Image.open(work / "photos" / f"{messy_catalogue.manifest[name][0]}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
    assert json.loads((work / "photos" / PHOTOS_REPORT).read_text()) == report
    assert not list((work / "photos").glob("*.tmp"))


def test_rerun_skips_finished_photos(messy_photos, messy_catalogue):
    work, image_ids, _ = messy_photos
    again = photos.normalise_photos(image_ids, messy_catalogue.data_dir / "images", work / "photos",
                                    size=SIZE, workers=1)
    assert (again["written"], again["skipped"], again["failed"]) == (0, 37, 3)


def test_missing_source_is_a_failure_not_a_crash(tmp_path):
    image_id, status, error = photos.normalise_task(("gone", tmp_path / "gone.jpg", tmp_path / "out.jpg", SIZE))
    assert (image_id, status) == ("gone", "failed") and "gone.jpg" in error


def test_partial_file_from_a_killed_run_is_redone(tmp_path, image_variants):
    images, out = tmp_path / "images", tmp_path / "photos"
    images.mkdir()
    out.mkdir()
    (images / "a.jpg").write_bytes(image_variants["rgb_jpeg"])
    (out / "a.jpg.tmp").write_bytes(image_variants["rgb_jpeg"][:100])
    report = photos.normalise_photos(["a"], images, out, size=SIZE, workers=1)
    assert (report["written"], report["partial_files_removed"]) == (1, 1)
    assert sorted(path.name for path in out.iterdir()) == ["a.jpg", PHOTOS_REPORT]


def test_interrupted_save_leaves_no_photo(tmp_path, monkeypatch):
    def fail_half_way(image, path, **options):
        path.write_bytes(b"\xff\xd8half a jpeg")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        photos.save_jpeg_atomically(Image.new("RGB", (4, 4)), tmp_path / "a.jpg")
    assert not (tmp_path / "a.jpg").exists()


def test_new_size_is_not_skipped(tmp_path, image_variants):
    source = tmp_path / "source.jpg"
    source.write_bytes(image_variants["rgb_jpeg"])
    assert photos.normalise_photo(source, tmp_path / "out.jpg", 32) == "written"
    assert photos.normalise_photo(source, tmp_path / "out.jpg", 32) == "skipped"
    assert photos.normalise_photo(source, tmp_path / "out.jpg", 48) == "written"
    assert Image.open(tmp_path / "out.jpg").size == (48, 48)


def test_main_reads_the_training_table(sample_catalogue, tmp_path, capsys):
    tables.clean_tables(sample_catalogue.data_dir, tmp_path)
    photos.main(["--data", str(sample_catalogue.data_dir), "--out", str(tmp_path), "--size", "32", "--workers", "1"])
    assert "48 written, 0 already done, 0 failed" in capsys.readouterr().out
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 48
