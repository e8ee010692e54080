"""How long ``read_results`` (what ``cpsc-ray report`` reads) takes over many published experiments on an
S3 API: moto's server on the loopback, with a round trip added to every read as a remote store has one.
Each experiment holds three files (epochs, trials, lineage), each read whole once; the reads run
``READ_THREADS`` at a time, and ``--threads 1`` shows them one after another.

    python benchmarks/results_read.py [--experiments 100] [--round-trip-ms 30] [--threads 16 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import pyarrow.fs as pafs
from moto.server import ThreadedMotoServer

from cpsc_ray.results import tables
from cpsc_ray.storage import Storage

BUCKET = "runs"


def publish_experiments(root: Storage, count: int, epochs: int) -> None:
    for index in range(count):
        experiment = f"exp-{index:04d}"
        identity = {"experiment": experiment, "dataset": "digits", "trial_id": "run", "selection": "val_acc"}
        rows = [{**identity, "epoch": e, "val_acc": e / epochs} for e in range(1, epochs + 1)]
        tables.publish(root, experiment, rows, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--round-trip-ms", type=float, default=30.0, help="added to every read; 0 for moto's own")
    parser.add_argument("--threads", type=int, nargs="+", default=[tables.READ_THREADS, 1])
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        credentials = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}
        pafs.S3FileSystem(
            **credentials, endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True
        ).create_dir(BUCKET)
        uri = f"s3://testing:testing@{BUCKET}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        publish_experiments(Storage(uri), args.experiments, args.epochs)

        read_bytes = Storage.read_bytes

        def remote_read(self: Storage, relative: str) -> bytes:
            time.sleep(args.round_trip_ms / 1000)
            return read_bytes(self, relative)

        Storage.read_bytes = remote_read
        seconds = {}
        for threads in args.threads:
            tables.READ_THREADS = threads
            start = time.perf_counter()
            results = tables.read_results([uri])
            seconds[threads] = round(time.perf_counter() - start, 2)
            assert len(results.trials) == args.experiments
        print(json.dumps({**vars(args), "files": 3 * args.experiments, "seconds_by_threads": seconds}, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
