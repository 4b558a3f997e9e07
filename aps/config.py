"""One typed training config: defaults and one line of help each, grouped by the part that uses them.

The CLI of train.py is generated from these fields (`add_arguments` / `from_args`), so a default or
a help line lives in exactly one place. Each field's group (task, flow, image flow, objective,
optimisation, run) is a section of a recipe file and of the "train" entry of a checkpoint's
config.json (`to_groups` / `from_dict`); aps.recipe layers recipes, a resumed run's saved config and
the command line over these defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ApsError


def option(default, help: str, group: str, choices=None):
    """A dataclass field with its CLI help line, group header and choices (read by `add_arguments`)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class TrainConfig:
    # -- task: what to train for (restored from the checkpoint on --resume)
    problem: str = option("", "mixture problem file (.npz/.safetensors: means, weights, variances, A, sigma_y)", "task")
    mcgdiff: str = option("", "or make an MCGdiff mixture problem: 'd,dy,seed' (uniform weights, sigma_y 0.1) or "
                          "'d,dy,seed,published' (the paper's weights and noise); saved into --out", "task")
    prior: str = option("", "or train for images: a diffusers prior folder (unet/ + scheduler/), e.g. checkpoints/mnist-prior", "task")
    operator: str = option("", "with --prior: the operator's name (denoise, inpaint_box, inpaint_random, sr, deblur, cs, classifier)", "task")
    op_arg: list = option(None, "with --operator: one operator parameter as key=value (JSON value), repeatable, "
                        "e.g. --op-arg factor=4 --op-arg sigma_y=0.1", "task")
    data: str = option("mnist", "with --prior: clean images x (train split only): mnist, digits8, an image folder, or "
                       "prior (drawn from the prior itself: see the data options)", "task")
    # -- data: clean images drawn from the prior itself (--data prior), measurements without ground truth
    prior_sampler: str = option("ddim", "--data prior: the prior's scheduler that draws the images: ddim (eta 0) or ddpm",
                                "data", ("ddim", "ddpm"))
    prior_steps: int = option(100, "--data prior: inference steps of that scheduler", "data")
    prior_bank: int = option(20000, "--data prior: images in the bank (drawn once, cached, reused by later runs)", "data")
    prior_batch: int = option(500, "--data prior: images drawn per batch on the device", "data")
    prior_frac: float = option(0.0, "--data D: the fraction of each forward-KL batch drawn from a bank of the prior's "
                               "own images (drawn and cached as for --data prior) beside D's images; 0: none", "data")
    prior_cache: str = option("", "--data prior: cache folder of the banks (default $XDG_CACHE_HOME or ~/.cache, "
                              "then aps/prior-banks)", "data")
    measurements: str = option("", "images: a .safetensors/.npz file whose 'y' (N, *y_shape) the APS term trains on, "
                               "without ground truth; the forward-KL term then needs --data prior (its pairs "
                               "are drawn from the prior) or --fkl-weight 0", "data")
    # -- flow architecture (restored from the checkpoint on --resume)
    flow_layers: int = option(8, "spline coupling layers (0: the base and the frame alone)", "flow")
    flow_hidden: int = option(128, "hidden width of each coupling network", "flow")
    flow_blocks: int = option(2, "residual blocks per coupling network", "flow")
    flow_bins: int = option(16, "rational-quadratic spline bins", "flow")
    flow_tail_bound: float = option(5.0, "spline interval [-B, B] in the Gaussian frame's unit-scale space", "flow")
    flow_frame: str = option("moments", "frame: moments (the Gaussian posterior of the prior's moments), component "
                           "(that mean, scaled to one mixture component's posterior width) or conditioned (one "
                           "component's posterior gain and width: each posterior component a unit Gaussian whose "
                           "place does not move with y)", "flow", ("moments", "component", "conditioned"))
    flow_base_components: int = option(0, "base of the vector flow: K > 1 components of a conditional Gaussian mixture "
                                     "q0(z|y), trained by stratified sampling (ceil(n_z/K) z per component and y); "
                                     "0 or 1: N(0, I)", "flow")
    flow_base_gate: bool = option(False, "mixture base: a Gaussian gate on y for its weights and means linear in y "
                                "and full covariances (Gaussian mixture regression), fitted by EM to joint prior draws (z, y)", "flow")
    flow_base_cov: str = option("full", "gated mixture base: full component covariances and a diagonal gate, or diag "
                                "components and a full-covariance gate on y (for high dimension: no d x d factors)",
                                "flow", ("full", "diag"))
    flow_fourier: int = option(0, "vector flow: F > 0 appends sin/cos of F random projections of the standardised y "
                             "to the flow's context (0 = off)", "flow")
    flow_fourier_scale: float = option(10.0, "std of those projections' frequencies, in units of y's spread", "flow")
    # -- image flow (ConditionalGlow; restored from the checkpoint on --resume)
    glow_levels: int = option(3, "multiscale levels (H and W must be divisible by 2^levels)", "image flow")
    glow_steps: int = option(8, "Glow steps (ActNorm, 1x1 conv, coupling) per level", "image flow")
    glow_hidden: int = option(64, "channels of each coupling network", "image flow")
    glow_cond: int = option(32, "channels of the measurement features", "image flow")
    glow_clamp: float = option(2.0, "soft bound on each coupling's log-scale", "image flow")
    glow_enc_blocks: int = option(0, "residual blocks per scale of the measurement encoder, with a top-down path so that "
                                  "every level's features see all of y (SRFlow-style; 0 = the plain pyramid)", "image flow")
    glow_blocks: int = option(0, "residual blocks in each coupling network (0 = Glow's conv 3x3, 1x1, 3x3)", "image flow")
    glow_attention: int = option(0, "the coupling networks of this many coarsest levels get a self-attention layer over "
                                 "the level's positions (0 = none)", "image flow")
    glow_tarflow: int = option(0, "TarFlow blocks (causal transformer over the tokens of 2^L x 2^L patches, affine "
                               "autoregressive) before the Glow levels; sampling is sequential over the (H W / 4^L) "
                               "tokens (0 = none)", "image flow")
    glow_tarflow_width: int = option(128, "width of each TarFlow block's transformer", "image flow")
    glow_tarflow_layers: int = option(2, "transformer layers per TarFlow block", "image flow")
    backprojection: bool = option(False, "also feed A^T y (the adjoint of a linear operator) to the flow's encoder", "image flow")
    class_template: bool = option(True, "classifier operator: end the flow with x = t_c + exp(s_c) * x', a learned image and "
                                  "log-scale per class started at the class's mean and std of the training images", "image flow")
    # -- objective
    n_z: int = option(4, "flow samples z per measurement y in each step", "objective")
    n_elbo: int = option(8, "(t, eps) draws per x for the prior's ELBO", "objective")
    elbo_sampling: str = option("lambda", "ELBO time sampling: lambda (variance-reduced) or uniform", "objective",
                              ("lambda", "uniform"))
    exact_prior: bool = option(False, "use the prior's exact log-density instead of its ELBO (mixtures only)", "objective")
    temper_start: float = option(0.02, "tempering: beta rises geometrically from this to 1 (1 = off)", "objective")
    temper_frac: float = option(0.5, "fraction of the steps over which beta reaches 1", "objective")
    fkl_weight: float = option(0.0, "weight of the mass-covering forward-KL term -log q(x|y) on data pairs", "objective")
    likelihood_weight: float = option(1.0, "guidance scale w: the APS term targets p(x) p(y|x)^w (1 = the posterior; "
                                      "> 1 sharpens it, for a weak likelihood such as a class label)", "objective")
    aps_weight: float = option(1.0, "weight of the APS (reverse-KL) term; 0 trains by forward KL alone (a reference)", "objective")
    aps_weight_start: float = option(-1.0, "ramp the APS weight: start at this weight and rise to --aps-weight over "
                                     "--aps-ramp-frac of training (geometrically if > 0, linearly from 0; < 0 = no ramp)",
                                     "objective")
    aps_ramp_frac: float = option(0.5, "fraction of training over which the APS weight ramp reaches --aps-weight", "objective")
    elbo_strata: str = option("item", "ELBO time draws stratified over each x's n_elbo draws (item) or over the whole "
                              "batch (batch: one rotated lattice of times, VDM's low-discrepancy sampler)", "objective",
                              ("item", "batch"))
    elbo_antithetic: bool = option(False, "antithetic ELBO noise: draws in pairs (t, eps) and (t, -eps); needs an even --n-elbo",
                                   "objective")
    # -- optimisation
    steps: int = option(4000, "optimizer steps", "optimisation")
    batch_size: int = option(256, "measurements y per step (per process)", "optimisation")
    lr: float = option(1e-3, "peak learning rate (AdamW, cosine decay after warmup)", "optimisation")
    warmup: int = option(100, "linear warmup steps", "optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay", "optimisation")
    grad_clip: float = option(5.0, "gradient-norm clip (0 = off)", "optimisation")
    grad_accum: int = option(1, "gradient accumulation steps", "optimisation")
    # -- run
    out: str = option("runs/aps", "output folder: config.json, flow.safetensors, training state, logs, model card", "run")
    recipe: str = option("", "the recipe file (or shipped recipe name) the options start from; default: the one for the "
                         "task's kind (aps/recipes/defaults.toml); on --resume the run's own config", "run")
    seed: int = option(0, "random seed (ranks draw different noise)", "run")
    mixed_precision: str = option("no", "accelerate mixed precision", "run", ("no", "bf16", "fp16"))
    cpu: bool = option(False, "force the CPU even if a GPU is there", "run")
    checkpoint_every: int = option(1000, "save the flow and the training state every N steps", "run")
    keep: int = option(2, "training states kept (older ones are deleted)", "run")
    log_every: int = option(50, "log the loss terms every N steps", "run")
    sample_every: int = option(500, "image tasks: save a PNG grid of posterior samples (and log it) every N steps (0 = off)", "run")
    ema_decay: float = option(0.0, "EMA of the flow's weights, saved as the flow (e.g. 0.999; 0 = off; warms up as "
                            "(1+n)/(10+n))", "run")
    max_seconds: float = option(0.0, "stop (saving the flow) after this many seconds of training (0 = no limit); the LR "
                              "decay and tempering then follow whichever of steps or time runs out first", "run")
    stop_after: float = option(0.0, "end this invocation after this many seconds, saving the training state, without "
                             "ending the run: --resume continues it, and the LR decay and tempering keep following "
                             "--steps / --max-seconds, counted over all invocations (0 = off)", "run")
    resume: bool = option(False, "continue the run in --out from its latest training state", "run")
    overwrite: bool = option(False, "start a new run in --out even if it holds one (deletes that run's files)", "run")
    nonfinite: str = option("stop", "a NaN or inf loss term or gradient: stop (error; the saved states are kept) or "
                            "skip that step (stopping after 10 in a row)", "run", ("stop", "skip"))
    init_from: str = option("", "start a new run from the weights of this checkpoint folder (same task and architecture; "
                          "fresh optimizer and schedule), e.g. to train a shipped flow longer", "run")
    prior_gradient_checkpointing: bool = option(False, "recompute the prior UNet's activations in the backward pass "
                                                "(less GPU memory for large priors, e.g. 256x256)", "run")
    cuda_graph: str = option("auto", "capture the training step once as a CUDA graph and replay it: the image step is "
                             "launch-bound, a replay launches it all at once (6-11x the steps/s on an H200); auto = on "
                             "for image tasks in one CUDA process with --grad-accum 1, on = required, off = never", "run",
                             ("auto", "on", "off"))
    dry_run: bool = option(False, "print the resolved config and exit", "run")

    TASK_FIELDS = ("problem", "mcgdiff", "prior", "operator", "op_arg", "data", "prior_sampler", "prior_steps",
                   "prior_bank", "prior_frac", "measurements")
    ARCH_FIELDS = ("flow_layers", "flow_hidden", "flow_blocks", "flow_bins", "flow_tail_bound", "flow_frame",
                   "flow_base_components", "flow_base_gate", "flow_base_cov", "flow_fourier", "flow_fourier_scale",
                   "glow_levels", "glow_steps", "glow_hidden", "glow_cond", "glow_clamp", "backprojection",
                   "class_template", "glow_enc_blocks", "glow_blocks", "glow_attention",
                   "glow_tarflow", "glow_tarflow_width", "glow_tarflow_layers") + TASK_FIELDS

    def __post_init__(self):
        self.op_arg = list(self.op_arg or [])

    @property
    def is_image(self) -> bool:
        return bool(self.prior)

    def validate(self) -> "TrainConfig":
        """Raise ApsError on nonsense values (one line each)."""
        if bool(self.prior) != bool(self.operator):
            raise ApsError("--prior and --operator go together (images), e.g. --prior checkpoints/mnist-prior --operator sr")
        if sum(bool(v) for v in (self.problem, self.mcgdiff, self.prior)) != 1:
            raise ApsError("say what to train for: --problem FILE, --mcgdiff d,dy,seed, or --prior FOLDER --operator NAME")
        if self.mcgdiff:
            from .problems import parse_mcgdiff

            parse_mcgdiff(self.mcgdiff)  # a bad spec fails now, not after the run folder is taken
        if self.op_arg and not self.operator:
            raise ApsError("--op-arg needs --operator")
        self.operator_args()  # parse errors now, not after the prior has loaded
        if self.flow_layers < 0:
            raise ApsError(f"--flow-layers must be >= 0, got {self.flow_layers}")
        positive = ("flow_hidden", "flow_blocks", "flow_bins", "n_z", "n_elbo", "steps",
                    "batch_size", "grad_accum", "checkpoint_every", "keep", "log_every", "glow_levels",
                    "glow_steps", "glow_hidden", "glow_cond")
        for name in positive:
            if getattr(self, name) < 1:
                raise ApsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise ApsError(f"--lr must be positive, got {self.lr}")
        if not 0 < self.temper_start <= 1:
            raise ApsError(f"--temper-start must be in (0, 1], got {self.temper_start}")
        if not 0 < self.temper_frac <= 1:
            raise ApsError(f"--temper-frac must be in (0, 1], got {self.temper_frac}")
        if self.flow_fourier < 0 or self.flow_fourier_scale <= 0:
            raise ApsError("--flow-fourier must be >= 0 and --flow-fourier-scale > 0")
        if self.glow_enc_blocks < 0 or self.glow_blocks < 0 or self.glow_tarflow < 0:
            raise ApsError("--glow-enc-blocks, --glow-blocks and --glow-tarflow must be >= 0")
        if self.glow_tarflow_width < 1 or self.glow_tarflow_layers < 1:
            raise ApsError("--glow-tarflow-width and --glow-tarflow-layers must be at least 1")
        if not 0 <= self.glow_attention <= self.glow_levels:
            raise ApsError(f"--glow-attention must be in 0 .. --glow-levels ({self.glow_levels}), got {self.glow_attention}")
        if self.flow_base_components < 0:
            raise ApsError(f"--flow-base-components must be >= 0, got {self.flow_base_components}")
        if self.flow_base_gate and self.flow_base_components < 2:
            raise ApsError("--flow-base-gate needs a mixture base: add --flow-base-components K (K >= 2)")
        if self.flow_base_cov != "full" and not self.flow_base_gate:
            raise ApsError("--flow-base-cov is the gated base's option: add --flow-base-gate (the ungated base is "
                           "diagonal already)")
        if self.flow_frame == "conditioned" and self.is_image:
            raise ApsError("--flow-frame conditioned is for mixture problems (an exact prior's components)")
        if not self.likelihood_weight > 0:
            raise ApsError(f"--likelihood-weight must be positive, got {self.likelihood_weight}")
        if self.fkl_weight < 0 or self.aps_weight < 0 or self.flow_tail_bound <= 0 or self.grad_clip < 0:
            raise ApsError("--fkl-weight, --aps-weight and --grad-clip must be >= 0 and --flow-tail-bound > 0")
        if not 0 < self.aps_ramp_frac <= 1:
            raise ApsError(f"--aps-ramp-frac must be in (0, 1], got {self.aps_ramp_frac}")
        if self.aps_weight_start >= 0 and self.aps_weight == 0:
            raise ApsError("--aps-weight-start ramps the APS weight up to --aps-weight, which is 0")
        if self.elbo_antithetic and self.n_elbo % 2:
            raise ApsError(f"--elbo-antithetic draws (t, eps) in pairs: --n-elbo must be even, got {self.n_elbo}")
        if self.cuda_graph == "on" and self.nonfinite == "skip":
            raise ApsError("--cuda-graph on applies every step as it runs: use --nonfinite stop with it")
        if self.cuda_graph == "on" and self.grad_accum != 1:
            raise ApsError("--cuda-graph on captures one whole optimizer step: use --grad-accum 1")
        if self.fkl_weight == 0 and self.aps_weight == 0:
            raise ApsError("--aps-weight and --fkl-weight are both 0: nothing to train")
        if self.prior_steps < 1 or self.prior_bank < 1 or self.prior_batch < 1:
            raise ApsError("--prior-steps, --prior-bank and --prior-batch must be at least 1")
        if not 0 <= self.prior_frac < 1:
            raise ApsError(f"--prior-frac must be in [0, 1) (all prior images is --data prior), got {self.prior_frac}")
        if self.prior_frac and (not self.is_image or self.data == "prior"):
            raise ApsError("--prior-frac mixes prior images into an image data set: it needs --prior, --operator and "
                           "a --data other than prior")
        if self.prior_frac and self.fkl_weight == 0:
            raise ApsError("--prior-frac feeds the forward-KL term, which --fkl-weight 0 turns off")
        if self.measurements and not self.is_image:
            raise ApsError("--measurements is for image tasks (--prior and --operator)")
        if self.measurements and self.aps_weight == 0:
            raise ApsError("--measurements trains the APS term on them: --aps-weight 0 would never see them")
        if self.measurements and self.fkl_weight > 0 and self.data != "prior":
            raise ApsError("--measurements has no ground truth, so the forward-KL term has no pairs: add --data prior "
                           "(pairs drawn from the prior) or --fkl-weight 0")
        if self.overwrite and self.resume:
            raise ApsError("--overwrite starts a new run and --resume continues one: give one of them")
        if self.max_seconds < 0 or self.stop_after < 0:
            raise ApsError("--max-seconds and --stop-after must be >= 0")
        if not 0 <= self.ema_decay < 1 or self.sample_every < 0 or self.glow_clamp <= 0:
            raise ApsError("--ema-decay must be in [0, 1), --sample-every >= 0 and --glow-clamp > 0")
        return self

    def operator_args(self) -> dict:
        """--op-arg key=value pairs as a dict; values are read as JSON (4, 0.1, true, [8, 8, 16, 16]) or kept as strings."""
        args = {}
        for item in self.op_arg:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ApsError(f"--op-arg wants key=value, got {item!r}")
            try:
                args[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                args[key.strip()] = value
        return args

    def beta(self, step: int) -> float:
        """Tempering: beta_0^(1 - s) with s = step / (temper_frac * steps), capped at 1."""
        return self.beta_at(step / max(1, self.steps))

    def beta_at(self, progress: float) -> float:
        """Tempering at a fraction `progress` of training: beta_0^(1 - s), s = progress / temper_frac capped at 1."""
        s = min(1.0, progress / self.temper_frac)
        return self.temper_start ** (1.0 - s)

    def aps_weight_at(self, progress: float) -> float:
        """The APS term's weight at a fraction `progress` of training: --aps-weight, or its ramp from
        --aps-weight-start (geometric from a positive start, linear from 0) reached at --aps-ramp-frac."""
        if self.aps_weight_start < 0:
            return self.aps_weight
        s = min(1.0, progress / self.aps_ramp_frac)
        if self.aps_weight_start == 0:
            return s * self.aps_weight
        return self.aps_weight_start ** (1.0 - s) * self.aps_weight ** s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_groups(self) -> dict:
        """{section: {option: value}}, sections in the fields' order (what config.json and recipes hold)."""
        groups: dict[str, dict] = {}
        for f in dataclasses.fields(self):
            groups.setdefault(section(f), {})[f.name] = getattr(self, f.name)
        return groups

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From to_groups() or to_dict() output (config.json of any version); unknown keys are dropped."""
        d = flatten(d, cls)
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if cls is TrainConfig:
            d.setdefault("class_template", False)  # runs saved before the option existed were built without it
        return cls(**d)


def section(f: dataclasses.Field) -> str:
    """The recipe / config.json section of a config field: its group header, e.g. "image flow" -> image_flow."""
    return f.metadata["group"].replace(" ", "_")


def flatten(d: dict, cls=TrainConfig) -> dict:
    """{section: {option: value}} -> {option: value}; a flat dict (config.json before sections) is returned as is."""
    names = {section(f) for f in dataclasses.fields(cls)}
    if d and all(k in names and isinstance(v, dict) for k, v in d.items()):
        return {k: v for group in d.values() for k, v in group.items()}
    return dict(d)


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One typed option per dataclass field, grouped under headers."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):  # --x / --no-x: a recipe may have turned it either way
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f"{meta['help']} (default: {'on' if f.default else 'off'})")
        elif isinstance(f.default, tuple):  # e.g. UNet channels: --block-out-channels 32 64 96
            kind = type(f.default[0])
            conv = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
            group.add_argument(flag, type=conv, nargs="+", default=f.default,
                               help=f"{meta['help']} (default: {' '.join(map(str, f.default))})")
        elif f.type in (list, "list"):
            group.add_argument(flag, action="append", metavar="KEY=VALUE", help=meta["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            group.add_argument(flag, type=typ, default=f.default, choices=meta["choices"],
                               help=f"{meta['help']} (default: {f.default})")


def from_args(args: argparse.Namespace, cls=TrainConfig):
    """The config dataclass `cls` from parsed arguments (nargs lists become tuples where the default is one)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{f.name: tuple(kw[f.name]) if isinstance(f.default, tuple) else kw[f.name]
                  for f in dataclasses.fields(cls)})


def explicit_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, cls=TrainConfig) -> dict:
    """The options given on the command line, {field: value}, without any default: argv parsed again with
    every default suppressed (what aps.recipe layers over a recipe and a resumed run)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in given.items() if k in fields}
