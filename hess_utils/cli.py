"""Command line: ``python -m hess_utils {spectrum,diagonal,column,eigs,solve} ...`` (``--help``).

Preparing the embedded data and models and reproducing the papers are the harness's
(``python -m hess_utils.harness {prepare,reproduce}``).

``spectrum`` runs stochastic Lanczos quadrature of the loss Hessian of a causal LM, checkpointed in a run
folder: re-running the same command resumes an interrupted run, or returns a finished one at once.
``diagonal`` estimates the Hessian's diagonal (Hutchinson), ``column`` computes exact Hessian columns,
``eigs`` a few extreme eigenpairs (thick-restart Lanczos) with where they live and how the gradient projects
on them, ``solve`` the damped Newton system ``(H + damping I) x = g`` for the loss gradient ``g``.

Bad input prints ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hess_utils.dtypes import DTYPE_NAMES, as_dtype

ENGINES = ("single", "device_map", "ddp", "fsdp")
METHODS = ("auto", "rev-rev", "fwd-rev", "fd")
DISTRIBUTED_ENGINES = ("ddp", "fsdp")
EIGS_WHICH = ("LA", "SA", "LM", "BE")  # hess_utils.algorithms.eigsh.WHICH, spelt out to keep --help import-free
SOLVERS = ("cg", "minres")  # hess_utils.algorithms.solve.METHODS
EIGS_CHECKPOINT_DIR = "eigsh"  # eigs' checkpoint folder inside its run folder

ENGINE_HELP = """\
engines:
  single      one process; the model on --device (default: cuda:0 if available, else cpu).
  device_map  one process; the model split over all visible GPUs (and CPU) by accelerate's
              device_map="auto". Weights offloaded to disk/meta are refused (they would drop out of
              the Hessian). Exact methods work: accelerate's hooks keep double backward.
  ddp         data parallel under torchrun, one process per device: every rank holds the whole model,
              batches are dealt round-robin (rank r of W takes batches r, r+W, ...) and each H v is
              all-reduced. The result does not depend on the number of ranks: when it does not divide
              the number of batches some ranks do one batch more, and a rank with no batch contributes
              zero (with a warning, since it wastes a device). Process group from torchrun's
              environment: nccl with cuda:LOCAL_RANK when CUDA is available, else gloo on CPU.
                torchrun --standalone --nproc_per_node=2 -m hess_utils spectrum --engine ddp ...
  fsdp        like ddp, with the weights sharded by FSDP2 (fully_shard on every decoder block, then on
              the whole model). Double backward does not survive FSDP, so H v is a central finite
              difference of gradients: --method fd only (the default for this engine).
"""

RUN_HELP = """\
run folder (--out) of spectrum:
  config.json      the parameters that define the result; a re-run with other ones is refused
  checkpoint.pt    resumable state (+ checkpoint.json with its sha256, basis/ with Lanczos basis rows)
  ritz.csv         probe,value,weight,ghost,residual: one row per Ritz pair (written last)
  tridiagonal.csv  probe,i,alpha,beta: the Lanczos matrices
  probes.csv       per probe: seed, iterations, breakdown, last_beta, orthogonality_loss, ghosts,
                   reorth_steps, check_steps, recalibration_steps, max_omega (reorth=partial: re-orthogonalised,
                   checked and recalibrated steps, estimate)
  density.csv      eigenvalue,density: Gaussian-smoothed density (sigma, a standard deviation, in run.json)
  run.json         provenance (model, data, seed, versions, git commit, devices), timings, orthogonality
                   (measured loss; reorth=partial: estimate, re-orthogonalised, checked, recalibrated steps)
Re-running the same command resumes from the last checkpoint (same numbers as an uninterrupted run),
or, when the run is finished, prints so and recomputes nothing. Re-plot with
hess_utils.plotting.plot_spectrum_run(RUN_DIR, STEM).
"""


EIGS_HELP = """\
run folder (--out) of eigs:
  config.json         the parameters that define the result; a re-run with other ones is refused
  eigenvectors.pt     torch.save of a list of k dicts parameter name -> CPU tensor, in the order of eigenpairs.csv
  mass_by_layer.csv   eigenvector,eigenvalue,group,layer,kind,numel,mass: each eigenvector's share of ||v||^2 per
                      layer and module kind (hess_utils.algorithms.directions.mass_by_group, by="module"; rows
                      without a layer are the embeddings, final norm and head); plot_mass_heatmap draws one
  gradient_overlap.csv rank,index,eigenvalue,cos2,share,cumulative: cos^2 of the loss gradient with each eigenvector
                      (most wanted first) and its share ||P_j g||^2/||g||^2 in the span of the first j
  run.json            provenance (model, data, seed, versions, git commit, devices), the eigsh summary, timings
  eigenpairs.csv      index,eigenvalue,residual,relative_residual,converged: ascending (written last)
  eigsh/              the checkpoint: config.json, checkpoint.json (sha256 of the current state), the state at the
                      last saved restart (basis rows, T, b, counters) or, once done, the result
Re-running the same command resumes an interrupted run from its last saved restart (same numbers as an
uninterrupted run); into a finished folder it prints so and recomputes nothing.
"""

SOLVE_HELP = """\
run folder (--out) of solve:
  config.json     the parameters that define the result; a re-run with other ones is refused
  solution.pt     torch.save of a dict parameter name -> CPU tensor: x with (H + damping I) x = g
  run.json        provenance, timings and the summary under "solve": solver, damping, tol, converged,
                  true_residual ||g - (H + damping I) x|| / ||g||, iterations, products, ||g||, ||x||, g.x
  residuals.csv   step,relative_residual: the solver's relative residual after each step (step 0: the start;
                  a residual replacement adds the true residual it restarts from) (written last)
