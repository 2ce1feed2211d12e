"""Every Ray internal the pipeline uses (workers/ray_compat.py) is still where it was read
from: after a Ray upgrade this names what moved, instead of a run quietly losing its
loopback-only instance, its console or its quiet logs."""

import logging

from workers import ray_compat


def test_every_ray_internal_is_still_there():
    assert ray_compat.missing() == []


def test_the_cluster_switch_is_off_inside_and_restored_after():
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_compat.cluster_mode_off():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert ray_constants.ENABLE_RAY_CLUSTER == before


def test_the_train_context_logger_is_a_file_of_ray_train():
    name = ray_compat.train_context_logger_name()
    assert name is not None and name.endswith("ray/train/v2/_internal/execution/context.py")
    assert logging.getLogger(name).name == name
