"""Redis losing state under running instances: the service notices and rebuilds it from the
input topic, and no event's session changes.

Each test runs instances (with the session events topic on) while input arrives, makes Redis
lose state (a restart from an older RDB snapshot, a FLUSHDB, a crash that lost its append-only
file's last writes, a snapshot older than the input's retention, a partition count change),
waits until every input offset is committed and checks the committed output against the
fault-free reference (`enricher batch` on the same input) byte for byte, the session events
topic against the output, and the repair metrics against what the fault did."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewPartitions  # type: ignore[attr-defined]
from feeding import Feeder, as_messages, produce_input, traffic
from instances import Fleet, Instance, wait_for
from progress import Progress
from reconcile import reconcile
from reference import BatchReference, check_output, read_all
from service_settings import REPO, service_env
from stack import Stack

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

PARTITIONS = 6
DONE_TIMEOUT = 300.0
GROUP_SETTINGS = {
    "ENRICHER_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "ENRICHER_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "ENRICHER_KAFKA_MAX_POLL_INTERVAL_MS": "30000",
}
BEHIND = "redis is behind kafka on partition"


def total(instances: Sequence[Instance], name: str, labels: str = "") -> float:
    return sum(i.metric(name, labels) for i in instances if i.running)


def repairs(instances: Sequence[Instance]) -> dict[str, float]:
    return {
        "behind": total(instances, "enricher_state_repairs_total", 'found="behind"'),
        "missing": total(instances, "enricher_state_repairs_total", 'found="missing"'),
        "events": total(instances, "enricher_state_repair_events_total"),
        "unreplayable": total(instances, "enricher_state_repair_unreplayable_offsets_total"),
        "repairing": total(instances, "enricher_state_repairing_partitions"),
    }


def logged_repairs(instances: Sequence[Instance]) -> int:
    return sum(
        message.startswith(BEHIND) for i in instances for message in i.messages(all_starts=True)
    )


class Run:
    """Instances enriching ``events`` generated events while a fault strikes."""

    def __init__(
        self, stack: Stack, fleet: Fleet, tmp_path: Path, name: str, *, events: int, seed: int
    ) -> None:
        self.stack, self.fleet, self.tmp_path = stack, fleet, tmp_path
        self.items = traffic(events, events // 10, seed=seed)
        self.reference = BatchReference(self.items, tmp_path)
        self.topics = stack.new_topics(name, partitions=PARTITIONS)
        self.env = service_env(stack, self.topics, **GROUP_SETTINGS)
        self.progress = Progress(stack, self.env["ENRICHER_GROUP_ID"], self.topics.input)
        self.instances: list[Instance] = []

    def start(self, count: int) -> list[Instance]:
        self.instances = [self.fleet.add(f"repair-{i}", self.env).start() for i in range(count)]
        return self.instances

    def during_feed(self, fault: Callable[[], None], rate: float = 3_000) -> None:
        """Feed the input at ``rate``; once a quarter is committed, ``fault``."""
        feeder = Feeder(self.stack, self.topics.input, as_messages(self.items), rate=rate).start()
        self.progress.wait_total(len(self.items) // 4, DONE_TIMEOUT, self.fleet)
        fault()
        self.sent = feeder.join()

    def wait_done(self) -> None:
        self.progress.wait_done(DONE_TIMEOUT, self.fleet, expected=len(self.items))
        wait_for(
            lambda: repairs(self.instances)["repairing"] == 0,
            "the repairs to finish",
            DONE_TIMEOUT,
            checks=self.instances,
        )

    def check(self, *, sessions: bool = True) -> None:
        """Stop the instances (each exits 0), then compare everything committed (the session
        events topic too, unless the input's partitions changed: its reconciliation takes
        an input partition for the output's)."""
        for instance in self.instances:
            if instance.running:
                assert instance.stop() == 0, instance.tail()
        output, dead = read_all(self.stack, self.topics)
        assert not dead, f"{len(dead)} dead letters, e.g. {dead[:2]}"
        check_output(output, self.reference.result(), self.sent)
        if sessions:
            reconcile(self.stack, self.topics, output)


def restart_from_snapshot(stack: Stack, run: Run, snapshot: Path, *, kill_instances: bool) -> int:
    """Snapshot Redis, let more batches commit, then SIGKILL Redis (and the instances) and
    bring it back from the snapshot. Returns the records committed after the snapshot."""
    stack.redis_snapshot(snapshot)
    at_snapshot = run.progress.total()
    run.progress.wait_total(at_snapshot + len(run.items) // 4, DONE_TIMEOUT, run.fleet)
    if kill_instances:
        for instance in run.instances:
            instance.kill()
    stack.kill_redis()
    lost = run.progress.total() - at_snapshot
    stack.start_redis(snapshot)
    if kill_instances:
        for instance in run.instances:
            instance.start()
    return lost


@pytest.mark.parametrize("kill_instances", [False, True], ids=["instances-run", "instances-killed"])
def test_redis_restarted_from_an_older_snapshot_changes_no_session(
    stack: Stack, fleet: Fleet, tmp_path: Path, kill_instances: bool
) -> None:
    run = Run(stack, fleet, tmp_path, "snapshot", events=40_000, seed=71)
    run.start(3)
    lost: list[int] = []
    run.during_feed(
        lambda: lost.append(
            restart_from_snapshot(stack, run, tmp_path / "older.rdb", kill_instances=kill_instances)
        )
    )
    run.wait_done()
    found = repairs(run.instances)
    print(f"{lost[0]} records committed after the snapshot; repairs: {found}")
    assert found["behind"] > 0 and found["missing"] == 0, found
    # What was committed after the snapshot is replayed (and at most the uncommitted batches
    # the snapshot ran ahead of, once per repair).
    assert found["events"] >= lost[0] > 0, found
    assert found["unreplayable"] == 0
    assert logged_repairs(run.instances) == found["behind"]
    run.check()


def test_a_flushdb_mid_run_is_rebuilt_from_the_earliest_offsets(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    run = Run(stack, fleet, tmp_path, "flush", events=30_000, seed=72)
    run.start(2)
    flushed_at: list[int] = []

    def flush() -> None:
        stack.redis().flushdb()
        flushed_at.append(run.progress.total())

    run.during_feed(flush)
    run.wait_done()
    found = repairs(run.instances)
    print(f"flushed at {flushed_at[0]} committed records; repairs: {found}")
    # Every partition is rebuilt from offset 0, nothing is missing from the input.
    assert found["missing"] >= PARTITIONS and found["behind"] == 0, found
    assert found["events"] >= flushed_at[0] > 0, found
    assert found["unreplayable"] == 0
    run.check()


def test_a_redis_crash_that_lost_its_last_writes_under_load_changes_no_session(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    """``appendfsync everysec``: a machine crash loses up to a second of writes. SIGKILL alone
    loses nothing (the kernel keeps what Redis wrote), so the append-only file is cut back to
    where it stood a moment before, as the crash would have left it."""
    run = Run(stack, fleet, tmp_path, "everysec", events=40_000, seed=73)
    run.start(2)
    cut: list[int] = []

    def crash() -> None:
        size = stack.redis_aof_size()
        at = run.progress.total()
        run.progress.wait_total(at + 2_000, DONE_TIMEOUT, run.fleet)  # writes after the cut
        stack.kill_redis()
        stack.start_redis(truncate_aof=size)
        cut.append(run.progress.total() - at)

    run.during_feed(crash)
    run.wait_done()
    found = repairs(run.instances)
    print(f"{cut[0]} records committed after the cut; repairs: {found}")
    assert found["behind"] > 0 and found["events"] >= cut[0] > 0, found
    assert logged_repairs(run.instances) == found["behind"]
    run.check()


def test_a_gap_the_input_no_longer_retains_is_logged_counted_and_the_service_goes_on(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    run = Run(stack, fleet, tmp_path, "retention", events=20_000, seed=74)
    [instance] = run.start(1)
    half = run.items[: len(run.items) // 2]
    produce_input(stack, run.topics.input, as_messages(half))
    run.progress.wait_done(DONE_TIMEOUT, run.fleet, expected=len(half))
    snapshot = tmp_path / "older.rdb"
    stack.redis_snapshot(snapshot)
    rest = run.items[len(half) :]
    produce_input(stack, run.topics.input, as_messages(rest[: len(rest) // 2]))
    run.progress.wait_done(DONE_TIMEOUT, run.fleet)
    assert instance.stop() == 0, instance.tail()
    committed = run.progress.committed()
    stack.kill_redis()
    stack.start_redis(snapshot)
    prefix = run.env["ENRICHER_REDIS_KEY_PREFIX"]
    complete = {
        p: int(stack.redis().hget(f"{prefix}{{{run.topics.input}:{p}}}:meta", "complete") or 0)
        for p in committed
    }
    # Retention deletes the input up to the committed offsets: nothing can be replayed.
    deleted = [TopicPartition(run.topics.input, p, committed[p]) for p in committed]
    admin = stack.admin()  # held: its requests end with it
    for future in admin.delete_records(deleted).values():
        future.result(timeout=30)
    gap = sum(committed[p] - complete[p] for p in committed)
    assert gap > 0, (committed, complete)

    instance.start()
    produce_input(stack, run.topics.input, as_messages(rest[len(rest) // 2 :]))
    run.progress.wait_done(DONE_TIMEOUT, run.fleet)
    found = repairs([instance])
    assert found["unreplayable"] == gap, (found, gap)
    assert found["events"] == 0 and found["repairing"] == 0, found
    assert instance.logged("are no longer retained")
    assert instance.metric("enricher_records_consumed_total") == len(rest) - len(rest) // 2
    assert instance.stop() == 0, instance.tail()


def test_a_partition_count_change_is_refused_until_migrated_and_sessions_stay_whole(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    run = Run(stack, fleet, tmp_path, "grow", events=20_000, seed=75)
    first, second = run.items[: len(run.items) // 2], run.items[len(run.items) // 2 :]
    [instance] = run.start(1)
    sent = produce_input(stack, run.topics.input, as_messages(first))
    run.progress.wait_done(DONE_TIMEOUT, run.fleet, expected=len(first))
    assert instance.stop() == 0, instance.tail()

    grown = PARTITIONS + 3
    # The output topics grow with the input, so that a device's output partition stays its
    # input partition.
    admin = stack.admin()  # held: its requests end with it
    grow = [NewPartitions(topic, grown) for topic in run.topics.all]
    for future in admin.create_partitions(grow).values():
        future.result(timeout=30)
    wait_for(
        lambda: {len(p) for p in stack.partitions(run.topics.all).values()} == {grown},
        "the new partitions",
        60,
    )
    instance.start()
    wait_for(lambda: not instance.running, "the instance to refuse to start", 60)
    assert instance.returncode == 2
    command = f"enricher state migrate --partitions {grown}"
    assert instance.logged(command), instance.tail()

    migrated = subprocess.run(
        [sys.executable, "-m", "enricher", "state", "migrate", "--partitions", str(grown)],
        env={**os.environ, **run.env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert f"from {PARTITIONS} to {grown} partitions" in migrated.stdout

    run.progress = Progress(stack, run.env["ENRICHER_GROUP_ID"], run.topics.input)
    instance.start()
    sent += produce_input(stack, run.topics.input, as_messages(second))
    run.progress.wait_done(DONE_TIMEOUT, run.fleet, expected=len(run.items))
    assert repairs([instance])["behind"] + repairs([instance])["missing"] == 0
    run.sent = sent
    run.check(sessions=False)
