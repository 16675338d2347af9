"""Invalid job specs for fuzzing: hypothesis strategies that break a valid spec in exactly one way and say which
field (or which line) the refusal must name.

Written from the spec format as docs/specs.md and `l2cluster schema` document it, and deliberately independent of
l2cluster's code: it never imports l2cluster, so a mistake in l2cluster's models cannot hide in the oracle.
Used by tests/test_spec_fuzz.py (pytest puts tests/ on sys.path) and bench/fuzz_specs.py (which adds it).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
import string
from dataclasses import dataclass

import yaml
from hypothesis import strategies as st

MAX_SEED = 2**63 - 1
DEFAULT_MAX_JOBS = 10_000
BUILTIN_PLUGINS = ("l2", "decoupled_decay", "dropout", "grad_clip")
INF, NAN = float("inf"), float("nan")


@dataclass(frozen=True)
class Case:
    """One broken spec: the file's bytes, what it was broken with, and what its refusal must name."""

    kind: str
    content: bytes
    suffix: str  # ".yaml" or ".json"
    fields: tuple[str, ...]  # the refusal must name one of these (a spec path, or "line" for a syntax error)
    max_jobs: int | None = None  # --max-jobs to validate with (None: the default)
    data: object = None  # the spec as data, for submitting it without a file (None: broken file syntax)

    def describe(self) -> str:
        return f"{self.kind} (expects {' or '.join(self.fields)}): {self.content[:300]!r}"


# -- what a clean refusal looks like ------------------------------------------------------------------------
_LINE_COL = re.compile(r"line \d+, column \d+")


def names_field(message: str, field: str) -> bool:
    """Does a refusal name `field`? On a path line of the rendered error (the field or something inside it),
    or as a word of a message line. "line" means a syntax error's "line N, column M"."""
    if field == "line":
        return bool(_LINE_COL.search(message))
    word = re.compile(rf"(?<![\w.\[]){re.escape(field)}(?![\w])")
    for line in message.splitlines():
        if line.startswith("  ") and not line.startswith("    "):  # a path line: "  optimizer.lr"
            path = line.strip()
            if path == field or path.startswith((field + ".", field + "[")):
                return True
        elif word.search(line):
            return True
    return False


def clean_refusal(code: int | None, stderr: str, case: Case) -> str | None:
    """None when the CLI refused `case` cleanly (exit code 2, no traceback, names the field); else why not."""
    if code != 2:
        return f"exit code {code}, expected 2"
    if "Traceback" in stderr:
        return "printed a traceback"
    if not stderr.strip():
        return "printed no error"
    if not any(names_field(stderr, f) for f in case.fields):
        return f"does not name {' or '.join(case.fields)}"
    return None


# -- valid specs --------------------------------------------------------------------------------------------
def _floats(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False):
    return st.floats(lo, hi, exclude_min=open_lo, exclude_max=open_hi, allow_nan=False, allow_infinity=False)


_NAME_CHARS = string.ascii_letters + string.digits + "_.-"
names = st.builds(lambda a, b: a + b, st.sampled_from(string.ascii_letters + string.digits),
                  st.text(_NAME_CHARS, max_size=20))


@st.composite
def _optimizer(draw):
    name = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    opt = {"name": name, "lr": draw(_floats(1e-5, 1.0))}
    if name == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        opt["momentum"] = momentum
        if momentum > 0:
            opt["nesterov"] = draw(st.booleans())
    else:
        opt["betas"] = [draw(_floats(0, 0.99)), draw(_floats(0, 0.999))]
        opt["eps"] = draw(_floats(1e-10, 1e-6))
    return opt


@st.composite
def _schedule(draw):
    name = draw(st.sampled_from(["constant", "step", "cosine", "plateau"]))
    if name == "step":
        return {"name": name, "step_size": draw(st.integers(1, 5)), "gamma": draw(_floats(0.1, 1.0))}
    if name == "cosine":
        return {"name": name, "t_max": draw(st.none() | st.integers(1, 20)), "min_lr": draw(_floats(0, 1e-4))}
    if name == "plateau":
        return {"name": name, "factor": draw(_floats(0.1, 0.9)), "patience": draw(st.integers(0, 3)),
                "threshold": draw(_floats(0, 1e-2)), "min_lr": 0.0}
    return {"name": name}


