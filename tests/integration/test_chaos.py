"""Exactly once under process faults: SIGKILLed instances, scaling out and in, a paused zombie.

Whatever happens to the instances, the committed output must hold every input event exactly
once, byte-equal to the fault-free reference (`enricher batch` on the same input). Each test
waits until the consumer group has committed every input offset (the service commits them in
the transaction that publishes the output, so nothing more can appear), stops the instances
with SIGTERM (each must exit 0) and then reads everything committed."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
from feeding import Feeder, as_messages, produce_input, traffic
from instances import Fleet, Instance, wait_for
from progress import Progress
from reconcile import reconcile
from reference import BatchReference, check_output, read_all
from rekeyed import (
    by_device,
    check,
    expected_sessions,
    json_event,
    keyed_at_random,
    stop,
    wait_done,
)
from service_settings import service_env
from stack import Stack, TopicSet

pytest_plugins = ["instances"]
pytestmark = pytest.mark.integration

PARTITIONS = 12
MAX_KILLS = 15
DONE_TIMEOUT = 240.0
# Short group timeouts, so the group notices a dead or paused member within seconds.
GROUP_SETTINGS = {
    "ENRICHER_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "ENRICHER_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "ENRICHER_KAFKA_MAX_POLL_INTERVAL_MS": "20000",
}


def chaos_env(stack: Stack, topics: TopicSet, **extra: str) -> dict[str, str]:
    return service_env(stack, topics, **GROUP_SETTINGS, **extra)


def finish(stack: Stack, fleet: Fleet, topics: TopicSet, progress: Progress, total: int) -> None:
    """Wait until all input is committed, then stop every running instance cleanly."""
    progress.wait_done(DONE_TIMEOUT, fleet, expected=total)
    for instance in fleet.instances:
        if instance.running:
            assert instance.stop() == 0, instance.tail()


def test_sigkilled_instances_lose_and_duplicate_nothing(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    events = 100_000
    items = traffic(events, 10_000, seed=41)
    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("chaos", partitions=PARTITIONS)
    env = chaos_env(stack, topics)
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instances = [fleet.add(f"chaos-{i}", env).start() for i in range(3)]
    # Input arrives over ~25 s while instances die and come back.
    feeder = Feeder(stack, topics.input, as_messages(items), rate=4_000).start()

    rng = random.Random(42)
    kills = 0
    down: list[Instance] = []
    started = time.monotonic()
    while not (feeder.done and progress.total() >= events) and kills < MAX_KILLS:
        fleet.check()
        time.sleep(rng.uniform(1.0, 3.0))  # the chaos schedule, not synchronisation
        for instance in down:
            instance.start()
        down = []
        victim = rng.choice([i for i in instances if i.running])
        victim.kill()
        kills += 1
        if rng.random() < 0.5:
            victim.start()  # at once: the same transactional id aborts its open transaction
        else:
            down.append(victim)  # later: its partitions move to the others meanwhile
    for instance in down:
        instance.start()
    sent = feeder.join()
    print(f"{kills} kills in {time.monotonic() - started:.0f}s, {progress.total()} committed")
    assert kills >= 10, f"only {kills} kills while the input was consumed"

    finish(stack, fleet, topics, progress, events)
    output, dead = read_all(stack, topics)
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:2]}"
    check_output(output, reference.result(), sent)
    reconcile(stack, topics, output)


def test_scaling_out_and_in_mid_stream(stack: Stack, fleet: Fleet, tmp_path: Path) -> None:
    phase = 20_000
    items = traffic(4 * phase, 8_000, seed=51)
    phases = [items[i : i + phase] for i in range(0, len(items), phase)]
    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("scale", partitions=PARTITIONS)
    env = chaos_env(stack, topics)
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    first = fleet.add("scale-0", env).start()
    others = [fleet.add(f"scale-{i}", env) for i in (1, 2, 3)]
    sent = []

    # Phase 1: one instance; three more join while it works.
    feeder = Feeder(stack, topics.input, as_messages(phases[0]), rate=4_000).start()
    progress.wait_total(phase // 4, DONE_TIMEOUT, fleet)
    for instance in others:
        instance.start()
    for instance in others:
        instance.wait_owning()
    sent += feeder.join()

    # Phase 2: four instances; two leave while they work.
    feeder = Feeder(stack, topics.input, as_messages(phases[1]), rate=4_000).start()
    progress.wait_total(phase + phase // 4, DONE_TIMEOUT, fleet)
    worked = {i.name: i.metric("enricher_records_produced_total") for i in others}
    for instance in others[:2]:
        assert instance.stop() == 0, instance.tail()
    sent += feeder.join()

    # Phase 3: two instances; the last extra one leaves.
    feeder = Feeder(stack, topics.input, as_messages(phases[2]), rate=4_000).start()
    progress.wait_total(2 * phase + phase // 4, DONE_TIMEOUT, fleet)
    worked[others[2].name] = others[2].metric("enricher_records_produced_total")
    assert others[2].stop() == 0, others[2].tail()
    sent += feeder.join()

    # Phase 4: back to one instance.
    sent += produce_input(stack, topics.input, as_messages(phases[3]))
    finish(stack, fleet, topics, progress, len(items))
    assert all(count > 0 for count in worked.values()), f"records published: {worked}"
    assert first.logged("released partitions"), "the first instance never gave partitions away"

    output, dead = read_all(stack, topics)
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:2]}"
    check_output(output, reference.result(), sent)
    reconcile(stack, topics, output)


ZOMBIE_SIGNS = ("fenced", "batch aborted", "abort failed", "lost partitions")


def fenced_partitions(instance: Instance) -> list[int]:
    """The partitions ``instance`` logged it was fenced out of."""
    found: set[int] = set()
    for message in instance.messages():
        match = re.search(r"fenced out of partitions \[([\d, ]*)\]", message)
        if match:
            found.update(int(p) for p in match.group(1).split(",") if p.strip())
    return sorted(found)


def test_paused_zombie_cannot_corrupt_state(stack: Stack, fleet: Fleet, tmp_path: Path) -> None:
    # The backlog must outlast the attempts to pause the zombie inside a batch (up to about
    # 2 s of them, more on a loaded machine), however fast the service works through it.
    items = traffic(140_000, 6_000, seed=61)
    warm, backlog, more = items[:10_000], items[10_000:120_000], items[120_000:130_000]
    shared, alone = items[130_000:135_000], items[135_000:]
    reference = BatchReference(items, tmp_path)
    topics = stack.new_topics("zombie", partitions=PARTITIONS)
    # A long transaction timeout: the zombie's open transaction must be stopped by fencing,
    # not by the coordinator timing it out while the process is stopped. Big batches: the
    # zombie spends most of its time inside one, not waiting for input.
    env = chaos_env(
        stack, topics, ENRICHER_TRANSACTION_TIMEOUT_MS="90000", ENRICHER_BATCH_SIZE="5000"
    )
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    zombie = fleet.add("zombie", env).start()
    successor = fleet.add("successor", env)

    sent = produce_input(stack, topics.input, as_messages(warm))
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(warm))

    # A backlog keeps the zombie busy; stop it dead, most likely in the middle of a batch.
    sent += produce_input(stack, topics.input, as_messages(backlog))
    progress.wait_total(len(warm) + 2_000, DONE_TIMEOUT, fleet)
    inside = zombie.pause_inside_batch()
    paused_at = progress.total()
    assert paused_at < len(warm) + len(backlog), "the zombie finished before it was paused"

    # The group evicts it; the successor takes every partition and works on.
    successor.start()
    successor.wait_owning()
    sent += produce_input(stack, topics.input, as_messages(more))
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(warm) + len(backlog) + len(more))

    # The zombie wakes up holding a batch and partitions it no longer owns, then rejoins.
    zombie.resume()
    wait_for(
        lambda: any(zombie.logged(sign) for sign in ZOMBIE_SIGNS),
        f"the zombie to notice it lost its partitions (any of {ZOMBIE_SIGNS})",
        60,
        checks=[fleet],
    )
    wait_for(
        lambda: sum("assigned partitions" in m for m in zombie.messages()) >= 2,
        "the zombie to rejoin the group",
        60,
        checks=[fleet],
    )
    signs = [m for m in zombie.messages() if any(s in m for s in ZOMBIE_SIGNS)]
    print(f"paused at {paused_at} (inside a batch: {inside}); the zombie logged: {signs}")
    if inside:  # its batch could not commit: fenced in Redis, or the transaction failed
        assert any(s in m for m in signs for s in ZOMBIE_SIGNS[:3]), signs
    sent += produce_input(stack, topics.input, as_messages(shared))
    progress.wait_done(DONE_TIMEOUT, fleet, expected=len(items) - len(alone))

    # The successor leaves: the former zombie must now serve every partition, including
    # those it was fenced out of.
    assert successor.stop() == 0, successor.tail()
    sent += produce_input(stack, topics.input, as_messages(alone))
    progress.wait_done(
        DONE_TIMEOUT,
        fleet,
        expected=len(items),
        stall=30,
        hint=lambda: (
            f"the former zombie was fenced out of partitions {fenced_partitions(zombie)} "
            "and owns all partitions now: a partition it paused when it was fenced is never "
            "resumed when it is assigned again (enricher/service.py, Service.process pauses, "
            "_on_assign does not resume)"
        ),
    )
    assert zombie.stop() == 0, zombie.tail()

    output, dead = read_all(stack, topics)
    assert not dead, f"{len(dead)} dead letters, e.g. {dead[:2]}"
    check_output(output, reference.result(), sent)
    reconcile(stack, topics, output)


def test_the_rekeying_hop_loses_and_duplicates_nothing_when_instances_are_sigkilled(
    stack: Stack, fleet: Fleet
) -> None:
    """Input keyed at random, the device in each event: both hops under SIGKILL. The
    reference is the engine on each device's events in the order the hop wrote them."""
    messages, devices = keyed_at_random(traffic(40_000, 4_000, seed=93), seed=93)
    topics = stack.new_topics("rekey-chaos", partitions=6)
    env = chaos_env(stack, topics, ENRICHER_DEVICE_ID="duid")
    progress = Progress(stack, env["ENRICHER_GROUP_ID"], topics.input)
    instances = [fleet.add(f"rekey-chaos-{i}", env).start() for i in range(2)]
    feeder = Feeder(stack, topics.input, messages, rate=3_000).start()
    kills = 0
    while not feeder.done and kills < 8:
        fleet.check()
        progress.wait_total(progress.total() + 2_000, DONE_TIMEOUT, fleet)
        victim = instances[kills % 2]
        victim.kill()
        victim.start()
        kills += 1
    feeder.join()
    assert kills >= 3, f"only {kills} kills while the input was consumed"
    wait_done(stack, env, fleet, len(messages), len(messages))
    stop(instances)

    expected = expected_sessions(stack, by_device(env), json_event)
    check(stack.read_committed([topics.output]), expected, json_event, devices)
