"""Tools a model may call during a multi-turn episode: a calculator and a Python sandbox.

    calc = get_tool("calculator")
    calc("123456789*987654321")           # ToolResult(text='121932631112635269', error=False)
    calc("2**0.5")                        # ToolResult(text='1.41421356237', error=False)
    calc("__import__('os')")              # ToolResult(text='error: function calls are not allowed', error=True)

    py = get_tool("python", timeout_s=2.0, memory_mb=256)
    py("print(sum(range(10)))")           # ToolResult(text='45\\n', error=False)
    run_many(py, ["print(1)", "1/0"], max_workers=4)   # results in the order of the arguments

A tool is called with one string (an expression, a program) and returns a `ToolResult`: the text the
environment shows the model, and whether the call failed. A tool never raises on what the model wrote: a
bad argument is an error result whose text starts with "error: " and says why, so the model can read it
and try again.

`Calculator` evaluates arithmetic with the `ast` module, exactly (integers and decimals as fractions), and
refuses everything that is not a number, an operator or parentheses. Limits on the expression's length,
the exponents and the digits of every intermediate value keep `9**9**9` from running for hours.

`PythonSandbox` runs a program in a separate interpreter (`sys.executable -I`) started by a small wrapper
that, before running the program:

* sets resource limits: CPU seconds (`cpu_s`), address space (`memory_mb`), size of any file written
  (`file_mb`, which also bounds the captured output), no core files;
* installs an audit hook (`sys.addaudithook`) that refuses network use (every `socket.*` event),
  starting processes (`subprocess.Popen`, `os.system`, `os.exec*`, `os.spawn*`, `os.posix_spawn`,
  `os.fork*`, `pty.spawn`), signalling other processes (`os.kill`), `ctypes` (beyond the `import ctypes`
  that numpy does), raising resource limits,
  opening a file for writing anywhere but its own directory, and reading a file anywhere but its own
  directory and the interpreter's library directories (so `import math, json, numpy` work).

The program runs with an empty environment (only thread-count variables set to 1) in a fresh temporary
directory, removed afterwards; the parent kills the whole process group when the wall-clock limit
(`timeout_s`) passes. Its result is the captured stdout, followed on failure by "error: " and the last line
of stderr (the exception), truncated to `max_output_chars`.

The audit hook guards against accidents (a model that writes `open('/etc/passwd')` or `requests.get`),
not against hostile code: Python code can get around an in-process hook (e.g. through memory corruption
or by reaching interpreter internals). Code from an adversary needs an OS boundary around the process as
well: a container or VM with no network, seccomp filters, or a jail such as nsjail or gVisor, running as
an unprivileged user on a read-only file system.

Layering: imports only `jaxrl_llm.errors` and the standard library.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import decimal
import difflib
import fractions
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from jaxrl_llm.errors import ConfigError

TRUNCATION_MARK = " ...[truncated]"


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a tool call gives back: `text` for the model to read, `error` True when the call failed."""

    text: str
    error: bool = False


@runtime_checkable
class Tool(Protocol):
    """A tool: called with one string argument, it returns a `ToolResult` and never raises on bad input.

    name: what the model writes to call it (`<calculator>...</calculator>`).
    description: one sentence for the system prompt: what it does and what the argument is.
    parameter: the name of the argument in the JSON call format ({"expression": "12*34"}).
    """

    name: str
    description: str
    parameter: str

    def __call__(self, argument: str) -> ToolResult: ...