_REGULARIZERS = {
    "l2": lambda draw: {"strength": draw(_floats(0, 1e-2)), "exclude_bias_and_1d": draw(st.booleans())},
    "decoupled_decay": lambda draw: {"weight_decay": draw(_floats(0, 0.1))},
    "dropout": lambda draw: {"p": draw(_floats(0, 0.5))},
    "grad_clip": lambda draw: {"mode": draw(st.sampled_from(["norm", "value"])), "max_norm": draw(_floats(0.1, 10)),
                               "on_nonfinite": draw(st.sampled_from(["skip", "fail"]))},
}

# Fields a sweep may vary, with a strategy for valid values (regularizer fields only when that plugin is listed).
_GRID_VALUES = {
    "optimizer.lr": _floats(1e-5, 1.0),
    "epochs": st.integers(1, 20),
    "data.batch_size": st.integers(4, 512),
    "data.split_seed": st.integers(0, 10**6),
    "model.activation": st.sampled_from(["relu", "gelu", "tanh"]),
}
_PLUGIN_GRID = {"l2": ("strength", _floats(0, 1e-2)), "decoupled_decay": ("weight_decay", _floats(0, 0.1)),
                "dropout": ("p", _floats(0, 0.5)), "grad_clip": ("max_norm", _floats(0.1, 10))}


@st.composite
def valid_specs(draw) -> dict:
    """A valid spec with a handful of jobs: random sections, regularizers and a small sweep."""
    spec: dict = {"name": draw(names), "optimizer": draw(_optimizer())}
    num_workers = draw(st.integers(1, 4))
    if draw(st.booleans()):
        spec["description"] = draw(st.text(max_size=40))
    if draw(st.booleans()):
        spec["model"] = {"hidden_sizes": draw(st.lists(st.integers(1, 64), min_size=1, max_size=3)),
                         "activation": draw(st.sampled_from(["relu", "gelu", "tanh"])),
                         "dtype": draw(st.sampled_from(["float32", "float64"]))}
    if draw(st.booleans()):
        spec["data"] = {"batch_size": draw(st.integers(num_workers, 512)), "val_size": draw(st.integers(1, 5000)),
                        "split_seed": draw(st.integers(0, 1000))}
        if draw(st.booleans()):
            spec["data"]["train_size"] = draw(st.integers(1, 1000))
    if draw(st.booleans()):
        spec["schedule"] = draw(_schedule())
    if draw(st.booleans()):
        spec["epochs"] = draw(st.integers(1, 20))
    if draw(st.booleans()):
        spec["seed"] = draw(st.integers(0, 1000))
    if draw(st.booleans()):
        spec["max_attempts"] = draw(st.integers(1, 100))
    regs = draw(st.lists(st.sampled_from(BUILTIN_PLUGINS), unique=True, max_size=3))
    spec["regularizers"] = [{"name": r, **_REGULARIZERS[r](draw)} for r in regs]
    if not regs and spec["optimizer"]["name"] != "sgd" and draw(st.booleans()):
        spec["optimizer"]["weight_decay"] = draw(_floats(0, 0.1))  # only without l2/decoupled_decay: decays twice
    spec["scaling"] = {"num_workers": num_workers, "use_gpu": draw(st.sampled_from(["auto", False, True])),
                       "cpus_per_worker": draw(st.sampled_from([0.5, 1, 2]))}
    if num_workers > 1 and spec.get("data", {}).get("batch_size", 64) < num_workers:
        spec["data"]["batch_size"] = num_workers
    sweep: dict = {}
    if draw(st.booleans()):
        sweep["seeds"] = draw(st.lists(st.integers(0, 100), min_size=1, max_size=3, unique=True))
    grid_paths = list(_GRID_VALUES) + [f"regularizers.{r}.{_PLUGIN_GRID[r][0]}" for r in regs]
    for path in draw(st.lists(st.sampled_from(grid_paths), unique=True, max_size=2)):
        values = _PLUGIN_GRID[path.split(".")[1]][1] if path.startswith("regularizers.") else _GRID_VALUES[path]
        sweep.setdefault("grid", {})[path] = draw(st.lists(values, min_size=1, max_size=3))
    if draw(st.booleans()):
        sweep["variants"] = [{"label": "plain", "set": {"regularizers": []}},
                             {"label": "l2", "set": {"regularizers": [{"name": "l2"}],
                                                     "optimizer.weight_decay": 0.0},
                              "grid": {"regularizers.l2.strength": [1e-4, 1e-3]}}]
        sweep.get("grid", {}).pop("regularizers.l2.strength", None)  # the l2 variant sets its own list
        for path in [p for p in sweep.get("grid", {}) if p.startswith("regularizers.")]:
            sweep["grid"].pop(path)  # the variants replace the regularizers these paths point into
    if sweep:
        spec["sweep"] = sweep
    return spec


