"""Traced programs saved under `$JAXSPEC_CACHE/programs`, so that a new process runs the
decoding loop without tracing it again.

JAX's persistent compilation cache (jaxspec.compile_cache) skips XLA's compile, but every
process still traces and lowers the loop first: about 2 s of a CLI start on the default model.
`load_or_compile` keys a program by everything its trace depends on: jaxspec's own source
files, the JAX and jaxlib versions, the JAX configuration, the environment variables that
jaxspec, XLA and Neuron read, the device, the function, its static argument
and the abstract arguments (tree structure, shapes, dtypes, weak types, shardings). Under that
key it keeps the program exported with `jax.export` (StableHLO with JAX's compatibility
guarantees) and the output's tree structure; a later process deserializes it, and compiling
it hits JAX's cache. `start` returns once the program is traced (or read): XLA compiles it in a
background thread while the caller traces the next one with its output shapes (`out_info`),
so the static loop's two programs compile side by side. What cannot be keyed exactly, or
exported (a static argument holding a lambda, a mesh or an array; host callbacks; a platform
export does not know), is compiled as before and not saved.

`JAXSPEC_COMPILE_CACHE`: "1" (default) this cache and JAX's, "xla" JAX's only, "0" neither.
A file that cannot be read is removed and the program traced again. The folder is kept under
MAX_BYTES: a save removes the least recently used files (a load marks its file used) until the
rest fit, so programs of older jaxspec versions, models and shapes do not pile up. The files
hold pickled tree structures, so the cache directory must be as trusted as the code that loads
them (as JAX's own cache, which holds executables).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib.util
import os
import pickle
import types
from collections.abc import Callable

import jax
import jaxlib
import numpy as np
from jax.api_util import shaped_abstractify

from jaxspec import compile_cache, devices
from jaxspec.errors import UserError
from jaxspec.paths import prune, writable_cache_dir, write_atomically
from jaxspec.xla_options import compiler_options

FORMAT = 1  # bump when what a file holds changes
SOURCE_SUFFIXES = (".py", ".cc", ".h")
MAX_BYTES = 256 << 20  # the folder's size after a save (default-model programs: 117-168 KB)
stats = {"loaded": 0, "saved": 0}  # this process's, for tests


@dataclasses.dataclass(frozen=True)
class Program:
    """A compiled flat program called with the original argument trees."""

    compiled: jax.stages.Compiled  # leaves -> output leaves
    out_tree: jax.tree_util.PyTreeDef

    def __call__(self, *args):
        return jax.tree.unflatten(self.out_tree, self.compiled(*jax.tree.leaves(args)))

    @property
    def out_info(self):
        """The output's ShapeDtypeStructs, in the output's tree structure."""
        return jax.tree.unflatten(self.out_tree, jax.tree.leaves(self.compiled.out_info))


def load_or_compile(fn: Callable, static, *args, donate: tuple[int, ...] = (), device=None):
    """`jax.jit(fn, static_argnums=0, donate_argnums=donate).lower(static, *args).compile()`
    on `device` (None: JAX's default), with jaxspec's XLA options for its platform
    (jaxspec.xla_options), traced by this process or loaded as an earlier one
    saved it. Returns (program, how): program is called like the compiled function (and has
    its `out_info`); how is "loaded", "saved" or "compiled" (not cacheable, or cache off)."""
    pending = start(fn, static, *args, donate=donate, device=device)
    return pending.result(), pending.how


class Pending:
    """A program whose trace is done (or read from the cache) and whose XLA compile runs in a
    background thread, so that the next program can be traced meanwhile; `out_info` (the
    output's ShapeDtypeStructs) is known before it compiles."""

    def __init__(self, future, out_info, how: str, retrace: Callable | None = None):
        self._future, self._out_info, self.how, self._retrace = future, out_info, how, retrace

    @property
    def out_info(self):
        """The output's ShapeDtypeStructs (without waiting, unless the outputs are sharded)."""
        return self.result().out_info if self._out_info is None else self._out_info

    def result(self):
        """The compiled program (waits for its compile)."""
        try:
            program = self._future.result()
        except Exception:
            if self._retrace is None:
                raise
        else:
            self._retrace = None  # holds the arguments
            return program
        # a file that reads but does not compile: trace again and replace it (once)
        retrace, self._retrace = self._retrace, None
        again = retrace()
        self._future, self.how = again._future, again.how
        return self._future.result()


def start(fn: Callable, static, *args, donate: tuple[int, ...] = (), device=None) -> Pending:
    """load_or_compile's work up to XLA's compile, which continues in a background thread."""
    path = _path(fn, static, args, donate, device)
    saved = _read(path) if path is not None and os.path.exists(path) else None
    if saved is not None:
        stats["loaded"] += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be pruned
        return Pending(_compile_later(saved, args, donate, device), _out_info(saved, device),
                       "loaded", retrace=lambda: _trace(fn, static, args, donate, device, path))
    return _trace(fn, static, args, donate, device, path)


def _trace(fn, static, args, donate, device, path) -> Pending:
    """Export fn and save it at path (None: not cacheable), or compile it as before when it
    cannot be exported."""
    leaves, in_tree = jax.tree.flatten(args)
    flat_donate = _leaf_positions(args, donate)
    saved = None if path is None else _export(fn, static, in_tree, leaves, flat_donate, device)
    if saved is None:
        with devices.on(device):
            compiled = jax.jit(fn, static_argnums=0, donate_argnums=donate).lower(
                static, *args).compile(compiler_options=compiler_options(device))
        done = concurrent.futures.Future()
        done.set_result(compiled)
        return Pending(done, compiled.out_info, "compiled")
    how = "compiled"
    if _write(path, saved):
        stats["saved"] += 1
        how = "saved"
        prune(os.path.dirname(path), MAX_BYTES)
    return Pending(_compile_later(saved, args, donate, device), _out_info(saved, device), how)


def _compile_later(saved, args: tuple, donate, device) -> concurrent.futures.Future:
    """_compiled in the background, for the abstract values of args' leaves (the thread holds
    no argument buffers: they may be donated meanwhile)."""
    abstract = [_struct(shaped_abstractify(leaf), getattr(leaf, "sharding", None))
                for leaf in jax.tree.leaves(args)]
    return _background().submit(_compiled, saved, abstract, _leaf_positions(args, donate),
                                device)


@functools.cache
def _background() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxspec-compile")


def _struct(aval, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                sharding=sharding)


def _out_info(saved, device):
    """The ShapeDtypeStructs of a saved program's outputs on `device`; None for a program
    over several devices (its output shardings are known once it compiles)."""
    exported, out_tree = saved
    if exported.nr_devices != 1:
        return None
    sharding = jax.sharding.SingleDeviceSharding(devices.or_default(device))
    return jax.tree.unflatten(out_tree, [_struct(a, sharding) for a in exported.out_avals])


def _compiled(saved, leaves: list, flat_donate: tuple[int, ...], device) -> Program:
    """The saved (Exported, out_tree) compiled for these argument leaves (JAX's cache)."""
    exported, out_tree = saved
    with devices.on(device):
        compiled = jax.jit(exported.call, donate_argnums=flat_donate).lower(*leaves).compile(
            compiler_options=compiler_options(device))
    return Program(compiled, out_tree)


def _leaf_positions(args: tuple, donate: tuple[int, ...]) -> tuple[int, ...]:
    """The flat positions of the leaves of args[i - 1] for each argnum i in donate (argnum 0
    being the static argument)."""
    counts = [len(jax.tree.leaves(a)) for a in args]
    starts = np.cumsum([0] + counts)
    return tuple(j for i in donate for j in range(starts[i - 1], starts[i - 1] + counts[i - 1]))


def _export(fn, static, in_tree, leaves, flat_donate, device):
    """(Exported, out_tree) of fn(static, *args) as a function of the leaves; None when JAX
    cannot export it."""
    from jax import export

    out_trees = []

    def flat(*leaves):
        out = fn(static, *jax.tree.unflatten(in_tree, leaves))
        out_leaves, out_tree = jax.tree.flatten(out)
        out_trees.append(out_tree)
        return out_leaves

    from jaxspec.kernels import cpu_matmul

    checks = [export.DisabledSafetyCheck.custom_call(name) for name in cpu_matmul.TARGETS]
    try:
        with devices.on(device):
            exported = export.export(jax.jit(flat, donate_argnums=flat_donate),
                                     platforms=[devices.or_default(device).client.platform],
                                     disabled_checks=checks)(*leaves)
    except Exception:  # host callbacks, other custom calls, a platform export does not know
        return None
    return exported, out_trees[-1]


def enabled() -> bool:
    return os.environ.get(compile_cache.ENV, "1") not in ("0", "xla")


def key(fn: Callable, static, args, donate=(), device=None) -> str | None:
    """The hex digest naming this program, or None when something in it has no stable
    description (the program is then not cached)."""
    described = [describe(fn), describe(static)]
    if None in described:
        return None
    leaves, tree = jax.tree.flatten(args)
    if "0x" in str(tree):  # a node whose description names a memory address
        return None
    device = devices.or_default(device)
    parts = [FORMAT, _source_digest(), jax.__version__, jaxlib.__version__, _environment(),
             device.platform, device.client.platform_version, device.id, device.device_kind,
             len(device.client.devices()),
             sorted((k, repr(v)) for k, v in jax.config.values.items()),
             *described, str(tree), [_abstract(leaf) for leaf in leaves], tuple(donate)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def describe(value) -> str | None:
    """A description of a static value that is the same in every process and differs where the
    trace could: values, dataclasses field by field, functions by module and name. None for
    anything else (lambdas, closures, arrays, meshes, other objects)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, np.dtype):
        return f"dtype({value})"
    if isinstance(value, (tuple, list)):
        return _joined(type(value).__name__, value)
    if isinstance(value, dict):
        return _joined("dict", sorted(value.items(), key=lambda kv: repr(kv[0])))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        return _joined(_qualified(type(value)), fields)
    if isinstance(value, functools.partial):
        return _joined("partial", (value.func, value.args, sorted(value.keywords.items())))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        name = _qualified(value)
        plain = "<" not in name and not getattr(value, "__closure__", None)
        return name if plain else None
    return None


def _joined(head: str, items) -> str | None:
    parts = [describe(item) for item in items]
    return None if None in parts else f"{head}({', '.join(parts)})"


def _qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _abstract(leaf) -> str:
    """The abstract value of an argument (shape, dtype, weak type: e.g. "~int32[]") and its
    sharding."""
    return f"{shaped_abstractify(leaf)} {getattr(leaf, 'sharding', None)!r}"


@functools.cache
def _source_digest() -> str:
    """sha256 over jaxspec's source files (the package and its kernels), read once."""
    digest = hashlib.sha256()
    kernels = importlib.util.find_spec("jaxspec.kernels").origin  # packaged from kernels/
    for root in (os.path.dirname(__file__), os.path.dirname(kernels)):
        for folder, subfolders, files in sorted(os.walk(root)):
            subfolders.sort()
            for name in sorted(files):
                if name.endswith(SOURCE_SUFFIXES):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()


def _environment() -> list[tuple[str, str]]:
    """The environment variables that jaxspec, XLA or the Neuron compiler read while a program
    is traced or compiled."""
    return sorted((k, v) for k, v in os.environ.items()
                  if k.startswith(("JAXSPEC_", "XLA_", "NEURON_")))


def _path(fn, static, args, donate, device) -> str | None:
    if not enabled():
        return None
    name = key(fn, static, args, donate, device)
    if name is None:
        return None
    try:
        folder = writable_cache_dir("programs")
    except UserError:
        return None
    label = getattr(getattr(fn, "func", fn), "__name__", "program")  # partials: their function
    return os.path.join(folder, f"{label}-{name}.bin")


def _read(path: str):
    """(Exported, out_tree) saved at path, or None (the file is removed) when it cannot be
    read."""
    from jax import export

    try:
        with open(path, "rb") as f:
            version, serialized, out_tree = pickle.load(f)
        if version != FORMAT:
            raise ValueError(f"format {version}")
        return export.deserialize(bytearray(serialized)), out_tree
    except Exception:  # a damaged or foreign file: trace again (and replace it)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None


def _write(path: str, saved) -> bool:
    """Write (Exported, out_tree) to path atomically; False when it cannot be."""
    exported, out_tree = saved
    try:
        data = pickle.dumps((FORMAT, bytes(exported.serialize()), out_tree))
    except Exception:  # e.g. a tree node that does not pickle
        return False
    try:
        write_atomically(path, data)
    except OSError:
        return False
    return True
