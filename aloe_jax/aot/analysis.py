"""Compile one program for a slice and say what it costs per chip: memory against HBM, FLOPs, and a roofline bound.

Memory is XLA:TPU's own accounting (`memory_analysis`, per device): peak = arguments + outputs - aliased (donated
buffers reused for outputs) + temporaries. A program the compiler refuses with RESOURCE_EXHAUSTED is reported as not
fitting, with the compiler's numbers.

FLOPs: XLA's `cost_analysis` counts the body of a while loop (lax.scan, fori_loop, while_loop) once, whatever its
trip count — measured: a lax.scan of 10 [256, 256] matmuls reports 3.4e7 FLOPs, the same matmuls unrolled 3.4e8 —
so micro-batch accumulation, scanned layers, blockwise attention and the decode loop are undercounted. The analytic
model FLOPs (matmuls + attention, aloe_jax.train.metrics_log) count every iteration but no recomputation (remat). Both
are lower bounds on the work, so the roofline takes the larger: step time = max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth), where bytes is XLA's estimate of HBM traffic (`bytes accessed`, loop bodies once too) or the arguments
read as often as the program must read them, whichever is larger. Tokens/s and MFU (model FLOPs / (step time · peak))
at that step time are ceilings, not predictions.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax

from aloe_jax.aot.programs import Program
from aloe_jax.aot.topologies import Slice, first_line, out_of_memory
from aloe_jax.train.metrics_log import peak_flops_of_kind

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Report:
    """What one program costs on one chip of a slice (sizes in bytes, times in seconds)."""

    program: str
    topology: str
    topology_string: str
    chips: int
    hosts: int
    model: str
    config: str
    shapes: str
    hbm: float
    peak: float
    fits: bool
    compile_s: float
    argument: float | None = None
    output: float | None = None
    alias: float | None = None
    temp: float | None = None
    flops_per_chip: float | None = None  # XLA's count
    bytes_accessed_per_chip: float | None = None  # XLA's count
    model_flops_per_chip: float = 0.0
    tokens_per_chip: float = 0.0
    peak_flops_per_s: float | None = None
    hbm_bytes_per_s: float = 0.0
    roofline_step_s: float | None = None
    roofline_bound: str | None = None  # "compute" | "memory"
    error: str | None = None  # the compiler's refusal

    @property
    def free_fraction(self) -> float:
        return 1.0 - self.peak / self.hbm

    @property
    def tokens_per_s_per_chip(self) -> float | None:
        return self.tokens_per_chip / self.roofline_step_s if self.roofline_step_s else None

    @property
    def mfu_ceiling(self) -> float | None:
        if not (self.roofline_step_s and self.peak_flops_per_s):
            return None
        return self.model_flops_per_chip / (self.roofline_step_s * self.peak_flops_per_s)

    def json(self) -> str:
        """One JSON object (sizes in GiB)."""
        gib = lambda b: None if b is None else b / GIB  # noqa: E731
        return json.dumps({
            "program": self.program, "topology": self.topology, "topology_string": self.topology_string,
            "chips": self.chips, "hosts": self.hosts, "model": self.model, "config": self.config, "shapes": self.shapes,
            "hbm_gib": gib(self.hbm), "argument_gib": gib(self.argument), "output_gib": gib(self.output),
            "alias_gib": gib(self.alias), "temp_gib": gib(self.temp), "peak_gib": gib(self.peak), "fits": self.fits,
            "free_fraction": self.free_fraction, "flops_per_chip": self.flops_per_chip,
            "model_flops_per_chip": self.model_flops_per_chip, "bytes_accessed_per_chip": self.bytes_accessed_per_chip,
            "tokens_per_chip": self.tokens_per_chip, "roofline_step_s": self.roofline_step_s,
            "roofline_bound": self.roofline_bound, "roofline_tokens_per_s_per_chip": self.tokens_per_s_per_chip,
            "mfu_ceiling": self.mfu_ceiling, "compile_s": round(self.compile_s, 2), "error": self.error,
        })

    def text(self) -> str:
        """A few lines for people."""
        gib = _size
        plural = lambda n, what: f"{n} {what}{'s' if n > 1 else ''}"  # noqa: E731
        lines = [f"{self.program} on {self.topology} ({self.topology_string}: {plural(self.chips, 'chip')}, "
                 f"{plural(self.hosts, 'host')})",
                 f"  model: {self.model}",
                 f"  shapes: {self.shapes}"]
        if self.error:
            lines.append(f"  refused by the compiler: {self.error}")
        else:
            lines.append(f"  per chip: arguments {gib(self.argument)}, outputs {gib(self.output)}, aliased "
                         f"{gib(self.alias)}, temporaries {gib(self.temp)}")
        verdict = (f"fits, {self.free_fraction:.0%} free" if self.fits
                   else f"does not fit by {gib(self.peak - self.hbm)}")
        lines.append(f"  peak {gib(self.peak)} of {gib(self.hbm)} HBM: {verdict}")
        xla = "" if self.flops_per_chip is None else f"{self.flops_per_chip:.3g} by XLA (loop bodies counted once), "
        lines.append(f"  FLOPs per chip: {xla}{self.model_flops_per_chip:.3g} by the model (matmuls + attention)")
        if self.roofline_step_s:
            lines.append(f"  roofline at {self.peak_flops_per_s / 1e12:.0f} bf16 TFLOP/s and "
                         f"{self.hbm_bytes_per_s / 1e9:.0f} GB/s per chip: {self.roofline_step_s:.3g} s "
                         f"({self.roofline_bound}-bound), "
                         f"{self.tokens_per_s_per_chip:,.0f} tokens/s/chip, MFU <= {self.mfu_ceiling:.0%}")
        lines.append(f"  compiled in {self.compile_s:.1f} s")
        return "\n".join(lines)


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def analyse(program: Program, slice_: Slice, devices: list, hbm: float, model: str, config: str) -> Report:
    """Compile `program` for the slice and measure it (a refusal for lack of HBM is a Report too)."""
    base = dict(program=program.name, topology=slice_.name, topology_string=slice_.topology, chips=len(devices),
                hosts=len({d.process_index for d in devices}), model=model, config=config, shapes=program.shapes,
                model_flops_per_chip=program.model_flops / len(devices), tokens_per_chip=program.tokens / len(devices),
                peak_flops_per_s=peak_flops_of_kind(devices[0].device_kind), hbm_bytes_per_s=slice_.hbm_bytes_per_s)
    start = time.perf_counter()  # tracing and lowering included: for a large unrolled model they take a while too
    lowered = program.lower()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        sizes = out_of_memory(str(err))
        if sizes is None:
            raise
        return Report(**base, hbm=sizes[1], peak=sizes[0], fits=False, compile_s=time.perf_counter() - start,
                      error=first_line(err))
    compile_s = time.perf_counter() - start
    memory, cost = compiled.memory_analysis(), _cost(compiled)
    argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    peak = argument + output - alias + temp
    flops, accessed = cost.get("flops"), cost.get("bytes accessed")
    step_s = bound = None
    if base["peak_flops_per_s"]:
        compute_s = max(flops or 0.0, base["model_flops_per_chip"]) / base["peak_flops_per_s"]
        memory_s = max(accessed or 0.0, program.argument_reads * argument) / slice_.hbm_bytes_per_s
        step_s, bound = max(compute_s, memory_s), "compute" if compute_s >= memory_s else "memory"
    return Report(**base, hbm=hbm, peak=peak, fits=peak <= hbm, compile_s=compile_s, argument=argument,
                  output=output, alias=alias, temp=temp, flops_per_chip=flops, bytes_accessed_per_chip=accessed,
                  roofline_step_s=step_s, roofline_bound=bound)