# -- spec paths ---------------------------------------------------------------------------------------------
def put(spec: dict, path: str, value) -> None:
    """Set `a.b[0].c` in a spec dict, creating missing sections."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = spec
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key = int(part[1:-1]) if part.startswith("[") else part
        if last:
            node[key] = value
        else:
            if isinstance(key, str) and not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]


def _reg_index(spec: dict, name: str) -> int | None:
    return next((i for i, r in enumerate(spec.get("regularizers", [])) if r.get("name") == name), None)


# (path, kind, lo, hi, open_lo, open_hi) of the numbers a spec holds, from `l2cluster schema`.
def _numeric_fields(spec: dict) -> list[tuple]:
    fields = [("epochs", int, 1, 10000), ("seed", int, 0, MAX_SEED), ("max_attempts", int, 1, 100),
              *([("model.hidden_sizes[0]", int, 1, 65536)] if "model" in spec else []),
              ("data.batch_size", int, 1, 60000), ("data.val_size", int, 1, 59999),
              ("data.train_size", int, 1, 59999), ("data.split_seed", int, 0, MAX_SEED),
              ("optimizer.lr", float, 0, 10, True), ("optimizer.weight_decay", float, 0, 10),
              ("scaling.num_workers", int, 1, 1024), ("scaling.cpus_per_worker", float, 0, INF, True)]
    opt = spec["optimizer"]["name"]
    if opt == "sgd":
        fields.append(("optimizer.momentum", float, 0, 1, False, True))
    else:
        fields += [("optimizer.betas[0]", float, 0, 1, False, True), ("optimizer.betas[1]", float, 0, 1, False, True),
                   ("optimizer.eps", float, 0, INF, True)]
    sched = spec.get("schedule", {}).get("name", "constant")
    fields += {"step": [("schedule.step_size", int, 1, INF), ("schedule.gamma", float, 0, 1, True)],
               "cosine": [("schedule.t_max", int, 1, INF), ("schedule.min_lr", float, 0, INF)],
               "plateau": [("schedule.factor", float, 0, 1, True, True), ("schedule.patience", int, 0, INF),
                           ("schedule.threshold", float, 0, INF), ("schedule.min_lr", float, 0, INF)],
               "constant": []}[sched]
    plugin_fields = {"l2": [("strength", float, 0, 10)], "decoupled_decay": [("weight_decay", float, 0, 100)],
                     "dropout": [("p", float, 0, 1, False, True)],
                     "grad_clip": [("max_norm", float, 0, INF, True), ("max_value", float, 0, INF, True)]}
    for i, r in enumerate(spec.get("regularizers", [])):
        fields += [(f"regularizers[{i}].{f[0]}", *f[1:]) for f in plugin_fields[r["name"]]]
    return [(f + (False, False))[:6] for f in fields]


# Strings pydantic would read as a number or a boolean are valid input, so they are never used as "wrong".
_WORDS = st.sampled_from(["ten", "lots", "none at all", "", " ", "1.5x", "0x10", "½", "maybe", "sometimes", "NaNa"])
_CONTAINERS = st.sampled_from([[1], [], {"a": 1}, {}, [[0.1]]])


@st.composite
def _out_of_range(draw, kind, lo, hi, open_lo, open_hi):
    options = []
    if lo != -INF:
        below = lo if open_lo else (lo - 1 if kind is int else math.nextafter(lo, -INF))
        options.append(st.just(below) if kind is float else st.integers(max_value=int(below)).filter(
            lambda v: v > -(10**30)))
        if kind is float:
            options.append(_floats(-1e6, lo, open_hi=not open_lo) if lo > -1e6 else st.just(lo))
    if hi != INF:
        above = hi if open_hi else (hi + 1 if kind is int else math.nextafter(hi, INF))
        if kind is int:
            options.append(st.integers(min_value=int(above), max_value=max(int(above), 10**25)))
        else:
            options.append(st.just(above))
            options.append(_floats(hi, max(hi * 10, 1e6), open_lo=not open_hi))
    if kind is float:
        options.append(st.sampled_from([NAN, INF, -INF]) if hi != INF else st.sampled_from([NAN, -INF]))
    return draw(st.one_of(options))


# -- the faults ---------------------------------------------------------------------------------------------
@st.composite
def _fault_out_of_range(draw, spec):
    path, kind, lo, hi, open_lo, open_hi = draw(st.sampled_from(_numeric_fields(spec)))
    value = draw(_out_of_range(kind, lo, hi, open_lo, open_hi))
    if path.startswith("data.train_size"):
        spec.setdefault("data", {})["val_size"] = 100  # train_size + val_size ≤ 60000 is a separate rule
    if path == "scaling.num_workers" and isinstance(value, int) and value > 1024:
        spec.setdefault("data", {})["batch_size"] = 60000
    put(spec, path, value)
    return spec, (path,)


@st.composite
def _fault_wrong_type(draw, spec):
    numeric = [(f[0], f[1]) for f in _numeric_fields(spec)]
    choices = numeric + [("name", str), ("description", str), ("model.activation", "enum"), ("model.dtype", "enum"),
                         ("model.hidden_sizes", list), ("regularizers", list), ("sweep.seeds", list),
                         ("sweep.grid", dict), ("sweep.variants", list), ("scaling.use_gpu", bool),
                         ("optimizer.name", "enum"), ("model", dict), ("data", dict), ("optimizer", dict),
                         ("schedule", dict), ("scaling", dict), ("sweep", dict)]
    if spec["optimizer"]["name"] == "sgd":
        choices.append(("optimizer.nesterov", bool))
    if spec["optimizer"]["name"] == "sgd" and spec["optimizer"].get("momentum", 0) == 0:
        choices.remove(("optimizer.nesterov", bool))
    for i, r in enumerate(spec["regularizers"]):
        choices.append((f"regularizers[{i}]", dict))
        if r["name"] in ("l2", "decoupled_decay"):
            choices.append((f"regularizers[{i}].exclude_bias_and_1d", bool))
        if r["name"] == "grad_clip":
            choices.append((f"regularizers[{i}].mode", "enum"))
    path, kind = draw(st.sampled_from(choices))
    nothing = st.nothing() if path in ("data.train_size", "schedule.t_max") else st.just(None)  # may be null
    if kind is int:
        value = draw(_WORDS | _CONTAINERS | st.booleans() | nothing | st.sampled_from([2.5, -0.5, 1e-3]))
    elif kind is float:
        value = draw(_WORDS | _CONTAINERS | st.booleans() | nothing)
    elif kind is str:
        value = draw(st.integers() | st.floats(allow_nan=False) | _CONTAINERS | st.booleans() | st.just(None))
    elif kind == "enum":
        value = draw(_WORDS | st.integers() | _CONTAINERS | st.sampled_from(["RELU", "adam ", "Float32"]))
    elif kind is bool:
        value = draw(st.sampled_from(["maybe", "sometimes", "2", "auto-ish", ""]) | st.integers(2, 100)
                     | _CONTAINERS | st.just(None))
    elif kind is list:
        value = draw(_WORDS | st.integers() | st.sampled_from([{"a": 1}, {}]) | st.booleans())
    else:  # dict
        value = draw(_WORDS | st.integers() | st.sampled_from([[1], [], ["adam"]]) | st.booleans())
    if path == "optimizer.name":
        spec["optimizer"] = {"name": value}
        return spec, ("optimizer",)
    if path == "scaling.use_gpu" and value in (None,):
        value = "maybe"
    if path in ("model.hidden_sizes", "sweep.seeds", "sweep.variants", "regularizers") and value in ([], {}):
        value = "x"
    put(spec, path, value)
    return spec, (path,)


_KNOWN = {
    "": {"name", "description", "model", "data", "optimizer", "schedule", "epochs", "seed", "regularizers",
         "scaling", "sweep", "max_attempts"},
    "model": {"hidden_sizes", "activation", "dtype"},
    "data": {"batch_size", "val_size", "train_size", "split_seed"},
    "optimizer": {"name", "lr", "weight_decay", "momentum", "nesterov", "betas", "eps"},
    "schedule": {"name", "step_size", "gamma", "t_max", "min_lr", "factor", "patience", "threshold"},
    "scaling": {"num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker"},
    "sweep": {"seeds", "grid", "variants"},
    "regularizers": {"name", "strength", "exclude_bias_and_1d", "weight_decay", "p", "mode", "max_norm",
                     "norm_type", "max_value", "on_nonfinite"},
    "variant": {"label", "set", "grid"},
}
_field_names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True) | st.sampled_from(
    ["Name", "optimiser", "learning_rate", "hidden", "plugin_dir", "data_dir", "path", "import", "__class__",
     "strenght", "weight-decay", "epoch"])


@st.composite
def _fault_unknown_field(draw, spec):
    sections = ["", "model", "data", "optimizer", "schedule", "scaling", "sweep"]
    sections += [f"regularizers[{i}]" for i in range(len(spec["regularizers"]))]
    if spec.get("sweep", {}).get("variants"):
        sections.append("sweep.variants[0]")
    section = draw(st.sampled_from(sections))
    known = _KNOWN["regularizers" if section.startswith("regularizers") else
                   "variant" if section.startswith("sweep.variants") else section]
    key = draw(_field_names.filter(lambda k: k not in known))
    value = draw(st.integers(0, 9) | _WORDS | st.just(None))
    path = f"{section}.{key}" if section else key
    if section in ("schedule",) and "schedule" not in spec:
        spec["schedule"] = {"name": "constant"}
    if section == "sweep" and "sweep" not in spec:
        spec["sweep"] = {}
    put(spec, path, value)
    return spec, (path,)


_HOSTILE_PLUGINS = ["../../etc", "../../etc/passwd", "/etc/passwd", "os.system", "os", "subprocess.run",
                    "l2cluster.plugins.l2", "plugins/l2.py", "l2.py", "__import__('os')", "l2; rm -rf /", "L2",
                    "l2 ", " l2", "l1", "l3", "dropout2", "grad-clip", "", "\x00", "http://x/p.py", "~/.ssh/id_rsa"]


@st.composite
def _fault_unknown_plugin(draw, spec):
    name = draw(st.sampled_from(_HOSTILE_PLUGINS) | st.text(max_size=12).filter(lambda s: s not in BUILTIN_PLUGINS))
    entry = draw(st.sampled_from([{"name": name}, {"name": name, "strength": 0.1}, {"strength": 0.1}, {}]))
    if isinstance(entry, dict) and "name" not in entry and not entry:
        entry = {"p": 0.1}
    index = draw(st.integers(0, len(spec["regularizers"])))
    spec["regularizers"].insert(index, entry)
    return spec, (f"regularizers[{index}]",)


_BAD_SYNTAX_PATHS = ["", ".", "..", "a..b", ".lr", "optimizer.", "optimizer lr", "optimizer/lr", "../etc",
                     "regularizers.².strength", "optimizer.lr\n", "optimizer[0]", "optimizer.lr ", "ёпт.lr",
                     "regularizers.-1.strength", "$(reboot)"]


def _sweep_path_faults(spec: dict) -> list[tuple[str, str | None]]:
    """(grid path, the field path the error is reported at if not the sweep entry itself)."""
    n = len(spec["regularizers"])
    missing = [r for r in BUILTIN_PLUGINS if _reg_index(spec, r) is None]
    out = [("seed", None), ("name", None), ("description", None), ("sweep", None), ("sweep.seeds", None),
           ("nonexistent.lr", None), ("optimizer.lr.value", None), ("epochs.x", None),
           (f"regularizers.{n}.strength", None), ("regularizers.99.p", None), ("model.hidden_sizes.5", None),
           ("optimizer.learning_rate", "optimizer.learning_rate"), ("model.width", "model.width"),
           ("learning_rate", "learning_rate"), ("data.size", "data.size")]
    out += [(f"regularizers.{m}.strength", None) for m in missing]
    return out


@st.composite
def _fault_sweep_path(draw, spec):
    sweep = spec.setdefault("sweep", {})
    where = draw(st.sampled_from(["grid", "variant set", "variant grid"]))
    syntax = draw(st.booleans())
    if syntax:
        path, reported = draw(st.sampled_from(_BAD_SYNTAX_PATHS)), None
    else:
        path, reported = draw(st.sampled_from(_sweep_path_faults(spec)))
    value = draw(st.sampled_from([0.01, 1, "x"]))
    if where == "grid":
        sweep.setdefault("grid", {})[path] = [value]
        section = "sweep.grid"
    else:
        sweep["variants"] = [{"label": "v", **({"set": {path: value}} if where == "variant set"
                                               else {"grid": {path: [value]}})}]
        section = "sweep.variants[0].set" if where == "variant set" else "sweep.variants[0].grid"
    if syntax:
        return spec, (section,)
    fields = (f"{section}.{path}",) + ((reported,) if reported else ())
    return spec, fields


@st.composite
def _fault_empty_grid(draw, spec):
    sweep = spec.setdefault("sweep", {})
    path = draw(st.sampled_from(["optimizer.lr", "epochs", "data.batch_size"]))
    if draw(st.booleans()):
        sweep.setdefault("grid", {})[path] = []
        return spec, (f"sweep.grid.{path}",)
    sweep["variants"] = [{"label": "a"}, {"label": "b", "grid": {path: []}}]
    return spec, (f"sweep.variants[1].grid.{path}",)


@st.composite
def _fault_bad_grid_value(draw, spec):
    """A valid sweep path with one value out of range: reported at the field, with the grid setting."""
    options = [("optimizer.lr", "optimizer.lr", st.sampled_from([0.0, -1.0, 11.0, NAN, INF, "fast"])),
               ("epochs", "epochs", st.sampled_from([0, -3, 10001, 2.5, "ten", True])),
               ("data.batch_size", "data.batch_size", st.sampled_from([0, 60001, "big", None, [64]])),
               ("model.activation", "model.activation", st.sampled_from(["swish", 1, None])),
               ("model.hidden_sizes", "model.hidden_sizes", st.sampled_from([[], [0], [-5], "wide", [True]]))]
    for r in spec["regularizers"]:
        i = _reg_index(spec, r["name"])
        field, bad = {"l2": ("strength", [-1.0, 11.0, NAN]), "decoupled_decay": ("weight_decay", [-0.1, 101.0]),
                      "dropout": ("p", [1.0, -0.1, 2.0]), "grad_clip": ("max_norm", [0.0, -1.0])}[r["name"]]
        options.append((f"regularizers.{r['name']}.{field}", f"regularizers[{i}].{field}", st.sampled_from(bad)))
    path, reported, values = draw(st.sampled_from(options))
    bad = draw(values)
    spec.setdefault("sweep", {}).pop("variants", None)
    grid = spec["sweep"].setdefault("grid", {})
    grid.pop(path, None)
    good = {"optimizer.lr": 0.01, "epochs": 2, "data.batch_size": 32, "model.activation": "relu",
            "model.hidden_sizes": [8]}.get(path, 0.01 if "grad_clip" not in path else 1.0)
    grid[path] = draw(st.permutations([good, bad]))
    if path == "data.batch_size":
        spec["scaling"]["num_workers"] = 1
    return spec, (reported,)


@st.composite
def _fault_too_many_jobs(draw, spec):
    """Valid values whose product (× seeds) exceeds the cap: the default 10,000 or a small --max-jobs."""
    cap = draw(st.sampled_from([None, None, 1]) | st.integers(1, 500))
    limit = DEFAULT_MAX_JOBS if cap is None else cap
    sweep = spec.setdefault("sweep", {})
    sweep.pop("variants", None)
    seeds = sweep.get("seeds") or [0]
    lists = {
        "optimizer.lr": [round(1e-4 * (i + 1), 6) for i in range(draw(st.integers(2, 30)))],
        "epochs": list(range(1, draw(st.integers(2, 30)) + 1)),
        "data.split_seed": list(range(draw(st.integers(2, 40)))),
        "model.activation": ["relu", "gelu", "tanh"],
    }
    sweep["grid"] = dict(lists)
    total = math.prod(len(v) for v in lists.values()) * len(seeds)
    while total <= limit:  # grow the split seeds until the sweep is over the cap
        extra = limit // (total // len(lists["data.split_seed"])) + 1
        lists["data.split_seed"] = list(range(extra))
        sweep["grid"] = dict(lists)
        total = math.prod(len(v) for v in lists.values()) * len(seeds)
    if draw(st.booleans()):
        spec["sweep"]["variants"] = [{"label": "a"}, {"label": "b", "set": {"epochs": 1}}]  # twice the jobs
    return spec, ("sweep",), cap


_BAD_NAMES = ["", ".hidden", "..", "-rf", "a/b", "../../etc", "/etc/passwd", "a b", "x" * 65, "naïve", "a\nb",
              "a\\b", "con:", "ab$", "~root", "name\x00", "exp*", "a\tb", "_" + "\u202e", "über"]


@st.composite
def _fault_bad_name(draw, spec):
    spec["name"] = draw(st.sampled_from(_BAD_NAMES) | st.text(min_size=1, max_size=70).filter(
        lambda s: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", s)))
    return spec, ("name",)


@st.composite
def _fault_cross_field(draw, spec):
    rule = draw(st.sampled_from(["decay_twice", "too_much_data", "batch_vs_workers", "nesterov", "dup_reg",
                                 "dup_seed", "dup_label", "fractional_gpus", "gpus_whole", "bad_label",
                                 "norm_type_inf"]))
    if rule == "decay_twice":
        spec["optimizer"] = {"name": "adamw", "lr": 1e-3, "weight_decay": draw(_floats(1e-4, 1))}
        if _reg_index(spec, "l2") is None and _reg_index(spec, "decoupled_decay") is None:
            spec["regularizers"].append({"name": draw(st.sampled_from(["l2", "decoupled_decay"]))})
        return spec, ("optimizer.weight_decay",)
    if rule == "too_much_data":
        spec["data"] = {"train_size": draw(st.integers(55001, 59999)), "val_size": 5000}
        return spec, ("data.train_size",)
    if rule == "batch_vs_workers":
        workers = draw(st.integers(2, 64))
        spec["scaling"] = {"num_workers": workers}
        spec["data"] = {"batch_size": draw(st.integers(1, workers - 1))}
        return spec, ("data.batch_size",)
    if rule == "nesterov":
        spec["optimizer"] = {"name": "sgd", "nesterov": True}
        return spec, ("optimizer",)
    if rule == "dup_reg":
        name = draw(st.sampled_from(BUILTIN_PLUGINS))
        spec["regularizers"] = [r for r in spec["regularizers"] if r["name"] != name] + [{"name": name}] * 2
        spec["optimizer"]["weight_decay"] = 0.0
        return spec, ("regularizers",)
    if rule == "dup_seed":
        seed = draw(st.integers(0, 100))
        spec.setdefault("sweep", {})["seeds"] = [seed, seed + 1, seed]
        return spec, ("sweep.seeds",)
    if rule == "dup_label":
        spec.setdefault("sweep", {})["variants"] = [{"label": "same"}, {"label": "same"}]
        return spec, ("sweep.variants",)
    if rule == "bad_label":
        label = draw(st.sampled_from(["", "-x", "a/b", "a b", "../x", "x" * 65, ".x"]))
        spec.setdefault("sweep", {})["variants"] = [{"label": label}]
        return spec, ("sweep.variants[0].label",)
    if rule == "fractional_gpus":
        spec["scaling"] = {"num_workers": 2, "gpus_per_worker": draw(_floats(0.01, 0.99))}
        spec.setdefault("data", {})["batch_size"] = 64
        return spec, ("scaling",)
    if rule == "gpus_whole":
        spec["scaling"] = {"num_workers": 1, "gpus_per_worker": draw(st.sampled_from([1.5, 2.25, 3.7]))}
        return spec, ("scaling",)
    spec["regularizers"] = [r for r in spec["regularizers"] if r["name"] != "grad_clip"]
    spec["regularizers"].append({"name": "grad_clip", "norm_type": INF})
    return spec, (f"regularizers[{len(spec['regularizers']) - 1}]",)


@st.composite
def _fault_not_plain_data(draw, spec):
    """Values YAML can express but a spec cannot hold: sets, binary, dates, pairs, non-text keys."""
    value = draw(st.sampled_from([{1, 2}, b"\x00\x01", datetime.date(2024, 1, 1),
                                  datetime.datetime(2024, 1, 1, 12, 0)]))
    path = draw(st.sampled_from(["description", "optimizer.lr", "model.hidden_sizes", "sweep.seeds"]))
    if draw(st.booleans()):
        section = draw(st.sampled_from(["", "optimizer", "sweep"]))
        target = spec if not section else spec.setdefault(section, {})
        key = draw(st.sampled_from([1, 2.5, None, True]))
        target[key] = "x"
        return spec, (section or "(top level)",)
    put(spec, path, value)
    return spec, (path,)


@st.composite
def _fault_not_a_mapping(draw, spec):
    return draw(st.sampled_from([[], [spec], "name: x", 42, None, [["a", 1]]])), ("(top level)",)


_DATA_FAULTS = {
    "out_of_range": _fault_out_of_range, "wrong_type": _fault_wrong_type, "unknown_field": _fault_unknown_field,
    "unknown_plugin": _fault_unknown_plugin, "bad_sweep_path": _fault_sweep_path, "empty_grid": _fault_empty_grid,
    "bad_grid_value": _fault_bad_grid_value, "too_many_jobs": _fault_too_many_jobs, "bad_name": _fault_bad_name,
    "cross_field": _fault_cross_field, "not_plain_data": _fault_not_plain_data,
    "not_a_mapping": _fault_not_a_mapping,
}


def _json_safe(data) -> bool:
    """Can JSON hold `data` as it is (json.dumps would silently turn a key 1 into "1")?"""
    if isinstance(data, dict):
        return all(isinstance(k, str) and _json_safe(v) for k, v in data.items())
    if isinstance(data, list):
        return all(_json_safe(v) for v in data)
    return data is None or isinstance(data, (str, int, float, bool))


def _dump(data, as_json: bool) -> tuple[bytes, str]:
    if as_json:
        return json.dumps(data, indent=1).encode(), ".json"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode(), ".yaml"


@st.composite
def broken_data_specs(draw):
    """A valid spec broken in its data: the Case carries both the file and the data."""
    kind = draw(st.sampled_from(sorted(_DATA_FAULTS)))
    spec = copy.deepcopy(draw(valid_specs()))
    out = draw(_DATA_FAULTS[kind](spec))
    data, fields = out[0], out[1]
    cap = out[2] if len(out) > 2 else None
    as_json = _json_safe(data) and draw(st.integers(0, 3)) == 0
    content, suffix = _dump(data, as_json)
    return Case(kind, content, suffix, fields, cap, data)


_YAML_BREAKERS = [
    "oops: [1, 2", "oops: {a: 1", 'oops: "unterminated', "oops: a: b", "\toops: 1", "oops: *nowhere",
    "oops: @at", "oops: `tick", "oops: !!python/object/apply:os.system ['true']",
    "oops: !!python/name:os.system", "oops: !!python/module:os", "oops: !custom 1", "oops: !!float fast",
    "name: twice", "oops: %", "oops: [1, 2]]", "? [a, b]\n: 1",
]


@st.composite
def broken_yaml_files(draw):
    """A valid spec's YAML with one broken line put between its top-level keys (or a broken file as a whole)."""
    spec = draw(valid_specs())
    lines = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).splitlines()
    kind = draw(st.sampled_from(["line", "line", "line", "deep", "long_int", "control_char", "not_utf8"]))
    if kind == "deep":
        depth = draw(st.integers(33, 100_000))
        return Case("yaml_too_deep", ("oops: " + "[" * depth + "]" * depth + "\n" + "\n".join(lines)).encode(),
                    ".yaml", ("nested",))
    if kind == "long_int":
        return Case("yaml_long_int", ("\n".join(lines) + "\noops: " + "9" * draw(st.integers(4301, 9000))).encode(),
                    ".yaml", ("line",))
    if kind == "control_char":
        char = draw(st.sampled_from(["\x00", "\x07", "\x1b", "\ufffe"]))
        return Case("yaml_control_char", ("\n".join(lines) + f"\noops: a{char}b\n").encode(), ".yaml",
                    ("unacceptable character", "special characters are not allowed", "line"))
    if kind == "not_utf8":
        bad = draw(st.sampled_from([b"\xff\xfe\xfa", b"\xc3\x28", b"caf\xe9"]))
        return Case("yaml_not_utf8", "\n".join(lines).encode() + b"\ndescription: " + bad + b"\n", ".yaml",
                    ("not UTF-8",))
    top = [i for i, line in enumerate(lines) if line and not line[0].isspace() and not line.startswith("-")]
    at = draw(st.sampled_from(top + [len(lines)]))
    breaker = draw(st.sampled_from(_YAML_BREAKERS))
    lines.insert(at, breaker)
    return Case("yaml_syntax", ("\n".join(lines) + "\n").encode(), ".yaml", ("line",))