--method is how H v is computed, as in every command; the solver is --solver.
Re-running the same command into a finished folder prints so and recomputes nothing.
"""


class CLIError(ValueError):
    """Bad input on the command line (printed as ``error: ...``, exit status 2)."""


# ---------------------------------------------------------------------------------------------- parser
def _add_common_args(p: argparse.ArgumentParser, method_type: Any = None) -> None:
    """Options shared by every Hessian command: what Hessian, and where it is computed.

    ``method_type`` converts ``--method`` (argparse ``type``); solve passes one that points a solver name
    given there to ``--solver``.
    """
    g = p.add_argument_group("the Hessian")
    g.add_argument("--model", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, tiny-gpt2, ...), a hub id, or a local folder written by "
                        "save_pretrained (config, weights and tokenizer) (default: %(default)s)")
    g.add_argument("--data", default="wiki",
                   help="embedded corpus (wiki, news, speeches, code), 'random' (uniform token ids), a datasets hub "
                        "id, or a local text/json/csv/parquet file (default: %(default)s)")
    g.add_argument("--split", default="train", choices=["train", "heldout"],
                   help="which split of the corpus (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    g.add_argument("--num-sequences", type=int, default=4,
                   help="sequences in the loss: the Hessian is that of their mean token loss, all of them in every "
                        "product (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=2,
                   help="sequences per forward pass; memory, not maths (default: %(default)s). Under ddp/fsdp the "
                        "batches are what is dealt over ranks")
    g.add_argument("--params", default=None,
                   help="parameter selection: comma-separated names, globs (transformer.h.0.*) or module types "
                        "(Linear) (default: all parameters)")
    g.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="dtype the model is loaded in; float64 for reference numbers (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the data sample and of the random probes (default: %(default)s)")
    c = p.add_argument_group("how and where it is computed")
    c.add_argument("--method", default=None, choices=METHODS, type=method_type,
                   help="how H v is computed: rev-rev (exact, reverse over reverse), fwd-rev (exact, forward over "
                        "reverse), fd (central finite differences of gradients), auto (rev-rev with a twice-"
                        "differentiable attention kernel, fd for flash attention) (default: auto; fd for fsdp)")
    c.add_argument("--fd-eps", type=float, default=None, metavar="EPS",
                   help="a fixed relative step for --method fd, h = EPS <|v|,|w|> / ||v||^2, one central pair per "
                        "product (default: none, the step adapts to each vector: two pairs, extrapolated, "
                        "within 1e-3 in float32 and 1e-7 in float64 on the embedded models' Krylov vectors)")
    c.add_argument("--engine", default="single", choices=ENGINES,
                   help="where the products run: single, device_map, ddp or fsdp (see 'engines' below; ddp and "
                        "fsdp run under torchrun) (default: %(default)s)")
    c.add_argument("--device", default="auto",
                   help="device of the single engine: auto (cuda:0 if available, else cpu), cpu, cuda, cuda:N. "
                        "ddp/fsdp use cuda:LOCAL_RANK with CUDA unless this is cpu; device_map ignores it "
                        "(default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="run folder (default: runs/COMMAND-MODEL-DATA-seedN-HASH, HASH naming the options that define "
                        "the result, so the same command always finds its folder)")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_spectrum_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p)
    s = p.add_argument_group("stochastic Lanczos quadrature")
    s.add_argument("--num-iters", type=int, default=30,
                   help="Lanczos iterations per probe = Ritz values per probe = products with H per probe "
                        "(default: %(default)s)")
    s.add_argument("--probes", type=int, default=1,
                   help="independent random start vectors (SLQ probes); probe p uses seed*1000003+p "
                        "(default: %(default)s)")
    s.add_argument("--probe-kind", default="rademacher", choices=["rademacher", "gaussian"],
                   help="distribution of the start vectors (default: %(default)s)")
    s.add_argument("--reorth", default="partial", choices=["partial", "full", "offload", "none"],
                   help="re-orthogonalisation: partial (basis on the device, kept semi-orthogonal: re-orthogonalised "
                        "only when the estimated or measured loss of orthogonality passes sqrt(eps); the Ritz values "
                        "of full), full (every step), offload (as full, basis in CPU memory), none (three vectors; "
                        "ghosts appear, flagged in ritz.csv) (default: %(default)s)")
    s.add_argument("--checkpoint-every", type=int, default=10,
                   help="save the run every N Lanczos iterations (and after every probe); 0: after every probe "
                        "only. A save writes the basis rows added since the last one (default: %(default)s)")


def _add_diagonal_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p)
    s = p.add_argument_group("Hutchinson diagonal")
    s.add_argument("--probes", type=int, default=100,
                   help="random probes v; the estimate is the mean of v * (H v), its standard error falls like "
                        "1/sqrt(probes) (default: %(default)s)")
    s.add_argument("--probe-kind", default="rademacher", choices=["rademacher", "gaussian"],
                   help="distribution of the probes (default: %(default)s)")


def _add_column_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p)
    s = p.add_argument_group("Hessian columns")
    s.add_argument("--index", type=int, nargs="+", default=[0],
                   help="global parameter indices (parameters in model order, each flattened row-major); one "
                        "product H e_i per index (default: 0)")
    s.add_argument("--relative", action="store_true",
                   help="threshold table of |H_ij| / max_j |H_ij| instead of |H_ij|")


def _add_eigs_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p)
    s = p.add_argument_group("eigenpairs (thick-restart Lanczos, hess_utils.algorithms.eigsh)")
    s.add_argument("--k", type=int, default=5, help="number of eigenpairs, below the dimension (default: %(default)s)")
    s.add_argument("--which", default="LA", choices=EIGS_WHICH,
                   help="LA largest algebraic, SA smallest algebraic, LM largest magnitude, BE both ends "
                        "(ceil(k/2) from the top, floor(k/2) from the bottom) (default: %(default)s)")
    s.add_argument("--tol", type=float, default=1e-6,
                   help="relative tolerance: a pair is converged when ||H x - theta x|| <= tol * max|theta|; above "
                        "the dtype's rounding unit (float32: 1e-5 is realistic) (default: %(default)s)")
    s.add_argument("--max-products", type=int, default=None,
                   help="products with H allowed in the iteration; running out writes the pairs reached, flagged "
                        "converged=False (default: max(1000, 50 * basis size))")
    s.add_argument("--check-multiplicity", action="store_true",
                   help="after convergence, restart orthogonally to the pairs found until the next Ritz pair has "
                        "settled behind them, to find second copies of repeated eigenvalues (off, as in ARPACK)")
    s.add_argument("--checkpoint-every", type=int, default=1,
                   help="save the Lanczos state in the run folder's eigsh/ every this many thick restarts, so a "
                        "re-run of the same command resumes; 0: only the result (default: %(default)s)")


def _solver_not_method(value: str) -> str:
    """``--method`` of solve: a solver name there is a mix-up with ``--solver``, said so."""
    if value in SOLVERS:
        raise argparse.ArgumentTypeError(f"{value!r} is a solver: use --solver {value} (--method is how H v is "
                                         f"computed: {', '.join(METHODS)})")
    return value


def _add_solve_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p, method_type=_solver_not_method)
    s = p.add_argument_group("the damped system (H + damping I) x = g, g the loss gradient on the same batches")
    s.add_argument("--damping", type=float, required=True,
                   help="lambda >= 0 usually; cg needs H + lambda I positive definite, i.e. lambda > -lambda_min(H) "
                        "(eigs --which SA --k 1 estimates lambda_min); minres does not")
    s.add_argument("--solver", default="cg", choices=SOLVERS,
                   help="cg (conjugate gradients, positive definite systems) or minres (any symmetric system) "
                        "(default: %(default)s)")
    s.add_argument("--tol", type=float, default=1e-6,
                   help="relative residual ||g - (H + lambda I) x|| / ||g|| to reach (default: %(default)s)")
    s.add_argument("--max-iters", type=int, default=None,
                   help="iterations allowed (one product each); running out writes x with converged=false in "
                        "run.json (default: min(2 * dim, 10000))")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m hess_utils", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    spec = sub.add_parser("spectrum", help="SLQ spectrum of the loss Hessian, checkpointed; writes ritz.csv, run.json",
                          description="Stochastic Lanczos quadrature of the Hessian of a causal LM's mean token loss, "
                                      "checkpointed and resumable.", epilog=ENGINE_HELP + "\n" + RUN_HELP,
                          formatter_class=fmt)
    _add_spectrum_args(spec)
    diag = sub.add_parser("diagonal", help="Hutchinson estimate of the Hessian diagonal, with standard errors",
                          description="Hutchinson estimate of diag(H): writes diagonal.safetensors (estimate.NAME and "
                                      "stderr.NAME, float64), diagonal.csv (one summary row per parameter) and "
                                      "run.json.", epilog=ENGINE_HELP, formatter_class=fmt)
    _add_diagonal_args(diag)
    col = sub.add_parser("column", help="exact Hessian columns H e_i and their threshold tables",
                         description="Columns H e_i: writes columns.safetensors (column.I, float64), columns.csv (one "
                                     "row per column), thresholds.csv (fraction of entries below 1e-12 ... 1e-1) and "
                                     "run.json.", epilog=ENGINE_HELP, formatter_class=fmt)
    _add_column_args(col)
    eig = sub.add_parser("eigs", help="a few extreme eigenpairs of the loss Hessian, where they live, gradient overlap",
                         description="k extreme eigenpairs of the Hessian by thick-restart Lanczos (eigsh): writes "
                                     "eigenpairs.csv, eigenvectors.pt, mass_by_layer.csv, gradient_overlap.csv and "
                                     "run.json.", epilog=ENGINE_HELP + "\n" + EIGS_HELP, formatter_class=fmt)
    _add_eigs_args(eig)
    sol = sub.add_parser("solve", help="solve (H + damping I) x = g for the loss gradient g (cg or minres)",
                         description="The damped Newton system (H + damping I) x = g, g the gradient of the same loss "
                                     "on the same batches: writes solution.pt, residuals.csv and run.json.",
                         epilog=ENGINE_HELP + "\n" + SOLVE_HELP, formatter_class=fmt)
    _add_solve_args(sol)
    return parser


# ---------------------------------------------------------------------------------------------- configuration
def _method(args: argparse.Namespace) -> str:
    """The requested method, with the engine's default and its restrictions."""
    method = getattr(args, "method", None)
    if args.engine == "fsdp":
        if method not in (None, "fd"):
            raise CLIError(f"--engine fsdp computes H v by finite differences only (double backward does not survive "
                           f"FSDP), so --method {method} is not possible: use --method fd (the default for fsdp), or "
                           "--engine ddp/device_map for an exact method")
        return "fd"
    return method or "auto"


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before anything is loaded."""
    positive = {"seq_len": 2, "num_sequences": 1, "batch_size": 1}
    if args.command == "spectrum":
        positive.update(num_iters=1, probes=1)
    if args.command == "diagonal":
        positive.update(probes=1)
    if args.command == "eigs":
        positive.update(k=1)
    for name in ("max_products", "max_iters"):  # optional counts of eigs and solve
        if getattr(args, name, None) is not None:
            positive[name] = 1
    for name, minimum in positive.items():
        if getattr(args, name) < minimum:
            raise CLIError(f"--{name.replace('_', '-')} must be at least {minimum}, got {getattr(args, name)}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if getattr(args, "checkpoint_every", 0) < 0:
        raise CLIError(f"--checkpoint-every must be >= 0 (0: only after every probe), got {args.checkpoint_every}")
    if args.command == "column" and any(i < 0 for i in args.index):
        raise CLIError(f"--index values must be >= 0, got {args.index}")
    if args.command in ("eigs", "solve") and not (math.isfinite(args.tol) and args.tol > 0):
        raise CLIError(f"--tol must be a finite number > 0 (a relative residual), got {args.tol}")
    if args.command == "solve" and not math.isfinite(args.damping):
        raise CLIError(f"--damping must be finite, got {args.damping}")
    if getattr(args, "fd_eps", None) is not None:
        if not args.fd_eps > 0:
            raise CLIError(f"--fd-eps must be positive, got {args.fd_eps}")
        if _method(args) != "fd":
            raise CLIError(f"--fd-eps applies to --method fd only (this run: {_method(args)}); leave it out")
    _method(args)
    if args.engine in DISTRIBUTED_ENGINES and not _launched_by_torchrun():
        raise CLIError(f"--engine {args.engine} runs one process per device under torchrun (RANK and WORLD_SIZE are "
                       f"not set): torchrun --standalone --nproc_per_node=N -m hess_utils {args.command} "
                       f"--engine {args.engine} ...")
    if args.engine == "device_map" and args.device != "auto":
        raise CLIError("--device does not apply to --engine device_map (accelerate places the model); leave it out")


def _launched_by_torchrun() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define a command's result (stored in config.json, compared on re-runs).

    Output and display options (``--out``, ``--no-progress``, ``--checkpoint-every``) and ``--device`` are not part
    of it; the engine is, since it changes the order of floating-point sums.
    """
    cfg: dict[str, Any] = {
        "command": args.command, "model": args.model, "data": args.data, "split": args.split, "seq_len": args.seq_len,
        "num_sequences": args.num_sequences, "batch_size": args.batch_size, "params": args.params,
        "dtype": args.dtype, "seed": args.seed, "method": _method(args), "engine": args.engine, "reduction": "mean",
    }
    if getattr(args, "fd_eps", None) is not None:  # absent from older run folders: added only when set
        cfg["fd_eps"] = args.fd_eps
    if args.command == "spectrum":
        cfg.update(num_iters=args.num_iters, num_probes=args.probes, probe=args.probe_kind, reorth=args.reorth)
    elif args.command == "diagonal":
        cfg.update(num_probes=args.probes, probe=args.probe_kind)
    elif args.command == "column":
        cfg.update(index=list(args.index), relative=bool(args.relative))
    elif args.command == "eigs":
        cfg.update(k=args.k, which=args.which, tol=args.tol, max_products=args.max_products)
    elif args.command == "solve":
        cfg.update(damping=args.damping, solver=args.solver, tol=args.tol, max_iters=args.max_iters)
    return cfg


