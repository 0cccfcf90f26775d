"""Jitted programs as values: what a recipe compiles, declared once, jitted for a run or lowered for a plan.

A :class:`Program` is one XLA program of a training recipe (the sampler, a log-prob pass, the update, an eval
pass, ...): its function, its abstract arguments at the recipe's real shapes (``jax.ShapeDtypeStruct`` leaves
carrying their ``NamedSharding``), its output shardings, donated and static arguments, and its phase
(``rollout`` | ``update`` | ``eval`` | ``init``). A :class:`ProgramSet` holds a recipe's programs and is the only
place they are jitted::

    programs = ProgramSet([
        Program("update", update_fn, args=lambda: (params_sds, opt_sds, batch_sds, key_sds),
                out_shardings=(param_shardings, opt_shardings, replicated), donate_argnums=(0, 1)),
        Program("generate", generate_fn, args=..., out_shardings=batch_sharded, phase="rollout"),
    ])
    fns = programs.jit()                  # a run: name -> jitted callable (compiled on first call)
    params, opt_state, metrics = fns["update"](params, opt_state, batch, key)
    report = programs.compile()           # a plan: every program lowered + compiled at its abstract arguments

Built on a mesh of a TPU topology (``jax.experimental.topologies``), :meth:`ProgramSet.compile` runs the TPU
compiler on this machine: :class:`CompiledProgram` carries its ``memory_analysis()`` (the chip's buffer
assignment: arguments, outputs, temporaries, aliases) and ``cost_analysis()`` (FLOPs, bytes accessed). The same
``Program`` values serve ``train``, ``eval`` and ``plan``, so a plan compiles exactly what a run executes
(MaxText's ``get_functional_train_with_signature`` / ``train_compile.py`` idea, for every program of an RL step).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax

__all__ = ["Program", "ProgramSet", "CompiledProgram", "PHASES", "abstract_like", "key_struct", "loop_factor",
           "matmul_flops"]

log = logging.getLogger(__name__)

PHASES = ("rollout", "update", "eval", "init")


def key_struct(sharding: Any = None) -> jax.ShapeDtypeStruct:
    """The abstract value of one typed PRNG key (``jax.random.key``), optionally with a sharding."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``tree`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs; ``shardings``: one sharding for every leaf or a
    matching tree (default: each leaf's own ``.sharding`` when it has one)."""
    leaves, treedef_ = jax.tree.flatten(tree)
    treedef: Any = treedef_  # jax's stubs leave PyTreeDef unresolved
    if shardings is None:
        shs = [getattr(x, "sharding", None) for x in leaves]
    elif isinstance(shardings, jax.sharding.Sharding):
        shs = [shardings] * len(leaves)
    else:
        shs = treedef.flatten_up_to(shardings)
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shs)])


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program of a recipe.

    Attributes:
      name: unique within its set (``'generate'``, ``'logprobs'``, ``'update'``, ``'eval/generate'``, ...).
      fn: the pure function (closed over graph definitions, options and the mesh; no config).
      args: ``() -> tuple`` of the abstract arguments at the recipe's real shapes (ShapeDtypeStruct leaves with
        shardings; static arguments as their Python values); None when a program has no plan (it still jits).
      out_shardings / donate_argnums / static_argnums: as for ``jax.jit``.
      phase: ``rollout`` | ``update`` | ``eval`` | ``init``: what a step's timing, an asynchronous schedule and the
        plan report group it under.
      shrink_key: the config key that shrinks this program's memory (e.g. ``'optim.grad_accum_steps'``,
        ``'eval.batch_size'``): what a plan names when the program does not fit.
      per_step: how many times one RL step runs the program (the plan's predicted step time); eval programs
        count ``1 / eval_every``, init programs 0.
      planned_by: the programs a plan compiles instead of this one (e.g. the sampler's loop is planned as its
        prefill and decode steps; a reference pass with the policy's shapes as the policy's pass): the plan
        skips it (its memory and cost are those of the named programs).
    """

    name: str
    fn: Callable[..., Any]
    args: Callable[[], tuple] | None = None
    out_shardings: Any = None
    donate_argnums: tuple[int, ...] = ()
    static_argnums: tuple[int, ...] = ()
    phase: str = "update"
    shrink_key: str = ""
    per_step: float | None = None
    planned_by: tuple[str, ...] = ()

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"Program {self.name!r}: phase must be one of {PHASES}, got {self.phase!r}")
        object.__setattr__(self, "donate_argnums", tuple(self.donate_argnums))
        object.__setattr__(self, "static_argnums", tuple(self.static_argnums))
        if self.per_step is None:
            object.__setattr__(self, "per_step", 0.0 if self.phase == "init" else 1.0)

    def jit(self) -> jax.stages.Wrapped:
        """``jax.jit`` of :attr:`fn` with this program's shardings and donation."""
        kwargs: dict[str, Any] = {}
        if self.out_shardings is not None:
            kwargs["out_shardings"] = self.out_shardings
        if self.donate_argnums:
            kwargs["donate_argnums"] = self.donate_argnums
        if self.static_argnums:
            kwargs["static_argnums"] = self.static_argnums
        return jax.jit(self.fn, **kwargs)

    def abstract_args(self) -> tuple:
        if self.args is None:
            raise ValueError(f"Program {self.name!r} declares no abstract arguments (args=None): it cannot be lowered "
                             "ahead of time")
        return tuple(self.args())

    def lower(self) -> Any:
        """``jit(fn).lower(*abstract_args)``: the program traced at its declared shapes and shardings."""
        return self.jit().lower(*self.abstract_args())

    def compile(self) -> "CompiledProgram":
        """Lowers and compiles this program for the devices of its shardings; see :class:`CompiledProgram`."""
        return self.compile_args(self.abstract_args())

    def compile_args(self, args: tuple) -> "CompiledProgram":
        """:meth:`compile` at given abstract arguments (e.g. those of :meth:`abstract_args`, already built)."""
        t0 = time.perf_counter()
        lowered = self.jit().lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        once, looped = _jaxpr_matmul_flops(self.fn, args, self.static_argnums)
        devices = max((len(getattr(getattr(x, "sharding", None), "device_set", ()) or ())
                       for x in jax.tree.leaves(args)), default=1) or 1
        return CompiledProgram(self, compiled, lower_s=t1 - t0, compile_s=t2 - t1,
                               loop_factor=looped / once if once > 0 else 1.0,
                               jaxpr_flops_per_device=looped / devices)


def _dot_flops(eqn: Any) -> float:
    """2 x (product of the output's dims) x (contracted size) of a ``dot_general`` equation."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    k = 1
    for d in lhs_contract:
        k *= int(lhs[d])
    n = 1
    for d in out:
        n *= int(d)
    return 2.0 * n * k


def _subjaxprs(eqn: Any) -> list[Any]:
    out = []
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns"):
                out.append(x.jaxpr if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns") else x)
    return out


def matmul_flops(jaxpr: Any, *, count_loops: bool) -> float:
    """The matmul FLOPs of a jaxpr (``dot_general``; every nested jaxpr visited), with each ``scan`` body counted
    ``length`` times when ``count_loops`` (else once, as XLA's cost analysis counts a loop body)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        inner = sum(matmul_flops(j, count_loops=count_loops) for j in _subjaxprs(eqn))
        if name == "scan" and count_loops:
            inner *= int(eqn.params.get("length", 1))
        elif name == "cond":  # one branch runs
            branches = [matmul_flops(j, count_loops=count_loops) for j in eqn.params.get("branches", ())]
            inner = max(branches, default=0.0)
        total += inner
    return total


def _jaxpr_matmul_flops(fn: Callable[..., Any], args: tuple, static_argnums: tuple[int, ...] = ()
                        ) -> tuple[float, float]:
    """``(once, looped)``: :func:`matmul_flops` of ``fn``'s jaxpr with every loop body counted once / ``length``
    times ((0, 0) when it cannot be traced here)."""
    try:
        jaxpr = jax.make_jaxpr(fn, static_argnums=static_argnums)(*args)
    except Exception:  # pylint: disable=broad-except
        return 0.0, 0.0
    return matmul_flops(jaxpr, count_loops=False), matmul_flops(jaxpr, count_loops=True)


def loop_factor(fn: Callable[..., Any], args: tuple, static_argnums: tuple[int, ...] = ()) -> float:
    """How much a compiler's cost analysis undercounts ``fn`` because it counts every loop body once: the matmul
    FLOPs with ``scan`` bodies counted ``length`` times over those with every body counted once (1.0 without
    scans; ``while`` loops of unknown trip count stay once: plan them per step, as ``plan/decode``)."""
    once, looped = _jaxpr_matmul_flops(fn, args, static_argnums)
    return looped / once if once > 0 else 1.0


@dataclasses.dataclass
class CompiledProgram:
    """A compiled :class:`Program` and what its compiler says about it (per device).

    ``memory``: ``argument``, ``output``, ``temp``, ``alias``, ``generated_code`` bytes and ``peak`` =
    argument + output + temp - alias (the program's HBM footprint while it runs, its inputs included).
    ``cost``: ``flops`` and ``bytes_accessed`` of one execution: the compiler's cost analysis (per device for an
    SPMD program) scaled by :func:`loop_factor` (a compiler counts a loop body once: a scanned layer stack or a
    micro-batch loop would otherwise count one layer / one micro-batch); ``xla_flops`` / ``xla_bytes_accessed``
    are the compiler's own figures. A compiler without a cost analysis (XLA:GPU compiling without a device)
    gives ``cost_source='jaxpr'``: the jaxpr's matmul FLOPs split evenly over the devices, and as bytes the
    program's arguments and outputs read / written once (a floor).
    """

    program: Program
    compiled: Any
    lower_s: float = 0.0
    compile_s: float = 0.0
    loop_factor: float = 1.0
    jaxpr_flops_per_device: float = 0.0

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def memory(self) -> dict[str, int]:
        m = self.compiled.memory_analysis()
        if m is None:
            return {}
        out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
               "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes),
               "generated_code": int(getattr(m, "generated_code_size_in_bytes", 0))}
        out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
        return out

    @property
    def cost(self) -> dict[str, Any]:  # numbers, and "cost_source" (str)
        c = self.compiled.cost_analysis()
        if isinstance(c, (list, tuple)):  # older jax: one dict per computation
            c = c[0] if c else {}
        c = dict(c or {})
        f = self.loop_factor
        if not c:  # no cost analysis from this compiler
            m = self.memory
            return {"flops": self.jaxpr_flops_per_device,
                    "bytes_accessed": float(m.get("argument", 0) + m.get("output", 0) - m.get("alias", 0)),
                    "transcendentals": 0.0, "loop_factor": f, "xla_flops": 0.0, "xla_bytes_accessed": 0.0,
                    "cost_source": "jaxpr"}
        return {"cost_source": "compiler", "flops": f * float(c.get("flops", 0.0)),
                "bytes_accessed": f * float(c.get("bytes accessed", 0.0)),
                "transcendentals": f * float(c.get("transcendentals", 0.0)), "loop_factor": f,
                "xla_flops": float(c.get("flops", 0.0)), "xla_bytes_accessed": float(c.get("bytes accessed", 0.0))}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "phase": self.program.phase, "memory": self.memory, "cost": self.cost,
                "lower_s": self.lower_s, "compile_s": self.compile_s}