def truncate(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters, ending in TRUNCATION_MARK when it was cut."""
    if len(text) <= max_chars:
        return text
    if max_chars <= len(TRUNCATION_MARK):
        return text[:max_chars]
    return text[:max_chars - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _error(why: str) -> ToolResult:
    return ToolResult(f"error: {why}", True)


def _check_positive(owner: str, knob: str, value: Any, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise ValueError(f"{owner}: {knob}={value!r} must be a positive {'integer' if integer else 'number'}")


# ----------------------------------------------------------------------------- calculator

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if isinstance(a, float) else fractions.Fraction(a) / b,  # int / int stays exact
    ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**", ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
           ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}


class _Refused(Exception):
    """An expression the calculator does not evaluate; the message says why."""


@dataclasses.dataclass(frozen=True)
class Calculator:
    """Exact arithmetic on integers and decimals: + - * / // % **, unary minus, parentheses.

    max_length: the longest expression accepted, in characters.
    max_exponent: the largest |exponent| of `**`.
    max_digits: the most decimal digits any value (intermediate or final; numerator and denominator of a
        fraction) may have.
    precision: significant digits of a result that is not an integer (1/3 -> 0.333333333333).

    Numbers are exact (decimals become fractions: 0.1 + 0.2 is 0.3); an integer result is written exactly
    (`str(int)`), any other rounded to `precision` significant digits. A fractional power (2**0.5) is
    computed in floating point. A trailing "=" is ignored ("12*34=").
    """

    max_length: int = 200
    max_exponent: int = 10_000
    max_digits: int = 1000
    precision: int = 12
    name: str = "calculator"
    description: str = ("evaluates an arithmetic expression exactly: numbers, + - * / // % ** and "
                        "parentheses, e.g. (12+3)*4.5")
    parameter: str = "expression"

    def __post_init__(self):
        for knob in ("max_length", "max_exponent", "max_digits", "precision"):
            _check_positive("calculator", knob, getattr(self, knob), integer=True)

    def __call__(self, argument: str) -> ToolResult:
        if not isinstance(argument, str):
            return _error(f"the expression must be text, not {type(argument).__name__}")
        text = argument.strip()
        if text.endswith("="):
            text = text[:-1].strip()
        if not text:
            return _error("empty expression")
        if len(text) > self.max_length:
            return _error(f"expression too long ({len(text)} characters; at most {self.max_length})")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as e:
            return _error(f"not an arithmetic expression ({e.msg})")
        except (ValueError, RecursionError, MemoryError) as e:
            return _error(f"not an arithmetic expression ({type(e).__name__})")
        try:
            return ToolResult(self._format(self._eval(tree.body)), False)
        except _Refused as e:
            return _error(str(e))
        except ZeroDivisionError:
            return _error("division by zero")
        except OverflowError:
            return _error(f"result too large (more than {self.max_digits} digits)")
        except (RecursionError, MemoryError, ValueError, TypeError, ArithmeticError) as e:
            return _error(f"cannot evaluate ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------ evaluation

    def _eval(self, node: ast.AST):
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Refused(f"only numbers are allowed, not {v!r}")
            if isinstance(v, float):
                if not math.isfinite(v):
                    raise _Refused(f"number too large ({self.max_digits} digits at most)")
                v = fractions.Fraction(repr(v))
            return self._checked(v)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self._eval(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self._checked(_BINARY[type(node.op)](self._eval(node.left), self._eval(node.right)))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return self._power(self._eval(node.left), self._eval(node.right))
        if isinstance(node, ast.Name):
            raise _Refused(f"names are not allowed ({node.id!r}); write the numbers themselves")
        if isinstance(node, ast.Call):
            raise _Refused("function calls are not allowed")
        if isinstance(node, ast.Attribute):
            raise _Refused("attributes are not allowed")
        op = getattr(node, "op", None)
        if op is not None and type(op) in _SYMBOL:
            raise _Refused(f"operator {_SYMBOL[type(op)]!r} is not supported; use + - * / // % **")
        raise _Refused(f"unsupported syntax ({type(node).__name__}); use numbers, + - * / // % ** and parentheses")

    def _power(self, base, exponent):
        if isinstance(exponent, fractions.Fraction) and exponent.denominator == 1:
            exponent = int(exponent)
        if isinstance(exponent, int):
            if abs(exponent) > self.max_exponent:
                raise _Refused(f"exponent {exponent} too large (at most {self.max_exponent})")
            if isinstance(base, (int, fractions.Fraction)):
                b = fractions.Fraction(base)
                bits = max(abs(b.numerator).bit_length(), b.denominator.bit_length())
                # the result's numerator or denominator has about bits * |exponent| bits: refuse before computing
                if (bits - 1) * abs(exponent) > self.max_digits * math.log2(10) + 1:
                    raise _Refused(f"result too large (more than {self.max_digits} digits)")
            return self._checked(base ** exponent)
        value = float(base) ** float(exponent)  # a fractional power: floating point
        if isinstance(value, complex):
            raise _Refused("the result is not a real number (a negative number to a fractional power)")
        return self._checked(value)

    def _checked(self, v):
        """`v` (int, Fraction or float), after checking it has at most max_digits digits."""
        if isinstance(v, float):
            if not math.isfinite(v):
                raise _Refused(f"result too large (more than {self.max_digits} digits)")
            if abs(v) >= 10.0 ** min(self.max_digits, 308):
                raise _Refused(f"result too large (more than {self.max_digits} digits)")
            return v
        if isinstance(v, fractions.Fraction) and v.denominator == 1:
            v = int(v)
        limit_bits = self.max_digits * math.log2(10) + 1
        if isinstance(v, int):
            if abs(v).bit_length() > limit_bits or len(str(abs(v))) > self.max_digits:
                raise _Refused(f"result too large (more than {self.max_digits} digits)")
            return v
        if max(abs(v.numerator).bit_length(), v.denominator.bit_length()) > limit_bits:
            raise _Refused(f"a value needs more than {self.max_digits} digits")
        return v

    def _format(self, v) -> str:
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return _plain(format(v, f".{self.precision}g"))
        with decimal.localcontext() as ctx:
            ctx.prec = self.precision
            d = decimal.Decimal(v.numerator) / decimal.Decimal(v.denominator)
            return _plain(format(d, f".{self.precision}g"))


def _plain(text: str) -> str:
    """'1.50000' -> '1.5', '-0' -> '0'; exponent forms ('1.2e-07') are kept."""
    if "e" not in text.lower() and "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# ----------------------------------------------------------------------------- Python sandbox

# Runs in the child: `python -I -B -X utf8 -c _WRAPPER <work dir> <cpu s> <memory bytes> <file bytes>`; the
# program comes on stdin. Everything it needs is imported before the audit hook is installed.
_WRAPPER = r'''
import os, resource, signal, sys, types

def _sandbox():
    def limit(kind, soft, hard=None):
        hard = soft if hard is None else hard
        now = resource.getrlimit(kind)[1]
        if now != resource.RLIM_INFINITY:
            soft, hard = min(soft, now), min(hard, now)
        resource.setrlimit(kind, (soft, hard))

    work = os.path.realpath(sys.argv[1])
    cpu, mem, fsize = (int(a) for a in sys.argv[2:5])
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)   # SIGXCPU at the soft limit
    limit(resource.RLIMIT_AS, mem)
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past file_mb fails with an OSError instead
    code = sys.stdin.read()
    sys.stdin.close()
    sys.stdin = open(os.devnull)

    roots = []
    for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.__file__)] + sys.path:
        if isinstance(p, str) and os.path.isabs(p):
            p = os.path.realpath(p)
            if p != os.path.dirname(p) and p not in roots:   # never the file system's root
                roots.append(p)
    roots = tuple(roots) + (work,)
    writable = (work,)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
               "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.", "ctypes.", "resource.setrlimit",
               "resource.prlimit", "sys.remote_exec", "webbrowser.")
    writes = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
              "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
              "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,),
              "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
    reads = {"os.listdir": (0,), "os.scandir": (0,), "glob.glob": (0,), "os.getxattr": (0,),
             "os.listxattr": (0,)}
    realpath, join, getcwd, fsdecode, sep = os.path.realpath, os.path.join, os.getcwd, os.fsdecode, os.sep
    busy = []

    def inside(path, where):
        if isinstance(path, int):      # an already open file descriptor
            return True
        try:
            p = realpath(join(getcwd(), fsdecode("." if path is None else path)))
        except Exception:
            return False
        return any(p == r or p.startswith(r + sep) for r in where)

    def hook(event, args):
        if busy:                       # the checks' own calls
            return
        busy.append(1)
        try:
            if event == "ctypes.dlopen" and args and args[0] is None:
                return                 # `import ctypes` opens the interpreter itself (numpy imports ctypes)
            if event.startswith(blocked):
                raise PermissionError(f"sandbox: {event} is not allowed (no network, no new processes, no ctypes)")
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                write = bool((flags or 0) & write_flags) or any(c in (mode or "") for c in "wax+")
                if not inside(path, writable if write else roots):
                    raise PermissionError(f"sandbox: cannot {'write' if write else 'read'} {path!r}; only files "
                                          "in the working directory can be used")
            elif event in writes or event in reads:
                for i in writes.get(event) or reads[event]:
                    if i < len(args) and not inside(args[i], writable if event in writes else roots):
                        raise PermissionError(f"sandbox: {event} on {args[i]!r} is not allowed; only the "
                                              "working directory can be used")
        finally:
            busy.pop()

    main = types.ModuleType("__main__")
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    compiled = compile(code, "<program>", "exec")
    sys.addaudithook(hook)
    return compiled, main.__dict__

_program, _globals = _sandbox()
del _sandbox
exec(_program, _globals)
'''

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class PythonSandbox:
    """Runs a Python program in a separate, limited interpreter; its result is what it printed.

    timeout_s: wall-clock limit; past it the process group is killed ("error: timed out ...").
    cpu_s: CPU-time limit (RLIMIT_CPU); None: timeout_s rounded up.
    memory_mb: address-space limit (RLIMIT_AS); an allocation past it raises MemoryError.
    file_mb: the largest file the program may write (RLIMIT_FSIZE), its captured output included.
    max_output_chars: the result text is truncated to this.
    python: the interpreter to run (default: this one, `sys.executable`).

    See the module docstring for what the audit hook refuses and why it is not a security boundary.
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 512
    file_mb: int = 16
    max_output_chars: int = 2000
    python: str = sys.executable
    name: str = "python"
    description: str = ("runs a Python program (no network, no files outside its working directory) and "
                        "returns what it prints; use print() to see a value")
    parameter: str = "code"

    def __post_init__(self):
        _check_positive("python sandbox", "timeout_s", self.timeout_s)
        if self.cpu_s is not None:
            _check_positive("python sandbox", "cpu_s", self.cpu_s, integer=True)
        for knob in ("memory_mb", "file_mb", "max_output_chars"):
            _check_positive("python sandbox", knob, getattr(self, knob), integer=True)
        if not isinstance(self.python, str) or not os.path.isfile(self.python):
            raise ValueError(f"python sandbox: python={self.python!r} is not an interpreter file; give the path "
                             "of a python executable (default sys.executable)")

    def __call__(self, argument: str) -> ToolResult:
        if not isinstance(argument, str):
            return _error(f"the program must be text, not {type(argument).__name__}")
        root = tempfile.mkdtemp(prefix="jaxrl_llm_sandbox_")
        try:
            return self._run(argument, root)
        except OSError as e:  # could not start the interpreter, or the disk is full: the call failed
            return _error(f"the sandbox could not run the program ({type(e).__name__}: {e})")
        finally:
            _remove_tree(root)

    def _run(self, code: str, root: str) -> ToolResult:
        work = os.path.join(root, "work")
        os.mkdir(work)
        cpu = self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))
        limits = [str(cpu), str(self.memory_mb * 2**20), str(self.file_mb * 2**20)]
        env = {k: "1" for k in _THREAD_VARS}
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([self.python, "-I", "-B", "-X", "utf8", "-c", _WRAPPER, work, *limits],
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.communicate(code.encode("utf-8", "replace"), timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
                proc.wait()
        stdout = _read_head(out_path, 4 * self.max_output_chars + 64)
        if timed_out:
            why = f"timed out after {self.timeout_s:g} s"
        elif proc.returncode == 0:
            return ToolResult(truncate(stdout, self.max_output_chars), False)
        elif proc.returncode == -signal.SIGXCPU:
            why = f"CPU time limit of {cpu} s exceeded"
        elif proc.returncode < 0:
            why = f"killed by signal {signal.Signals(-proc.returncode).name} (a CPU or memory limit)"
        else:
            why = _last_line(err_path) or f"exit status {proc.returncode}"
        tail = ("\n" if stdout and not stdout.endswith("\n") else "") + f"error: {why}"
        room = self.max_output_chars - len(tail)  # cut the output, not the reason
        text = truncate(stdout, room) + tail if room > 0 else truncate(tail.lstrip("\n"), self.max_output_chars)
        return ToolResult(text, True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_head(path: str, max_bytes: int) -> str:
    with open(path, "rb") as f:
        return f.read(max_bytes).decode("utf-8", "replace")


def _last_line(path: str) -> str:
    """The last non-empty line of the file (its last 4 KiB), e.g. the exception of a traceback."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    return next((ln for ln in reversed(lines) if ln), "")


def _remove_tree(path: str) -> None:
    """Removes the directory even where the program took away its own permissions."""
    def make_writable(func, p, exc_info):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=make_writable)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- registry, many calls

_TOOLS: dict[str, Callable[..., Tool]] = {"calculator": Calculator, "python": PythonSandbox}


def register_tool(name: str):
    """Decorator: make a tool factory (usually its class) available to `get_tool(name, **kwargs)`."""
    def deco(factory):
        if name in _TOOLS:
            raise ValueError(f"tool {name!r} is registered twice")
        _TOOLS[name] = factory
        return factory
    return deco


def get_tool(name: str, **kwargs) -> Tool:
    """Builds a registered tool ('calculator', 'python'); an unknown name is a ConfigError naming the nearest."""
    if name not in _TOOLS:
        near = difflib.get_close_matches(str(name), _TOOLS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown tool {name!r}.{hint} Registered: {', '.join(sorted(_TOOLS))} "
                       "(add one with @register_tool)")
    return _TOOLS[name](**kwargs)


def registered_tools() -> list[str]:
    return sorted(_TOOLS)


def run_many(tool: Callable[[Any], ToolResult], arguments: Sequence[Any], max_workers: int = 4) -> list[ToolResult]:
    """`tool(a)` for every argument, up to `max_workers` at a time in threads; results in argument order.

    tool: a `Tool` (arguments are strings), or any callable returning a `ToolResult` (ToolEnv passes one
    that dispatches parsed calls to their tools).

    Each sandbox call is its own process, so threads run them in parallel. A tool that raises (it should
    not) gives an error result for that call instead of failing the batch.
    """
    _check_positive("run_many", "max_workers", max_workers, integer=True)

    def call(argument: str) -> ToolResult:
        try:
            return tool(argument)
        except Exception as e:  # a tool's bug must not lose the other calls' results
            return _error(f"the tool failed ({type(e).__name__}: {e})")

    if max_workers == 1 or len(arguments) <= 1:
        return [call(a) for a in arguments]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(arguments))) as pool:
        return list(pool.map(call, arguments))


__all__ = ["Calculator", "PythonSandbox", "TRUNCATION_MARK", "Tool", "ToolResult", "get_tool", "register_tool",
           "registered_tools", "run_many", "truncate"]
