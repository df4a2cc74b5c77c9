"""`distrain k8s render CONFIG --nodes N --gpus-per-node G --image IMG [--pvc CLAIM] [key=value ...]`.

Prints (or writes with --out) a ConfigMap holding the resolved config and a Kubeflow PyTorchJob - or, with
``--kind trainjob``, a TrainJob - that trains it on N pods; ``kubectl apply -f`` the result. See
distrain/launch/k8s.py and the templates in launch/k8s/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distrain.commands import add_config_arguments, needs_action
from distrain.errors import UsageError


def register(sub) -> None:
    from distrain.cli import Parser  # lazy: start-up: the CLI parser loads every command, the work loads on use

    p = sub.add_parser("k8s", help="Kubernetes: render a Kubeflow PyTorchJob or TrainJob for a config")
    actions = p.add_subparsers(dest="k8s_command", metavar="ACTION", parser_class=Parser)
    r = actions.add_parser("render", help="print the manifests (ConfigMap + PyTorchJob/TrainJob) for N pods x G GPUs")
    add_config_arguments(r)
    r.add_argument("--nodes", required=True, metavar="N|MIN:MAX", help="pods; MIN:MAX makes an elastic PyTorchJob")
    r.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                   help="GPUs per pod, one worker each (0: CPU pods with one worker)")
    r.add_argument("--image", required=True, metavar="IMG", help="container image with distrain installed")
    r.add_argument("--pvc", default=None, metavar="CLAIM",
                   help="ReadWriteMany PersistentVolumeClaim for the run directory (needed for more than one pod)")
    r.add_argument("--kind", choices=("pytorchjob", "trainjob"), default="pytorchjob",
                   help="Kubeflow training-operator PyTorchJob (default) or Kubeflow Trainer TrainJob")
    r.add_argument("--elastic", action="store_true", help="PyTorchJob with elasticPolicy even for a fixed --nodes N")
    r.add_argument("--name", default=None, help="job name (default: run.name)")
    r.add_argument("--namespace", default=None, help="namespace (default: kubectl's)")
    r.add_argument("--grace-period", type=int, default=None, metavar="S",
                   help="terminationGracePeriodSeconds (default 2 x dist.timeout_s + 60: the step in flight and "
                        "the preemption checkpoint)")
    r.add_argument("--max-restarts", type=int, default=3, metavar="K",
                   help="elastic: worker-group restarts inside each pod (default 3)")
    r.add_argument("--template", default=None, metavar="PATH", help="your own copy of a launch/k8s/ template")
    r.add_argument("--out", default=None, metavar="FILE", help="write the manifests here instead of stdout")
    r.add_argument("--check", action="store_true",
                   help="also read the job back with the Kubeflow SDK's model (pip install 'distrain[k8s]')")
    r.set_defaults(handler=run_render)
    p.set_defaults(handler=needs_action("distrain k8s: choose an action: `distrain k8s render CONFIG --nodes N "
                                        "--gpus-per-node G --image IMG [--pvc CLAIM]`."))


def run_render(args: argparse.Namespace) -> int:
    from distrain.config import load_config  # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.launch.k8s import JobSpec, render

    if args.grace_period is not None and args.grace_period < 1:
        raise UsageError(f"--grace-period {args.grace_period} is not allowed: it must be at least 1 second.")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts {args.max_restarts} is not allowed: it must be 0 or more.")
    cfg = load_config(args.config, args.overrides)
    job = JobSpec(kind=args.kind, nodes=str(args.nodes), gpus_per_node=args.gpus_per_node, image=args.image,
                  pvc=args.pvc, elastic=args.elastic, name=args.name, namespace=args.namespace,
                  grace_period_s=args.grace_period, max_restarts=args.max_restarts,
                  template=Path(args.template) if args.template else None)
    text, warnings = render(cfg, job)
    if args.check:
        # lazy: start-up: the CLI parser loads every command, the work loads on use
        from distrain.launch.k8s import check_with_sdk

        check_with_sdk(text)
    for warning in warnings:
        print(f"distrain k8s render: warning: {warning}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"distrain k8s render: wrote {args.out}; apply it with `kubectl apply -f {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
