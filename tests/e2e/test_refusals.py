"""A replica whose spec can never run on the node: it fails once, with its sentence."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.node import IMAGE, Node, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


def agentd_log(node: Node) -> str:
    return "\n".join(p.read_text(errors="replace") for p in node.paths.log_dir.glob("agentd*.log"))


def test_a_user_the_image_lacks_fails_once_without_retrying(node: Node) -> None:
    spec = node.spec(
        "nouser",
        f"""
        version: v1
        deployment: nouser
        services:
          web:
            image: {IMAGE}
            command: {{entrypoint: ["sleep", "600"]}}
            user: nosuchuser
            scale: {{mode: fixed, replicas: 1}}
        """,
    )
    sentence = 'the user "nosuchuser" is not in the image\'s /etc/passwd'
    try:
        node.ctl("up", "-b", str(spec), check=True)
        (replica,) = wait_until(
            lambda: [r for r in node.replicas("nouser") if sentence in str(r["message"])],
            30,
            "the refusal in the replica's message",
        )
        assert replica["state"] == "failed" and not replica["pid"], replica
        # Retries would come after 1 s, 2 s, 4 s: none comes.
        time.sleep(5)
        (later,) = node.replicas("nouser")
        assert later["state"] == "failed" and later["message"] == replica["message"], later
        assert later["restarts"] == 0 and "retrying" not in str(later["message"]), later
        attempts = agentd_log(node).count(f"{replica['id']} did not start")
        assert attempts == 1, f"{attempts} start attempts"
    finally:
        node.ctl("down", "nouser")


def refusal_events(node: Node, deployment: str) -> list[dict[str, object]]:
    out = node.ctl("events", "-d", deployment, "--format", "json", check=True).stdout
    return [e for e in json.loads(out) if e["kind"] == "refused"]


def test_a_refusal_is_one_event_with_its_sentence(node: Node) -> None:
    body = f"""
        version: v1
        deployment: refusedev
        services:
          web:
            image: {IMAGE}
            command: {{entrypoint: ["sleep", "600"]}}
            user: nosuchuser
            scale: {{mode: fixed, replicas: 1}}
            env: {{ROUND: "ROUND_NO"}}
        """
    sentence = 'the user "nosuchuser" is not in the image\'s /etc/passwd'
    try:
        node.ctl("up", "-b", str(node.spec("refusedev", body.replace("ROUND_NO", "1"))), check=True)
        (event,) = wait_until(lambda: refusal_events(node, "refusedev"), 30, "the refusal's event")
        assert sentence in str(event["message"]) and event["service"] == "web", event
        assert str(event["replica"]).startswith("refusedev-web-1-"), event
        time.sleep(5)  # where retries would have been: still one event
        assert len(refusal_events(node, "refusedev")) == 1
        # A new revision is tried once more, and refused once more: one more event.
        node.ctl("up", "-b", str(node.spec("refusedev", body.replace("ROUND_NO", "2"))), check=True)
        wait_until(
            lambda: len(refusal_events(node, "refusedev")) == 2, 30, "the second refusal's event"
        )
        time.sleep(3)
        assert len(refusal_events(node, "refusedev")) == 2
    finally:
        node.ctl("down", "refusedev")
