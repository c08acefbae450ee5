"""Read an optimised XLA:GPU HLO module's text: its kernels, what each one is, where it comes from in the source.

Used by scripts/aot_gpu.py on programs compiled ahead of time for a GPU target. A "kernel" is an
instruction of a computation that XLA:GPU launches as its own kernel (a fusion, a custom call such
as a cuBLAS GEMM or the cuDNN attention, a copy or transpose, a dynamic slice or update, ...);
parameters, tuples, get-tuple-element, bitcasts and constants are free. For each kernel:

- `kind`: gemm (a Triton GEMM fusion or a cuBLAS custom call), attention (cuDNN fMHA), pallas (a Pallas
  kernel, `__gpu$xla.gpu.triton`: opaque to the reader, 0 FLOPs, bytes = operands + result), elementwise
  (kLoop fusion), reduction (kInput fusion or a Triton reduction fusion), layout (copy / transpose, or
  a loop fusion whose root is one), slice (dynamic-slice / -update-slice: the scan's per-layer
  reads and writes), other;
- `flops` (matrix products only: 2 x output elements x contracted size; attention 4 x B x H x T x S x D)
  and `bytes` (operands + result as the kernel's signature shows them);
- `sources`: the lens_jax source lines of the ops fused into it (HLO metadata stack frames).

`roofline_ms` turns (flops, bytes) into a lower bound of the kernel's time on a device with a given
peak (max of compute time and memory time); a real run is slower, never faster.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "f4e2m1fn": 0.5,
               "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
FREE_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
            "replica-id", "opt-barrier", "add-dependency"}
# One instruction line: "%name = <shape> <opcode>(<operands>), attrs". Shapes may be tuples "(a, b)".
INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|[\w\[\]{},:.\s]+?)\s+([a-z][a-z0-9\-]*)\((.*)$")
ARRAY_RE = re.compile(r"(pred|[sufb]f?\d+(?:e\d+m\d+(?:fn)?)?|bf16|f8e4m3fn|f8e5m2|f4e2m1fn)\[([\d,]*)\]")
MODEL_FILES = ("models/transformer.py", "models/text_encoder.py", "models/vae")
COMP_RE = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string (tuples summed)."""
    total = 0.0
    for dtype, dims in ARRAY_RE.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def dims_of(shape: str) -> list[int]:
    m = ARRAY_RE.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclass
class Instr:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes, as text

    @property
    def operands(self) -> list[str]:
        depth, out, cur = 0, [], []
        for ch in self.rest:
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    break
                depth -= 1
            cur.append(ch)
        return re.findall(r"%([\w.\-]+)", "".join(cur))

    def attr(self, key: str) -> str | None:
        m = re.search(key + r"=([%\w.\-\"$]+)", self.rest)
        return m.group(1).strip('"') if m else None

    @property
    def frame(self) -> int | None:
        m = re.search(r"stack_frame_id=(\d+)", self.rest)
        return int(m.group(1)) if m else None


@dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str
    frames: dict[int, tuple[int, int]]  # stack frame id -> (file location id, parent frame id)
    locations: dict[int, tuple[str, str, int]]  # file location id -> (file, function, line)

    def source(self, frame: int | None, keep: str = "lens_jax/") -> list[str]:
        """The frames of a stack, innermost first, in files under `keep`: 'file.py:line function'."""
        out, seen = [], set()
        while frame and frame in self.frames and frame not in seen:
            seen.add(frame)
            loc, parent = self.frames[frame]
            if loc in self.locations:
                path, fn, line = self.locations[loc]
                if keep in path:
                    out.append(f"{path.split(keep, 1)[1]}:{line} {fn}")
            frame = parent - 1  # a parent_frame_id is one more than its frame's listed id (XLA as of jax 0.10.2)
        return out