class ProgramSet(Mapping[str, Program]):
    """A recipe's programs by name (insertion order); :meth:`jit` for a run, :meth:`compile` for a plan."""

    def __init__(self, programs: Iterable[Program] = ()):
        self._programs: dict[str, Program] = {}
        self._jitted: dict[str, Callable[..., Any]] = {}
        for p in programs:
            self.add(p)

    def add(self, program: Program) -> Program:
        if program.name in self._programs:
            raise ValueError(f"duplicate program name {program.name!r}")
        self._programs[program.name] = program
        return program

    def __getitem__(self, name: str) -> Program:
        try:
            return self._programs[name]
        except KeyError:
            raise KeyError(f"no program {name!r}; the set has {list(self._programs)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._programs)

    def __len__(self) -> int:
        return len(self._programs)

    def jitted(self, name: str) -> Callable[..., Any]:
        """The jitted callable of ``name`` (built once; XLA compiles it on its first call)."""
        if name not in self._jitted:
            self._jitted[name] = self[name].jit()
        return self._jitted[name]

    def jit(self) -> dict[str, Callable[..., Any]]:
        """``{name: jitted callable}`` for every program (the only ``jax.jit`` of a recipe)."""
        return {name: self.jitted(name) for name in self._programs}

    def phase(self, phase: str) -> list[str]:
        return [n for n, p in self._programs.items() if p.phase == phase]

    def compile(self, names: Sequence[str] | None = None, *,
                on_error: Callable[[str, BaseException], None] | None = None) -> dict[str, CompiledProgram]:
        """Lowers and compiles ``names`` (default: every program with abstract arguments) at their declared
        shapes; ``on_error(name, err)`` (default: raise) sees programs that fail to compile."""
        out: dict[str, CompiledProgram] = {}
        for name in (names if names is not None else [n for n, p in self._programs.items() if p.args is not None]):
            try:
                out[name] = self[name].compile()
            except Exception as err:  # pylint: disable=broad-except
                if on_error is None:
                    raise
                on_error(name, err)
        return out