def default_out(args: argparse.Namespace) -> Path:
    """``runs/COMMAND-MODEL-DATA-seedN-HASH`` where HASH is a digest of :func:`run_config`."""
    digest = hashlib.sha256(json.dumps(run_config(args), sort_keys=True).encode()).hexdigest()[:8]
    model = Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model.replace("/", "_")
    data = Path(args.data).name if Path(args.data).expanduser().exists() else args.data.replace("/", "_")
    return Path("runs") / f"{args.command}-{model}-{data}-seed{args.seed}-{digest}"


def _rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(message: str) -> None:
    """Print on rank 0 only."""
    from hess_utils.distributed import is_main_process

    if is_main_process() and _rank_from_env() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------- engines
@dataclass
class Setup:
    """A loaded model, its batches and the Hessian operator of one engine."""

    model: Any
    op: Any
    engine: str
    device: str
    world_size: int = 1
    rank: int = 0
    backend: str | None = None
    rank_devices: list[str] = field(default_factory=list)
    load_s: float = 0.0
    owns_process_group: bool = False

    def close(self, barrier: bool = True) -> None:
        """Destroy the process group if this setup created it (after a barrier, unless a rank failed)."""
        if self.owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                if barrier:  # no rank tears gloo/nccl down while another still talks to it
                    dist.barrier()
                dist.destroy_process_group()
            self.owns_process_group = False