@st.composite
def broken_json_files(draw):
    spec = draw(valid_specs())
    text = json.dumps(spec, indent=1)
    how = draw(st.sampled_from(["truncate", "trailing_comma", "single_quotes", "garbage", "duplicate",
                                "unquoted_key", "comment"]))
    if how == "truncate":
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif how == "trailing_comma":
        text = text[:-2] + ",\n}"
    elif how == "single_quotes":
        text = text.replace('"name"', "'name'", 1)
    elif how == "garbage":
        text += draw(st.sampled_from(["x", "}", "[]", "\n{}"]))
    elif how == "duplicate":
        text = text[:-2] + ',\n "name": "again"\n}'
        return Case("json_duplicate_key", text.encode(), ".json", ("name",))
    elif how == "unquoted_key":
        text = text.replace('"optimizer"', "optimizer", 1)
    else:
        text = "// a comment\n" + text
    return Case(f"json_{how}", text.encode(), ".json", ("line",))


def invalid_specs():
    """Every kind of broken spec: mostly broken data, some broken YAML and JSON files."""
    return st.one_of(broken_data_specs(), broken_data_specs(), broken_data_specs(), broken_data_specs(),
                     broken_yaml_files(), broken_json_files())


def validate_in_process(case: Case, directory) -> tuple[int | None, str]:
    """Write `case` to a file in `directory` and run `l2cluster validate` on it in this process, as a user would
    from a shell (the CLI entry point is the only part of l2cluster this module touches); (exit code, stderr).
    An exception that escapes the CLI is what a user would see as a traceback."""
    import contextlib
    import io
    import traceback
    from pathlib import Path

    from l2cluster.cli import main

    path = Path(directory) / f"spec{case.suffix}"
    path.write_bytes(case.content)
    args = ["validate", str(path)] + (["--max-jobs", str(case.max_jobs)] if case.max_jobs is not None else [])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
        except Exception:
            code = 1
            err.write(traceback.format_exc())
    return code, err.getvalue()
