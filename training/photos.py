"""Stage 2: normalise every photo of the training table to an RGB square JPEG (aspect kept, black bars) in
WORK/photos/, with photos_report.json (the photos that could not be decoded); a re-run resumes."""
import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from marketplace_search.files import TEMPORARY_SUFFIX, replaced_atomically
from marketplace_search.images import ImageError, decode_image, pad_to_square
from training.data import PHOTOS_DIR, PHOTOS_REPORT, read_training_table

JPEG_QUALITY = 95


def is_done(destination: Path, size: int) -> bool:
    """True when a finished photo of this size is already there (writes are atomic, so it is whole)."""
    try:
        with Image.open(destination) as image:
            return image.size == (size, size)
    except OSError:  # missing, or not written by this stage (ours are renamed into place whole)
        return False


def save_jpeg_atomically(image: Image.Image, destination: Path) -> None:
    """Write to a temporary file and rename, so a killed run never leaves half a JPEG under the real name."""
    with replaced_atomically(destination, durable=False) as temporary:  # an fsync per photo slows the stage
        image.save(temporary, format="JPEG", quality=JPEG_QUALITY)


def normalise_photo(source: Path, destination: Path, size: int) -> str:
    """Normalise one photo; returns "written" or "skipped". Raises ImageError for a bad source."""
    if is_done(destination, size):
        return "skipped"
    try:
        image = decode_image(source, fit_size=size)
    except OSError as error:  # decode_image turns decoding errors into ImageError: this is reading the file
        raise ImageError(f"{source}: cannot read the file ({error.strerror or error})") from error
    save_jpeg_atomically(pad_to_square(image, size), destination)
    return "written"


def normalise_task(task: tuple[str, Path, Path, int]) -> tuple[str, str, str | None]:
    """Worker entry point: `(image_id, status, error)`; an unusable source is a result, not a crash."""
    image_id, source, destination, size = task
    try:
        return image_id, normalise_photo(source, destination, size), None
    except ImageError as error:
        return image_id, "failed", str(error)


def run_tasks(tasks: list, workers: int) -> list[tuple[str, str, str | None]]:
    """Normalise in `workers` processes (in this process when 1), with a progress bar."""
    progress = dict(total=len(tasks), desc="normalising photos", unit="photo", smoothing=0.1)
    if workers <= 1:
        return [normalise_task(task) for task in tqdm(tasks, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as executor:
        chunksize = max(1, min(64, len(tasks) // (workers * 8)))
        return list(tqdm(executor.map(normalise_task, tasks, chunksize=chunksize), **progress))


def normalise_photos(image_ids: list[str], images_dir: Path, photos_dir: Path, size: int = 512,
                     workers: int | None = None) -> dict:
    """Normalise `image_ids` from IMAGES_DIR into PHOTOS_DIR; writes and returns the report."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    images_dir, photos_dir = Path(images_dir), Path(photos_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} is missing (expected the photos as images/<image_id>.jpg)")
    photos_dir.mkdir(parents=True, exist_ok=True)
    partial = list(photos_dir.glob(f"*{TEMPORARY_SUFFIX}"))  # left by a killed run
    for path in partial:
        path.unlink()
    workers = workers or os.cpu_count() or 1
    tasks = [(image_id, images_dir / f"{image_id}.jpg", photos_dir / f"{image_id}.jpg", size) for image_id in image_ids]
    started = time.perf_counter()
    results = run_tasks(tasks, workers)
    failures = [{"image_id": image_id, "error": error} for image_id, status, error in results if status == "failed"]
    statuses = [status for _, status, _ in results]
    report = {"source": str(images_dir.resolve()), "size": size, "photos": len(tasks),
              "written": statuses.count("written"), "skipped": statuses.count("skipped"), "failed": len(failures),
              "partial_files_removed": len(partial), "workers": workers,
              "seconds": round(time.perf_counter() - started, 1), "failures": failures}
    (photos_dir / PHOTOS_REPORT).write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"photos: {report['photos']:,} ({report['written']:,} written, {report['skipped']:,} already done, "
             f"{report['failed']:,} failed) at {report['size']}x{report['size']} in {report['seconds']} s "
             f"with {report['workers']} workers"]
    lines += [f"  failed {failure['image_id']}: {failure['error']}" for failure in report["failures"][:20]]
    if report["failed"] > 20:
        lines.append(f"  ... and {report['failed'] - 20} more, see {PHOTOS_REPORT}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder with images/<image_id>.jpg")
    parser.add_argument("--out", required=True, type=Path, help="work folder with tables/; writes OUT/photos/")
    parser.add_argument("--size", type=int, default=512, help="side of the square output photos")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    args = parser.parse_args(argv)
    table = read_training_table(args.out)
    report = normalise_photos(list(table["image_id"]), args.data / "images", args.out / PHOTOS_DIR,
                              args.size, args.workers)
    print(format_report(report))
    print(f"-> {args.out / PHOTOS_DIR}")


if __name__ == "__main__":
    main()
