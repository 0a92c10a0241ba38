"""The README keeps up with the code: every endpoint listed, the quick start
as CI runs it, every command-line option and environment variable named."""

import re
from pathlib import Path

import pytest

import talk_server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_path(path):
    """A route path as the README writes it: <token> becomes {token}."""
    return re.sub(r"<(\w+)>", r"{\1}", path)


def section(heading):
    """The README from `heading` to the next heading of the same level."""
    start = README.index(heading + "\n")
    level = heading.split(" ")[0]
    end = README.find("\n" + level + " ", start + len(heading))
    return README[start : end if end > 0 else None]


# Where the README lists each route table's endpoints.
SECTIONS = {
    id(talk_server.ROUTES): "## What is implemented",
    id(talk_server.CLOUD_ROUTES): "## What is implemented",
    id(talk_server.SIGNIN_ROUTES): "## What is implemented",
    id(talk_server.AVATAR_ROUTES): "## What is implemented",
    id(talk_server.USER_STATUS_ROUTES): "## What is implemented",
    id(talk_server.AUTOCOMPLETE_ROUTES): "## What is implemented",
    id(talk_server.ROUTES_V4): "### Today's API: conversations and participants (v4)",
    id(talk_server.CHAT_ROUTES): "### Chat on today's API",
    id(talk_server.ROUTES_V3): "### Today's API: internal signaling (v3)",
    id(talk_server.HPB_ROUTES): "### Today's API: the signaling server's backend requests",
    id(talk_server.BOT_ROUTES): "## Bots",
}


@pytest.mark.parametrize(
    "heading, method, path",
    [
        (SECTIONS[id(table)], method, path)
        for _, _, table in talk_server.ROUTE_TABLES
        for method, path, _, _ in table
    ],
)
def test_readme_lists_every_endpoint(heading, method, path):
    table = section(heading)
    shown = readme_path(path)
    assert f"`{shown}`" in table or f"{shown}`" in table, f"{method} {shown} is missing"


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_test_one():
    quick = README[README.index("## Quick start") :].split("\n## ")[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick, re.S)
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) == 1 for b in blocks)
    install_and_run, install_and_test = (b.strip() for b in blocks)
    assert install_and_run.endswith("talk-server serve")
    test_command = install_and_test.rsplit("&& ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci


def test_readme_names_every_serve_option_and_environment_variable():
    source = Path(talk_server.__file__).read_text(encoding="utf-8")
    options = set(re.findall(r'serve\.add_argument\(\s*"(--[a-z-]+)"', source))
    variables = set(re.findall(r"\b(TALK_[A-Z_]+)\b", source))
    assert options and variables
    missing = sorted(name for name in options | variables if name not in README)
    assert not missing, f"README does not mention {missing}"