def parse(text: str) -> Module:
    """An HLO module's text (`compiled.as_text()`) -> computations, entry name, stack frames."""
    comps: dict[str, list[Instr]] = {}
    entry, cur = "", None
    files: dict[int, str] = {}
    funcs: dict[int, str] = {}
    locations: dict[int, tuple[str, str, int]] = {}
    frames: dict[int, tuple[int, int]] = {}
    section = None
    for line in text.splitlines():
        if cur is not None:
            if line.startswith("}"):
                cur = None
                continue
            m = INSTR_RE.match(line)
            if m:
                comps[cur].append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
            continue
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        m = COMP_RE.match(line)
        if m and not line.startswith("HloModule"):
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            section = None
            continue
        if section and line.strip():
            idx, _, body = line.strip().partition(" ")
            if not idx.isdigit():
                continue
            i = int(idx)
            if section == "FileNames":
                files[i] = body.strip('"')
            elif section == "FunctionNames":
                funcs[i] = body.strip('"')
            elif section == "FileLocations":
                f = re.search(r"file_name_id=(\d+)", body)
                fn = re.search(r"function_name_id=(\d+)", body)
                ln = re.search(r"\bline=(\d+)", body)
                locations[i] = (files.get(int(f.group(1)), "?") if f else "?",
                                funcs.get(int(fn.group(1)), "?") if fn else "?", int(ln.group(1)) if ln else 0)
            elif section == "StackFrames":
                loc = re.search(r"file_location_id=(\d+)", body)
                par = re.search(r"parent_frame_id=(\d+)", body)
                frames[i] = (int(loc.group(1)) if loc else 0, int(par.group(1)) if par else 0)
    return Module(comps, entry, frames, locations)


@dataclass
class Kernel:
    name: str
    kind: str
    flops: float
    bytes: float
    out_shape: str
    sources: list[str] = field(default_factory=list)
    ops: collections.Counter = field(default_factory=collections.Counter)  # opcodes fused inside
    count: int = 1  # launches per run of the computation it was listed for (nested loops)

    def roofline_ms(self, peak_flops: float, bandwidth: float) -> float:
        return 1e3 * max(self.flops / peak_flops, self.bytes / bandwidth)


def _dot_flops(ins: Instr, shapes: dict[str, str]) -> float:
    ops = ins.operands
    if not ops or ops[0] not in shapes:
        return 0.0
    lhs = dims_of(shapes[ops[0]])
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    if m is None:  # a cuBLAS custom call keeps its dimension numbers in the backend config
        m = re.search(r'"lhs_contracting_dimensions":\[([\d",]*)\]', ins.rest)
    k = 1
    for d in (m.group(1).replace('"', "").split(",") if m else []):
        if d:
            k *= lhs[int(d)]
    n = 1
    for d in dims_of(ins.shape):
        n *= d
    return 2.0 * n * k


def _read_fractions(body: list[Instr]) -> dict[str, float]:
    """Per instruction of a fused computation, the fraction of its result the kernel reads.

    The root is read whole; a value used through a `slice` / `dynamic-slice` is read in the slices'
    share (summed over slices, at most 1); through any other op (elementwise, bitcast, concatenate,
    broadcast, reduce, ...) in the share its user reads (the largest over such users). So a GEMM
    output reached through `bitcast -> add bias -> concatenate -> slice(q)` counts as its q third:
    XLA's fused kernels index only the elements they use."""
    shapes = {i.name: i.shape for i in body}
    users: dict[str, list[Instr]] = collections.defaultdict(list)
    for i in body:
        for o in i.operands:
            users[o].append(i)
    frac: dict[str, float] = {}
    for i in reversed(body):  # users come after their operands in a computation's text
        if i is body[-1] or i.name not in users:
            frac[i.name] = 1.0
            continue
        sliced, other = 0.0, 0.0
        for u in users[i.name]:
            through = frac.get(u.name, 1.0)
            size = shape_bytes(shapes.get(i.name, ""))
            if u.op in ("slice", "dynamic-slice") and u.operands and u.operands[0] == i.name and size:
                sliced += through * shape_bytes(u.shape) / size
            else:
                other = max(other, through)
        frac[i.name] = min(1.0, sliced + other)
    return frac


