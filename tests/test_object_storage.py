"""Object storage other than AWS: a whole tiny PBT run (one-worker trials, and two-worker Ray Train trials)
against a real S3 API, moto's server on the loopback, and everything it wrote read back from s3://."""

from __future__ import annotations

import itertools
import threading
import uuid

import pyarrow.fs as pafs
import pytest
from conftest import assert_tensorboard_shows_what_each_trial_reported, s3_bucket
from ray.tune import ExperimentAnalysis
from test_tune import SPACES, assert_one_row_per_trained_epoch, check_exploits

from cpsc_ray.cli import main
from cpsc_ray.cluster.tune import TuneOptions, run_tune
from cpsc_ray.cluster.tune.trial import load_trial_checkpoint
from cpsc_ray.config import with_values
from cpsc_ray.errors import InputError
from cpsc_ray.results.lineage import read_lineage
from cpsc_ray.results.schema import epoch_table
from cpsc_ray.results.tables import publish, read_results
from cpsc_ray.storage import Storage

BUCKET = "runs"


def test_child_uris_keep_the_store_options():
    options = "endpoint_override=h:1&scheme=http"
    assert Storage(f"s3://b/p?{options}").child("x").uri("y") == f"s3://b/p/x/y?{options}"
    assert Storage(f"s3://b/p/?{options}").uri_of("b/other/checkpoint_0") == f"s3://b/other/checkpoint_0?{options}"
    assert Storage("gs://b/p").uri("x") == "gs://b/p/x"
    assert Storage("file:///tmp/p").uri("x") == "file:///tmp/p/x"
    assert Storage("/tmp/p/").uri("x") == Storage("/tmp/p").uri_of("/tmp/p/x") == "/tmp/p/x"
    folder, name = Storage.of_file(f"s3://b/teachers/t.pt?{options}")  # a teacher given as a URI
    assert (folder.uri(), name) == (f"s3://b/teachers?{options}", "t.pt")


@pytest.mark.parametrize(
    "uri", ["s3://KEY:s3cr3t@b/p?scheme=http", "s3://KEY@b/p", "abfs://c/p?sas_token=s3cr3t", "s3://b/p?secret=s3cr3t"]
)
def test_a_location_that_carries_a_credential_is_refused_without_repeating_it(uri):
    with pytest.raises(InputError) as refused:
        Storage(uri)
    message = str(refused.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "\n" not in message
    assert "s3cr3t" not in message and "KEY@" not in message and "KEY:" not in message


@pytest.fixture(scope="module")
def s3_root(s3_server):
    """A bucket on moto's S3 server; the credentials are in the environment (conftest's s3_credentials), which
    Ray's workers inherited when the session's Ray started."""
    return s3_bucket(s3_server, BUCKET)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_readers_get_one_whole_version_of_a_file_a_run_keeps_replacing(store, s3_root, tmp_path):
    """A run rewrites its metrics.parquet every epoch and its results tables when it publishes; a poller or a
    report reading meanwhile gets one whole version: not a torn file, nor the writer's staging file."""
    root = Storage(str(tmp_path)) if store == "local" else Storage(s3_root).child(f"replaced-{uuid.uuid4().hex}")
    identity = {"experiment": "live", "dataset": "digits", "trial_id": "run", "selection": "val_acc"}
    rows = [{**identity, "epoch": e, "val_acc": e / 40} for e in range(1, 41)]
    written, stop, failures = [0], threading.Event(), []

    def write(epochs: int) -> None:
        root.write_parquet("metrics.parquet", epoch_table(rows[:epochs]))
        publish(root, "live", rows[:epochs], [])
        written[0] += 1

    def run() -> None:
        try:
            for epochs in itertools.takewhile(lambda _: not stop.is_set(), itertools.cycle(range(1, len(rows) + 1))):
                write(epochs)
        except Exception as error:  # noqa: BLE001 -- the reader's loop ends on it and the test reports it
            failures.append(error)

    write(1)  # a whole version before the reader starts
    writer = threading.Thread(target=run)
    writer.start()
    try:
        reads = 0
        while (reads < 100 or written[0] < 100) and not failures:
            epochs = root.read_parquet("metrics.parquet")["epoch"].to_pylist()
            assert epochs == list(range(1, len(epochs) + 1))
            published = read_results([root.uri()]).epochs.epoch.tolist()
            assert published == list(range(1, len(published) + 1))
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert not failures, failures


@pytest.mark.parametrize("workers", [1, 2])
def test_a_tuning_run_on_an_s3_compatible_store_reads_back_from_it(ray_local, digits_cfg, s3_root, tmp_path, workers):
    experiment = f"pbt-{workers}w"
    summary = run_tune(
        with_values(digits_cfg, {"train.epochs": 2}),
        TuneOptions(
            space=str(SPACES / "calm_pbt.yaml"),
            scheduler="pbt",
            num_samples=2,
            perturbation_interval=1,
            workers_per_trial=workers,
            cpus_per_worker=0.5,
            keep_checkpoints=None,
            search_seed=3,
            storage=s3_root,
            name=experiment,
        ),
    )
    assert not summary["errored"]
    root = Storage(s3_root)
    assert summary["results"] == root.uri("results")

    # Results and lineage: the exploits' source checkpoints are in the bucket and hold what was cloned.
    results = check_exploits(s3_root, experiment, epochs=2)
    assert len(results.trials) == 2 and set(results.epochs.workers) == {workers}
    assert_one_row_per_trained_epoch(results.epochs, total=2)
    in_experiment = f"s3://{BUCKET}/{experiment}/"
    trials = root.child(experiment, "cpsc", "trials")
    for trial_id in set(results.lineage.trial_id):
        for record in read_lineage(trials.child(trial_id)):
            assert record.source_checkpoint.startswith(in_experiment), record.source_checkpoint

    # Checkpoints: each trial's newest, as Tune holds it, is a last epoch's state (PBT's last round may have
    # cloned the other trial's into it).
    analysis = ExperimentAnalysis(root.uri(experiment))
    trial_ids = {trial.trial_id for trial in analysis.trials}
    for trial in analysis.trials:
        checkpoint = trial.checkpoint
        with checkpoint.as_directory() as directory:
            start = load_trial_checkpoint(directory, root.uri_of(checkpoint.path))
        assert start.epoch == 2 and start.trial_id in trial_ids
        assert start.where.startswith(in_experiment)

    # Tune's TensorBoard logs are in the bucket too: each trial's reports, one per round of a multi-worker trial.
    pafs.copy_files(root.path(experiment), str(tmp_path / "copy" / experiment), source_filesystem=root.fs)
    assert_tensorboard_shows_what_each_trial_reported(tmp_path / "copy", experiment)

    # The report reads the same results.
    out = tmp_path / "report"
    assert main(["report", s3_root, "-o", str(out), "--experiments", experiment]) == 0
    assert experiment in (out / "report.md").read_text()