class _Closing(AbstractContextManager):
    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def __enter__(self) -> Setup:
        return self.setup

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.setup.close(barrier=exc_type is None)  # a failed rank must not wait for the others


def _single_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {spec}: no CUDA device is visible; use --device cpu")
    try:
        return str(torch.device(spec))
    except RuntimeError as err:
        raise CLIError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from err


def _init_distributed(device_spec: str) -> tuple[str, bool]:
    """Initialise the process group from torchrun's environment; returns ``(device, created)``."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():
        return device, False
    if use_cuda:
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device, True


def decoder_blocks(model: Any) -> list[Any]:
    """The model's repeated transformer blocks (FSDP wrap units): modules whose class is in ``_no_split_modules``,
    else the children of its longest ``ModuleList``."""
    import torch

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def build(args: argparse.Namespace) -> Setup:
    """Load the model and batches and build the operator of ``args.engine`` (initialising torch.distributed)."""

    from hess_utils.batches import load_batches
    from hess_utils.models import load_model

    t0 = time.perf_counter()
    dtype = as_dtype(args.dtype)
    method = _method(args)
    params = [s.strip() for s in args.params.split(",") if s.strip()] if args.params else None
    setup_kw: dict[str, Any] = {}
    if args.engine in DISTRIBUTED_ENGINES:
        import torch.distributed as dist

        device, created = _init_distributed(args.device)
        setup_kw.update(owns_process_group=created, world_size=dist.get_world_size(), rank=dist.get_rank(),
                        backend=str(dist.get_backend()))
    elif args.engine == "single":
        device = _single_device(args.device)
    else:
        device = "auto"
    try:
        if args.engine == "device_map":
            model, tokenizer = load_model(args.model, dtype=dtype, device_map="auto")
        else:
            model, tokenizer = load_model(args.model, dtype=dtype)
            model = model.to(device)
        batches = load_batches(args.data, tokenizer, seq_len=args.seq_len, num_sequences=args.num_sequences,
                               batch_size=args.batch_size, split=args.split, seed=args.seed)
        if args.engine in ("single", "device_map"):
            from hess_utils.operators.engines import check_materialised
            from hess_utils.operators.hessian import hessian_operator

            check_materialised(model)
            op = hessian_operator(model, batches, params=params, method=method, progress=False,
                                  fd_eps=args.fd_eps)
            devices = sorted({str(p.device) for p in model.parameters()})
            device = ",".join(devices)
        elif args.engine == "ddp":
            from hess_utils.operators.engines import DataParallelHessianOperator

            op = DataParallelHessianOperator(model, batches, params=params, method=method, progress=False,
                                             fd_eps=args.fd_eps)
        else:
            from torch.distributed.fsdp import fully_shard

            from hess_utils.operators.engines import FSDPHessianOperator

            blocks = decoder_blocks(model)
            if not blocks:
                raise CLIError(f"cannot find the decoder blocks of {type(model).__name__} to shard with FSDP")
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
            op = FSDPHessianOperator(model, batches, params=params, fd_eps=args.fd_eps)
        setup = Setup(model=model, op=op, engine=args.engine, device=device, **setup_kw)
        if args.engine in DISTRIBUTED_ENGINES:
            import torch.distributed as dist

            gathered: list[Any] = [None] * setup.world_size
            dist.all_gather_object(gathered, device)
            setup.rank_devices = [str(d) for d in gathered]
        else:
            setup.rank_devices = [device]
        setup.load_s = time.perf_counter() - t0
        return setup
    except BaseException:
        if setup_kw.get("owns_process_group"):
            Setup(model=None, op=None, engine=args.engine, device=device, owns_process_group=True).close(barrier=False)
        raise


def _record(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """The run.json fields every command shares (computed on every rank: the loss is a collective)."""
    from hess_utils.models import model_provenance

    op = setup.op
    return {
        "command": args.command, "model": args.model, "data": args.data, "split": args.split, "seed": args.seed,
        "parameters": {k: v for k, v in vars(args).items() if k != "command"},
        "model_provenance": model_provenance(setup.model), "dim": op.dim, "method": op.method,
        "keep_graph": getattr(op, "keep_graph_mode", None),
        "keep_graph_fallback": getattr(op, "keep_graph_fallback", None),
        "graph_bytes": getattr(op, "graph_bytes", None), "fd_mode": getattr(op, "fd_mode", None),
        "num_tokens": op.num_tokens, "loss": op.loss(), "engine": setup.engine, "world_size": setup.world_size,
        "backend": setup.backend, "rank_devices": setup.rank_devices,
        "num_batches": -(-args.num_sequences // args.batch_size),
    }


def gradient_seconds(op: Any, repeats: int = 2) -> float:
    """Wall time of one gradient of the operator's loss on its batches (the fastest of ``repeats``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op.gradient()
        times.append(time.perf_counter() - start)
    return min(times)


