import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """A randomly initialised tiny DeepSeek-V3 MoE and its offline tokenizer, saved as an HF checkpoint."""
    from rlk2.data import builtin_split
    from rlk2.policy import TinyMoEShape, build_demo_policy

    rows = builtin_split("arith", "train")[:2000]
    corpus = [f"Q: {r['prompt']}\nA: " for r in rows] + [r["completion"] for r in rows]
    shape = TinyMoEShape(hidden_size=32, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16)
    return build_demo_policy(tmp_path_factory.mktemp("policy"), corpus, seed=0, shape=shape)


@pytest.fixture
def second_engine():
    """A second Docker engine on its own socket with the sandbox image (root only; fails instead of skipping in CI)."""
    yield from _second_engine(tls=False)


@pytest.fixture
def tls_engine():
    """The second engine, also listening on loopback TCP with TLS (`tls_url`, client certificates required)."""
    yield from _second_engine(tls=True)


def _second_engine(tls: bool):
    from sandboxes import DEFAULT_IMAGE
    from sandboxes.testing import SecondEngine, require, required

    require("docker")
    problem = None
    if os.geteuid() != 0:
        problem = "a second dockerd needs root"
    elif shutil.which("dockerd") is None:
        problem = "dockerd is not installed"
    elif tls and shutil.which("openssl") is None:
        problem = "openssl is not installed (scripts/docker_up.sh installs it)"
    if problem:
        if required("docker"):
            pytest.fail(problem)
        pytest.skip(problem)
    engine = SecondEngine(Path("/run") / f"rlk2-test-docker2-{os.getpid()}", tls=tls)
    try:
        engine.start()
        engine.ensure_image(DEFAULT_IMAGE, os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
        yield engine
    finally:
        engine.close()


@pytest.fixture
def ssh_engine(tmp_path, monkeypatch):
    """The local Docker engine reached over ssh (`url` = ssh://USER@127.0.0.1:PORT, its own sshd), with $HOME pointing
    at a home that holds the client key and the host key (root only; fails instead of skipping in CI)."""
    from sandboxes.testing import SshEngine, require, required

    require("docker")
    problem = None
    if os.geteuid() != 0:
        problem = "an sshd of the test's own needs root"
    elif not Path("/usr/sbin/sshd").exists() or shutil.which("ssh-keygen") is None:
        problem = "openssh-server is not installed (scripts/docker_up.sh installs it)"
    if problem:
        if required("docker"):
            pytest.fail(problem)
        pytest.skip(problem)
    engine = SshEngine(tmp_path / "ssh")
    engine.start()
    monkeypatch.setenv("HOME", str(engine.home))
    try:
        yield engine
    finally:
        engine.close()
