"""Cluster ids for the test and dev Kafka broker: Kafka's form, never read as an option."""

from __future__ import annotations

import base64

from pointmesh.kafka_server import new_cluster_id


def test_cluster_ids_are_sixteen_random_bytes_that_never_start_with_a_dash() -> None:
    ids = [new_cluster_id() for _ in range(2000)]  # about 31 of them would start with '-' unchecked
    assert all(not i.startswith("-") for i in ids)
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
