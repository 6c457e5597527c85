"""A mount's options: the command line's defaults are the options module's, and the sizes derived
from --cache-size are derived in one place."""

from __future__ import annotations

import pytest

from fusecache import cli, options
from fusecache.errors import QuietError
from fusecache.options import MountOptions

MiB = 1 << 20
GiB = 1 << 30


def parse_mount(*extra: str):
    return cli.build_parser().parse_args(["mount", "/images", "/mnt", *extra])


def test_command_line_defaults_are_the_options_defaults():
    args = parse_mount()
    opts = MountOptions("/images", "/mnt")
    assert args.cache_size == opts.cache_size == options.CACHE_SIZE
    assert args.revalidate == opts.revalidate == options.REVALIDATE
    assert args.peer_timeout == opts.peer_timeout == options.PEER_TIMEOUT
    assert args.attr_timeout == opts.attr_timeout == options.ATTR_TIMEOUT
    assert args.admit == opts.admit == options.ADMIT
    assert args.staging_size is None and opts.staging_size is None


def test_help_names_the_defaults():
    mount = cli.build_parser()._subparsers._group_actions[0].choices["mount"]  # type: ignore[union-attr]
    text = " ".join(mount.format_help().split())  # argparse wraps lines
    assert "(default 2G)" in text and "at most 256M" in text and "(default 0.005)" in text and "(default 2)" in text


@pytest.mark.parametrize(
    ("cache_size", "staging"),
    [(2 * GiB, 256 * MiB), (512 * MiB, 128 * MiB), (4 * MiB, MiB), (64 * GiB, 256 * MiB)],
)
def test_staging_is_a_quarter_of_the_cache_at_most_256m(cache_size, staging):
    assert MountOptions("/images", "/mnt", cache_size=cache_size).staging_bytes == staging


def test_an_explicit_staging_size_wins():
    assert MountOptions("/images", "/mnt", cache_size=2 * GiB, staging_size=7 * MiB).staging_bytes == 7 * MiB
    assert MountOptions("/images", "/mnt", staging_size=0).staging_bytes == 0


def test_the_peer_summary_is_sized_for_every_page_of_the_cache():
    assert MountOptions("/images", "/mnt", cache_size=8 * GiB).summary_pages == 8 * GiB // 4096


def test_a_cache_below_the_minimum_is_refused_in_one_line():
    with pytest.raises(QuietError, match="too small"):
        cli._mount(parse_mount("--cache-size", "512K"), [])


def test_pin_options_and_the_budget():
    args = parse_mount("--cache-size", "8G", "--pin", "golden/*", "--pin", "*.qcow2")
    assert args.pin == ["golden/*", "*.qcow2"] and args.pin_budget == options.PIN_BUDGET
    opts = MountOptions("/images", "/mnt", cache_size=8 * GiB, pin_budget=0.25)
    assert opts.pin_budget_bytes == 2 * GiB
    for bad in ("2", "-0.1", "half"):
        with pytest.raises(QuietError, match="--pin-budget"):
            parse_mount("--pin-budget", bad)


def test_warm_takes_ranges_and_rates():
    args = cli.build_parser().parse_args(["warm", "/mnt", "a.img", "b.img", "--range", "1G:512M", "--rate", "16M"])
    assert args.images == ["a.img", "b.img"] and args.range == (GiB, 512 * MiB) and args.rate == 16 * MiB
    with pytest.raises(QuietError, match="OFFSET:LENGTH"):
        cli.build_parser().parse_args(["warm", "/mnt", "a.img", "--range", "1G"])
