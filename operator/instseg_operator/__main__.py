"""`instseg-operator`: `kopf run` of our handlers with flags that default from the environment
(what the Helm chart sets), so that a Deployment needs no command line of its own.

    instseg-operator                       # all namespaces, metrics on :8000, probe on :8080
    instseg-operator -n team-a -n team-b   # or INSTSEG_NAMESPACES=team-a,team-b
    instseg-operator --standalone          # no peering (a single replica, or a laptop)
"""

from __future__ import annotations

import argparse
import os
import sys


def _args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="instseg-operator", description="Runs the InstanceSegTraining operator (kopf)."
    )
    parser.add_argument(
        "-n", "--namespace", action="append", default=None,
        help="namespace to watch (repeatable; globs allowed); default: INSTSEG_NAMESPACES "
             "(comma-separated), else all namespaces",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-port", type=int, default=int(env("INSTSEG_METRICS_PORT", "8000")),
        help="Prometheus /metrics port, 0 for none (INSTSEG_METRICS_PORT, default 8000)",
    )  # fmt: skip
    parser.add_argument(
        "--liveness", default=env("INSTSEG_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="kopf's liveness endpoint, empty for none (INSTSEG_LIVENESS)",
    )  # fmt: skip
    parser.add_argument(
        "--peering", default=env("INSTSEG_PEERING", "instseg"),
        help="kopf peering object; replicas sharing it never act twice (INSTSEG_PEERING)",
    )  # fmt: skip
    parser.add_argument(
        "--standalone", action="store_true",
        default=env("INSTSEG_STANDALONE", "").lower() in ("1", "true", "yes"),
        help="no peering at all (INSTSEG_STANDALONE)",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", choices=["plain", "full", "json"],
        default=env("INSTSEG_LOG_FORMAT", "full"), help="INSTSEG_LOG_FORMAT (default full)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning"],
        default=env("INSTSEG_LOG_LEVEL", "info"), help="INSTSEG_LOG_LEVEL (default info)",
    )  # fmt: skip
    return parser.parse_args(argv)


def kopf_argv(args: argparse.Namespace) -> list[str]:
    """The `kopf run` command line equivalent to our flags."""
    namespaces = args.namespace or [
        n.strip() for n in os.environ.get("INSTSEG_NAMESPACES", "").split(",") if n.strip()
    ]
    argv = ["run", "-m", "instseg_operator.handlers", f"--log-format={args.log_format}"]
    argv += [f"--namespace={n}" for n in namespaces] if namespaces else ["--all-namespaces"]
    argv += ["--standalone"] if args.standalone else [f"--peering={args.peering}"]
    if args.liveness:
        argv.append(f"--liveness={args.liveness}")
    argv += {"debug": ["--debug"], "info": [], "warning": ["--quiet"]}[args.log_level]
    return argv


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    os.environ["INSTSEG_METRICS_PORT"] = str(args.metrics_port)
    from kopf.cli import main as kopf_main

    kopf_main(args=kopf_argv(args), prog_name="kopf")


if __name__ == "__main__":
    sys.exit(main())