def _operand_bytes(ins: Instr, body: list[Instr], shapes: dict[str, str]) -> float:
    """Bytes a kernel reads: each operand's size times the share of it the fused computation reads
    (`_read_fractions`: the scan's per-layer dynamic-slice of a stacked weight, a q/k/v slice of a
    fused qkv GEMM output, ...)."""
    params = {}
    for i in body:
        if i.op == "parameter":
            m = re.match(r"\s*(\d+)\)", i.rest)
            if m:
                params[int(m.group(1))] = i.name
    frac = _read_fractions(body) if body else {}
    total = 0.0
    for idx, operand in enumerate(ins.operands):
        total += shape_bytes(shapes.get(operand, "")) * frac.get(params.get(idx, ""), 1.0)
    return total


def _called(ins: Instr) -> str | None:
    return ins.attr("calls") and ins.attr("calls").lstrip("%")


def classify(module: Module, ins: Instr, shapes: dict[str, str]) -> Kernel:
    """One kernel-launching instruction of a computation -> Kernel."""
    body = module.computations.get(_called(ins) or "", [])
    inner = {i.name: i.shape for i in body}
    ops = collections.Counter(i.op for i in body if i.op not in FREE_OPS)
    nbytes = shape_bytes(ins.shape) + _operand_bytes(ins, body, shapes)
    if body and body[-1].op == "dynamic-update-slice":  # in place: reads and writes the update, not the buffer
        buffer = shape_bytes(body[-1].shape)
        update = shape_bytes(inner.get(body[-1].operands[1], "")) if len(body[-1].operands) > 1 else 0.0
        nbytes = max(nbytes - 2 * buffer, 0.0) + 2 * update
    flops = sum(_dot_flops(i, inner) for i in body if i.op == "dot")
    target = ins.attr("custom_call_target") or ""
    kind = "other"
    if ins.op == "custom-call" and "fmha" in target:
        kind = "attention"
        q = dims_of(shapes.get(ins.operands[0], ""))
        k = dims_of(shapes.get(ins.operands[1], ""))
        if len(q) == 4 and len(k) == 4:  # [B, T, H, D], [B, S, H, D]
            flops = 4.0 * q[0] * q[1] * q[2] * q[3] * k[1]
        nbytes = shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands[:3])
    elif ins.op == "custom-call" and target == "__gpu$xla.gpu.triton":
        kind = "pallas"
    elif ins.op == "custom-call" and ("gemm" in target or "matmul" in target):
        kind = "gemm"
        flops = _dot_flops(ins, shapes)  # the result is the tuple's first array (then the workspace)
    elif ins.op == "fusion":
        fkind = ins.attr("kind")
        backend = re.search(r'"kind":"([^"]+)"', ins.rest)
        backend = backend.group(1) if backend else ""
        root = body[-1].op if body else ""
        if "gemm" in backend or "dot" in ops:
            kind = "gemm"
        elif "dynamic-slice" in ops and set(ops) <= {"dynamic-slice", "copy", "slice"}:
            kind = "weight slice"
        elif backend.startswith("__triton") or fkind == "kInput":
            kind = "reduction"
        elif root in ("copy", "transpose") or set(ops) <= {"copy", "transpose"}:
            kind = "layout"
        elif set(ops) <= {"dynamic-slice", "dynamic-update-slice", "slice", "concatenate"} and ops:
            kind = "slice"
        elif fkind == "kLoop":
            kind = "elementwise"
    elif ins.op in ("dot", "convolution"):
        kind = "gemm"
        flops = _dot_flops(ins, shapes)
    elif ins.op in ("copy", "transpose"):
        kind = "layout"
    elif ins.op in ("dynamic-slice", "dynamic-update-slice", "slice"):
        kind = "slice"
    elif ins.op in ("copy-start", "copy-done", "dynamic-slice-start", "async-start", "async-done"):
        kind = "host transfer"
    frames = [i.frame for i in body] + [ins.frame]
    sources: list[str] = []
    for f in frames:
        src = module.source(f)
        if src:
            # the innermost model frame (transformer.py / text_encoder.py), then the innermost lens_jax helper
            model = next((s for s in src if s.startswith(MODEL_FILES)), None)
            tag = model or src[0]
            if model and src[0] != model:
                tag = f"{model} ({src[0]})"
            if tag not in sources:
                sources.append(tag)
    loop = [t for t in sources if "scan_layers" in t]  # the layer loop's own frame: only when nothing else
    sources = [t for t in sources if "scan_layers" not in t] or loop
    return Kernel(ins.name, kind, flops, nbytes, ins.shape, sources, ops)


