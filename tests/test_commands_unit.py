"""The command line's shared argument type and the persistent-VM policy the
commands call (labkit/commands/common.py, labkit/machine/persistent.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from labkit.commands.common import number, positive
from labkit.image import DEFAULT_KERNEL
from labkit.machine import persistent
from labkit.settings import Settings


@pytest.mark.parametrize("kind, args, text, want", [
    (int, dict(low=1, high=50, flag="--runs"), "0", "--runs 0 is out of range (use 1..50)"),
    (int, dict(low=0, high=20, flag="--learners", hint="use 1..20, or 0 to skip"), "-1",
     "--learners -1 is out of range (use 1..20, or 0 to skip)"),
    (int, dict(low=1024, high=65535, flag="port"), "80", "port 80 is out of range (use 1024..65535)"),
    (int, dict(low=1, high=5), "many", "'many' is not a number"),
    (int, dict(low=1024, high=65535, flag="port", what="a port number"), "8080x", "'8080x' is not a port number"),
])
def test_number_refuses_with_the_range(kind, args, text, want):
    with pytest.raises(argparse.ArgumentTypeError, match=want.replace("(", r"\(").replace(")", r"\)")):
        number(kind, **args)(text)


def test_number_and_positive_accept_the_bounds():
    assert number(int, 1, 50)("1") == 1 and number(int, 1, 50)("50") == 50
    assert positive(float)("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="0 must be more than 0"):
        positive(int)("0")


def test_a_range_error_is_argparses_usage_error(capsys):
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--runs", type=number(int, 1, 50, flag="--runs"))
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--runs", "51"])
    assert e.value.code == 2 and "--runs 51 is out of range (use 1..50)" in capsys.readouterr().err


def _settings(tmp_path) -> Settings:
    return Settings.from_env({"LABKIT_STATE_DIR": str(tmp_path), "LABKIT_CACHE_DIR": str(tmp_path / "cache"),
                              "LABKIT_SHARED_CACHE_DIR": ""})


def test_reset_of_a_vm_never_started_is_none(tmp_path):
    assert persistent.for_reset("never", _settings(tmp_path)) is None


def test_reset_uses_the_kernel_the_record_names(tmp_path):
    d = tmp_path / "vms" / "r1"
    d.mkdir(parents=True)
    (d / "vm.json").write_text(json.dumps({"name": "r1", "kernel": "6.12", "state": "stopped"}))
    got = persistent.for_reset("r1", _settings(tmp_path))
    assert got is not None and got.vm.kernel == "6.12" and got.note == ""
    assert got.vm.state_dir == d


def test_reset_of_an_unreadable_record_takes_the_default_kernel_and_says_so(tmp_path):
    d = tmp_path / "vms" / "r2"
    d.mkdir(parents=True)
    (d / "vm.json").write_text("{not json")
    got = persistent.for_reset("r2", _settings(tmp_path))
    assert got is not None and got.vm.kernel == DEFAULT_KERNEL
    assert "unreadable and has been set aside" in got.note and DEFAULT_KERNEL in got.note
    assert (d / "vm.json.corrupt").exists()
