"""The `splitz` command."""

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from pydantic import ValidationError

from . import checkpoint, data, evaluate, importer
from .errors import InputError, SplitzError, first_line
from .images import load_image
from .lipschitz import layer_profile
from .smoothing import PRECISIONS, SEED_LIMIT, Smooth, known_draw, parse_device
from .stats import FIXED_BOUNDS, text_down, text_up
from .train import TrainConfig, train


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except SplitzError as e:
        print(f"splitz: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # a config file or SPLITZ_* variable with a bad value
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        print(f"splitz: error: invalid {e.title} {where}: {first['msg']}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is missing, a folder, not writable...
        print(f"splitz: error: {e.strerror or first_line(e)}"
              f"{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitz: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitz", description=__doc__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    c = sub.add_parser("certify", help="certify images: class and certified l2 radius")
    _sampling_args(c, n=100_000)
    c.add_argument("--n0", type=_positive_int, default=100, help="selection samples (100)")
    c.add_argument("--radius", type=float, help="also say whether this radius is certified")
    _bound_arg(c)
    c.add_argument("--tolerance", type=float,
                   help="adaptive: --n is a budget; stop at a third of it once the radius is "
                        "within this share of the whole budget's (e.g. 0.02)")
    c.set_defaults(run=_certify)

    q = sub.add_parser("query", help="is the radius certified? stops sampling once decided")
    _sampling_args(q, n=100_000)
    q.add_argument("--radius", type=float, required=True)
    q.add_argument("--n0", type=_positive_int, default=100, help="selection samples (100)")
    _bound_arg(q)
    q.set_defaults(run=_query)

    pr = sub.add_parser("predict", help="smoothed prediction with a binomial test (may abstain)")
    _sampling_args(pr, n=10_000)
    pr.set_defaults(run=_predict)

    li = sub.add_parser("lipschitz", help="per-layer Lipschitz upper bounds of a model")
    li.add_argument("--model", type=Path, required=True, help="model directory")
    li.set_defaults(run=_lipschitz)

    ev = sub.add_parser("evaluate", help="certified accuracy on every k-th test image (TSV)")
    ev.add_argument("--model", type=Path, required=True, help="model directory")
    ev.add_argument("--out", type=Path, required=True, help="TSV to write (resumed if present)")
    ev.add_argument("--every", type=_positive_int, default=None,
                    help="take every k-th test image (20 for CIFAR-10 = 500, 10 for MNIST)")
    ev.add_argument("--limit", type=_positive_int, help="at most this many images")
    ev.add_argument("--order", choices=evaluate.ORDERS, default="index",
                    help="index (default) or spread: one fixed shuffle of the subset, so that any "
                         "first images are a uniform sample of it and a partial run estimates "
                         "the whole")
    ev.add_argument("--n", type=_positive_int, default=100_000)
    ev.add_argument("--n0", type=_positive_int, default=100)
    ev.add_argument("--alpha", type=float, default=0.001)
    ev.add_argument("--batch", type=_positive_int, help="default: the model card's")
    ev.add_argument("--precision", choices=tuple(PRECISIONS),
                    help="f2's precision (default: the model card's)")
    ev.add_argument("--seed", type=_seed, default=0, help="image i uses seed + i (0)")
    ev.add_argument("--device", type=_device, default="cpu")
    ev.add_argument("--data-root", type=Path)
    ev.add_argument("--data", choices=sorted(data.SPECS.keys() | data.VARIANTS.keys()),
                    help="test set (default: the card's data set; cifar10-exact1000 and "
                         "cifar10-jpeg1000 are the first 1000 CIFAR-10 test images, exact / JPEG)")
    ev.add_argument("--record", action="store_true",
                    help="write the run into the model card's metrics, after every image")
    ev.set_defaults(run=_evaluate)

    pl = sub.add_parser("plot", help="certified accuracy vs radius for several TSVs, one PNG")
    pl.add_argument("tsv", nargs="+", type=Path, help="evaluate outputs (label = file stem)")
    pl.add_argument("--out", type=Path, required=True)
    pl.set_defaults(run=_plot)

    se = sub.add_parser("serve", help="run the HTTP API (embedded engine unless SPLITZ_REDIS_URL)")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.set_defaults(run=_serve)

    wo = sub.add_parser("worker", help="run an RQ worker (needs SPLITZ_REDIS_URL)")
    wo.add_argument("--models", nargs="*", help="model ids to load at boot (default: all)")
    wo.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    wo.add_argument("--check", action="store_true",
                    help="healthcheck: exit 0 if a worker of this host is alive in Redis")
    wo.set_defaults(run=_worker)

    su = sub.add_parser("submit", help="send a batch job to a running service, wait, print")
    su.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    su.add_argument("--model", required=True, help="model id on the server")
    su.add_argument("--url", default="http://127.0.0.1:8000")
    su.add_argument("--api-key", type=_api_key)
    su.add_argument("--n", type=_positive_int)
    su.add_argument("--n0", type=_positive_int)
    su.add_argument("--alpha", type=float)
    su.add_argument("--radius", type=float)
    su.add_argument("--seed", type=int)
    su.add_argument("--bound", choices=FIXED_BOUNDS, help="as certify's (server default: "
                    "clopper-pearson); the server refuses the randomized one with --seed")
    su.add_argument("--tolerance", type=float, help="as certify's: adaptive, --n a budget")
    su.add_argument("--format", choices=("json", "csv"), default="json")
    su.add_argument("--out", type=Path, help="write results here instead of stdout")
    su.set_defaults(run=_submit)

    _import_args(sub.add_parser(
        "import", help="make a model of the repository from a state dict trained elsewhere",
        description="Check a state dict (.safetensors, or .pt/.pth read with weights_only=True) "
                    "against an architecture and card fields, and write it into the model "
                    "repository. sigma is the noise's standard deviation on [0, 1] pixels, "
                    "before the model's normalization."))

    t = sub.add_parser("train", help="train a SPLITZ model or the smoothing baseline")
    t.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    for name, typ in (("id", str), ("out", Path), ("arch", str), ("dataset", str),
                      ("split", str), ("sigma", float), ("epochs", int), ("batch-size", int),
                      ("lr", float), ("train-limit", int), ("seed", int), ("data-root", Path),
                      ("loader-workers", int)):
        t.add_argument(f"--{name}", type=typ)
    t.add_argument("--precision", choices=("float32", "bfloat16", "auto"),
                   help="forward passes in bfloat16 autocast (auto: where the device has it in "
                        "hardware); a run may resume under another")
    t.add_argument("--device", type=_device, default="cpu",
                   help="cpu, cuda, cuda:1 ... (resumes on any)")
    t.set_defaults(run=_train)
    return p


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", type=Path, help="state dict: .safetensors, .pt or .pth")
    p.add_argument("--card", type=Path, help="JSON file of card fields; flags override it")
    p.add_argument("--id", help="model id (the folder's name)")
    p.add_argument("--arch", help="registered architecture, e.g. resnet18, cifar_resnet110")
    p.add_argument("--arch-kwargs", type=_json_object, help="JSON object of its arguments")
    p.add_argument("--dataset", help="mnist / cifar10 (defaults for shape, classes, mean, std) "
                   "or any label (custom)")
    p.add_argument("--split", help="input (default; plain randomized smoothing) or conv1")
    p.add_argument("--sigma", type=float, help="noise std on [0, 1] pixels, before normalizing")
    p.add_argument("--input-shape", type=_positive_int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument("--classes", nargs="+", metavar="NAME", help="class names, or their number")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel normalization mean")
    p.add_argument("--std", type=float, nargs="+", help="per-channel normalization std")
    p.add_argument("--resize", type=_positive_int, nargs="+", metavar="SIZE",
                   help="preprocessing: shorter side, or H W")
    p.add_argument("--center-crop", type=_positive_int, nargs="+", metavar="SIZE",
                   help="preprocessing after the resize: side, or H W")
    p.add_argument("--batch-size", type=_positive_int, help="samples per forward pass (1000)")
    p.add_argument("--description")
    p.add_argument("--strip-prefix", default="", help="remove this prefix from every key")
    p.add_argument("--out", type=Path, default=Path("models"), help="model repository (models)")
    p.add_argument("--force", action="store_true", help="replace a model of the same id")
    p.set_defaults(run=_import)


def _device(name: str) -> str:
    try:
        parse_device(name)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _api_key(text: str) -> str:
    if not (text.isascii() and text.isprintable()):  # an HTTP header carries it
        raise argparse.ArgumentTypeError("an API key is printable ASCII")
    return text


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not JSON: {first_line(e)}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _sampling_args(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--model", type=Path, required=True, help="model directory (weights + card)")
    p.add_argument("--n", type=_positive_int, default=n, help=f"noise samples ({n:,})")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (0.001)")
    p.add_argument("--batch", type=_positive_int,
                   help="samples per forward pass (default: the model card's)")
    p.add_argument("--seed", type=_seed, help="noise seed (default: drawn from the OS's secure "
                   "generator; a chosen seed is recorded as seed_source=client)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=tuple(PRECISIONS),
                   help="f2's precision (default: the model card's)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _bound_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bound", choices=FIXED_BOUNDS, default="clopper-pearson",
                   help="fixed-n lower bound on pA; the randomized one is tighter, its uniform "
                        "draw comes from the seed and is recorded (clopper-pearson)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, {SEED_LIMIT}], got {text}")
    return value


def _load(args) -> tuple[Smooth, checkpoint.LoadedModel, torch.Tensor]:
    loaded = checkpoint.load(args.model)
    x = torch.stack([load_image(p, loaded.model.input_shape, preprocess=loaded.card.preprocess)
                     for p in args.images])
    smooth = Smooth.from_checkpoint(loaded, args.batch, args.device, args.precision)
    _check_memory(smooth, x, max(args.n, getattr(args, "n0", 0)))
    return smooth, loaded, x


def _check_memory(smooth: Smooth, x: torch.Tensor, n: int) -> None:
    """Refuse a batch whose forward pass cannot fit in this machine's available memory (a
    --batch of 10^8 died in the allocator with a traceback)."""
    samples = min(smooth.batch_size, n * len(x))  # a forward pass holds at most this many
    need = samples * _bytes_per_sample(smooth, x[:1])
    have = _available_memory()
    if have is not None and need > have:
        raise SplitzError(f"--batch {smooth.batch_size} needs {need / 2**30:.1f} GiB for one "
                          f"forward pass; {have / 2**30:.1f} GiB available: use a smaller --batch")


def _bytes_per_sample(smooth: Smooth, x: torch.Tensor) -> int:
    """The noisy copy of f1(x) (float32) and the output of every innermost layer of f2 for one
    sample: an upper estimate, since inference frees activations as it goes (the top-level
    outputs alone miss a whole network's insides: an imported ResNet is one child of f2)."""
    z = smooth.bound.exact(x).float()
    sizes = [z.numel() * 4]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(
        out.numel() * out.element_size())) for m in smooth.f2.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            smooth.f2(z.to(smooth.device, smooth.dtype))
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _warn_known_draw(args) -> None:
    """The CLI's user is the certifier and may fix the draw (to reproduce a certificate), but a
    certificate shown to others should not have been made so."""
    if why := known_draw(args.bound, args.seed):
        print(f"splitz: warning: --bound {args.bound} with --seed: {why}", file=sys.stderr)


def _certify(args) -> int:
    _warn_known_draw(args)
    smooth, loaded, x = _load(args)
    certs = smooth.certify(x, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed,
                           radius=args.radius, progress=not args.quiet, bound=args.bound,
                           tolerance=args.tolerance)
    classes = loaded.model.spec.classes
    rows = []
    for path, c in zip(args.images, certs, strict=True):
        if args.json:
            print(json.dumps({"image": str(path)} | c.to_dict()))
            continue
        label = "ABSTAIN" if c.abstained else classes[c.prediction]
        row = [path.name, label, text_down(c.radius, 4), text_down(c.p_a_lower, 6),
               f"{c.n_a}/{c.n}", text_up(c.lipschitz, 4), text_down(c.gamma, 4),
               f"{c.time_s:.1f}"]
        if args.radius is not None:
            row.append("yes" if c.certified else "no")
        rows.append(row)
    if not args.json:
        head = ["image", "class", "radius", "pA_lower", "nA/n", "L_gamma", "gamma", "s"]
        if args.radius is not None:
            head.append(f"r={args.radius:g}")
        _table(head, rows)
        c = certs[0]
        print(f"model {c.model_id} sha256 {c.model_sha256[:16]}  sigma={c.sigma} "
              f"n0={c.n0} n={c.n} alpha={c.alpha} seed={c.seed} ({c.seed_source})  "
              f"L_global={text_up(c.lipschitz_global, 4)}  bound={c.bound} stopping={c.stopping}")
        if c.preprocess:
            print(f"radii are in the pixels of the preprocessed image ({c.preprocess})")
    return 0


def _query(args) -> int:
    _warn_known_draw(args)
    smooth, loaded, x = _load(args)
    answers = smooth.query(x, args.radius, alpha=args.alpha, n0=args.n0, n_max=args.n,
                           seed=args.seed, bound=args.bound)
    classes = loaded.model.spec.classes
    rows = []
    for path, a in zip(args.images, answers, strict=True):
        if args.json:
            print(json.dumps({"image": str(path)} | a.to_dict()))
        rows.append([path.name, "yes" if a.certified else "no",
                     "-" if a.prediction is None else classes[a.prediction],
                     f"{a.samples}/{args.n}", str(a.looks), text_down(a.p_a_lower, 6),
                     text_up(a.p_needed, 6)])
    if not args.json:
        _table([f"image (r={args.radius:g})", "certified", "class", "samples", "looks",
                "pA_lower", "needed"], rows)
    return 0


def _predict(args) -> int:
    smooth, loaded, x = _load(args)
    preds = smooth.predict(x, n=args.n, alpha=args.alpha, seed=args.seed)
    classes = loaded.model.spec.classes
    rows = []
    for path, p in zip(args.images, preds, strict=True):
        if args.json:
            print(json.dumps({"image": str(path)} | p.to_dict()))
        rows.append([path.name, "ABSTAIN" if p.prediction is None else classes[p.prediction],
                     f"{p.n_a}/{p.n_b}", f"{p.p_value:.3g}"])
    if not args.json:
        _table(["image", "class", "nA/nB", "p-value"], rows)
    return 0


def _lipschitz(args) -> int:
    loaded = checkpoint.load(args.model)
    try:
        profile = layer_profile(loaded.model)
    except ValueError as e:
        raise SplitzError(f"{e}: the profile covers splitz's own architectures; "
                          f"{loaded.card.arch}'s f1 is the identity (L = 1)") from None
    rows = [[r.name, text_up(r.bound, 4), text_up(r.cumulative, 4)] for r in profile]
    _table(["layer", "L (upper bound)", "product so far"], rows)
    split = sum(r.in_f1 for r in profile)
    print(f"split after {split} layer(s) of f1; the certificate uses the exact local bound of f1 "
          "and no bound at all on f2 (it is smoothed).")
    return 0


def _evaluate(args) -> int:
    loaded = checkpoint.load(args.model)
    protocol = evaluate.Protocol.of(loaded, args.data, args.every, args.order, args.n0, args.n,
                                    args.alpha, args.seed, args.precision, args.batch,
                                    args.device)
    record = partial(_record, args, protocol, loaded.sha256) if args.record else None
    summary = evaluate.evaluate(loaded, args.out, protocol, args.limit, args.data_root,
                                args.device, on_row=record)
    print(evaluate.markdown_table({loaded.card.id: summary}))
    if record:
        record(summary)  # also when no row was added
    return 0


def _record(args, protocol: evaluate.Protocol, weights_sha256: str,
            summary: evaluate.Summary) -> None:
    """The run so far into the model card, after every image: the card is at most the one image
    being written behind the TSV."""
    checkpoint.update_card(args.model, lambda card: card.metrics.update({args.out.stem: {
        "tsv": args.out.name, **asdict(protocol), "images": summary.images,
        "certified_accuracy": {str(r): a for r, a in summary.certified_accuracy.items()},
        "average_certified_radius": summary.average_certified_radius,
        "command": shlex.join(["splitz", *sys.argv[1:]]) if sys.argv[1:] else "evaluate",
    }}), weights_sha256)


def _plot(args) -> int:
    if args.out.suffix.lower() != ".png":
        raise InputError(f"--out {args.out}: plot writes a PNG (name it .png)")
    evaluate.plot({p.stem: evaluate.read_tsv(p, evaluate.SUMMED) for p in args.tsv}, args.out)
    print(f"wrote {args.out}")
    return 0


def _serve(args) -> int:
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port)
    return 0


def _worker(args) -> int:
    from worker.main import main as worker_main

    return worker_main([*(["--models", *args.models] if args.models else []),
                        *(["--burst"] if args.burst else []), *(["--check"] if args.check else [])])


def _submit(args) -> int:
    import csv
    import io

    import httpx

    from app.client import Client, ServiceError

    params = {k: getattr(args, k) for k in ("n", "n0", "alpha", "radius", "seed", "bound",
                                            "tolerance")
              if getattr(args, k) is not None}
    client = Client(args.url, args.api_key)
    try:
        job_id = client.submit(args.images, args.model, **params)
        results = client.wait(job_id, progress=True)["results"]
    except (ServiceError, httpx.HTTPError, OSError) as e:
        raise SplitzError(str(e)) from None
    if args.format == "json":
        text = "\n".join(json.dumps(r) for r in results) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
        text = buf.getvalue()
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


def _train(args) -> int:
    fields = _json_file(args.config, "--config") if args.config else {}
    for key in ("id", "out", "arch", "dataset", "split", "sigma", "epochs", "batch_size", "lr",
                "train_limit", "seed", "data_root", "loader_workers", "precision"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    fields.setdefault("out", Path("runs") / fields.get("id", "model"))
    path = train(TrainConfig.model_validate(fields), device=args.device)
    print(f"wrote {path}")
    return 0


def _import(args) -> int:
    fields = _json_file(args.card, "--card") if args.card else {}
    flags = {"id": args.id, "arch": args.arch, "arch_kwargs": args.arch_kwargs,
             "dataset": args.dataset, "split": args.split, "sigma": args.sigma,
             "input_shape": args.input_shape, "mean": args.mean, "std": args.std,
             "batch_size": args.batch_size, "description": args.description}
    if args.classes:
        one = args.classes[0]
        flags["classes"] = int(one) if len(args.classes) == 1 and one.isdigit() else args.classes
    preprocess = {k: v[0] if len(v) == 1 else v for k, v in
                  (("resize", args.resize), ("center_crop", args.center_crop)) if v}
    if preprocess:
        flags["preprocess"] = preprocess
    fields |= {k: v for k, v in flags.items() if v is not None}
    if isinstance(fields.setdefault("training", {}), dict):  # else the card check names it
        fields["training"]["command"] = shlex.join(["splitz", *sys.argv[1:]]) if sys.argv[1:] \
            else "import"
    done = importer.import_model(args.weights, fields, args.out, args.strip_prefix, args.force)
    for warning in done.warnings:
        print(f"splitz: warning: {warning}", file=sys.stderr)
    print(f"wrote {done.path} (sha256 {done.sha256})")
    return 0


def _json_file(path: Path, flag: str) -> dict:
    """The JSON object of fields in the file given as `flag`."""
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise SplitzError(f"{flag} {path}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(fields, dict):
        raise SplitzError(f"{flag} {path}: must hold a JSON object of fields")
    return fields


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