def product_timings(op: Any, gradient_s: float, load_s: float) -> dict[str, Any]:
    """run.json's ``timings``: loading, one gradient, the median product and their ratio (this session)."""
    import statistics

    seconds = op.product_seconds
    median = statistics.median(seconds) if seconds else None
    return {"load_s": load_s, "gradient_s": gradient_s, "products": len(seconds), "median_product_s": median,
            "product_per_gradient": median / gradient_s if median is not None and gradient_s > 0 else None}


def _describe(args: argparse.Namespace, setup: Setup) -> None:
    op = setup.op
    where = f"{setup.engine} on {setup.device}" if setup.world_size == 1 else (
        f"{setup.engine} over {setup.world_size} ranks ({setup.backend}: {', '.join(setup.rank_devices)})")
    _say(f"model {args.model}: {op.dim:,} parameters in the Hessian; data {args.data}: {args.num_sequences} x "
         f"{args.seq_len} tokens; method {op.method}; engine {where}")


def _finished_before_loading(out: Path, config: dict[str, Any], marker: str) -> bool:
    """True if ``out`` holds this finished run (checked on the options alone, before loading anything).

    Raises the mismatch error early too, naming the differing options; keys only known once the model is
    loaded (its dimension, dtype and parameter names) are checked later by :mod:`hess_utils.checkpoint`.
    """
    from hess_utils import runs

    saved = runs.load_config(out)
    if saved is None:
        return False
    mismatches = [(k, o, n) for k, o, n in runs.config_mismatches(saved, config) if k in config]
    if mismatches:
        details = "; ".join(f"{k}: {o!r} (saved) != {n!r} (now)" for k, o, n in mismatches)
        raise CLIError(f"run folder {out} holds a different run: {details}. Use another --out folder, or delete {out} "
                       "to start over")
    return (out / marker).exists()


