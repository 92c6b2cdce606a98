"""config.toml is decoded into typed records: every unknown key, wrong type or value out of
range is refused with one line naming the file, the key and what is expected (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import run_cli

from p2pfs.config import Config, load
from p2pfs.errors import EXIT_USAGE, UsageError
from p2pfs.names import check_desktop_name, check_volume_name, name_problem
from p2pfs.sizes import format_size, parse_size

pytestmark = pytest.mark.unit


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        load(path)
    assert e.value.exit_code == EXIT_USAGE
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_a_missing_file_is_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path / "none.toml") == Config()


def test_every_documented_key_is_read(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[node]\nname = "ws-0412"\n'
        '[network]\nsite = "berlin"\nport = 7999\nlisten = "127.0.0.1"\n'
        'static_peers = ["10.0.0.5:7420"]\n'
        "discovery = false\npeer_fetch = false\nframe_timeout_s = 5\nkeepalive_s = 2.5\n"
        "[fetch]\ndeadline_s = 7\nhedge_after_s = 0.25\npeers_without_digest = 5\n"
        '[cache]\nmax_bytes = "20G"\nmin_free = "512M"\nmemory = 1048576\n'
        "scrub_interval_h = 12\nscrub_rate_mb_s = 10\n"
        "[publish]\nsettle_s = 0\nmax_delay_s = 9\n"
        '[appliance]\nuser_listen = "192.168.56.2:7421"\ndesktop_pin = true\nvolumes = ["tools"]\n'
        '[metrics]\nlisten = "127.0.0.1:9742"\n'
    )
    c = load(tmp_path / "c.toml")
    assert (c.port, c.listen, c.static_peers, c.discovery, c.peer_fetch) == (
        7999,
        "127.0.0.1",
        (("10.0.0.5", 7420),),
        False,
        False,
    )
    assert (c.frame_timeout_s, c.keepalive_s, c.fetch_deadline_s, c.hedge_after_s) == (
        5,
        2.5,
        7,
        0.25,
    )
    assert (c.peers_without_digest, c.cache_max_bytes, c.cache_min_free_bytes) == (
        5,
        20 << 30,
        512 << 20,
    )
    assert (c.memory_cache_bytes, c.scrub_interval_s, c.scrub_rate_bytes_s) == (
        1 << 20,
        12 * 3600,
        10e6,
    )
    assert (c.settle_s, c.max_delay_s) == (0, 9)
    assert (c.appliance_listen, c.desktop_pin, c.follow_volumes) == (
        ("192.168.56.2:7421",),
        True,
        ("tools",),
    )
    assert c.metrics_listen == ("127.0.0.1", 9742)
    assert (c.node_name, c.site) == ("ws-0412", "berlin")


def test_the_old_node_site_is_read_and_may_not_contradict_network_site(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[node]\nsite = "berlin"\n')  # the last release's spelling
    assert load(tmp_path / "c.toml").site == "berlin"
    (tmp_path / "c.toml").write_text('[node]\nsite = "berlin"\n[network]\nsite = "berlin"\n')
    assert load(tmp_path / "c.toml").site == "berlin"
    message = config_error(tmp_path, '[node]\nsite = "berlin"\n[network]\nsite = "paris"\n')
    assert "[network] site = 'paris' and [node] site = 'berlin' differ" in message


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("", None),
        ('[metrics]\nlisten = "127.0.0.1:9742"\n', ("127.0.0.1", 9742)),
        ('[metrics]\nlisten = "[::1]:9742"\n', ("::1", 9742)),
        ('[metrics]\nlisten = "localhost:9742"\n', ("localhost", 9742)),
        ('[metrics]\nlisten = "0.0.0.0:9742"\nallow_remote = true\n', ("0.0.0.0", 9742)),
    ],
)
def test_metrics_listen(tmp_path: Path, text: str, address: tuple[str, int] | None) -> None:
    (tmp_path / "c.toml").write_text(text)
    assert load(tmp_path / "c.toml").metrics_listen == address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[cache]\nmax_byte = "20G"\n',
            "[cache] has no key `max_byte` (it knows max_bytes, min_free",
        ),
        ("[netwrk]\nport = 1\n", "the file has no table `netwrk` (it knows node, network, fetch"),
        ("[network]\nport = 70000\n", "[network] port: expected `int` <= 65535"),
        ('[network]\nport = "7420"\n', "[network] port: expected `int`, got `str`"),
        ("[network]\ndiscovery = 1\n", "[network] discovery: expected `bool`, got `int`"),
        ('[fetch]\ndeadline_s = "5"\n', "[fetch] deadline_s: expected `float`, got `str`"),
        ("[fetch]\ndeadline_s = 0\n", "[fetch] deadline_s: expected `float` >= 0.1"),
        (
            '[cache]\nmax_bytes = "lots"\n',
            "[cache] max_bytes must be a size like 20G or 512M, not 'lots'",
        ),
        ("[network]\nstatic_peers = [1]\n", "[network] static_peers: expected `str`, got `int`"),
        (
            '[network]\nstatic_peers = ["nocolon"]\n',
            "[network] static_peers: 'nocolon' is not HOST:PORT",
        ),
        ("cache = 5\n", "[cache]: expected `object`, got `int`"),
        ("[publish\n", "is not valid TOML"),
        (
            '[metrics]\nlisten = "0.0.0.0:9742"\n',
            "[metrics] listen: 0.0.0.0 is not a loopback address; metrics show volume names",
        ),
        (
            '[metrics]\nlisten = "metrics.example:9742"\n',
            "[metrics] listen: metrics.example is not a loopback address",
        ),
        ('[metrics]\nlisten = "9742"\n', "[metrics] listen: '9742' is not HOST:PORT"),
        ("[metrics]\nlisten = 9742\n", "[metrics] listen: expected `str | null`, got `int`"),
        ("[metrics]\nallow_remote = 1\n", "[metrics] allow_remote: expected `bool`, got `int`"),
        ('[network]\nsite = ""\n', "[network] site: expected `str` of length >= 1"),
        ('[network]\nsite = "berlin\\n"\n', "[network] site: expected `str` matching regex"),
        ('[node]\nname = "ws\\n"\n', "[node] name: expected `str` matching regex"),
        ('[node]\nsite = "-x"\n', "[node] site: expected `str` matching regex"),
        ("[network]\nsite = 1\n", "[network] site: expected `str | null`, got `int`"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(tmp_path, text)


def test_a_config_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[network]\nport = 1 # \xff\n")
    with pytest.raises(UsageError, match="not valid TOML: not UTF-8"):
        load(path)


def test_the_command_line_refuses_a_bad_config_with_exit_2(home: Path) -> None:
    (home / "config.toml").write_text('[cache]\nmax_byte = "20G"\n')
    proc = run_cli(home, "status")
    assert proc.returncode == EXIT_USAGE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_byte" in lines[0] and "config.toml" in lines[0], proc.stderr


@pytest.mark.parametrize("name", ["tools\n", "-tools", ".hidden", "", "a" * 65, "with space", "é"])
def test_one_name_rule_refuses(name: str) -> None:
    assert name_problem(name) is not None
    with pytest.raises(UsageError):
        check_volume_name(name)
    with pytest.raises(UsageError):
        check_desktop_name(name)


@pytest.mark.parametrize("name", ["tools", "a", "_x", "v1.2-beta_3", "a" * 64])
def test_one_name_rule_accepts(name: str) -> None:
    assert name_problem(name) is None and check_volume_name(name) == name


def test_volume_create_refuses_a_name_with_a_newline(home: Path) -> None:
    proc = run_cli(home, "volume", "create", "tools\n")
    assert proc.returncode == EXIT_USAGE and "invalid volume name" in proc.stderr
    assert run_cli(home, "volume", "list").stdout == ""


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20G", 20 << 30),
        ("512M", 512 << 20),
        ("64MiB", 64 << 20),
        ("1.5T", 3 << 39),
        ("100", 100),
        ("7kb", 7 << 10),
        (42, 42),
    ],
)
def test_sizes_parse(text: object, size: int) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("text", ["lots", "-5", "inf", "nan", "1e3", "20X", "", True, -1, 1.5])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(UsageError, match="x must be a size"):
        parse_size(text, "x")


def test_sizes_print() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 1536, 20 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "20.0 GiB",
    ]
