"""``timm-dgate serve FOLDER``: a gated, cascade or exported folder on Ray Serve, until interrupted.

The application is built (and the folder checked) before Ray starts, so a bad folder or option is one
line and exit code 2. ``--address`` (or ``RAY_ADDRESS``) joins a running Ray cluster, where the
folder must be readable on every node; without it a local Ray is started and stopped with the command.
"""

from __future__ import annotations

import argparse
import os
import signal
import time


def add_serve_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..serve.app import SHAPES

    help = "serve a gated, cascade or exported folder on Ray Serve (HTTP and Python handles)"
    command = sub.add_parser("serve", help=help, description=help + ". Needs the serve extra: "
                             "pip install 'timm-dgate[serve]'.")
    command.add_argument("folder", help="a folder saved by save_pretrained, a cascade's, or one written by export")
    command.add_argument("--shape", choices=SHAPES, default="segments",
                         help="one deployment per segment, one for the whole model (refill executor), or the plain "
                         "model without exits (to compare)")
    command.add_argument("--max-batch-size", type=int, default=32, help="rows each model deployment batches")
    command.add_argument("--batch-wait-timeout-s", type=float, default=0.005,
                         help="seconds a batch waits to fill after its first row")
    command.add_argument("--num-replicas", default="1", help="replicas of each model deployment, or 'auto'")
    command.add_argument("--num-cpus", type=float, default=None,
                         help="CPUs each model replica reserves (default: one for the whole application)")
    command.add_argument("--torch-threads", type=int, default=None, help="torch threads in each model replica")
    command.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    command.add_argument("--port", type=int, default=8000, help="HTTP port")
    command.add_argument("--route-prefix", default="/", help="HTTP path the application answers at")
    command.add_argument("--name", default="timm-dgate", help="the Serve application's name")
    command.add_argument("--address", default=None,
                         help="a running Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    command.set_defaults(func=run_serve, check=check_serve)
    return command


def check_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_replicas != "auto" and not (args.num_replicas.isdigit() and int(args.num_replicas) >= 1):
        parser.error(f"--num-replicas must be a positive integer or 'auto', got {args.num_replicas!r}")
    if args.max_batch_size < 1 or args.batch_wait_timeout_s < 0:
        parser.error("--max-batch-size must be at least 1 and --batch-wait-timeout-s at least 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> int:
    from ..serve.app import build_app

    app = build_app(
        args.folder,
        shape=args.shape,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        num_replicas="auto" if args.num_replicas == "auto" else int(args.num_replicas),
        ray_actor_options=None if args.num_cpus is None else {"num_cpus": args.num_cpus},
        torch_threads=args.torch_threads,
    )
    import ray
    from ray import serve

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    stop = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops as Ctrl-C does, cleaning up
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=args.name, route_prefix=args.route_prefix)
        print(f"serving {args.folder} ({args.shape}) at http://{args.host}:{args.port}{args.route_prefix} "
              "(POST an image or tensor, GET for a description); Ctrl-C stops", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, stop)
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(args.name)  # a cluster's other applications stay
        finally:
            ray.shutdown()
    return 0