def _run_folder(args: argparse.Namespace, marker: str) -> tuple[Path, dict[str, Any], bool]:
    """A command's run folder and configuration, and whether that folder already holds this finished run
    (``marker`` written last); nothing is loaded for that answer."""
    _check_args(args)
    out = Path(args.out) if args.out else default_out(args)
    config = run_config(args)
    done = _finished_before_loading(out, config, marker)
    if done:
        _say(f"{out} holds this finished run: nothing recomputed (delete the folder to recompute)")
    return out, config, done


def _claim_run_folder(out: Path, config: dict[str, Any], op, marker: str) -> tuple[bool, dict[str, Any]]:
    """Refuse a folder of another run (:func:`hess_utils.checkpoint.check_run_folder`, with the operator's
    fingerprint); returns whether this process writes (rank 0) and the full configuration checked."""
    from hess_utils import checkpoint
    from hess_utils.distributed import is_main_process

    writer = is_main_process()
    full = {**config, **checkpoint.operator_fingerprint(op)}
    checkpoint.check_run_folder(out, full, marker, writer)
    return writer, full


@dataclass
class _Verb:
    """One command's run: its folder and options, and once loaded the setup, whether this rank writes and the
    full configuration (options and operator fingerprint) that run.json records."""

    args: argparse.Namespace
    out: Path
    config: dict[str, Any]
    done: bool
    setup: Setup | None = None
    writer: bool = False
    full: dict[str, Any] | None = None

    @property
    def op(self) -> Any:
        return self.setup.op

    def save_run_json(self, kind: str, compute_s: float, files: dict[str, str], gradient_s: float | None = None,
                      **fields: Any) -> None:
        """run.json: the setup record, the full configuration, ``fields`` and the timings (with the gradient
        and median product times when ``gradient_s`` is given)."""
        from hess_utils import runs

        setup, op = self.setup, self.op
        timings = (product_timings(op, gradient_s, setup.load_s) if gradient_s is not None
                   else {"load_s": setup.load_s})
        timings.update(compute_s=compute_s, matvecs=op.num_matvecs)
        runs.save_run_json(self.out, runs.provenance(**_record(self.args, setup), kind=kind, config=self.full,
                                                     **fields, timings=timings, files=files))


@contextmanager
def _verb(args: argparse.Namespace, marker: str, check: Any = None) -> Iterator[_Verb]:
    """The run of a command that writes ``marker`` last: a finished folder for the same options is yielded
    with ``done`` (nothing loaded); otherwise the model is loaded, described, ``check(op)`` run (it raises
    :class:`CLIError` for options the operator refutes) and the folder claimed; closed on exit."""
    out, config, done = _run_folder(args, marker)
    run = _Verb(args, out, config, done)
    if done:
        yield run
        return
    with _Closing(build(args)) as setup:
        run.setup = setup
        _describe(args, setup)
        if check is not None:
            check(setup.op)
        run.writer, run.full = _claim_run_folder(out, config, setup.op, marker)
        yield run


# ---------------------------------------------------------------------------------------------- commands
def run_spectrum(args: argparse.Namespace) -> Path:
    """Load, sample, build the operator, run checkpointed SLQ, save the run folder; returns it.

    A finished run folder for the same options is returned at once (nothing loaded); an interrupted one is
    resumed from its last checkpoint.
    """
    from hess_utils import checkpoint
    from hess_utils.algorithms.slq import slq

    out, config, done = _run_folder(args, "ritz.csv")
    if done:
        checkpoint.load_slq_result(out)  # verifies the checkpoint's digest
        return out
    with _Closing(build(args)) as setup:
        op = setup.op
        _describe(args, setup)
        gradient_s = gradient_seconds(op)
        t1 = time.perf_counter()
        result = slq(
            op, num_iters=args.num_iters, num_probes=args.probes, reorth=args.reorth, seed=args.seed,
            probe=args.probe_kind, progress=not args.no_progress, checkpoint_dir=out,
            checkpoint_every=args.checkpoint_every, config=config,
            record=lambda: {**_record(args, setup), "timings": product_timings(op, gradient_s, setup.load_s)},
        )
        elapsed = time.perf_counter() - t1
        top = max(float(r.ritz_values.max()) for r in result.runs)
        _say(f"SLQ done in {elapsed:.1f} s ({op.num_matvecs} Hessian-vector products in this session); largest Ritz "
             f"value {top:.6g}; run folder {out}")
    return out


def _save_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from hess_utils import _io

    with _io.atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))