def kernels(module: Module, computation: str, peak: float = 989e12, bandwidth: float = 3.35e12,
            skip: str | None = None) -> list[Kernel]:
    """The kernels one run of a computation launches, in schedule order (free instructions dropped).

    Nested control flow is expanded: a while loop's body kernels repeat `trip_count` times (listed
    once with `count` set; 1 when XLA does not know the count), a call's kernels are listed, and of a
    conditional's branches the costliest one by roofline (`peak`, `bandwidth`) is listed. The loop whose
    body is `skip` is left out (a layer loop reported on its own).
    """
    body = module.computations[computation]
    shapes = {i.name: i.shape for i in body}
    out: list[Kernel] = []
    for i in body:
        if i.op == "while":
            name = (i.attr("body") or "").lstrip("%")
            if name == skip:
                continue
            n = trip_count(module, name) or 1
            for k in kernels(module, name, peak, bandwidth, skip):
                k.count *= n
                out.append(k)
        elif i.op == "call":
            out.extend(kernels(module, (i.attr("to_apply") or "").lstrip("%"), peak, bandwidth, skip))
        elif i.op == "conditional":
            branches = [kernels(module, n, peak, bandwidth, skip) for n in branch_names(module, i)]
            if branches:
                out.extend(max(branches, key=lambda ks: sum(k.count * k.roofline_ms(peak, bandwidth) for k in ks)))
        elif i.op not in FREE_OPS:
            out.append(classify(module, i, shapes))
    return out


def branch_names(module: Module, ins: Instr) -> list[str]:
    """The branch computations of a conditional, in the order the HLO names them."""
    names = re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", ins.rest)
    m = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
    names += re.findall(r"%([\w.\-]+)", m.group(1)) if m else []
    return [n for n in names if n in module.computations]


def conditionals(module: Module, computation: str, peak: float = 989e12, bandwidth: float = 3.35e12):
    """Per conditional of a computation: [(branch, roofline ms of one run, kernel launches, first source)].

    `kernels` keeps the costliest branch; this shows what the others would cost (which branch runs is
    decided by data at run time)."""
    out = []
    for i in module.computations[computation]:
        if i.op != "conditional":
            continue
        rows = []
        for name in branch_names(module, i):
            ks = kernels(module, name, peak, bandwidth)
            src = next((sr for k in ks for sr in k.sources), "")
            rows.append((name, sum(k.count * k.roofline_ms(peak, bandwidth) for k in ks), sum(k.count for k in ks), src))
        out.append((i.name, rows))
    return out


def layer_loop(module: Module, layers: int | None = None) -> str | None:
    """The body of the program's layer loop: the first while loop with `layers` iterations (else the first)."""
    loops = [b for _, b in while_bodies(module)]
    exact = [b for b in loops if layers and trip_count(module, b) == layers]
    return (exact or loops or [None])[0]


def while_bodies(module: Module) -> list[tuple[str, str]]:
    """(while instruction's computation, body computation name) for every while loop, in text order."""
    out = []
    for comp, body in module.computations.items():
        for i in body:
            if i.op == "while":
                b = i.attr("body")
                if b:
                    out.append((comp, b.lstrip("%")))
    return out


def trip_count(module: Module, body_name: str) -> int | None:
    for body in module.computations.values():
        for i in body:
            if i.op == "while" and (i.attr("body") or "").lstrip("%") == body_name:
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.rest)
                return int(m.group(1)) if m else None
    return None
