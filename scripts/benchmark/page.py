"""page: what the search page adds. One client sends the same multipart search to TorchServe directly and through
the page server (scripts.web, which forwards it with its key), in turns, then fetches cached thumbnails."""
import tempfile
from pathlib import Path

from scripts import api, web
from scripts.benchmark.common import bench_run, percentiles_ms, served_archive, timed
from scripts.serve import free_ports

WARM_UP_ROUNDS = 10
COLUMNS = [("way", "request"), ("requests", "requests"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
           ("extra_p50_ms", "p50 − direct ms")]


def bench_page(photos: list[bytes], settings: dict) -> dict:
    seconds = {"TorchServe directly": [], "through the page": [], "cached thumbnail": []}
    with tempfile.TemporaryDirectory(prefix="benchmark-page-") as scratch:
        scratch = Path(scratch)
        (scratch / "photos").mkdir()
        for number, photo in enumerate(photos):  # the catalogue photos the page shows: the photos sent
            (scratch / "photos" / f"photo-{number}.jpg").write_bytes(photo)
        run_dir = bench_run(settings, scratch)
        with served_archive(run_dir, scratch, "marketplace") as (server, _):
            address = web.start_page(scratch, server.inference_url, [scratch / "photos"], free_ports(1)[0],
                                     key_file=server.workdir / api.KEY_FILE)
            try:
                direct = api.prediction_url(server, "marketplace")
                headers = api.auth_headers(server.token("inference"))
                session = api.session()
                for round_ in range(WARM_UP_ROUNDS + settings["page_requests"]):
                    photo = photos[round_ % len(photos)]
                    parts = {"photo": ("photo", photo, api.content_type(photo)), "k": (None, "10")}
                    thumbnail = f"{address}photos/photo-{round_ % len(photos)}"
                    if round_ < len(photos):
                        timed(lambda: session.get(thumbnail, timeout=60))  # made once, then cached on disk
                    took = {"TorchServe directly": timed(lambda: session.post(direct, files=parts, headers=headers,
                                                                              timeout=60)),
                            "through the page": timed(lambda: session.post(f"{address}api/search", files=parts,
                                                                           headers={web.PAGE_HEADER: "1"},
                                                                           timeout=60)),
                            "cached thumbnail": timed(lambda: session.get(thumbnail, timeout=60))}
                    if round_ >= WARM_UP_ROUNDS:
                        for way, elapsed in took.items():
                            seconds[way].append(elapsed)
            finally:
                web.stop_page(scratch)
    rows = [{"way": way, "requests": len(times), **percentiles_ms(times, (50, 95))} for way, times in seconds.items()]
    rows[1]["extra_p50_ms"] = rows[1]["p50_ms"] - rows[0]["p50_ms"]
    return {"rows": rows, "columns": COLUMNS, "models": {"served": str(run_dir)}, "legend": (
        f"One client, one request at a time, the ways in turns after {WARM_UP_ROUNDS} warm-up rounds: a multipart "
        f"photo with k=10, the page server forwarding it with its key; thumbnails of {len(photos)} photos, each "
        f"made once before. Targets: the page adds at most 20 ms at p50; a cached thumbnail takes at most 5 ms.")}
