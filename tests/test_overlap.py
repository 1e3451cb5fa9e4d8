"""Two batches in flight on one worker (issue 31 §4): one holds the device while the other's files are written,
uploaded and committed. The device is benchmarks/device_overlap.py's stand-in (a sleep), the rest is real."""

import logging
import threading
import time
from unittest import mock

import pytest

from benchmarks.device_overlap import StandInDevice, template_fit, write_images
from pipeline.run import worker as worker_mod
from pipeline.run.executors import feed
from pipeline.run.identify import batch_columns
from pipeline.store.manifest import past_attempts
from pipeline.run.source import read_inputs
from pipeline.run.spec import JobSpec, Previews, RunState, Scaling, Tracking


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overlap-in")
    write_images(folder, 3)
    return folder


@pytest.fixture(scope="module")
def template(images):
    return template_fit(sorted(images.iterdir())[0])


class Handshake:
    """Makes the overlap of two batches a fact to check rather than a matter of timing on a busy machine: the
    upload of item m waits until fit m+1 has begun, and fit m+1 keeps the device until upload m has begun. A
    worker that does its items in turn cannot meet it: its waits time out, and they are counted."""

    def __init__(self, items: int, timeout_s: float = 60.0):
        self.items, self.timeout_s = items, timeout_s
        self.fits = self.uploads = self.timeouts = 0
        self.cond = threading.Condition()

    def _wait(self, ready) -> None:
        with self.cond:
            if not self.cond.wait_for(ready, self.timeout_s):
                self.timeouts += 1

    def fit(self, device):
        def fit(images, configs, **kwargs):
            with self.cond:
                self.fits += 1
                n = self.fits
                self.cond.notify_all()
            results = device(images, configs, **kwargs)
            if n >= 2:
                self._wait(lambda: self.uploads >= n - 1)
            return results
        return fit

    def upload_began(self) -> None:
        with self.cond:
            self.uploads += 1
            m = self.uploads
            self.cond.notify_all()
        if m < self.items:
            self._wait(lambda: self.fits >= m + 1)


def run(images, template, tmp_path, in_flight: int, handshake: Handshake | None = None):
    """Every image through one worker, `in_flight` at a time; the fits' and the uploads' time spans."""
    job = JobSpec(input=str(images), output=str(tmp_path / f"lib-{in_flight}"), default_content="sks square",
                  default_style="flat", fit={"base_model": "tiny", "steps": 2, "recalibrations": 1, "rank": 4},
                  tracking=Tracking(enabled=False), previews=Previews(steps=0),
                  state=RunState(run_id=f"run-{in_flight}"))
    device = StandInDevice(template, device_s=0.6, lora_bytes=20_000)
    logging.getLogger("transformers").setLevel(logging.WARNING)
    worker = worker_mod.FitWorker(job, device="cpu")
    # a worker on a remote node inherits none of the driver's settings: it quiets the libraries itself
    assert logging.getLogger("transformers").level == logging.ERROR
    uploads, lock, upload = [], threading.Lock(), worker_mod.upload_fit_files

    def timed_upload(store, item_id, folder):
        # the fit came back: its attempt's record is gone, so a crash of the process now charges no image of it
        assert past_attempts(store, item_id) == []
        start = time.perf_counter()
        if handshake:
            handshake.upload_began()
        time.sleep(0.3)  # a slow store: the upload must not keep the next fit off the device
        files = upload(store, item_id, folder)
        with lock:
            uploads.append((start, time.perf_counter()))
        return files

    items = read_inputs(job.input, default_content=job.default_content, default_style=job.default_style).items
    fit = handshake.fit(device) if handshake else device
    with mock.patch.object(worker_mod, "fit_many", fit), mock.patch.object(worker_mod, "upload_fit_files",
                                                                               timed_upload):
        done = feed(worker, (batch_columns([item]) for item in items), in_flight)
    markers = list((tmp_path / f"lib-{in_flight}" / "items").glob("*/_SUCCESS"))
    return done, markers, device.spans, uploads


def overlapping(spans, others) -> int:
    """How many pairs of distinct spans overlap in time."""
    return sum(a < d and c < b for a, b in spans for c, d in others if (a, b) != (c, d))


def test_two_batches_in_flight_upload_while_the_next_one_fits(images, template, tmp_path):
    handshake = Handshake(items=3)
    done, markers, fits, uploads = run(images, template, tmp_path, in_flight=2, handshake=handshake)
    assert done == 3 and len(markers) == 3 and len(fits) == 3 and len(uploads) == 3
    assert not overlapping(fits, fits)  # the device lock: one fit at a time
    # each of the first two uploads ran while the next item held the device (by the handshake, not by timing)
    assert handshake.timeouts == 0 and handshake.fits == 3 and handshake.uploads == 3


def test_the_handshake_fails_a_worker_that_does_its_items_in_turn(images, template, tmp_path):
    handshake = Handshake(items=3, timeout_s=0.5)
    done, _, _, _ = run(images, template, tmp_path, in_flight=1, handshake=handshake)
    assert done == 3 and handshake.timeouts >= 2


def test_one_batch_in_flight_does_everything_in_turn(images, template, tmp_path):
    done, markers, fits, uploads = run(images, template, tmp_path, in_flight=1)
    assert done == 3 and len(markers) == 3
    assert overlapping(uploads, fits) == 0


def test_batches_in_flight_default_to_two_on_a_gpu_worker():
    job = JobSpec(input="in", output="out")
    assert Scaling(gpus_per_worker=1.0).in_flight == 2
    assert job.scaling.in_flight == 1 and Scaling(batches_in_flight=3).in_flight == 3
