"""Compile Triton kernels ahead of time for real GPUs (no GPU needed) and read their resource usage.

The interpreter (``TRITON_INTERPRET=1``) checks a kernel's numbers on the CPU but accepts programs the
GPU compiler rejects, and says nothing about registers, spills or shared memory. This module compiles
a ``@triton.jit`` kernel for sm_80 / sm_90 and reads those from the cubin with ``cuobjdump``::

    signature, constexprs, attrs = specialize(my_kernel, launch_args, dict(BLOCK=128))
    jobs = [AotJob(kernel_name(my_kernel), signature, constexprs, attrs, num_warps=4, arch=arch)
            for arch in ARCHS]
    for r in compile_many(jobs):
        assert not r.problems(), r.problems()

``compile_many`` compiles in fresh worker processes with ``TRITON_INTERPRET`` removed, so it works from
a test session that runs the interpreter (where ``@triton.jit`` no longer yields compilable kernels).
``specialize`` turns real launch arguments into the signature and divisibility attributes that
``triton.jit`` itself would compile for them.
"""
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ARCHS = (80, 90)
# Largest shared memory one block can opt into (CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"): 163 KB on sm_80, 227 KB on sm_90.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
_DIVISIBLE_BY_16 = "D"  # the JIT's mark for an integer or pointer known to be a multiple of 16


@dataclasses.dataclass(frozen=True)
class AotJob:
    """One compilation: a kernel, its full signature, constexpr values, and launch options."""

    kernel: str  # "package.module:function" naming a @triton.jit function
    signature: Mapping[str, str]  # every parameter's type: "*fp16", "i32", "fp32", "constexpr", ...
    constexprs: Mapping[str, Any]  # values of the parameters typed "constexpr" (JSON scalars)
    attrs: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> "D" (divisible by 16)
    num_warps: int = 4
    num_stages: int = 3
    arch: int = 90  # compute capability, 80 = A100, 90 = H100/H200
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"maxnreg": 128}


@dataclasses.dataclass(frozen=True)
class AotResult:
    """Resources of one compiled kernel, from Triton's metadata and the cubin."""

    job: AotJob
    registers: int = -1  # per thread
    shared_bytes: int = -1  # dynamic (Triton) + static shared memory per block
    stack_bytes: int = -1  # spills land on the stack ...
    local_bytes: int = -1  # ... or in local memory
    error: str = ""  # compile error, empty when it compiled

    @property
    def spill_bytes(self) -> int:
        return self.stack_bytes + self.local_bytes

    def problems(self) -> List[str]:
        """What is wrong with this kernel for its arch: compile error, spills, too much shared memory."""
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_bytes > 0:
            out.append(f"spills (stack {self.stack_bytes} B, local {self.local_bytes} B)")
        limit = MAX_SHARED_BYTES[self.job.arch]
        if self.shared_bytes > limit:
            out.append(f"shared memory {self.shared_bytes} B > {limit} B on sm_{self.job.arch}")
        return out


def _python_fn(kernel):
    """The plain Python function under a JITFunction or an interpreter InterpretedFunction."""
    return getattr(kernel, "fn", kernel)


def kernel_name(kernel) -> str:
    """``"module:function"`` for a @triton.jit kernel (also under ``TRITON_INTERPRET=1``)."""
    fn = _python_fn(kernel)
    return f"{fn.__module__}:{fn.__qualname__}"


def _jit_option(kernel, name: str):
    # JITFunction keeps jit() options as attributes, InterpretedFunction in .kwargs.
    value = getattr(kernel, name, None)
    if value is None:
        value = getattr(kernel, "kwargs", {}).get(name)
    return value or ()