def run_diagonal(args: argparse.Namespace) -> Path:
    """Hutchinson diagonal estimate; writes diagonal.safetensors, diagonal.csv and run.json; returns the folder."""
    import numpy as np
    import pandas as pd

    from hess_utils import runs
    from hess_utils.algorithms import hutchinson_diagonal

    with _verb(args, "diagonal.csv") as run:
        if run.done:
            return run.out
        op, out = run.op, run.out
        t1 = time.perf_counter()
        res = hutchinson_diagonal(op, num_probes=args.probes, seed=args.seed, probe=args.probe_kind,
                                  progress=not args.no_progress and run.writer)
        compute_s = time.perf_counter() - t1
        if run.writer:
            tensors = {}
            rows = []
            for name, est, err in zip(op.param_names, res.estimate, res.stderr, strict=True):
                tensors[f"estimate.{name}"], tensors[f"stderr.{name}"] = est, err
                e, s = est.detach().double().cpu().numpy(), err.detach().double().cpu().numpy()
                rows.append({"param": name, "numel": e.size, "sum": float(e.sum()), "mean": float(e.mean()),
                             "mean_abs": float(np.abs(e).mean()), "min": float(e.min()), "max": float(e.max()),
                             "mean_stderr": float(np.mean(s)) if s.size else float("nan")})
            _save_safetensors(out / "diagonal.safetensors", tensors)
            frame = pd.DataFrame(rows)
            trace = float(frame["sum"].sum())
            run.save_run_json("diagonal", compute_s,
                              {"estimate_and_stderr": "diagonal.safetensors", "summary": "diagonal.csv"},
                              num_probes=res.num_probes, probe=res.probe, trace_from_diagonal=trace)
            runs.save_table(out, "diagonal.csv", frame)
        _say(f"diagonal of {op.dim:,} entries from {res.num_probes} probes in {compute_s:.1f} s; sum (trace estimate) "
             f"{sum(float(b.sum()) for b in res.estimate):.6g}; run folder {out}")
    return out


def run_column(args: argparse.Namespace) -> Path:
    """Exact Hessian columns; writes columns.safetensors, columns.csv, thresholds.csv, run.json; returns the folder."""
    import numpy as np
    import pandas as pd

    from hess_utils import runs
    from hess_utils.algorithms.columns import hessian_column, threshold_table

    def in_range(op: Any) -> None:
        bad = [i for i in args.index if i >= op.dim]
        if bad:
            raise CLIError(f"--index {bad[0]} is out of range: the Hessian has dimension {op.dim:,} (indices 0.."
                           f"{op.dim - 1})")

    with _verb(args, "thresholds.csv", check=in_range) as run:
        if run.done:
            return run.out
        op, out = run.op, run.out
        t1 = time.perf_counter()
        columns = [hessian_column(op, i) for i in args.index]
        compute_s = time.perf_counter() - t1
        if run.writer:
            import torch

            _save_safetensors(out / "columns.safetensors",
                              {f"column.{c.index}": torch.from_numpy(c.values) for c in columns})
            summary = pd.DataFrame([{"index": c.index, "param": c.param_name, "local_index": c.local_index,
                                     "diagonal": c.diagonal, "norm": float(np.linalg.norm(c.values)),
                                     "max_abs": float(np.abs(c.values).max())} for c in columns])
            runs.save_table(out, "columns.csv", summary)
            run.save_run_json("column", compute_s, {"columns": "columns.safetensors", "summary": "columns.csv",
                                                    "thresholds": "thresholds.csv"}, relative=bool(args.relative))
            runs.save_table(out, "thresholds.csv", threshold_table(columns, relative=args.relative))
        _say(f"{len(columns)} column(s) in {compute_s:.1f} s; run folder {out}")
    return run.out


