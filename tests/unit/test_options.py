"""A mount's options: the command line's defaults are the options module's, and the sizes derived
from --cache-size are derived in one place."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert MountOptions("/images", "/mnt", cache_size=cache_size, balloon=["libvirt"]).staging_bytes == staging


def test_without_a_balloon_source_nothing_is_staged_by_default():
    """Staged chunks are read only when a guest evicts them, known only from a balloon source: without one, none."""
    assert MountOptions("/images", "/mnt", cache_size=2 * GiB).staging_bytes == 0
    assert MountOptions("/images", "/mnt", cache_size=2 * GiB, staging_size=7 * MiB).staging_bytes == 7 * MiB


def test_an_explicit_staging_size_wins():
    assert MountOptions("/images", "/mnt", cache_size=2 * GiB, staging_size=7 * MiB, balloon=["libvirt"]).staging_bytes == 7 * MiB
    assert MountOptions("/images", "/mnt", staging_size=0, balloon=["libvirt"]).staging_bytes == 0


def test_the_peer_summary_is_sized_for_every_page_of_the_cache():
    assert MountOptions("/images", "/mnt", cache_size=8 * GiB).summary_pages == 8 * GiB // 4096


def test_a_cache_below_the_minimum_is_refused_in_one_line():
    with pytest.raises(QuietError, match="too small"):
        cli._mount(parse_mount("--cache-size", "512K"), [])


# --- numeric options: every value is either taken as a finite, non-negative number or refused in one line


SECONDS_OPTIONS = ("--revalidate", "--attr-timeout", "--peer-timeout")
SIZE_OPTIONS = ("--cache-size", "--staging-size")


def _refused_in_one_line(*argv: str) -> str:
    with pytest.raises(QuietError) as err:
        cli.build_parser().parse_args(["mount", "/images", "/mnt", *argv])
    assert err.value.exitcode == 2 and "\n" not in err.value.message
    return err.value.message


@pytest.mark.parametrize("option", SECONDS_OPTIONS)
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "-1", "-0.5", "soon"])
def test_seconds_that_are_not_a_finite_non_negative_number_are_refused(option, text):
    assert option in _refused_in_one_line(f"{option}={text}")


@pytest.mark.parametrize("option", SIZE_OPTIONS)
@pytest.mark.parametrize("text", ["inf", "infG", "nan", "-inf", "-1", "1e30", "9E", "lots"])
def test_sizes_that_are_not_a_finite_non_negative_size_are_refused(option, text):
    assert option in _refused_in_one_line(f"{option}={text}")


_NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from(["nan", "inf", "-inf", "+inf", "infinity", "1e400", "-0", "0x10", "", " ", "1_000", "\u0661"]),
)


@settings(max_examples=300, deadline=None)
@given(option=st.sampled_from(SECONDS_OPTIONS), text=_NUMBER_TEXT)
def test_any_seconds_text_is_a_finite_non_negative_number_or_one_clear_line(option, text):
    try:
        args = cli.build_parser().parse_args(["mount", "/images", "/mnt", f"{option}={text}"])
    except QuietError as err:
        assert err.exitcode == 2 and "\n" not in err.message and option in err.message
        return
    value = getattr(args, option.removeprefix("--").replace("-", "_"))
    assert math.isfinite(value) and value >= 0


@settings(max_examples=300, deadline=None)
@given(option=st.sampled_from(SIZE_OPTIONS), text=_NUMBER_TEXT, unit=st.sampled_from(["", "K", "M", "G", "T", "GiB"]))
def test_any_size_text_is_a_whole_non_negative_size_or_one_clear_line(option, text, unit):
    try:
        args = cli.build_parser().parse_args(["mount", "/images", "/mnt", f"{option}={text}{unit}"])
    except QuietError as err:
        assert err.exitcode == 2 and "\n" not in err.message and option in err.message
        return
    value = getattr(args, option.removeprefix("--").replace("-", "_"))
    assert isinstance(value, int) and 0 <= value < 1 << 63


def test_a_relative_log_file_is_made_absolute_before_the_daemon_starts(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    captured = {}

    def serve(opts):
        captured["opts"] = opts

    from fusecache import daemon

    monkeypatch.setattr(daemon, "setup_logging", lambda debug: None)
    monkeypatch.setattr(daemon, "serve", serve)
    cli._mount(parse_mount("--foreground", "--log-file", "logs/mount.log"), [])
    assert captured["opts"].log_file == str(tmp_path / "logs" / "mount.log")


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


@settings(max_examples=200, deadline=None)
@given(text=_NUMBER_TEXT)
def test_any_pin_budget_text_is_a_fraction_or_one_clear_line(text):
    try:
        args = cli.build_parser().parse_args(["mount", "/images", "/mnt", f"--pin-budget={text}"])
    except QuietError as err:
        assert err.exitcode == 2 and "\n" not in err.message and "--pin-budget" in err.message
        return
    assert 0 <= args.pin_budget <= 1
