"""Peak resident memory of the studio server for one person's full flow, and for three at once.

Drives a real ``streamlit run app.py`` with Playwright and Debian's Chromium (never ``playwright
install``) through the flow a person follows: open the studio, load the sample data, upload a zip of
1,000 photos of 400×400 px, train with the defaults (frozen backbone), evaluate (the confusion matrix,
Grad-CAM of a mistake and of every class, the embedding map), and prepare the export bundle.

A thread samples the resident memory (RSS) of the server process *and all its children* every
0.1 s with psutil, so work moved into a subprocess still counts (a child by its unique memory, USS,
so a forked child's pages shared with the server are not counted twice). Each run uses a fresh server with
its own empty ``TRANSFER_STUDIO_HOME`` and ``TRANSFER_STUDIO_CACHE`` (a first visit: nothing cached).

The photos are made at bench time from ``sample_data/hymenoptera`` (random crops, flips, rotations and
colour changes, so they are distinct and photo-like); each of the three sessions gets its own set, as
three people would bring their own images.

Prints one JSON line::

    {"peak_rss_mb": ..., "peak_rss_mb_3_sessions": ..., "steps_1_session": {...}, "steps_3_sessions": {...}, ...}

Usage::

    python bench/bench_memory.py                 # both measurements
    python bench/bench_memory.py --sessions 1    # only one person
    python bench/bench_memory.py --images 200    # a quicker, smaller flow

This is a benchmark, not a test: it takes minutes and its figures depend on the machine (and on the
torch build: a CUDA build maps more shared libraries than the CPU-only one used in the cloud).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "hymenoptera"
sys.path.insert(0, str(ROOT / "tests"))  # the browser tests' server and page helpers

from test_browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, StudioServer, button, heading, wait_idle  # noqa: E402

STEPS = ("start", "sample", "upload", "train", "evaluate", "gradcam", "embedding", "export")


# --------------------------------------------------------------------------------------------------
# Photos made at bench time


def make_zip(path: Path, *, n: int, size: int, seed: int) -> Path:
    """A zip of ``n`` distinct ``size``×``size`` JPEGs in two class folders, made from the sample photos.

    Every image is a random crop (40-100 % of the shorter side) of a random sample photo of its class,
    maybe mirrored, slightly rotated and recoloured: photo-like content that compresses like photos,
    and no two alike.
    """
    from PIL import Image, ImageEnhance

    rng = random.Random(seed)
    sources = {
        cls: sorted(p for split in ("train", "val") for p in (SAMPLE / split / cls).iterdir() if p.is_file())
        for cls in ("ants", "bees")
    }
    cache: dict[Path, Image.Image] = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for k in range(n):
            cls = ("ants", "bees")[k % 2]
            src = rng.choice(sources[cls])
            if src not in cache:
                cache[src] = Image.open(src).convert("RGB")
            im = cache[src]
            w, h = im.size
            side = int(min(w, h) * rng.uniform(0.4, 1.0))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            out = im.crop((x, y, x + side, y + side))
            if rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out = out.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR)
            out = out.resize((size, size), Image.Resampling.BICUBIC)
            out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
            out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
            out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))
            buf = io.BytesIO()
            out.save(buf, "JPEG", quality=rng.randint(82, 92))
            zf.writestr(f"insects/{cls}/{cls}_{seed}_{k:05d}.jpg", buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# Memory sampling


class Sampler:
    """Samples the RSS of a process tree every ``interval`` seconds and keeps the peak per step.

    Each sample is counted towards every step some session is in at that moment (three sessions
    overlap), and towards the overall peak.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0.0
        self.by_step: dict[str, float] = {}
        self.active: dict[int, str] = {}  # session -> current step
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.max_children = 0

    def rss_mb(self) -> float:
        """RSS of the server plus the unique memory (USS) of each child process.

        A child counts by what it adds: right after ``fork`` (or during ``vfork``, before ``exec``)
        a child maps all the server's pages, and adding its RSS would count them twice.
        """
        import psutil

        total = 0
        with contextlib.suppress(psutil.Error):
            total += self.proc.memory_info().rss
        children = []
        with contextlib.suppress(psutil.Error):
            children = self.proc.children(recursive=True)
        self.max_children = max(self.max_children, len(children))
        for p in children:
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().uss
        return total / 2**20

    def step(self, session: int, name: str | None) -> None:
        with self._lock:
            if name is None:
                self.active.pop(session, None)
            else:
                self.active[session] = name

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.rss_mb()
            with self._lock:
                self.peak = max(self.peak, rss)
                for name in set(self.active.values()):
                    self.by_step[name] = max(self.by_step.get(name, 0.0), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# One person's flow


def flow(server: StudioServer, sampler: Sampler, session: int, zip_path: Path, n_images: int, log: list,
         verbose: bool = False) -> None:
    """One person's full flow in its own Playwright instance and browser (Playwright is per thread)."""
    from playwright.sync_api import sync_playwright

    def at(step: str) -> None:
        sampler.step(session, step)
        row = {"session": session, "step": step, "t": round(time.time() - t0, 1), "rss_mb": round(sampler.rss_mb(), 1),
               "peak_so_far_mb": round(sampler.peak, 1)}
        log.append(row)
        if verbose:
            print(json.dumps(row), file=sys.stderr, flush=True)

    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        try:
            at("start")
            page.goto(server.url)
            heading(page, "Transfer Studio")
            wait_idle(page)

            at("sample")
            button(page, "Try it with the sample data").click()
            heading(page, "Data")
            wait_idle(page)

            at("upload")
            page.get_by_text("Add or replace images").click()  # folded once a dataset is loaded
            wait_idle(page)
            page.locator("[data-testid=stButtonGroup]").get_by_text("Zip file").click()
            wait_idle(page)
            page.locator("[data-testid=stFileUploader] input[type=file]").set_input_files(str(zip_path))
            page.get_by_text(f"{n_images:,} images in 2 classes").wait_for(timeout=900_000)
            wait_idle(page, 900_000)

            at("train")
            button(page, "Train with defaults").click()
            heading(page, "Train")
            wait_idle(page)
            button(page, "Start training").click()
            button(page, "Next: see how good it is").wait_for(timeout=3_600_000)
            wait_idle(page)

            at("evaluate")
            button(page, "Next: see how good it is").click()
            heading(page, "Evaluate")
            page.locator("[data-testid=stPlotlyChart]").filter(has_text="predicted class").first.wait_for(
                timeout=300_000)
            wait_idle(page, 300_000)
            page.get_by_role("tab", name="Mistakes").click()
            wait_idle(page, 300_000)

            at("gradcam")
            page.get_by_role("tab", name="Where it looks").click()
            wait_idle(page, 600_000)
            page.get_by_text("Computing").first.wait_for(state="hidden", timeout=600_000)
            wait_idle(page, 600_000)
            page.get_by_text("Class by class").click()
            wait_idle(page, 600_000)
            button(page, "Show the class-by-class grid").click()
            page.wait_for_timeout(500)
            page.get_by_text("Computing").first.wait_for(state="hidden", timeout=600_000)
            wait_idle(page, 600_000)

            at("embedding")
            page.get_by_role("tab", name="Map of the images").click()
            wait_idle(page, 300_000)
            charts = page.locator("[data-testid=stPlotlyChart]").count()
            page.get_by_text("Draw the map").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=stPlotlyChart]')]"
                f".filter(e => e.querySelector('.main-svg')).length > {charts}",
                timeout=900_000)
            wait_idle(page, 900_000)

            at("export")
            button(page, "Next: predict & export").click()
            heading(page, "Predict & Export")
            wait_idle(page)
            button(page, "Prepare the bundle").click()
            button(page, "Download the bundle").wait_for(timeout=1_800_000)
            wait_idle(page)
            at("done")
        except BaseException:
            shot = Path(tempfile.gettempdir()) / f"bench-memory-failure-{session}.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the failure: {shot}", file=sys.stderr)
            raise
        finally:
            sampler.step(session, None)
            browser.close()