def _save_torch(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a reader never sees half a file)."""
    import torch

    from hess_utils import _io

    with _io.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _cpu_dict(op: Any, vector: Any) -> dict[str, Any]:
    """A vector list as ``{parameter name: CPU tensor}`` (own storage: no view into a larger tensor is saved)."""
    return {name: block.detach().to("cpu").clone() for name, block in zip(op.param_names, vector, strict=True)}


def run_eigs(args: argparse.Namespace) -> Path:
    """k extreme eigenpairs; writes eigenpairs.csv, eigenvectors.pt, mass_by_layer.csv, gradient_overlap.csv and
    run.json; returns the folder.

    The eigenpairs are :func:`hess_utils.algorithms.eigsh.eigsh` of the command's operator with ``--seed`` as
    its seed, so the same call in Python gives the same numbers. The gradient for the overlaps is the loss
    gradient on the same batches. A finished folder for the same options is returned at once; an interrupted
    one resumes from the checkpoint in ``out/eigsh/`` (same numbers as an uninterrupted run).
    """
    import pandas as pd

    from hess_utils import runs
    from hess_utils.algorithms.directions import gradient_overlap, mass_by_group
    from hess_utils.algorithms.eigsh import eigsh

    def k_below_dim(op: Any) -> None:
        if args.k >= op.dim:
            raise CLIError(f"--k {args.k} must be below the Hessian's dimension {op.dim:,} (select more --params, "
                           "or compute the dense matrix)")

    with _verb(args, "eigenpairs.csv", check=k_below_dim) as run:
        if run.done:
            return run.out
        op, out, writer, full = run.op, run.out, run.writer, run.full
        gradient_s = gradient_seconds(op)
        gradient = op.gradient()  # collective under ddp/fsdp: every rank takes it
        t1 = time.perf_counter()
        # Checkpointed in out/eigsh/: an interrupted run resumes from its last restart when re-run.
        result = eigsh(op, k=args.k, which=args.which, tol=args.tol, max_products=args.max_products, seed=args.seed,
                       check_multiplicity=args.check_multiplicity,
                       progress=not args.no_progress and writer, checkpoint_dir=out / EIGS_CHECKPOINT_DIR,
                       checkpoint_every=args.checkpoint_every, checkpoint_config={"run": full}, is_writer=writer)
        compute_s = time.perf_counter() - t1
        if writer:
            _save_torch(out / "eigenvectors.pt", [_cpu_dict(op, x) for x in result.eigenvectors])
            masses = pd.concat([
                mass_by_group(op, x, by="module").assign(eigenvector=i, eigenvalue=float(value))
                for i, (value, x) in enumerate(zip(result.eigenvalues, result.eigenvectors, strict=True))
            ], ignore_index=True)
            first = ["eigenvector", "eigenvalue"]
            runs.save_table(out, "mass_by_layer.csv", masses[first + [c for c in masses.columns if c not in first]])
            overlap = gradient_overlap(result, gradient)
            runs.save_table(out, "gradient_overlap.csv", overlap)
            summary = {"which": result.which, "k": result.k, "tol": result.tol, "seed": result.seed,
                       "eigenvalues": [float(x) for x in result.eigenvalues],
                       "residuals": [float(x) for x in result.residuals], "scale": result.scale,
                       "all_converged": result.all_converged, "num_converged": int(result.converged.sum()),
                       "num_products": result.num_products, "num_restarts": result.num_restarts,
                       "num_multiplicity_checks": result.num_multiplicity_checks, "basis_size": result.basis_size}
            run.save_run_json("eigs", compute_s, {"eigenpairs": "eigenpairs.csv", "eigenvectors": "eigenvectors.pt",
                                                  "mass_by_layer": "mass_by_layer.csv",
                                                  "gradient_overlap": "gradient_overlap.csv"},
                              gradient_s=gradient_s, eigsh=summary, gradient_norm=overlap.attrs["gradient_norm"],
                              gradient_share_in_top_k=float(overlap["cumulative"].iloc[-1]))
            pairs = result.to_frame()
            pairs.insert(0, "index", range(result.k))
            runs.save_table(out, "eigenpairs.csv", pairs)  # last: its presence marks a finished run
        values = ", ".join(f"{x:.6g}" for x in result.eigenvalues)
        _say(f"{int(result.converged.sum())}/{result.k} eigenpairs ({args.which}) converged in {compute_s:.1f} s, "
             f"{result.num_products} products: {values}; run folder {out}")
    return run.out


def run_solve(args: argparse.Namespace) -> Path:
    """Solve ``(H + damping I) x = g`` for the loss gradient ``g``; writes solution.pt, residuals.csv, run.json.

    ``x`` is :func:`hess_utils.algorithms.solve.cg` (or ``minres``) of the command's operator and its own
    gradient, so ``-x`` is the damped Newton step. A finished folder for the same options is returned at once;
    an indefinite ``H + damping I`` under ``--solver cg`` is an error (use a larger damping, or minres).
    """
    import numpy as np
    import pandas as pd

    from hess_utils import runs
    from hess_utils import vectors as V
    from hess_utils.algorithms.solve import cg, minres

    with _verb(args, "residuals.csv") as run:
        if run.done:
            return run.out
        op, out = run.op, run.out
        gradient_s = gradient_seconds(op)
        gradient = op.gradient()
        solver = cg if args.solver == "cg" else minres
        t1 = time.perf_counter()
        result = solver(op, gradient, damping=args.damping, tol=args.tol, max_iters=args.max_iters,
                        progress=not args.no_progress and run.writer)
        compute_s = time.perf_counter() - t1
        summary = {"solver": result.method, "damping": result.damping, "tol": result.tol,
                   "converged": result.converged, "true_residual": result.true_residual,
                   "num_iters": result.num_iters, "num_products": result.num_products,
                   "num_replacements": result.num_replacements, "gradient_norm": V.norm(gradient),
                   "solution_norm": V.norm(result.x), "gradient_dot_solution": V.dot(gradient, result.x)}
        if run.writer:
            _save_torch(out / "solution.pt", _cpu_dict(op, result.x))
            run.save_run_json("solve", compute_s, {"solution": "solution.pt", "residuals": "residuals.csv"},
                              gradient_s=gradient_s, solve=summary)
            history = np.asarray(result.residual_norms)
            runs.save_table(out, "residuals.csv", pd.DataFrame({"step": np.arange(len(history)),
                                                                "relative_residual": history}))
        state = "converged" if result.converged else f"did NOT reach --tol {args.tol:g}"
        _say(f"{result.method} {state} in {result.num_iters} iterations ({compute_s:.1f} s): relative residual "
             f"{result.true_residual:.2e}, ||x|| {summary['solution_norm']:.6g}, "
             f"g.x {summary['gradient_dot_solution']:.6g}; run folder {out}")
    return run.out


COMMANDS = {"spectrum": run_spectrum, "diagonal": run_diagonal, "column": run_column, "eigs": run_eigs,
            "solve": run_solve}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with ``error: ...`` on stderr)."""
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, IndexError, NotADirectoryError, PermissionError,
            FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        return 130
    return 0
