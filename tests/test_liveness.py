"""Who owns a run or a trial, and whether that process lives: a PID that another process
reuses (after a reboot, on a busy host) is not taken for the owner."""

from __future__ import annotations

import os
import subprocess

import pytest

from runner import liveness


def test_this_process_lives_and_its_pid_with_another_start_time_does_not():
    tags = liveness.process_tags()
    assert tags["kmrun.pid"] == str(os.getpid()) and tags["kmrun.started"]
    assert liveness.owner_alive(tags)
    assert not liveness.owner_alive({**tags, "kmrun.started": "deadbeef-1"})  # a reused PID
    assert liveness.owner_alive({**tags, "kmrun.started": ""})  # recorded before kmrun recorded start times
    assert liveness.owner_alive({**tags, "kmrun.host": "elsewhere", "kmrun.pid": "1"})  # not ours to judge


@pytest.mark.slow  # starts a process
def test_a_dead_process_is_gone_by_pid_and_by_owner_label():
    child = subprocess.Popen(["true"])
    child.wait()
    assert not liveness.alive(child.pid)
    host = liveness.host_name()
    assert liveness.owner_gone(f"{host}:{child.pid}")  # the older HOST:PID form
    assert liveness.owner_gone(f"{host}:{os.getpid()}:deadbeef-1")  # our PID, another start: reused
    assert not liveness.owner_gone(liveness.owner_label())
    assert not liveness.owner_gone(f"another-host:{child.pid}:x-1")