_CUDA_ONLY = ("libcu", "libnv", "libtriton", "libtorch_cuda", "libcudnn", "libnccl", "libcusparse", "libcufft",
              "libcurand", "libcublas", "libcusolver", "libcupti", "libc10_cuda")


def cuda_library_rss_mb(pid: int) -> float:
    """Resident pages of the CUDA-only shared libraries (a CPU-only torch build does not have them).

    Only their file-backed pages: the heap that registering CUDA kernels costs is not counted.
    """
    import psutil

    total = 0
    with contextlib.suppress(psutil.Error):
        for m in psutil.Process(pid).memory_maps(grouped=True):
            if os.path.basename(m.path).startswith(_CUDA_ONLY):
                total += m.rss
    return round(total / 2**20, 1)


def measure(sessions: int, zips: list[Path], n_images: int, work: Path, keep_log: bool) -> dict:
    """Peak RSS of a fresh server while ``sessions`` people run the flow at the same time."""
    home = work / f"home-{sessions}"
    server = StudioServer(home, {"TRANSFER_STUDIO_CACHE": str(home / "cache")}).start()
    log: list[dict] = []
    errors: list[BaseException] = []
    t0 = time.time()
    try:
        with Sampler(server.proc.pid) as sampler:
            idle = sampler.rss_mb()

            def person(k: int) -> None:
                try:
                    flow(server, sampler, k, zips[k], n_images, log, keep_log)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finish
                    errors.append(exc)

            threads = [threading.Thread(target=person, args=(k,)) for k in range(sessions)]
            for k, t in enumerate(threads):
                t.start()
                if k + 1 < sessions:
                    time.sleep(2)  # near-simultaneous starts, as the load test does
            for t in threads:
                t.join()
            time.sleep(1.0)
            settled = sampler.rss_mb()
            cuda_libs = cuda_library_rss_mb(server.proc.pid)
    finally:
        server.stop()
        if keep_log and server.log_path.exists():
            print(server.log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
    if errors:
        raise errors[0]
    return {
        "peak_rss_mb": round(sampler.peak, 1),
        "idle_rss_mb": round(idle, 1),
        "end_rss_mb": round(settled, 1),
        "steps": {s: round(sampler.by_step[s], 1) for s in STEPS if s in sampler.by_step},
        "max_child_processes": sampler.max_children,
        "cuda_libs_rss_mb_at_end": cuda_libs,
        "seconds": round(time.time() - t0, 1),
        "log": log,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="photos in each uploaded zip (default 1000)")
    ap.add_argument("--size", type=int, default=400, help="their width and height in px (default 400)")
    ap.add_argument("--sessions", type=int, choices=(1, 3), default=None,
                    help="measure only 1 or only 3 sessions (default: both)")
    ap.add_argument("--log", action="store_true", help="also print the per-step RSS log and the server log tail")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 2
    plan = [args.sessions] if args.sessions else [1, 3]
    import torch

    result: dict = {
        "images": args.images, "image_size": args.size,
        "torch": torch.__version__, "torch_cuda_build": torch.version.cuda is not None,
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        zips = [make_zip(work / f"insects-{k}.zip", n=args.images, size=args.size, seed=k) for k in range(max(plan))]
        result["zip_mb"] = round(zips[0].stat().st_size / 1e6, 1)
        for n in plan:
            r = measure(n, zips, args.images, work, args.log)
            r.pop("log")
            suffix = "" if n == 1 else f"_{n}_sessions"
            result[f"peak_rss_mb{suffix}"] = r.pop("peak_rss_mb")
            result[f"steps_{n}_session{'s' if n > 1 else ''}"] = r.pop("steps")
            result[f"details_{n}"] = r
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