def specialize(kernel, args: Sequence, constexprs: Mapping[str, Any], specialized: bool = True
               ) -> Tuple[Dict[str, str], Dict[str, Any], Dict[str, str]]:
    """(signature, constexprs, attrs) that ``triton.jit`` would compile for this launch.

    ``args`` are the runtime (non-constexpr) arguments in order, ``constexprs`` the kernel's
    ``tl.constexpr`` values. The JIT turns integers equal to 1 into constants (added to the returned
    constexprs) and marks integers and pointers divisible by 16, each a separate compiled kernel;
    ``specialized=False`` gives the variant with none of that (as if every argument were listed in
    ``do_not_specialize``).
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import KernelParam

    fn = _python_fn(kernel)
    dns = set(_jit_option(kernel, "do_not_specialize"))
    dns_align = set(_jit_option(kernel, "do_not_specialize_on_alignment"))
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dns_align or p.name in dns_align)
              for i, p in enumerate(inspect.signature(fn).parameters.values())]
    runtime = [p for p in params if not p.is_constexpr]
    if len(runtime) != len(args):
        raise ValueError(f"args: got {len(args)} values, {fn.__name__} takes {len(runtime)} runtime "
                         f"arguments ({', '.join(p.name for p in runtime)})")
    signature = {p.name: "constexpr" for p in params if p.is_constexpr}
    constexprs, attrs = dict(constexprs), {}
    for p, value in zip(runtime, args):
        ty, attr = native_specialize_impl(CUDABackend, value, p.is_const,
                                          specialized and not p.do_not_specialize,
                                          specialized and not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = attr
        elif attr and _DIVISIBLE_BY_16 in attr:
            attrs[p.name] = _DIVISIBLE_BY_16
    return {p.name: signature[p.name] for p in params}, constexprs, attrs


def _cuobjdump_resources(cubin: bytes) -> Dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, via cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if set(found) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {k: int(v) for k, v in found.items()}


def compile_one(job: AotJob) -> AotResult:
    """Compile one job in this process (``TRITON_INTERPRET`` must be off) and measure it."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_one needs TRITON_INTERPRET unset; use compile_many instead")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    module, _, name = job.kernel.partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    missing = [k for k, v in job.signature.items() if v == "constexpr" and k not in job.constexprs]
    if missing:
        return AotResult(job, error=f"no value for constexpr parameter(s) {missing}")
    try:
        attrs = {(fn.arg_names.index(k),): CUDABackend.parse_attr(v) for k, v in job.attrs.items()}
        src = triton.compiler.ASTSource(fn=fn, signature=dict(job.signature),
                                        constexprs=dict(job.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                  options=dict(job.options, num_warps=job.num_warps,
                                               num_stages=job.num_stages))
        res = _cuobjdump_resources(compiled.asm["cubin"])
    except Exception as e:  # report, don't raise: one bad config should not hide the others
        return AotResult(job, error=f"{type(e).__name__}: {e}".strip()[-2000:])
    return AotResult(job, registers=res["REG"], shared_bytes=compiled.metadata.shared + res["SHARED"],
                     stack_bytes=res["STACK"], local_bytes=res["LOCAL"])


def _worker_main() -> None:
    """Subprocess entry point: argv = [jobs.json, results.json]."""
    src, dst = sys.argv[1:3]
    jobs = [AotJob(**j) for j in json.loads(Path(src).read_text())]
    results = [dataclasses.asdict(compile_one(j)) for j in jobs]
    Path(dst).write_text(json.dumps(results))


def compile_many(jobs: Sequence[AotJob], processes: Optional[int] = None) -> List[AotResult]:
    """Compile all jobs in ``processes`` worker processes without TRITON_INTERPRET; results in order.

    Jobs are dealt round-robin, so list similar (similarly slow) jobs next to each other.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The workers import kernels by module name: make the directory holding this package importable.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = f"from {__name__} import _worker_main; _worker_main()"
    results: List[Optional[AotResult]] = [None] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        workers = []
        for w in range(processes):
            mine = list(range(w, len(jobs), processes))
            src, dst = Path(tmp, f"jobs{w}.json"), Path(tmp, f"results{w}.json")
            src.write_text(json.dumps([dataclasses.asdict(jobs[i]) for i in mine]))
            proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(dst)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            workers.append((mine, dst, proc))
        for mine, dst, proc in workers:
            log = proc.communicate()[0]
            if proc.returncode != 0:
                raise RuntimeError(f"AOT worker failed (exit {proc.returncode}):\n{log[-4000:]}")
            for i, r in zip(mine, json.loads(dst.read_text())):
                results[i] = AotResult(**{**r, "job": jobs[i]})
    return results


def format_table(results: Sequence[AotResult], columns: Sequence[str]) -> str:
    """A plain-text table: the given constexpr columns, the first pointer's type (+D when the job
    has divisibility attributes), then arch, warps, registers, shared bytes and spill bytes."""
    head = [*columns, "sig", "arch", "warps", "regs", "shared", "spill"]
    rows = [head]
    for r in results:
        j = r.job
        ptr = next((t for t in j.signature.values() if t.startswith("*")), "")
        rows.append([*(str(j.constexprs.get(c, "")) for c in columns), ptr + ("+D" if j.attrs else ""),
                     f"sm_{j.arch}", str(j.num_warps), str(r.registers), str(r.shared_bytes),
                     str(r.spill_bytes) if not r.error else "ERROR"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
