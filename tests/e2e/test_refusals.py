"""A replica whose spec can never run on the node: it fails once, with its sentence."""

from __future__ import annotations

import time

from tests.e2e.node import IMAGE, Node, wait_until


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
